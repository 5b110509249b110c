"""Blends across block vocabularies, checked with ComfyUI's own LoRA key mapping and patching (in process).

ComfyUI's `model_lora_keys_unet` maps both vocabularies onto the model's weights (SGM and diffusers UNet names of
SD 1.5; BFL and diffusers FLUX names, the split to_q/to_k/to_v as row offsets into the fused qkv weight). A
stand-in model object gives it the weight names and the architecture config it reads; `load_lora` +
`calculate_weight` then apply the blend, and separately both inputs stacked at w1, w2: the patched weights agree
within float rounding, whichever LoRA comes first."""

import pytest
import torch

from lens_ops import LoRAModel
from lens_ops.blend import blend
from lens_ops.synth import make_lora
from comfy_stand_in import stand_in_model
from test_crossnames import BFL, PARTS, SD15_PICK, SD15_UP_ATTN, renamed, to_sgm

# SD 1.5's UNet block layout as ComfyUI's model detection reports it (the input of its own unet_to_diffusers)
SD15_CONFIG = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
               "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
               "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
FLUX_CONFIG = {"depth": 19, "depth_single_blocks": 38, "hidden_size": 3072}


def _apply(comfy, loras, strengths, key_map, base):
    """ComfyUI's load_lora + calculate_weight, as ModelPatcher.add_patches queues them (offsets included)."""
    queued = {k: [] for k in base}
    loaded = []
    for sd, s in zip(loras, strengths):
        patches = comfy.lora.load_lora(dict(sd), key_map, log_missing=False)
        loaded.append(len(patches))
        for pk, v in patches.items():
            key, offset, fn = (pk, None, None) if isinstance(pk, str) else (pk[0], pk[1], pk[2] if len(pk) > 2 else None)
            queued[key].append((s, v, 1.0, offset, fn))
    return {k: comfy.lora.calculate_weight(queued[k], base[k].clone().float(), k) for k in base}, loaded


def _compare(stacked, applied, base, tol):
    for key in base:
        d_stack, d_blend = stacked[key] - base[key], applied[key] - base[key]
        assert float(d_stack.norm()) > 0
        assert float((d_blend - d_stack).norm() / d_stack.norm()) < tol, key


@pytest.mark.parametrize("first", ["diffusers", "sgm"])
def test_sd15_sgm_and_diffusers_blend_applies_like_stacking(comfy_inproc, first):
    comfy = comfy_inproc.comfy
    import comfy.model_base
    unet = lambda n: bool(SD15_PICK.match(n)) and n.startswith("lora_unet_")
    sd_dif = make_lora("sd15_kohya_locon", rank=4, seed=21, dtype=torch.float32, name_filter=unet)
    sd_sgm = renamed(make_lora("sd15_kohya_locon", rank=6, seed=22, dtype=torch.float32, alpha=2.0, name_filter=unet),
                     lambda n: to_sgm(n, SD15_UP_ATTN), mix_with=None)
    dif = LoRAModel.from_state_dict(sd_dif)
    base = [m.name for m in dif.modules]
    # ComfyUI needs the model's real dotted weight names: take them from its own diffusers map
    diff_map = comfy.utils.unet_to_diffusers(SD15_CONFIG)
    weights = {"diffusion_model." + v: None for k, v in diff_map.items() if k.endswith(".weight")}
    key_map = comfy.lora.model_lora_keys_unet(stand_in_model(comfy.model_base.BaseModel, weights, SD15_CONFIG), {})
    targets = {key_map[n] for n in base}
    assert all(key_map.get(to_sgm(n, SD15_UP_ATTN)) == key_map[n] for n in base)   # ComfyUI loads both spellings
    g = torch.Generator().manual_seed(1)
    shapes = {key_map[m.name]: m.weight_shape() for m in dif.modules}
    base_w = {t: 1e-3 * torch.randn(shapes[t], generator=g) for t in targets}
    loras = [sd_dif, sd_sgm] if first == "diffusers" else [sd_sgm, sd_dif]
    w = [0.75, -0.5]
    stacked, loaded = _apply(comfy, loras, w, key_map, base_w)
    assert loaded == [len(targets), len(targets)]
    out, rep = blend([LoRAModel.from_state_dict(x) for x in loras], w, "concat")
    assert rep["modules"]["blended"] == len(targets) and not rep["warnings"]
    first_names = {m.name for m in LoRAModel.from_state_dict(loras[0]).modules}
    assert {m.name for m in out.modules} == first_names
    applied, loaded = _apply(comfy, [out.state_dict()], [1.0], key_map, base_w)
    assert loaded == [len(targets)]
    _compare(stacked, applied, base_w, 1e-5)


