"""Which module of one LoRA targets the same layer as a module of another, whatever their key conventions.

A module's canonical target is (model part, path): the part is `te1`/`te2`/`te3` or `diffusion`, the path is
`keys.flat()` of its name (prefix stripped, dots as underscores) with the diffusers attention-processor
spelling normalised (`attn1.processor.to_q` → `attn1.to_q`, processor `to_out` → `to_out.0`). So kohya
`lora_unet_down_blocks_0_…_to_q`, PEFT `unet.down_blocks.0.….to_q` and ComfyUI `diffusion_model.…` names
of the same layer meet; kohya `lora_te1_…` meets PEFT `text_encoder.…`.

Across the two block vocabularies of one model (see `crossnames`): SGM/ldm UNet names (`input_blocks`,
`middle_block`, `output_blocks`) meet diffusers names (`down_blocks`, `mid_block`, `up_blocks`) of SD 1.x/2.x and
SDXL through the block layout of the detected architecture, BFL FLUX names (`double_blocks`, fused `qkv`,
`linear1`) meet diffusers names (`transformer_blocks`, separate `to_q/to_k/to_v`, `proj_mlp`), and SD3/SD3.5
MMDiT names (`joint_blocks`, fused `x_block.attn.qkv`/`context_block.attn.qkv`) meet diffusers names. A fused module
pairs with its split parts: the first LoRA's fused module against the parts assembled by rows (`RowStack`), or
each of the first LoRA's parts against the matching row slice of the other's fused module (`RowSlice`); rows of
a fused module that no part of the first LoRA covers count as present in the other LoRA only. Everything stays
on factors (ΔW rows [r0, r1) = s·B[r0:r1]·A).

Still not mapped (and said so with a warning naming both schemes): other DiTs (HunyuanVideo, …) and UNets
whose layout is unknown; such modules are listed as present in one LoRA only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import LensError
from ..keys import flat, strip_prefix
from ..kinds import UNKNOWN
from .crossnames import CROSS_ARCHS, RowSlice, RowStack, dotted_name, name_like, piece_of, segments

SCHEMES = {
    "sgm": ("input_blocks", "middle_block", "output_blocks"),
    "diffusers-unet": ("down_blocks", "mid_block", "up_blocks"),
    "bfl": ("double_blocks", "single_blocks"),
    "mmdit": ("joint_blocks",),
    "diffusers-dit": ("transformer_blocks", "single_transformer_blocks"),
}
SCHEME_WORDS = {"sgm": "SGM/ldm UNet names (input_blocks, middle_block, output_blocks)",
                "diffusers-unet": "diffusers UNet names (down_blocks, mid_block, up_blocks)",
                "bfl": "BFL FLUX names (double_blocks, single_blocks)",
                "mmdit": "MMDiT names (joint_blocks)",
                "diffusers-dit": "diffusers transformer names (transformer_blocks)"}
CANONICAL_SCHEMES = {"sgm", "bfl", "mmdit"}       # the vocabulary pieces are named in (crossnames)


def family(component: str) -> str:
    return component if component.startswith("te") else "diffusion"


def canonical_path(name: str) -> str:
    f = flat(name).lstrip("_")   # Wan Fun LoRAs say `lora_unet__blocks_0_…` (ComfyUI's lora_convert drops the `_`)
    if "_processor_" in f or f.startswith("processor_"):
        f = f.replace("_processor_", "_")
        if f.endswith("_to_out"):
            f += "_0"
    f = re.sub(r"_default$", "", f)
    return f


def canonical_key(module) -> str:
    """'<part>:<path>' naming the layer a module changes, equal across key conventions of one vocabulary."""
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


def common_architecture(models) -> str:
    """The detected architecture id of the first model that has one ('unknown' when none)."""
    for m in models:
        if m.architecture.id != "unknown":
            return m.architecture.id
    return "unknown"


def cross_scheme_warning(label_a, schemes_a, label_b, schemes_b, arch: str, tail: str) -> str | None:
    """The warning for two LoRAs in different block vocabularies that cannot be mapped onto each other."""
    if not (schemes_a and schemes_b) or (schemes_a & schemes_b) or arch in CROSS_ARCHS:
        return None
    sa = ", ".join(SCHEME_WORDS[s] for s in sorted(schemes_a))
    sb = ", ".join(SCHEME_WORDS[s] for s in sorted(schemes_b))
    what = "an unknown base model" if arch == "unknown" else f"this base model ({arch})"
    return (f"{label_a} uses {sa} and {label_b} uses {sb}; mapping between these block vocabularies is not "
            f"implemented for {what}, so {tail}")


@dataclass
class Unit:
    """One output layer (or row segment of a fused layer): per input a module, a `RowSlice`/`RowStack` view,
    or None; `stub` = (name, component, weight shape) when the first input has no module here and the output
    must be named in its vocabulary."""
    key: str
    members: list
    stub: tuple | None = None


def _shape(m):
    try:
        s = m.weight_shape()
    except Exception:
        return None
    return None if s is None else tuple(s)


def _as_matrix(shape: tuple) -> tuple:
    """(rows, columns) of a weight shape: a LoKr's 2-D kron and a 4-D 1×1-conv LoRA change the same weight."""
    cols = 1
    for d in shape[1:]:
        cols *= d
    return (shape[0], cols)


