"""Test LoRAs of every module kind and key convention, with random factors and decaying spectra.

References here are written straight from the formulas (float64), independently of lens_ops, so a
wrong ΔW in the engine cannot agree with them by construction.
"""
from __future__ import annotations

import math

import torch

from lens_ops.synth import spectrum_factors


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pair(out_f, in_f, rank, g, eff=3.0):
    up, down = spectrum_factors(out_f, in_f, rank, g, eff_rank=eff, decay=0.5, magnitude=0.01)
    return up, down


# ------------------------------------------------------------------ module kinds: suffix -> tensor
def kind_tensors(kind: str, g, dtype=torch.float32):
    """(tensors by suffix, float64 dense reference ΔW at strength 1)."""
    r = 4
    if kind == "lora":
        up, down = pair(24, 16, r, g)
        t = {".lora_up.weight": up, ".lora_down.weight": down, ".alpha": torch.tensor(2.0)}
        ref = (2.0 / r) * up.double() @ down.double()
    elif kind == "lora_noalpha":
        up, down = pair(24, 16, r, g)
        t = {".lora_B.weight": up, ".lora_A.weight": down}
        ref = up.double() @ down.double()
    elif kind == "locon3x3":
        up, down = pair(8, 6 * 9, r, g)
        t = {".lora_up.weight": up.reshape(8, r, 1, 1), ".lora_down.weight": down.reshape(r, 6, 3, 3),
             ".alpha": torch.tensor(1.0)}
        ref = ((1.0 / r) * up.double() @ down.double()).reshape(8, 6, 3, 3)
    elif kind == "tucker":
        up = torch.randn(8, r, 1, 1, generator=g)
        down = torch.randn(r, 6, 1, 1, generator=g)
        mid = torch.randn(r, r, 3, 3, generator=g)
        t = {".lora_up.weight": up, ".lora_down.weight": down, ".lora_mid.weight": mid, ".alpha": torch.tensor(3.0)}
        # ΔW[o,i,h,w] = Σ_ab up[o,a] mid[a,b,h,w] down[b,i]
        ref = (3.0 / r) * torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0].double(), mid.double(),
                                        down[:, :, 0, 0].double())
    elif kind == "dora":
        up, down = pair(24, 16, r, g)
        t = {".lora_up.weight": up, ".lora_down.weight": down, ".alpha": torch.tensor(4.0),
             ".dora_scale": torch.rand(24, 1, generator=g) + 0.5}
        ref = up.double() @ down.double()
    elif kind == "loha":
        a1, b1, a2, b2 = (torch.randn(s, generator=g) * 0.1 for s in [(24, r), (r, 16), (24, r), (r, 16)])
        t = {".hada_w1_a": a1, ".hada_w1_b": b1, ".hada_w2_a": a2, ".hada_w2_b": b2, ".alpha": torch.tensor(2.0)}
        ref = (2.0 / r) * ((a1.double() @ b1.double()) * (a2.double() @ b2.double()))
    elif kind == "loha_cp":
        t1, t2 = torch.randn(r, r, 3, 3, generator=g), torch.randn(r, r, 3, 3, generator=g)
        a1, b1, a2, b2 = (torch.randn(s, generator=g) * 0.1 for s in [(r, 8), (r, 6), (r, 8), (r, 6)])
        t = {".hada_w1_a": a1, ".hada_w1_b": b1, ".hada_w2_a": a2, ".hada_w2_b": b2, ".hada_t1": t1,
             ".hada_t2": t2, ".alpha": torch.tensor(2.0)}
        m1 = torch.einsum("ijkl,jr,ip->prkl", t1.double(), b1.double(), a1.double())
        m2 = torch.einsum("ijkl,jr,ip->prkl", t2.double(), b2.double(), a2.double())
        ref = (2.0 / r) * m1 * m2
    elif kind == "lokr":
        w1 = torch.randn(4, 2, generator=g)
        w2a, w2b = torch.randn(6, r, generator=g), torch.randn(r, 8, generator=g)
        t = {".lokr_w1": w1, ".lokr_w2_a": w2a, ".lokr_w2_b": w2b, ".alpha": torch.tensor(2.0)}
        ref = (2.0 / r) * torch.kron(w1.double(), w2a.double() @ w2b.double())
    elif kind == "lokr_full":
        w1, w2 = torch.randn(4, 2, generator=g), torch.randn(6, 8, generator=g)
        t = {".lokr_w1": w1, ".lokr_w2": w2, ".alpha": torch.tensor(7.0)}
        ref = torch.kron(w1.double(), w2.double())  # no decomposed side: scale 1 (ComfyUI)
    elif kind == "lokr_ab":
        w1a, w1b = torch.randn(4, 2, generator=g), torch.randn(2, 2, generator=g)
        w2a, w2b = torch.randn(6, r, generator=g), torch.randn(r, 8, generator=g)
        t = {".lokr_w1_a": w1a, ".lokr_w1_b": w1b, ".lokr_w2_a": w2a, ".lokr_w2_b": w2b, ".alpha": torch.tensor(2.0)}
        ref = (2.0 / r) * torch.kron(w1a.double() @ w1b.double(), w2a.double() @ w2b.double())
    elif kind == "diff":
        d = torch.randn(24, 16, generator=g) * 0.01
        t = {".diff": d, ".diff_b": torch.randn(24, generator=g) * 0.01}
        ref = d.double()
    elif kind == "norm":
        t = {".w_norm": torch.randn(24, generator=g), ".b_norm": torch.randn(24, generator=g)}
        ref = t[".w_norm"].double()
    elif kind == "set":
        t = {".set_weight": torch.randn(24, generator=g)}
        ref = None
    elif kind == "glora":
        t = {".a1.weight": torch.randn(r, 16, generator=g), ".a2.weight": torch.randn(24, r, generator=g),
             ".b1.weight": torch.randn(r, 16, generator=g), ".b2.weight": torch.randn(24, r, generator=g)}
        ref = None
    elif kind == "oft":
        t = {".oft_blocks": torch.randn(4, 6, 6, generator=g), ".alpha": torch.tensor(1e-3)}
        ref = None
    elif kind == "boft":
        t = {".oft_blocks": torch.randn(2, 4, 6, 6, generator=g), ".rescale": torch.ones(24, 1)}
        ref = None
    else:
        raise ValueError(kind)
    return {k: v.to(dtype) for k, v in t.items()}, ref


