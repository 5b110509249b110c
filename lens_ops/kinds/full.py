"""Whole-tensor changes: `diff` (+ `diff_b` bias), LyCORIS norm `w_norm`/`b_norm`, and `set_weight`.

`diff` and `w_norm` are ΔW itself (ComfyUI applies them with strength only, no alpha); `set_weight`
replaces the weight, so it has no ΔW.
"""
from __future__ import annotations

import torch

from .base import ModuleKind, as_float, scale_tensor


class DiffKind(ModuleKind):
    name = "diff"
    label = "full diff"
    suffixes = {".diff": "diff", ".diff_b": "diff_b"}

    @classmethod
    def claims(cls, roles):
        return "diff" in roles or ("diff_b" in roles and not ({"up", "set_weight", "w_norm"} & roles.keys()))

    def scale(self, m):
        return 1.0

    def weight_shape(self, m):
        t = m.tensors.get("diff", m.tensors.get("diff_b"))
        return tuple(t.shape)

    def delta(self, m, dtype=torch.float32, device="cpu"):
        t = m.tensors.get("diff")
        return None if t is None else as_float(t, dtype, device)

    def scaled(self, m, factor):
        return {k: (scale_tensor(v, factor) if k in ("diff", "diff_b") else v) for k, v in m.tensors.items()}

    def describe(self, m):
        return "full diff" if "diff" in m.tensors else "bias diff"


class NormKind(DiffKind):
    name = "norm"
    label = "norm diff"
    suffixes = {".w_norm": "w_norm", ".b_norm": "b_norm"}

    @classmethod
    def claims(cls, roles):
        return "w_norm" in roles

    def weight_shape(self, m):
        return tuple(m.tensors["w_norm"].shape)

    def delta(self, m, dtype=torch.float32, device="cpu"):
        return as_float(m.tensors["w_norm"], dtype, device)

    def scaled(self, m, factor):
        return {k: (scale_tensor(v, factor) if k in ("w_norm", "b_norm") else v) for k, v in m.tensors.items()}

    def describe(self, m):
        return self.label


class SetWeightKind(ModuleKind):
    name = "set"
    label = "set_weight"
    suffixes = {".set_weight": "set_weight"}

    @classmethod
    def claims(cls, roles):
        return "set_weight" in roles

    def weight_shape(self, m):
        return tuple(m.tensors["set_weight"].shape)
