"""Per-tensor symmetric codecs: int8 (scale = max|x|/127, round, clamp to ±127) and fp8 e4m3fn
(scale = max|x|/448, cast with round-to-nearest). One scale per tensor; the caller folds it into alpha.

A zero tensor gets scale 1 (it stays zero; nothing divides by zero). An all-equal tensor maps to ±127
exactly. Non-finite input is refused: a NaN would turn every scale and the whole module into NaN.
"""
from __future__ import annotations

import math

import torch

from ..errors import LensError

FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8)


def is_quantized(t: torch.Tensor) -> bool:
    return t.dtype in QUANT_DTYPES


def check_finite(x: torch.Tensor, where: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int(x.numel() - torch.isfinite(x).sum().item())
        raise LensError(f"{where} contains {bad} NaN/Inf value(s); it cannot be quantized "
                        "(fix or drop that module first).")


def encode(x: torch.Tensor, fmt: str = "int8", where: str = "tensor",
           amax: float | None = None) -> tuple[torch.Tensor, float]:
    """(quantized tensor, scale) with x ≈ q.float()·scale. `x` should be float32 (or float64); `amax`
    (max|x|) may be passed when the caller already has it."""
    if fmt not in FORMATS:
        raise LensError(f"Unknown quantization format {fmt!r}; use int8 or fp8.")
    dtype, qmax = FORMATS[fmt]
    if amax is None:
        amax = float(x.abs().max()) if x.numel() else 0.0
    if not math.isfinite(amax):
        check_finite(x, where)
    if amax == 0.0:
        return torch.zeros(x.shape, dtype=dtype, device=x.device), 1.0
    scale = amax / qmax
    y = x / scale  # exactly round(x / s) as documented (x·(qmax/amax) can differ at rounding ties)
    if fmt == "int8":
        q = y.round_().clamp_(-qmax, qmax).to(dtype)
    else:
        q = y.clamp_(-qmax, qmax).to(dtype)
    return q, scale


def decode(q: torch.Tensor, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale if scale != 1.0 else q.to(dtype)
