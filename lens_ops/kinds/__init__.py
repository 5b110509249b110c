"""Registry of module kinds and the key-suffix table that splits a tensor name into (module, role).

Order matters as in ComfyUI's `weight_adapter.adapters`: the first kind that claims a module's roles
is its kind; a module no kind claims is `unknown` and is carried through untouched.
"""
from __future__ import annotations

from .base import ModuleKind
from .full import DiffKind, NormKind, SetWeightKind
from .lokr import LoKrKind
from .loha import LoHaKind
from .lora import LoRAKind
from .weight_dependent import BOFTKind, GLoRAKind, OFTKind


class UnknownKind(ModuleKind):
    name = "unknown"
    label = "unknown (carried through)"


KINDS: list[ModuleKind] = [LoRAKind(), LoHaKind(), LoKrKind(), GLoRAKind(), OFTKind(), BOFTKind(),
                           NormKind(), DiffKind(), SetWeightKind()]
UNKNOWN = UnknownKind()
BY_NAME = {k.name: k for k in KINDS + [UNKNOWN]}

# Roles any kind may carry (read by ComfyUI's load_lora around every adapter).
COMMON_SUFFIXES = {".alpha": "alpha", ".dora_scale": "dora_scale", ".reshape_weight": "reshape_weight",
                   ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude"}

SUFFIXES: dict[str, str] = dict(COMMON_SUFFIXES)
for _k in KINDS:
    SUFFIXES.update(_k.suffixes)
# Longest first, so `.lora_linear_layer.up.weight` wins over `.up.weight`.
SUFFIX_ORDER = sorted(SUFFIXES, key=len, reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    """('module base name', role) for a known LoRA key, or None."""
    for suf in SUFFIX_ORDER:
        if key.endswith(suf) and len(key) > len(suf):
            return key[: -len(suf)], SUFFIXES[suf]
    return None


def classify(roles: dict) -> ModuleKind:
    for kind in KINDS:
        if kind.claims(roles):
            return kind
    return UNKNOWN
