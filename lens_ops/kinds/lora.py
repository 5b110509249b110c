"""Plain LoRA, LoCon (conv, incl. 3×3), Tucker `lora_mid` and DoRA: ΔW = scale · up @ down.

The up/down key pairs cover every naming ComfyUI's LoRAAdapter accepts (kohya `lora_up/lora_down`,
PEFT `lora_B/lora_A` with or without `.default`, diffusers `_lora.up`, `.lora.up`,
`.lora_linear_layer.up`, Mochi's bare `lora_B`, XLabs `.up.weight`). scale = alpha / down.shape[0].
"""
from __future__ import annotations

import torch

from .base import ModuleKind, as_float, chain_error, scale_tensor

UP_DOWN_SUFFIXES = {
    ".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_mid.weight": "mid",
    "_lora.up.weight": "up", "_lora.down.weight": "down",
    ".lora_B.weight": "up", ".lora_A.weight": "down",
    ".lora_B.default.weight": "up", ".lora_A.default.weight": "down",
    ".lora.up.weight": "up", ".lora.down.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".lora_B": "up", ".lora_A": "down",
    ".up.weight": "up", ".down.weight": "down",
}


def fold_mid(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """Tucker: combine down [r,in,1,1] and mid [r,r,kh,kw] into one [r, in·kh·kw] factor (comfy's formula)."""
    r = down.shape[0]
    final_shape = [down.shape[1], r, mid.shape[2], mid.shape[3]]
    m2 = torch.mm(down.transpose(0, 1).flatten(start_dim=1), mid.transpose(0, 1).flatten(start_dim=1))
    return m2.reshape(final_shape).transpose(0, 1).flatten(start_dim=1)


class LoRAKind(ModuleKind):
    name = "lora"
    label = "LoRA"
    suffixes = UP_DOWN_SUFFIXES

    @classmethod
    def claims(cls, roles):
        return "up" in roles and "down" in roles

    def validate(self, m):
        up, down, mid = m.tensors["up"], m.tensors["down"], m.tensors.get("mid")
        if up.ndim not in (2, 3, 4, 5) or down.ndim not in (2, 3, 4, 5):
            raise chain_error(m, f"up {tuple(up.shape)} / down {tuple(down.shape)} are not matrices")
        if up.shape[1] != down.shape[0]:
            raise chain_error(m, f"up {tuple(up.shape)} and down {tuple(down.shape)} do not chain "
                                 f"(rank {up.shape[1]} vs {down.shape[0]})")
        if mid is not None and (mid.ndim != 4 or mid.shape[0] != down.shape[0] or mid.shape[1] != down.shape[0]):
            raise chain_error(m, f"lora_mid {tuple(mid.shape)} does not match rank {down.shape[0]}")
        for role in ("up", "down") + (("mid",) if mid is not None else ()):
            if m.tensors[role].numel() == 0:
                raise chain_error(m, f"{role} tensor is empty")

    def rank(self, m):
        return int(m.tensors["down"].shape[0])

    def weight_shape(self, m):
        up, down, mid = m.tensors["up"], m.tensors["down"], m.tensors.get("mid")
        if mid is not None:
            return (up.shape[0], down.shape[1]) + tuple(mid.shape[2:])
        return (up.shape[0],) + tuple(down.shape[1:])

    def lowrank(self, m, dtype=torch.float32, device="cpu"):
        up = as_float(m.tensors["up"], dtype, device).flatten(start_dim=1)
        down = as_float(m.tensors["down"], dtype, device)
        if "mid" in m.tensors:
            down = fold_mid(down, as_float(m.tensors["mid"], dtype, device))
        return up, down.flatten(start_dim=1)

    def delta(self, m, dtype=torch.float32, device="cpu"):
        b, a = self.lowrank(m, dtype, device)
        return (self.scale(m) * (b @ a)).reshape(self.weight_shape(m))

    def is_zero(self, m):
        return not m.tensors["up"].any() or not m.tensors["down"].any() or \
            ("mid" in m.tensors and not m.tensors["mid"].any())

    def scaled(self, m, factor):
        up = m.tensors["up"]
        # a bias change next to the pair (`.diff_b`) is part of the layer's change: it scales too
        bias = {"diff_b": scale_tensor(m.tensors["diff_b"], factor)} if "diff_b" in m.tensors else {}
        if up.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2) and not m.is_dora:
            # quantised factors: rescaling them would leave their grid; the factor goes into alpha (float32)
            alpha = m.alpha if m.alpha is not None else float(self.rank(m))
            return {**m.tensors, "alpha": torch.tensor(alpha * factor, dtype=torch.float32), **bias}
        return {**m.tensors, "up": scale_tensor(up, factor), **bias}

    def describe(self, m):
        mid = "mid" in m.tensors
        conv = m.tensors["down"].ndim >= 3 and m.tensors["down"].shape[2:].numel() > 1
        text = "LoCon (Tucker)" if mid else ("LoCon (conv)" if conv else
                                             ("LoRA (1×1 conv)" if m.tensors["down"].ndim >= 3 else "LoRA"))
        return text + (" + DoRA" if m.is_dora else "")