def _vocab(model) -> bool | None:
    """True when a model names its diffusion modules in the canonical vocabulary (SGM/BFL), False for diffusers
    names, None when unknown or mixed."""
    ss = {s for m in model.modules if m.kind is not UNKNOWN for s in [scheme_of(m)] if s}
    if not ss:
        return None
    canon = bool(ss & CANONICAL_SCHEMES)
    if canon and ss - CANONICAL_SCHEMES:
        return None
    return canon


def layer_units(models, labels, for_output: bool) -> list[Unit]:
    """Group the modules of all models by the layer they change (any vocabulary), in the first model's order.

    for_output=False (comparison): a layer the first model lacks keeps the other's own form and names.
    for_output=True (blend): fused vs split and names follow the first model's vocabulary where it is known."""
    arch = common_architecture(models)
    n = len(models)
    layers: dict = {}
    for i, model in enumerate(models):
        for mod in model.modules:
            if mod.kind is UNKNOWN:
                continue
            fam = family(mod.component)
            path = canonical_path(mod.name)
            p = piece_of(fam, path, arch, _shape(mod))
            slots = layers.setdefault(p.layer, [{"full": None, "parts": {}, "total": None} for _ in range(n)])
            slot = slots[i]
            other = slot["full"] if p.rows is None else slot["parts"].get(p.rows)
            if other is None and p.rows is None and slot["parts"]:
                other = next(iter(slot["parts"].values()))
            if other is None and p.rows is not None and slot["full"] is not None:
                other = slot["full"]
            if other is not None:
                raise LensError(f"{labels[i]} holds two modules for the same layer ({other.name} and {mod.name}); "
                                "remove the duplicate first.")
            if p.rows is None:
                slot["full"] = mod
            else:
                slot["parts"][p.rows] = mod
                slot["total"] = p.total
    vocab0 = _vocab(models[0]) if for_output else None
    example0 = next((m.name for m in models[0].modules
                     if m.kind is not UNKNOWN and family(m.component) == "diffusion"), None)
    units = []
    for layer, slots in layers.items():
        present = [i for i, s in enumerate(slots) if s["full"] is not None or s["parts"]]
        split_any = any(s["parts"] for s in slots)
        s0 = slots[0]
        if s0["full"] is not None or s0["parts"]:
            fused = s0["full"] is not None
        elif for_output and vocab0 is not None and layer.startswith("diffusion:"):
            fused = vocab0 or not (split_any or _fused_layer(layer, slots, arch)) or _whole_only(slots)
        else:
            fused = slots[present[0]]["full"] is not None
        if fused:
            total = next((_shape(s["full"])[0] for s in slots if s["full"] is not None and _shape(s["full"])),
                         next((s["total"] for s in slots if s["total"]), None))
            members = [s["full"] if s["full"] is not None else
                       (RowStack(list(s["parts"].items()), total) if s["parts"] else None) for s in slots]
            unit = Unit(_key(members, layer), members)
            if for_output and members[0] is None:
                unit.stub = _stub(layer, arch, vocab0, example0, members, fused_name=True)
            units.append(unit)
            continue
        total = next((s["total"] for s in slots if s["total"]), None)
        if total is None:
            total = next(_shape(s["full"])[0] for s in slots if s["full"] is not None)
        segs = segments(layer, total, arch) or []
        touched = set(r for s in slots for r in s["parts"])
        if any(s["full"] is not None for s in slots):
            touched |= {r for r, _ in segs}
        known = {r for r, _ in segs}
        for rows, dname in segs + [(r, None) for r in sorted(touched - known)]:
            if rows not in touched:
                continue
            members = [s["parts"].get(rows) if rows in s["parts"] else
                       (RowSlice(s["full"], rows) if s["full"] is not None else None) for s in slots]
            unit = Unit(_key(members, f"{layer}[{rows[0]}:{rows[1]}]"), members)
            if for_output and members[0] is None and dname is not None:
                ex = example0 if vocab0 is not None else next(
                    (m.name for m in members if m is not None and not isinstance(m, RowSlice)), example0)
                shape = next(m.weight_shape() for m in members if m is not None)
                comp = next(m.component for m in members if m is not None)
                unit.stub = (name_like(ex, dname), comp, tuple(shape)) if ex else None
            units.append(unit)
    return units


