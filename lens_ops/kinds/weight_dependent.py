"""Kinds whose change depends on the base weight: GLoRA, OFT, BOFT.

Without the base model there is no stand-alone ΔW; the engine carries them through untouched and
reports them, and operations that need ΔW say so instead of guessing.
"""
from __future__ import annotations

from .base import ModuleKind


class GLoRAKind(ModuleKind):
    name = "glora"
    label = "GLoRA"
    needs_base_weight = True
    suffixes = {".a1.weight": "a1", ".a2.weight": "a2", ".b1.weight": "b1", ".b2.weight": "b2"}

    @classmethod
    def claims(cls, roles):
        return "a1" in roles

    def rank(self, m):
        return int(min(m.tensors["a1"].shape[0], m.tensors["a1"].shape[1]))


class OFTKind(ModuleKind):
    name = "oft"
    label = "OFT"
    needs_base_weight = True
    suffixes = {".oft_blocks": "oft_blocks", ".rescale": "rescale"}

    @classmethod
    def claims(cls, roles):
        return "oft_blocks" in roles and roles["oft_blocks"].ndim == 3


class BOFTKind(OFTKind):
    name = "boft"
    label = "BOFT"

    @classmethod
    def claims(cls, roles):
        return "oft_blocks" in roles and roles["oft_blocks"].ndim == 4
