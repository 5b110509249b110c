"""Architecture detection from names and shapes, on the real layouts and on crafted DiT key sets."""
import pytest
import torch

from lens_ops import LoRAModel
from lens_ops.synth import make_lora

LAYOUT_ARCH = {"sd15_kohya": "sd1", "sd15_kohya_locon": "sd1", "sdxl_kohya": "sdxl", "sdxl_kohya_locon": "sdxl",
               "sdxl_lycoris_locon": "sdxl", "flux_kohya": "flux1", "flux_kohya_te1": "flux1",
               "flux_aitoolkit_peft": "flux1", "flux_diffusers_peft": "flux1", "flux_diffusers_peft_ext": "flux1"}


@pytest.mark.parametrize("layout", sorted(LAYOUT_ARCH))
def test_layouts(layout):
    model = LoRAModel.from_state_dict(make_lora(layout, rank=2, seed=1))
    assert model.architecture.id == LAYOUT_ARCH[layout]


def lora(names_shapes, fmt="{}.lora_up.weight"):
    sd = {}
    for name, (o, i) in names_shapes.items():
        sd[f"{name}.lora_up.weight"] = torch.randn(o, 2)
        sd[f"{name}.lora_down.weight"] = torch.randn(2, i)
    return LoRAModel.from_state_dict(sd)


CRAFTED = {
    "sd2": {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 1024)},
    "sd3": {"lora_unet_joint_blocks_0_x_block_attn_qkv": (4608, 1536)},
    "sd3_diffusers": {"transformer.transformer_blocks.0.attn.add_q_proj": (1536, 1536),
                      "transformer.transformer_blocks.0.attn.to_q": (1536, 1536)},
    "flux_double_only": {"transformer.transformer_blocks.0.attn.add_q_proj": (3072, 3072),
                         "transformer.transformer_blocks.0.attn.to_q": (3072, 3072)},
    "qwen_image": {"transformer_blocks.0.img_mlp.net.0.proj": (12288, 3072),
                   "transformer_blocks.0.attn.to_q": (3072, 3072)},
    "wan": {"diffusion_model.blocks.0.self_attn.q": (5120, 5120), "diffusion_model.blocks.0.cross_attn.k": (5120, 5120)},
    "wan_kohya": {"lora_unet_blocks_0_self_attn_q": (1536, 1536), "lora_unet_blocks_0_ffn_0": (8960, 1536)},
    "hunyuan_video": {"transformer.double_blocks.19.img_attn_qkv": (9216, 3072),
                      "transformer.single_blocks.39.linear1": (21504, 3072)},
    "z_image": {"diffusion_model.layers.0.attention.to_q": (3840, 3840),
                "diffusion_model.layers.0.feed_forward.w1": (10240, 3840)},
    "lumina2": {"diffusion_model.layers.0.attention.qkv": (6912, 2304),
                "diffusion_model.noise_refiner.0.feed_forward.w1": (6144, 2304)},
    "unknown": {"some.random.layer": (8, 8)},
}
EXPECT = {"sd3_diffusers": "sd3", "flux_double_only": "flux1", "wan_kohya": "wan"}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted(case):
    assert lora(CRAFTED[case]).architecture.id == EXPECT.get(case, case)


def test_metadata_fallback():
    sd = {"a.lora_up.weight": torch.randn(4, 2), "a.lora_down.weight": torch.randn(2, 4)}
    m = LoRAModel.from_state_dict(sd, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert m.architecture.id == "sdxl"
