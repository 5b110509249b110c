"""The in-memory LoRA: a list of modules, each with its original key names, kind, tensors and alpha.

Everything in LoRA Lens works on this one model. A module is found by splitting every tensor name into
(base name, role) with the kinds' suffix table; unknown tensors become `unknown` modules that are
carried through byte for byte. `state_dict()` gives the keys back in their original order, so an
untouched model writes back exactly what was read.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import __version__
from .arch import Architecture, detect
from .errors import LensError
from .keys import CLONEOFSIMO, block_of, convention_of, flat, name_components
from .kinds import UNKNOWN, ModuleKind, classify, split_key
from .st_io import MappedFile, atomic_save, load_file

PROVENANCE_KEY = "lora_lens.provenance"
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.",
                       "vae.", "encoder.down.", "decoder.up.")


_DIT_BLOCK = re.compile(r"(?:^|_)(?<!single_)transformer_blocks_(\d+)")
_SINGLE_STREAM = re.compile(r"(?:^|_)transformer_blocks_\d+_attn[12]_")   # LTX-Video, PixArt: self + cross attention
# two-stream blocks (FLUX/SD3/Qwen-Image): SD3.5 medium's x_block has a second attention `attn2` next to `attn`
_TWO_STREAM = re.compile(r"(?:^|_)transformer_blocks_\d+_(?:attn_|ff_context_|norm1_context_)")
_STREAM_BLOCK = re.compile(r"(?:^|_)(double|single)_stream_blocks_(\d+)")


class LoraStateDict(dict):
    """ComfyUI's LORA_MODEL (a plain dict of tensors) that also carries the file's metadata."""

    metadata: dict

    def __init__(self, *args, metadata: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.metadata = dict(metadata or {})


@dataclass
class LoRAModule:
    name: str
    keys: dict[str, str]
    tensors: dict[str, torch.Tensor]
    kind: ModuleKind
    component: str = "transformer"
    _alpha_cache: float | None = field(default=None, repr=False)
    single_stream: bool = field(default=False, repr=False)   # the file's transformer_blocks have attn1/attn2

    @property
    def alpha(self) -> float | None:
        """alpha exactly as ComfyUI reads it (`tensor.item()` of the stored value)."""
        t = self.tensors.get("alpha")
        return None if t is None else float(t.float().item() if t.dtype in (torch.int8, torch.uint8) else t.item())

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self.tensors or "magnitude" in self.tensors

    @property
    def block(self) -> str:
        b = block_of(self.name, self.component)
        if self.component == "transformer" and b.startswith(("block ", "double ")):
            f = flat(self.name)
            m = _DIT_BLOCK.search(f)
            if m:   # every module of diffusers' transformer_blocks.N in one block: FLUX/SD3/Qwen-Image double
                return f"{'block' if self.single_stream else 'double'} {m.group(1)}"   # (two-stream) blocks
            m = _STREAM_BLOCK.search(f)
            if m:   # HiDream double_stream_blocks.N / single_stream_blocks.N
                return f"{m.group(1)} {m.group(2)}"
        return b

    def rank(self) -> int | None:
        return self.kind.rank(self)

    def scale(self) -> float:
        return self.kind.scale(self)

    def weight_shape(self):
        return self.kind.weight_shape(self)

    def lowrank(self, dtype=torch.float32, device="cpu"):
        """(B, A, scale) with ΔW = scale·B@A, or None for kinds that are not a plain product."""
        f = self.kind.lowrank(self, dtype, device)
        return None if f is None else (f[0], f[1], self.scale())

    def delta(self, dtype=torch.float32, device="cpu") -> torch.Tensor | None:
        """Dense ΔW as ComfyUI applies it at strength 1 (DoRA: the LoRA part before re-normalisation)."""
        return self.kind.delta(self, dtype, device)

    @property
    def params(self) -> int:
        return sum(t.numel() for r, t in self.tensors.items() if r != "alpha")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def is_zero(self) -> bool:
        """True when the module's ΔW is exactly zero (untrained)."""
        return self.kind.is_zero(self)

    def nonfinite(self) -> int:
        """Number of NaN/Inf values in this module's floating tensors."""
        n = 0
        for t in self.tensors.values():
            if t.is_floating_point():
                if t.element_size() == 1:   # fp8 (torch has no isfinite for it): fp16 holds every fp8 value exactly
                    t = t.to(torch.float16)
                n += int(t.numel() - torch.isfinite(t).sum().item())
        return n

    def key_for(self, role: str) -> str:
        """The tensor name for `role`: the existing one, or the convention's spelling for a new role."""
        if role in self.keys:
            return self.keys[role]
        if role == "alpha":
            return f"{self.name}.alpha"
        raise LensError(f"Module {self.name} has no {role} tensor and no naming rule for one.")

    def with_tensors(self, tensors: dict[str, torch.Tensor], kind: ModuleKind | None = None) -> "LoRAModule":
        """A copy holding new tensors (same names; new roles get the convention's names)."""
        keys = {r: self.key_for(r) for r in tensors}
        m = LoRAModule(self.name, keys, dict(tensors), kind or self.kind, self.component,
                       single_stream=self.single_stream)
        m.kind.validate(m)
        return m


