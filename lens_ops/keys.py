"""Key naming conventions: which model part a module targets, which trainer convention names it,
and which block it sits in.

Prefix strings are the ones ComfyUI's `comfy/lora.py` maps (kohya `lora_unet_`/`lora_te*_`, diffusers
`unet.`/`text_encoder.`/`transformer.`, `diffusion_model.`, `base_model.model.`, SimpleTuner
`lycoris_`, OneTrainer `lora_transformer_`), plus XLabs FLUX and cloneofsimo's `unet:<i>:up`.
"""
from __future__ import annotations

import re

# (prefix, component); first match wins, so longer/more specific prefixes come first.
COMPONENT_PREFIXES = [
    ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te1"),
    ("lora_prior_te_", "te1"), ("lora_prior_unet_", "diffusion"), ("lora_unet_", "diffusion"),
    ("lora_transformer_", "diffusion"), ("lycoris_", "diffusion"),
    ("text_encoder_2.", "te2"), ("text_encoder_3.", "te3"), ("text_encoder.", "te1"), ("te.", "te1"),
    ("text_encoders.clip_l.", "te1"), ("text_encoders.clip_g.", "te2"), ("text_encoders.t5xxl.", "te3"),
    ("text_encoders.", "te1"),
    ("unet.", "diffusion"), ("transformer.", "diffusion"), ("diffusion_model.", "diffusion"),
    ("model.diffusion_model.", "diffusion"), ("base_model.model.", "diffusion"),
    ("unet:", "diffusion"), ("text_encoder:", "te1"),
]
UNET_WORDS = ("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block")
CLONEOFSIMO = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")


def strip_prefix(name: str) -> tuple[str, str]:
    """(prefix, rest) for the first known prefix of a module name ('' when none)."""
    for p, _ in COMPONENT_PREFIXES:
        if name.startswith(p):
            return p, name[len(p):]
    return "", name


def flat(name: str) -> str:
    """Module path without its prefix, with dots as underscores: one spelling for every convention."""
    return strip_prefix(name)[1].replace(".", "_").replace(":", "_")


def component_of(name: str) -> str:
    """'diffusion', 'te1', 'te2' or 'te3' for a module's base name (see `name_components`)."""
    for p, c in COMPONENT_PREFIXES:
        if name.startswith(p):
            return c
    return "diffusion"


def name_components(names: list[str]) -> list[str]:
    """Components for a whole file: the diffusion part is 'unet' when any of its modules sits in UNet
    blocks (so conv_in/time_embed of a UNet are 'unet' too), else 'transformer'."""
    comps = [component_of(n) for n in names]
    unet = any(c == "diffusion" and (any(w in n for w in UNET_WORDS) or n.startswith(("unet.", "unet:")))
               for n, c in zip(names, comps))
    return [("unet" if unet else "transformer") if c == "diffusion" else c for c in comps]


_BLOCK_RULES = [
    (re.compile(r"(?:^|_)input_blocks_(\d+)"), "input {}"),
    (re.compile(r"(?:^|_)middle_block"), "middle"),
    (re.compile(r"(?:^|_)output_blocks_(\d+)"), "output {}"),
    (re.compile(r"(?:^|_)down_blocks_(\d+)"), "down {}"),
    (re.compile(r"(?:^|_)mid_block"), "mid"),
    (re.compile(r"(?:^|_)up_blocks_(\d+)"), "up {}"),
    (re.compile(r"(?:^|_)double_blocks_(\d+)"), "double {}"),
    (re.compile(r"(?:^|_)single_transformer_blocks_(\d+)"), "single {}"),
    (re.compile(r"(?:^|_)single_blocks_(\d+)"), "single {}"),
    (re.compile(r"(?:^|_)joint_blocks_(\d+)"), "joint {}"),
    (re.compile(r"(?:^|_)transformer_blocks_(\d+)"), "block {}"),
    (re.compile(r"(?:^|_)blocks_(\d+)"), "block {}"),
    (re.compile(r"(?:^|_)layers_(\d+)"), "layer {}"),
]


def block_of(name: str, component: str) -> str:
    """Human block label ('input 4', 'double 7', 'te2', ...) used to group modules."""
    if component.startswith("te"):
        return component
    f = flat(name)
    if component == "transformer" and re.search(r"(?:^|_)transformer_blocks_\d+", f) and "single" not in f:
        m = re.search(r"(?:^|_)transformer_blocks_(\d+)", f)
        return f"double {m.group(1)}" if "attn_add_" in f or "context" in f or "ff_" in f or "norm1" in f \
            else f"block {m.group(1)}"
    for rx, label in _BLOCK_RULES:
        m = rx.search(f)
        if m:
            return label.format(*m.groups())
    return "other"


def convention_of(keys: list[str], kinds: set[str]) -> str:
    """Name the key-naming convention a file uses, in words users know."""
    ks = keys[:2000]
    if any(CLONEOFSIMO.match(k) for k in ks):
        return "cloneofsimo lora_diffusion"
    lyco = kinds & {"loha", "lokr", "glora", "oft", "boft"}
    lyco_txt = "LyCORIS " + "/".join(sorted(k.upper() if k in ("oft", "boft") else
                                             {"loha": "LoHa", "lokr": "LoKr", "glora": "GLoRA"}[k] for k in lyco))
    if any(k.startswith("lora_transformer_") for k in ks):   # OneTrainer names its text encoders lora_te1_/te2_ too
        return "OneTrainer"
    if any(k.startswith(("lora_unet_", "lora_te")) for k in ks):
        return (lyco_txt + " (kohya names)") if lyco else "kohya sd-scripts"
    if any(k.startswith("lycoris_") for k in ks):
        return "SimpleTuner LyCORIS"
    if any(".processor." in k and re.search(r"_lora\d?\.(up|down)\.weight$", k)
           and k.startswith(("double_blocks.", "single_blocks.")) for k in ks):
        return "XLabs FLUX"  # diffusers' old attention processors also say `.processor.…_lora.up.weight`
    if any(k.endswith("_lora.up.weight") for k in ks):      # `…attn1.processor.to_k_lora.up.weight`
        return "diffusers (attention processor)"
    if any(k.endswith(".lora.up.weight") for k in ks):      # `unet.….attn1.to_k.lora.up.weight` (diffusers' trainers)
        return "diffusers"
    if any(".lora_linear_layer." in k for k in ks):
        return "diffusers (lora_linear_layer)"
    if any(".lora_A." in k or k.endswith(".lora_A") for k in ks):
        return "PEFT/diffusers" + (" (.default adapter)" if any(".default." in k for k in ks) else "")
    if any(k.startswith(("diffusion_model.", "text_encoders.")) for k in ks):
        return "ComfyUI generic"
    if lyco:
        return lyco_txt
    return "unknown"