KINDS = ["lora", "lora_noalpha", "locon3x3", "tucker", "dora", "loha", "loha_cp", "lokr", "lokr_full",
         "lokr_ab", "diff", "norm", "set", "glora", "oft", "boft"]
EXPECTED_KIND = {"lora": "lora", "lora_noalpha": "lora", "locon3x3": "lora", "tucker": "lora", "dora": "lora",
                 "loha": "loha", "loha_cp": "loha", "lokr": "lokr", "lokr_full": "lokr", "lokr_ab": "lokr",
                 "diff": "diff", "norm": "norm", "set": "set", "glora": "glora", "oft": "oft", "boft": "boft"}


# ------------------------------------------------------------------ key conventions for a plain LoRA
# name -> (module base name, up suffix, down suffix, has alpha)
CONVENTIONS = {
    "kohya_unet": ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", ".lora_up.weight", ".lora_down.weight", True),
    "kohya_te": ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", ".lora_up.weight", ".lora_down.weight", True),
    "kohya_te1": ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", ".lora_up.weight", ".lora_down.weight", True),
    "kohya_te2": ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", ".lora_up.weight", ".lora_down.weight", True),
    "kohya_te3": ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", ".lora_up.weight", ".lora_down.weight", True),
    "peft_transformer": ("transformer.transformer_blocks.0.attn.to_q", ".lora_B.weight", ".lora_A.weight", False),
    "peft_default": ("transformer_blocks.0.attn.to_q", ".lora_B.default.weight", ".lora_A.default.weight", False),
    "peft_unet": ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", ".lora_B.weight", ".lora_A.weight", False),
    "peft_text_encoder": ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", ".lora_B.weight", ".lora_A.weight", False),
    "diffusers_processor": ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q", "_lora.up.weight", "_lora.down.weight", False),
    "diffusers_lora_dot": ("unet.mid_block.attentions.0.proj_in", ".lora.up.weight", ".lora.down.weight", False),
    "diffusers_linear_layer": ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", False),
    "diffusion_model": ("diffusion_model.double_blocks.0.img_attn.qkv", ".lora_up.weight", ".lora_down.weight", True),
    "base_model_model": ("base_model.model.transformer_blocks.0.attn.to_q", ".lora_B.weight", ".lora_A.weight", False),
    "lycoris_prefix": ("lycoris_transformer_blocks_0_attn_to_q", ".lora_up.weight", ".lora_down.weight", True),
    "onetrainer": ("lora_transformer_transformer_blocks_0_attn_to_q", ".lora_up.weight", ".lora_down.weight", True),
    "xlabs": ("double_blocks.0.processor.qkv_lora1", ".up.weight", ".down.weight", False),
    "mochi": ("blocks.0.attn.qkv_x", ".lora_B", ".lora_A", False),
}
EXPECTED_COMPONENT = {"kohya_te": "te1", "kohya_te1": "te1", "kohya_te2": "te2", "kohya_te3": "te3",
                      "peft_text_encoder": "te1", "diffusers_linear_layer": "te1"}


def convention_lora(conv: str, g, n_modules=3, rank=4, dtype=torch.float16):
    """A small LoRA in one convention: n modules (numbered copies of the base name)."""
    base, up_s, down_s, has_alpha = CONVENTIONS[conv]
    sd = {}
    for i in range(n_modules):
        name = base.replace("0", str(i), 1)
        up, down = pair(32, 16, rank, g)
        sd[name + down_s] = down.to(dtype)
        sd[name + up_s] = up.to(dtype)
        if has_alpha:
            sd[name + ".alpha"] = torch.tensor(rank / 2).to(dtype)
    return sd


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def mismatched_shape_pair() -> tuple[dict, dict]:
    """Two kohya LoRAs (0.01-scaled random factors) that name one layer with two different weight shapes (a 24×16
    linear vs an 8×6×3×3 conv) and share another, same-shaped layer: blending or scanning them must refuse with a
    sentence, not crash inside the maths."""
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    other = "lora_unet_mid_block_attentions_0_proj_out"
    a = {name + ".lora_up.weight": torch.randn(24, 4, generator=g), name + ".lora_down.weight": torch.randn(4, 16, generator=g),
         other + ".lora_up.weight": torch.randn(24, 4, generator=g), other + ".lora_down.weight": torch.randn(4, 16, generator=g)}
    b = {name + ".lora_up.weight": torch.randn(8, 4, 1, 1, generator=g),
         name + ".lora_down.weight": torch.randn(4, 6, 3, 3, generator=g),
         other + ".lora_up.weight": torch.randn(24, 4, generator=g), other + ".lora_down.weight": torch.randn(4, 16, generator=g)}
    return {k: 0.01 * v for k, v in a.items()}, {k: 0.01 * v for k, v in b.items()}