def _whole_only(slots) -> bool:
    """Only whole modules hold this layer and one of them cannot be cut into row pieces (DoRA's magnitude belongs to
    the whole weight; OFT/GLoRA/set need the base weight): the layer stays whole, carried under its own name."""
    return not any(s["parts"] for s in slots) and any(
        m.is_dora or m.kind.needs_base_weight or m.kind.name == "set" for s in slots for m in [s["full"]]
        if m is not None)


def _fused_layer(layer, slots, arch) -> bool:
    """A fused DiT layer (FLUX qkv / linear1, SD3 qkv) seen only as whole modules."""
    s = next((x["full"] for x in slots if x["full"] is not None), None)
    return s is not None and _shape(s) is not None and segments(layer, _shape(s)[0], arch) is not None


def _key(members, fallback: str) -> str:
    for m in members:
        if m is not None and not isinstance(m, (RowSlice, RowStack)):
            return canonical_key(m)
    return fallback


def _stub(layer, arch, vocab0, example0, members, fused_name: bool):
    """(name, component, shape) of a layer written in the first model's vocabulary, when a translation is needed
    (some member is a view or is named in the other vocabulary) and known."""
    if vocab0 is None or example0 is None or not layer.startswith("diffusion:"):
        return None
    path = layer.split(":", 1)[1]
    need = any(isinstance(m, (RowSlice, RowStack)) or
               (m is not None and (canonical_path(m.name) == path) != vocab0) for m in members)
    if not need:
        return None
    m = next(x for x in members if x is not None)
    shape = m.weight_shape()
    dotted = dotted_name(layer, arch, vocab0, shape)
    if dotted is None:
        return None
    return (name_like(example0, dotted), m.component, None if shape is None else tuple(shape))


@dataclass
class Matching:
    """Modules of A and B paired by the layer they change (pairs in A's order). A member may be a `RowSlice`
    or `RowStack` view (fused ↔ split pairs); views have name, block, component, lowrank() and delta()."""
    shared: list = field(default_factory=list)   # (key, module_a, module_b)
    only_a: list = field(default_factory=list)   # (key, module)
    only_b: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    schemes_a: set = field(default_factory=set)
    schemes_b: set = field(default_factory=set)
    architecture: str = "unknown"

    @property
    def scheme_mismatch(self) -> bool:
        return bool(self.schemes_a and self.schemes_b and not (self.schemes_a & self.schemes_b))

    @property
    def cross_scheme(self) -> bool:
        """Both LoRAs use different block vocabularies that were mapped onto each other."""
        return self.scheme_mismatch and self.architecture in CROSS_ARCHS


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
    la, lb = _label(a, "A"), _label(b, "B")
    res = Matching(architecture=common_architecture([a, b]))
    for u in layer_units([a, b], [la, lb], for_output=False):
        ma, mb = u.members
        if ma is None:
            res.only_b.append((u.key, mb))
            continue
        if mb is None:
            res.only_a.append((u.key, ma))
            continue
        sa, sb = _shape(ma), _shape(mb)
        if sa is not None and sb is not None and _as_matrix(sa) != _as_matrix(sb):  # ComfyUI reshapes ΔW to the weight
            raise LensError(f"Module {ma.name} changes a {sa} weight in {la} but {mb.name} changes a {sb} weight "
                            f"in {lb}: the LoRAs were trained for different base models.")
        res.shared.append((u.key, ma, mb))
    res.schemes_a = {s for m in a.modules if m.kind is not UNKNOWN for s in [scheme_of(m)] if s}
    res.schemes_b = {s for m in b.modules if m.kind is not UNKNOWN for s in [scheme_of(m)] if s}
    w = cross_scheme_warning(la, res.schemes_a, lb, res.schemes_b, res.architecture,
                             "their diffusion-model modules cannot be paired and count as present in one LoRA only.")
    if w:
        res.warnings.append(w)
    if require_overlap and not res.shared:
        why = (" " + res.warnings[0]) if res.warnings else ""
        raise LensError(f"{la} and {lb} change no layer in common, so there is nothing to compare or blend.{why}")
    return res
