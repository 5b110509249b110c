"""Which module of one LoRA targets the same layer as a module of another, whatever their key conventions.

A module's canonical target is (model part, path): the part is `te1`/`te2`/`te3` or `diffusion`, the path is
`keys.flat()` of its name (prefix stripped, dots as underscores) with the diffusers attention-processor
spelling normalised (`attn1.processor.to_q` → `attn1.to_q`, processor `to_out` → `to_out.0`). So kohya
`lora_unet_down_blocks_0_…_to_q`, PEFT `unet.down_blocks.0.….to_q` and ComfyUI `diffusion_model.…` names
of the same layer meet; kohya `lora_te1_…` meets PEFT `text_encoder.…`.

Not implemented (and said so, never guessed): mapping between the two block vocabularies of one model —
SGM/ldm UNet names (`input_blocks`, `middle_block`, `output_blocks`) vs diffusers (`down_blocks`,
`mid_block`, `up_blocks`), and BFL FLUX names (`double_blocks`, fused `qkv`) vs diffusers
(`transformer_blocks`, separate `to_q/to_k/to_v`). Such modules are listed as present in one LoRA only,
with a warning naming both schemes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import LensError
from ..keys import flat, strip_prefix
from ..kinds import UNKNOWN

SCHEMES = {
    "sgm": ("input_blocks", "middle_block", "output_blocks"),
    "diffusers-unet": ("down_blocks", "mid_block", "up_blocks"),
    "bfl": ("double_blocks", "single_blocks"),
    "diffusers-dit": ("transformer_blocks", "single_transformer_blocks"),
}
SCHEME_WORDS = {"sgm": "SGM/ldm UNet names (input_blocks, middle_block, output_blocks)",
                "diffusers-unet": "diffusers UNet names (down_blocks, mid_block, up_blocks)",
                "bfl": "BFL FLUX names (double_blocks, single_blocks)",
                "diffusers-dit": "diffusers transformer names (transformer_blocks)"}


def family(component: str) -> str:
    return component if component.startswith("te") else "diffusion"


def canonical_path(name: str) -> str:
    f = flat(name)
    if "_processor_" in f or f.startswith("processor_"):
        f = f.replace("_processor_", "_")
        if f.endswith("_to_out"):
            f += "_0"
    f = re.sub(r"_default$", "", f)
    return f


def canonical_key(module) -> str:
    """'<part>:<path>' naming the layer a module changes, equal across key conventions."""
    return f"{family(module.component)}:{canonical_path(module.name)}"


def scheme_of(module) -> str | None:
    """The block vocabulary a diffusion-model module name uses (None for text encoders / unknown)."""
    if module.component.startswith("te"):
        return None
    f = canonical_path(module.name)
    if re.search(r"(?:^|_)single_transformer_blocks_\d", f):
        return "diffusers-dit"
    for scheme, words in SCHEMES.items():
        if any(re.search(rf"(?:^|_){w}(?:_|$)", f) for w in words):
            return scheme
    return None


@dataclass
class Matching:
    """Modules of A and B paired by canonical target (pairs in A's order)."""
    shared: list = field(default_factory=list)   # (key, module_a, module_b)
    only_a: list = field(default_factory=list)   # (key, module)
    only_b: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    schemes_a: set = field(default_factory=set)
    schemes_b: set = field(default_factory=set)

    @property
    def scheme_mismatch(self) -> bool:
        return bool(self.schemes_a and self.schemes_b and not (self.schemes_a & self.schemes_b))


def _index(model, which: str) -> dict:
    out = {}
    for m in model.modules:
        if m.kind is UNKNOWN:
            continue
        k = canonical_key(m)
        if k in out:
            raise LensError(f"LoRA {which} holds two modules for the same layer ({out[k].name} and {m.name}); "
                            "remove the duplicate first.")
        out[k] = m
    return out


def _label(model, which):
    import os
    return os.path.basename(model.source) if getattr(model, "source", None) else f"LoRA {which}"


def check_architectures(a, b) -> None:
    """Refuse two LoRAs trained for different base models (both detected, different)."""
    arch_a, arch_b = a.architecture, b.architecture
    if arch_a.id != "unknown" and arch_b.id != "unknown" and arch_a.id != arch_b.id:
        raise LensError(f"{_label(a, 'A')} is a {arch_a.label} LoRA and {_label(b, 'B')} is a {arch_b.label} "
                        f"LoRA: they target different base models and cannot be compared or blended.")


def match_modules(a, b, require_overlap: bool = True) -> Matching:
    """Pair the modules of models a and b that change the same layer (see the module docstring)."""
    check_architectures(a, b)
    ia, ib = _index(a, "A"), _index(b, "B")
    res = Matching()
    for k, ma in ia.items():
        mb = ib.get(k)
        if mb is None:
            res.only_a.append((k, ma))
            continue
        sa, sb = ma.weight_shape(), mb.weight_shape()
        if sa is not None and sb is not None and tuple(sa) != tuple(sb):
            raise LensError(f"Module {ma.name} changes a {tuple(sa)} weight in {_label(a, 'A')} but {mb.name} "
                            f"changes a {tuple(sb)} weight in {_label(b, 'B')}: the LoRAs were trained for "
                            "different base models.")
        res.shared.append((k, ma, mb))
    res.only_b = [(k, m) for k, m in ib.items() if k not in ia]
    res.schemes_a = {s for _, m in res.only_a for s in [scheme_of(m)] if s} | \
        {s for _, m, _ in res.shared for s in [scheme_of(m)] if s}
    res.schemes_b = {s for _, m in res.only_b for s in [scheme_of(m)] if s} | \
        {s for _, _, m in res.shared for s in [scheme_of(m)] if s}
    if res.scheme_mismatch:
        sa = ", ".join(SCHEME_WORDS[s] for s in sorted(res.schemes_a))
        sb = ", ".join(SCHEME_WORDS[s] for s in sorted(res.schemes_b))
        res.warnings.append(f"{_label(a, 'A')} uses {sa} and {_label(b, 'B')} uses {sb}; mapping between these "
                            "block vocabularies is not implemented, so their diffusion-model modules cannot be "
                            "paired and count as present in one LoRA only.")
    if require_overlap and not res.shared:
        why = (" " + res.warnings[0]) if res.warnings else ""
        raise LensError(f"{_label(a, 'A')} and {_label(b, 'B')} change no layer in common, so there is nothing to "
                        f"compare or blend.{why}")
    return res