def _group(state: dict[str, torch.Tensor]) -> list[LoRAModule]:
    groups: dict[str, dict[str, str]] = {}
    for key in state:
        m = CLONEOFSIMO.match(key)
        split = (f"{m.group(1)}:{m.group(2)}", m.group(3)) if m else split_key(key)
        base, role = split if split else (key, "tensor")
        roles = groups.setdefault(base, {})
        if role in roles:  # two spellings of one role (e.g. .lora_B and .lora_B.weight): keep separate
            groups.setdefault(key, {})["tensor"] = key
            continue
        roles[role] = key
    names = list(groups)
    comps = name_components(names)
    dit = [flat(n) for n, c in zip(names, comps) if c == "transformer"]
    single = any(_SINGLE_STREAM.search(f) for f in dit) and not any(_TWO_STREAM.search(f) for f in dit)
    modules = []
    for base, comp in zip(names, comps):
        keys = groups[base]
        tensors = {r: state[k] for r, k in keys.items()}
        kind = classify(tensors) if "tensor" not in tensors else UNKNOWN
        mod = LoRAModule(base, keys, tensors, kind, comp, single_stream=single)
        kind.validate(mod)
        modules.append(mod)
    return modules


def _looks_like_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    keys = list(state)
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in keys[:5000]):
        return True
    big = sum(1 for t in state.values() if t.ndim >= 2 and t.numel() >= 1 << 20)
    return len(keys) > 200 and big > 20


