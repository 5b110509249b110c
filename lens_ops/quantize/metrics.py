"""Quality metrics of a quantization, on ΔW (what the model sees) and on the stored tensors.

Every metric is kept as sums (signal energy, error energy, |error| sum, max |error|, count) so module
and whole-file numbers aggregate exactly:
  SNR = 10·log10(Σx² / Σ(x−x̂)²) dB, MSE = Σ(x−x̂)²/N, MAE = Σ|x−x̂|/N, max error = max|x−x̂|,
  relative Frobenius error = ‖x−x̂‖_F / ‖x‖_F.
For a LoRA pair, ΔW's error energy comes from the factors without forming ΔW:
  s·BA − s·B̂Â = s·[E_B, B̂]·[A; E_A]   (E = exact − stored),
so ‖error‖² = s²·⟨XᵀX, YYᵀ⟩ (the identity of lens_ops.lowrank.frobenius_inner), exact, O((n+m)·r²). MAE and max
error on ΔW need every entry: they come from a dense pass (`dense`), which is optional on big files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..lowrank import frobenius_inner

SMALL = 1 << 16  # elements below which the metric maths runs in float64


@dataclass
class Stats:
    signal: float = 0.0     # Σ x²
    error: float = 0.0      # Σ (x − x̂)²
    abs_sum: float | None = 0.0   # Σ |x − x̂|   (None: not computed)
    max_abs: float | None = 0.0   # max |x − x̂| (None: not computed)
    count: int = 0

    def add(self, other: "Stats") -> "Stats":
        self.signal += other.signal
        self.error += other.error
        self.count += other.count
        if self.abs_sum is None or other.abs_sum is None:
            self.abs_sum = None
        else:
            self.abs_sum += other.abs_sum
        if self.max_abs is None or other.max_abs is None:
            self.max_abs = None
        else:
            self.max_abs = max(self.max_abs, other.max_abs)
        return self

    @property
    def snr_db(self) -> float | None:
        if self.error <= 0.0:
            return None if self.signal <= 0.0 else math.inf
        if self.signal <= 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.error)

    def as_dict(self) -> dict:
        snr = self.snr_db
        n = max(self.count, 1)
        return {
            "snr_db": None if snr is None else (snr if math.isfinite(snr) else ("inf" if snr > 0 else "-inf")),
            "mse": self.error / n,
            "mae": None if self.abs_sum is None else self.abs_sum / n,
            "max_error": self.max_abs,
            "rel_frobenius": (math.sqrt(self.error / self.signal) if self.signal > 0 else (0.0 if self.error == 0 else None)),
        }


def tensor_stats(x: torch.Tensor, xq: torch.Tensor) -> Stats:
    """Exact stats of x̂ = xq against x (float64 for small tensors; float32 with pairwise sums otherwise)."""
    w = torch.float64 if x.numel() <= SMALL or x.dtype == torch.float64 else torch.float32
    x = x.to(w)
    e = x - xq.to(w)
    if not e.numel():
        return Stats(0.0, 0.0, 0.0, 0.0, 0)
    vn = torch.linalg.vector_norm
    return Stats(float(vn(x)) ** 2, float(vn(e)) ** 2, float(vn(e, 1)), float(vn(e, math.inf)), x.numel())


def _work(*ts) -> torch.dtype:
    return torch.float64 if sum(t.numel() for t in ts) <= SMALL else torch.float32


def lowrank_signal(b: torch.Tensor, a: torch.Tensor, scale: float) -> float:
    """‖scale·b@a‖_F² exactly from the factors."""
    w = _work(b, a)
    b, a = b.to(w), a.to(w)
    return float(frobenius_inner(b, a, b, a).double()) * scale * scale


def lowrank_error(b, a, bq, aq, scale: float, with_signal: bool = False):
    """‖scale·(b@a − bq@aq)‖_F² exactly from the factors (no dense ΔW); with_signal also returns
    ‖scale·b@a‖_F² from the same Gram blocks.

    With E_b = b − bq, E_a = a − aq: b@a − bq@aq = E_b@a + bq@E_a, so
    ‖·‖² = ⟨E_b@a, E_b@a⟩ + ⟨bq@E_a, bq@E_a⟩ + 2⟨E_b@a, bq@E_a⟩, each term evaluated as in
    lens_ops.lowrank.frobenius_inner (⟨B1A1, B2A2⟩ = Σ (B1ᵀB2) ⊙ (A1A2ᵀ)): six r×r products, no cancellation,
    and bᵀb for the signal comes from the same blocks."""
    w = _work(b, a)
    b, a, bq, aq = b.to(w), a.to(w), bq.to(w), aq.to(w)
    eb, ea = b - bq, a - aq
    ebt = eb.transpose(0, 1)
    g_ee, g_eq, g_qq = ebt @ eb, ebt @ bq, bq.transpose(0, 1) @ bq
    h_aa, h_ee, h_ae = a @ a.transpose(0, 1), ea @ ea.transpose(0, 1), a @ ea.transpose(0, 1)
    d = torch.float64
    err = float((g_ee.to(d) * h_aa.to(d)).sum() + (g_qq.to(d) * h_ee.to(d)).sum()
                + 2 * (g_eq.to(d) * h_ae.to(d)).sum())
    err = max(err, 0.0) * scale * scale
    if not with_signal:
        return err
    g_bb = g_qq.to(d) + g_eq.to(d) + g_eq.to(d).transpose(0, 1) + g_ee.to(d)  # bᵀb = (bq+E)ᵀ(bq+E)
    return err, max(float((g_bb * h_aa.to(d)).sum()), 0.0) * scale * scale


def dense_stats(ref: torch.Tensor, got: torch.Tensor) -> Stats:
    return tensor_stats(ref, got)


def finalize(stats: Stats) -> dict:
    return stats.as_dict()
