"""Which base model a LoRA was trained for, from its module names and shapes (metadata as fallback).

Shapes decide where names are shared: the cross-attention key projection reads the text-encoder width
(SD 1.x 768, SD 2.x 1024, SDXL 2048); DiT hidden sizes separate FLUX (3072) from SD3 (1536/2432) and
Z-Image (3840) from Lumina 2 (2304); block counts separate FLUX (19 double/38 single) from
HunyuanVideo (20/40). "unknown" is a valid answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .keys import flat

LABELS = {"sd1": "SD 1.5", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3", "flux1": "FLUX.1",
          "qwen_image": "Qwen-Image", "wan": "Wan", "hunyuan_video": "HunyuanVideo", "z_image": "Z-Image",
          "lumina2": "Lumina 2", "ltxv": "LTX-Video", "hidream": "HiDream",
          "unknown": "unknown"}


@dataclass
class Architecture:
    id: str
    evidence: str

    @property
    def label(self) -> str:
        return LABELS[self.id]


# the two-stream (FLUX/SD3/Qwen-Image) attention projections of diffusers' transformer_blocks: each reads the width
ATTN_PROJ = r"transformer_blocks_\d+_attn_(?:to_[qkv]|add_[qkv]_proj|to_out_0|to_add_out)$"


def _max_index(names, rx):
    vals = [int(m.group(1)) for n in names for m in [re.search(rx, n)] if m]
    return max(vals) if vals else -1


def detect(modules, metadata: dict | None = None) -> Architecture:
    """modules: LoRAModule list (uses name, component, weight_shape())."""
    metadata = metadata or {}
    shapes = {}
    comps = set()
    for m in modules:
        comps.add(m.component)
        try:
            shapes[flat(m.name)] = m.weight_shape()
        except Exception:
            shapes[flat(m.name)] = None
    names = list(shapes)
    diff = [flat(m.name) for m in modules if not m.component.startswith("te")]

    def in_dim(pattern):
        for n in names:
            if re.search(pattern, n) and shapes[n] and len(shapes[n]) >= 2:
                return shapes[n][1]
        return None

    def out_dim(pattern):
        for n in names:
            if re.search(pattern, n) and shapes[n]:
                return shapes[n][0]
        return None

    if any(m.name.startswith(("unet:", "text_encoder:")) for m in modules):
        widths = {s[1] for s in shapes.values() if s and len(s) >= 2}
        if 2048 in widths:
            return Architecture("sdxl", "cloneofsimo keys, 2048-wide cross-attention")
        if 1024 in widths and 768 not in widths:
            return Architecture("sd2", "cloneofsimo keys, 1024-wide layers")
        return Architecture("sd1", "cloneofsimo keys, 768-wide text encoder / cross-attention")

    if any(re.search(r"(?:^|_)(double|single)_stream_blocks_\d+", n) for n in diff):
        return Architecture("hidream", "double_stream_blocks/single_stream_blocks (HiDream)")
    if any("double_blocks" in n or "single_blocks" in n for n in diff):
        d, s = _max_index(diff, r"double_blocks_(\d+)"), _max_index(diff, r"single_blocks_(\d+)")
        if d >= 19 or s >= 38 or any(("individual_token_refiner" in n or "txt_in" in n or "mlp_fc1" in n
                                      or "img_mod_linear" in n) for n in diff):
            return Architecture("hunyuan_video", "double/single blocks beyond FLUX's 19/38 or Hunyuan layer names")
        return Architecture("flux1", "double_blocks/single_blocks modules")
    if any("single_transformer_blocks" in n for n in diff):
        s = _max_index(diff, r"single_transformer_blocks_(\d+)")
        d = _max_index(diff, r"(?<!single_)transformer_blocks_(\d+)")
        if s >= 38 or d >= 19:
            return Architecture("hunyuan_video", "diffusers transformer with 20+ double / 40+ single blocks")
        return Architecture("flux1", "diffusers single_transformer_blocks")
    if any(re.search(r"(img|txt)_(mlp|mod)", n) for n in diff) and any("transformer_blocks" in n for n in diff):
        return Architecture("qwen_image", "transformer_blocks with img_mlp/txt_mlp/img_mod")
    if any("joint_blocks" in n for n in diff):
        return Architecture("sd3", "MMDiT joint_blocks")
    if any(re.search(r"blocks_\d+_(self|cross)_attn_[qkvo]$", n) for n in diff):
        return Architecture("wan", "blocks.N.self_attn.q / cross_attn (Wan)")
    if any(("noise_refiner" in n or "context_refiner" in n or "feed_forward_w" in n) for n in diff):
        dim = in_dim(r"attention_(to_q|qkv)$") or in_dim(r"feed_forward_w1$") or in_dim(r"attention_")
        if dim == 2304:
            return Architecture("lumina2", "refiner/feed_forward layers, 2304 wide")
        return Architecture("z_image", "noise/context refiner and feed_forward layers" + (f", {dim} wide" if dim else ""))
    if any("transformer_blocks" in n and "attn_add_" in n for n in diff) or any("context_block" in n for n in diff):
        dim = in_dim(r"transformer_blocks_\d+_attn_to_q$") or in_dim(ATTN_PROJ)   # any projection reads the width
        if dim == 3072 and _max_index(diff, r"(?:^|_)transformer_blocks_(\d+)") >= 19:
            return Architecture("qwen_image", "MMDiT transformer_blocks past FLUX's 19, 3072 wide (Qwen-Image)")
        if dim == 3072:
            return Architecture("flux1", "diffusers MMDiT blocks, 3072 wide (FLUX double blocks only)")
        return Architecture("sd3", "diffusers MMDiT transformer_blocks" + (f", {dim} wide" if dim else ""))

    ctx = in_dim(r"attn2_to_k$") or in_dim(r"attn2_(processor_)?to_k$")
    unet = any(w in n for n in diff for w in ("input_blocks", "output_blocks", "middle_block",
                                                "down_blocks", "up_blocks", "mid_block"))
    if not unet and any(re.search(r"(?:^|_)transformer_blocks_\d+_", n) for n in diff):
        # a DiT's transformer_blocks outside any UNet block: never SD 1.x/2.x/XL, whatever its cross-attention reads
        q = in_dim(r"transformer_blocks_\d+_attn_to_[qkv]$") or in_dim(ATTN_PROJ)
        top = _max_index(diff, r"(?:^|_)transformer_blocks_(\d+)")
        if q in (1536, 2432):
            return Architecture("sd3", f"diffusers MMDiT transformer_blocks, {q} wide")
        if q == 3072:
            return Architecture("qwen_image", "60 transformer_blocks, 3072 wide") if top >= 19 else \
                Architecture("flux1", "diffusers MMDiT blocks, 3072 wide (FLUX double blocks only)")
        a1 = in_dim(r"transformer_blocks_\d+_attn1_to_[qkv]$") or in_dim(r"transformer_blocks_\d+_attn2_to_q$")
        if a1 in (2048, 4096) and any("_attn2_" in n for n in diff):
            return Architecture("ltxv", f"transformer_blocks with self/cross attention attn1/attn2, {a1} wide")
        return _from_metadata(metadata) or Architecture("unknown", "DiT transformer_blocks of an unrecognised width")
    if ctx == 2048:
        return Architecture("sdxl", "cross-attention reads 2048-wide text embeddings")
    if ctx == 1024:
        return Architecture("sd2", "cross-attention reads 1024-wide text embeddings")
    if ctx == 768:
        return Architecture("sd1", "cross-attention reads 768-wide text embeddings")
    if "te2" in comps or any(n.startswith("input_blocks_7") or "transformer_blocks_9" in n for n in diff):
        return Architecture("sdxl", "second text encoder / SDXL block layout")
    # what is left are weak guesses (UNet names without the cross-attention width, CLIP-L text-encoder
    # modules, which SDXL and FLUX files have too): the trainer's metadata knows better
    from_meta = _from_metadata(metadata)
    if from_meta is not None:
        return from_meta
    te_w = in_dim(r"text_model_encoder_layers_\d+_self_attn_q_proj$")
    if te_w == 1024:
        return Architecture("sd2", "1024-wide text encoder (OpenCLIP-H)")
    if unet or te_w == 768:
        return Architecture("sd1", "SD UNet names" + (" and 768-wide text encoder" if te_w == 768 else ""))
    return Architecture("unknown", "no known module layout")


def _from_metadata(metadata: dict) -> Architecture | None:
    meta = " ".join(str(metadata.get(k, "")) for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    for token, aid in (("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("flux", "flux1"), ("sd3", "sd3"),
                       ("stable-diffusion-3", "sd3"), ("sd_v2", "sd2"), ("stable-diffusion-v2", "sd2"),
                       ("sd_v1", "sd1"), ("stable-diffusion-v1", "sd1"), ("qwen", "qwen_image"),
                       ("wan", "wan"), ("hunyuan", "hunyuan_video"), ("z-image", "z_image"), ("z_image", "z_image")):
        if token in meta:
            return Architecture(aid, "training metadata (names alone did not decide)")
    return None