@pytest.mark.parametrize("first", ["bfl", "diffusers"])
def test_flux_fused_and_split_blend_applies_like_stacking(comfy_inproc, first):
    comfy = comfy_inproc.comfy
    import comfy.model_base
    keep_bfl = BFL[:3]                                   # img qkv, txt qkv (partly covered), img proj
    keep_dif = [p for p, (src, _, _) in PARTS.items() if src in keep_bfl]
    sd_bfl = make_lora("flux_kohya", rank=4, seed=31, dtype=torch.float32, name_filter=lambda n: n in keep_bfl)
    sd_dif = make_lora("flux_aitoolkit_peft", rank=3, seed=32, dtype=torch.float32,
                       name_filter=lambda n: n in keep_dif)
    names = {n: "diffusion_model.double_blocks.0." + n.split("double_blocks_0_")[1].replace("_attn_", "_attn.")
             + ".weight" for n in keep_bfl}
    bfl = LoRAModel.from_state_dict(sd_bfl)
    g = torch.Generator().manual_seed(2)
    base_w = {names[m.name]: 1e-3 * torch.randn(m.weight_shape(), generator=g) for m in bfl.modules}
    key_map = comfy.lora.model_lora_keys_unet(stand_in_model(comfy.model_base.Flux, base_w, FLUX_CONFIG), {})
    assert all(key_map[n] == names[n] for n in keep_bfl)
    assert all(isinstance(key_map[p], tuple) for p in keep_dif if "to_out" not in p)   # split parts: row offsets
    loras = [sd_bfl, sd_dif] if first == "bfl" else [sd_dif, sd_bfl]
    w = [0.6, 1.1]
    stacked, loaded = _apply(comfy, loras, w, key_map, base_w)
    assert sorted(loaded) == sorted([len(keep_bfl), len(keep_dif)])
    out, rep = blend([LoRAModel.from_state_dict(x) for x in loras], w, "concat")
    out_names = {m.name for m in out.modules}
    if first == "bfl":
        assert out_names == set(keep_bfl)
    else:                                                # split output: the txt qkv's uncovered rows as add_v_proj
        assert out_names == set(keep_dif) | {"transformer.transformer_blocks.0.attn.add_v_proj"}
    applied, loaded = _apply(comfy, [out.state_dict()], [1.0], key_map, base_w)
    assert loaded == [len(out_names)]
    _compare(stacked, applied, base_w, 1e-5)


SD3_CONFIG = {"depth": 24, "num_blocks": 24}    # SD3 medium: hidden size 64·depth = 1536


@pytest.mark.parametrize("first", ["kohya", "diffusers"])
def test_sd3_mmdit_and_diffusers_blend_applies_like_stacking(comfy_inproc, first):
    """ComfyUI maps kohya `lora_unet_joint_blocks_…` names and diffusers `transformer.transformer_blocks.…` names
    (split q/k/v as row offsets into the fused qkv; the last block's context modulation with its halves swapped)
    onto SD3's weights: the blend, written in the first file's vocabulary, patches like both files stacked."""
    comfy = comfy_inproc.comfy
    import comfy.model_base
    from test_crossnames_sd3 import LAST, MMDIT, _out_rows, diffusers_sd3, kohya_sd3
    g = torch.Generator().manual_seed(3)
    base_w = {f"diffusion_model.joint_blocks.{b}.{layer}.weight": 1e-3 * torch.randn(_out_rows(layer, b), generator=g)
              for b in (0, LAST) for layer in MMDIT}
    key_map = comfy.lora.model_lora_keys_unet(stand_in_model(comfy.model_base.SD3, base_w, SD3_CONFIG), {})
    sd_k, sd_d = kohya_sd3(41, dtype=torch.float32), diffusers_sd3(42, dtype=torch.float32)
    assert isinstance(key_map["transformer.transformer_blocks.0.attn.to_q"], tuple)          # a row offset
    assert key_map[f"transformer.transformer_blocks.{LAST}.norm1_context.linear"][2] is not None   # swapped halves
    loras = [sd_k, sd_d] if first == "kohya" else [sd_d, sd_k]
    w = [0.8, -0.6]
    stacked, loaded = _apply(comfy, loras, w, key_map, base_w)
    n_k, n_d = len({k.rsplit(".", 2)[0] for k in sd_k}), len({k.rsplit(".", 2)[0] for k in sd_d})
    assert sorted(loaded) == sorted([n_k, n_d])           # ComfyUI reads every module of both files
    out, rep = blend([LoRAModel.from_state_dict(x) for x in loras], w, "concat")
    assert not rep["warnings"]
    names = {m.name for m in out.modules}
    assert (f"lora_unet_joint_blocks_0_x_block_attn_qkv" in names) == (first == "kohya")
    applied, loaded = _apply(comfy, [out.state_dict()], [1.0], key_map, base_w)
    assert loaded == [len(out.modules)]
    _compare(stacked, applied, base_w, 1e-5)