class LoRAModel:
    """A whole LoRA file: modules in file order plus the safetensors metadata."""

    def __init__(self, modules: list[LoRAModule], metadata: dict | None = None, source: str | None = None):
        self.modules = modules
        self.metadata = dict(metadata or {})
        self.source = source
        self._arch: Architecture | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], metadata: dict | None = None,
                        source: str | None = None) -> "LoRAModel":
        if metadata is None:
            metadata = getattr(state, "metadata", None)
        if not state:
            raise LensError("The LoRA contains no tensors.")
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LensError(f"LoRA entry {bad[0]!r} is not a tensor.")
        from .quantize.appformat import resolve_separate_scales  # lazy: that package builds on this module
        state, _ = resolve_separate_scales(state)  # int8 + separate scale keys -> exact dequantized floats
        modules = _group(state)
        if all(m.kind is UNKNOWN for m in modules) and _looks_like_checkpoint(state):
            where = f"{os.path.basename(source)} " if source else "This file "
            raise LensError(f"{where.strip()} looks like a full model checkpoint, not a LoRA "
                            "(no LoRA modules, whole-model weights).")
        return cls(modules, metadata, source)

    @classmethod
    def load(cls, path: str, device="cpu", progress: Callable[[int, int], None] | None = None,
             mapped: bool = False) -> "LoRAModel":
        """Read a LoRA file. `mapped` (CPU only): tensors are zero-copy views of a private memory map, for
        one streamed pass over a big file (see `release`); nothing is copied until it is used."""
        if mapped and torch.device(device).type == "cpu":
            mf = MappedFile(path)
            tensors = mf.tensors()
            if progress is not None:
                progress(len(tensors), len(tensors))
            model = cls.from_state_dict(tensors, mf.metadata, source=os.path.abspath(path))
            model._mapping = mf
            return model
        tensors, metadata = load_file(path, device=device, progress=progress)
        return cls.from_state_dict(tensors, metadata, source=os.path.abspath(path))

    def release(self, module: "LoRAModule | list | None" = None) -> None:
        """For a `mapped` model: the module's (a list of modules', default: every module's) input pages
        are no longer needed resident (re-read on use)."""
        mf = getattr(self, "_mapping", None)
        if mf is not None:
            mods = self.modules if module is None else module if isinstance(module, list) else [module]
            mf.release([t for m in mods for t in m.tensors.values()])

    # ---------------------------------------------------------------- views
    def state_dict(self) -> LoraStateDict:
        out = LoraStateDict(metadata=self.metadata)
        for m in self.modules:
            for role, key in m.keys.items():
                out[key] = m.tensors[role]
        return out

    def __iter__(self):
        return iter(self.modules)

    def __len__(self):
        return len(self.modules)

    def get(self, name: str) -> LoRAModule | None:
        for m in self.modules:
            if m.name == name:
                return m
        return None

    @property
    def architecture(self) -> Architecture:
        if self._arch is None:
            self._arch = detect(self.modules, self.metadata)
        return self._arch

    @property
    def convention(self) -> str:
        return convention_of([k for m in self.modules for k in m.keys.values()],
                             {m.kind.name for m in self.modules})

    @property
    def precision(self) -> str:
        """fp16/bf16/fp32/fp8/int8 of the factor tensors (alpha excluded), or 'mixed (…)'."""
        counts = Counter()
        for m in self.modules:
            for r, t in m.tensors.items():
                if r != "alpha":
                    counts[DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))] += t.numel()
        if not counts:
            return "none"
        names = [n for n, _ in counts.most_common()]
        return names[0] if len(names) == 1 else "mixed (" + " + ".join(names) + ")"

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules)

    def header_estimate(self, metadata: dict | None = None) -> int:
        """Bytes a safetensors header for these tensors and `metadata` takes, rounded up: what a streamed output
        reserves before its payload."""
        n = 8 + len(json.dumps(metadata if metadata is not None else self.metadata))
        for m in self.modules:
            for k, t in m.tensors.items():
                n += len(m.keys[k]) + 64 + 6 * t.ndim
        return n

    def replace_modules(self, new: dict[str, LoRAModule]) -> "LoRAModel":
        """A new model with some modules swapped (by name); order and the rest unchanged."""
        mods = [new.get(m.name, m) for m in self.modules]
        return LoRAModel(mods, self.metadata, self.source)

    def scaled(self, factor: float) -> "LoRAModel":
        """ΔW of every module times `factor` (exact; refuses kinds that are not linear, like set_weight)."""
        if factor == 1.0:
            return self
        new = {}
        for m in self.modules:
            if m.kind is UNKNOWN:
                continue
            if m.is_dora:
                raise LensError(f"Module {m.name} is DoRA: its change is not linear in strength, so it "
                                "cannot be baked in; apply the strength when loading instead.")
            new[m.name] = m.with_tensors(m.kind.scaled(m, factor))
        return self.replace_modules(new)

    # ---------------------------------------------------------------- output
    def with_provenance(self, op: str, settings: dict) -> dict:
        """Metadata plus one provenance entry saying what was done, with which settings."""
        meta = dict(self.metadata)
        try:
            history = json.loads(meta.get(PROVENANCE_KEY, "[]"))
            if not isinstance(history, list):
                history = []
        except json.JSONDecodeError:
            history = []
        history.append({"tool": f"LoRA Lens {__version__}", "op": op, "settings": settings,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        meta[PROVENANCE_KEY] = json.dumps(history)
        return meta

    def save(self, path: str, metadata: dict | None = None) -> str:
        """Write atomically; never over the file this model was read from."""
        return atomic_save(self.state_dict(), path, self.metadata if metadata is None else metadata,
                           forbid=(self.source,) if self.source else ())


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
               torch.int8: "int8", torch.uint8: "uint8", torch.float8_e4m3fn: "fp8 (e4m3fn)",
               torch.float8_e5m2: "fp8 (e5m2)"}


def ensure_model(lora, source: str | None = None) -> LoRAModel:
    """Accept a LoRAModel or a LORA_MODEL dict (ComfyUI socket value)."""
    if isinstance(lora, LoRAModel):
        return lora
    if isinstance(lora, dict):
        return LoRAModel.from_state_dict(lora, getattr(lora, "metadata", None), source)
    raise LensError(f"Expected a LoRA (dict of tensors), got {type(lora).__name__}.")


def exact_factors(module, dtype=torch.float32, device="cpu"):
    """(B, A, scale) with the flattened ΔW = scale·B@A exactly, or None: the LoRA factors (`lowrank`), else the
    kind's exact two-factor form (LoKr: kron of the sides' factors, LoHa: rank r₁·r₂; `kind.factor_pair`). Works on
    anything with `lowrank`, `kind` and `scale` (also the cross-name row slices of lens_ops.conflict)."""
    f = module.lowrank(dtype, device)
    if f is None and hasattr(module, "exact_factors"):   # a row view of fused/split modules assembles its own
        return module.exact_factors(dtype, device)
    if f is None:
        p = module.kind.factor_pair(module, dtype, device)
        f = None if p is None else (p[0], p[1], module.scale())
    return f


def finite_or_nan(x: float) -> float | None:
    return x if math.isfinite(x) else None
