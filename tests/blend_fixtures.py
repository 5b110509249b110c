"""Small LoRA pairs for the conflict/blend tests: related factors (shared directions, opposite signs),
decaying spectra, in several key conventions. Dense float64 references are built from the raw tensors."""
from __future__ import annotations

import torch

from lora_factory import gen, pair

# (kohya name, PEFT/diffusers name, out, in)
SD15_LAYERS = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 40, 40),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 40, 768),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
     "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2", 48, 96),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0",
     "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0", 40, 40),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 32, 32),
]


def related_factors(out_f, in_f, r1, r2, seed, relation="mixed"):
    """(up1, down1, up2, down2): the second shares part of the first's directions (along or against)."""
    g = gen(seed)
    up1, down1 = pair(out_f, in_f, r1, g)
    up2, down2 = pair(out_f, in_f, r2, g)
    k = min(r1, r2) // 2
    if relation in ("mixed", "along", "against") and k:
        sign = {"mixed": (-1.0 if seed % 2 else 1.0), "along": 1.0, "against": -1.0}[relation]
        up2[:, :k] = sign * 0.8 * up1[:, :k] + 0.2 * up2[:, :k]
        down2[:k] = down1[:k]
    return up1, down1, up2, down2


def kohya(layers, factors, alpha_frac=0.5, dtype=torch.float32):
    sd = {}
    for (name, _, _, _), (up, down) in zip(layers, factors):
        r = down.shape[0]
        sd[name + ".alpha"] = torch.tensor(r * alpha_frac).to(dtype)
        sd[name + ".lora_down.weight"] = down.to(dtype)
        sd[name + ".lora_up.weight"] = up.to(dtype)
    return sd


def peft(layers, factors, dtype=torch.float32):
    sd = {}
    for (_, name, _, _), (up, down) in zip(layers, factors):
        sd[name + ".lora_A.weight"] = down.to(dtype)
        sd[name + ".lora_B.weight"] = up.to(dtype)
    return sd


def make_pair(r1=6, r2=4, seed=0, relation="mixed", layers=SD15_LAYERS):
    f1, f2 = [], []
    for i, (_, _, o, n) in enumerate(layers):
        u1, d1, u2, d2 = related_factors(o, n, r1, r2, seed * 100 + i, relation)
        f1.append((u1, d1))
        f2.append((u2, d2))
    return f1, f2


def dense(up, down, scale=1.0):
    return scale * up.double() @ down.double()
