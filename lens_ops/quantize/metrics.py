"""Quality metrics of a quantization, on ΔW (what the model sees) and on the stored tensors.

Every metric is kept as sums (signal energy, error energy, |error| sum, max |error|, count) so module
and whole-file numbers aggregate exactly:
  SNR = 10·log10(Σx² / Σ(x−x̂)²) dB, MSE = Σ(x−x̂)²/N, MAE = Σ|x−x̂|/N, max error = max|x−x̂|,
  relative Frobenius error = ‖x−x̂‖_F / ‖x‖_F.
For a LoRA pair, ΔW's error energy comes from the factors without forming ΔW:
  s·BA − s·B̂Â = s·[E_B, B̂]·[A; E_A]   (E = exact − stored),
so ‖error‖² = s²·⟨XᵀX, YYᵀ⟩ (the identity of lens_ops.lowrank.frobenius_inner), exact, O((n+m)·r²). MAE and max
error on ΔW need every entry: they come from a dense pass (metrics "exact"), or, by default on big files, from
the same difference form evaluated exactly on a deterministic sample of ΔW rows (metrics "sampled-rows":
`abs_count` then counts the sampled entries, and the report says so).
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
    abs_count: int | None = None  # entries behind abs_sum/max_abs when they come from a row sample (None: count)
    sampled: bool = False         # abs_sum/max_abs from a deterministic sample of rows, not every entry

    @property
    def abs_n(self) -> int:
        return self.count if self.abs_count is None else self.abs_count

    def add(self, other: "Stats") -> "Stats":
        abs_n = self.abs_n + other.abs_n
        self.signal += other.signal
        self.error += other.error
        self.count += other.count
        self.abs_count = None if abs_n == self.count else abs_n
        self.sampled = self.sampled or other.sampled
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
    def label(self) -> str:
        """How MAE and max error were obtained: every entry, a sample of rows, or not at all."""
        if self.abs_sum is None or self.max_abs is None:
            return "snr-mse-only"
        return "sampled-rows" if self.sampled else "exact"

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
            "mae": None if self.abs_sum is None else self.abs_sum / max(self.abs_n, 1),
            "max_error": self.max_abs,
            "rel_frobenius": (math.sqrt(self.error / self.signal) if self.signal > 0 else (0.0 if self.error == 0 else None)),
            "metrics": self.label,
        }


def tensor_stats(x: torch.Tensor, xq: torch.Tensor, e: torch.Tensor | None = None) -> Stats:
    """Exact stats of x̂ = xq against x (float64 for small tensors; float32 BLAS dot products otherwise).
    `e` = x − xq may be passed when the caller has it (it must have been computed in x's dtype)."""
    w = torch.float64 if x.numel() <= SMALL or x.dtype == torch.float64 else torch.float32
    if not x.numel():
        return Stats(0.0, 0.0, 0.0, 0.0, 0)
    xf = x.reshape(-1).to(w)
    ef = (xf - xq.reshape(-1).to(w)) if e is None or e.dtype != w else e.reshape(-1)
    lo, hi = torch.aminmax(ef)
    # reductions: dot/aminmax/abs().sum() are ~10-25x faster than vector_norm(·, 1 | inf) on CPU
    return Stats(float(torch.dot(xf, xf)), float(torch.dot(ef, ef)), float(ef.abs().sum()),
                 max(-float(lo), float(hi)), x.numel())


def _work(*ts) -> torch.dtype:
    return torch.float64 if sum(t.numel() for t in ts) <= SMALL else torch.float32


def lowrank_signal(b: torch.Tensor, a: torch.Tensor, scale: float) -> float:
    """‖scale·b@a‖_F² exactly from the factors."""
    w = _work(b, a)
    b, a = b.to(w), a.to(w)
    return float(frobenius_inner(b, a, b, a).double()) * scale * scale


INT_GRAM_MAX_ROWS = (2**31 - 1) // (127 * 127)  # int8·int8 products summed in int32 stay exact below this


def _int_gram(q: torch.Tensor, rows: bool) -> torch.Tensor | None:
    """qᵀq (rows=False) or qqᵀ (rows=True) of an int8 matrix, exactly, in int32 (VNNI on CPUs that have it;
    ~5x faster than the float32 product); None when the platform cannot (the caller falls back to floats)."""
    k = q.shape[1] if rows else q.shape[0]
    if q.dtype != torch.int8 or k > INT_GRAM_MAX_ROWS or not hasattr(torch, "_int_mm"):
        return None
    try:
        if rows:   # _int_mm takes the transposed view as it is (a contiguous copy of int8 costs as much as the product)
            return torch._int_mm(q, q.transpose(0, 1))
        return torch._int_mm(q.transpose(0, 1), q)
    except (RuntimeError, NotImplementedError):
        return None


def lowrank_error(b, a, bq, aq, scale: float, with_signal: bool = False, eb=None, ea=None, qb=None, sb=None,
                  qa=None, sa=None):
    """‖scale·(b@a − bq@aq)‖_F² exactly from the factors (no dense ΔW); with_signal also returns
    ‖scale·b@a‖_F² from the same Gram blocks. `eb` = b − bq and `ea` = a − aq may be passed precomputed.

    With E_b = b − bq, E_a = a − aq: b@a − bq@aq = E_b@a + bq@E_a, so
    ‖·‖² = ⟨E_b@a, E_b@a⟩ + ⟨bq@E_a, bq@E_a⟩ + 2⟨E_b@a, bq@E_a⟩, each term evaluated as in
    lens_ops.lowrank.frobenius_inner (⟨B1A1, B2A2⟩ = Σ (B1ᵀB2) ⊙ (A1A2ᵀ)): six r×r products, no cancellation
    (every product involving an error factor is formed from the error itself, never as a difference of big
    Grams), and bᵀb for the signal comes from the same blocks. The r×r blocks are combined in float64.

    When the int8 codes and scales are given (bq = qb·sb, aq = qa·sa), bqᵀbq and aq·aqᵀ come from exact int32
    products of the codes, and a·aᵀ, a·E_aᵀ are assembled from aq·aqᵀ, aq·E_aᵀ and E_a·E_aᵀ (sums of large
    terms, no cancellation): four float products instead of six."""
    w = _work(b, a)
    if eb is None or eb.dtype != w:
        eb = b.to(w) - bq.to(w)
    if ea is None or ea.dtype != w:
        ea = a.to(w) - aq.to(w)
    d = torch.float64
    ebt = eb.transpose(0, 1)
    gi = _int_gram(qb, rows=False) if w == torch.float32 and qb is not None and qa is not None else None
    hi = _int_gram(qa, rows=True) if gi is not None else None
    if gi is not None and hi is not None:
        aq = aq.to(w)
        g_ee, g_eq = (ebt @ eb).to(d), (ebt @ bq.to(w)).to(d)
        h_ee, h_qe = (ea @ ea.transpose(0, 1)).to(d), (aq @ ea.transpose(0, 1)).to(d)
        g_qq = gi.to(d) * (float(sb) * float(sb))
        h_ae = h_qe + h_ee                                               # a·E_aᵀ = (aq + E_a)·E_aᵀ
        h_aa = hi.to(d) * (float(sa) * float(sa)) + h_qe + h_qe.transpose(0, 1) + h_ee  # (aq+E_a)(aq+E_a)ᵀ
    else:
        a, bq = a.to(w), bq.to(w)
        g_ee, g_eq, g_qq = ebt @ eb, ebt @ bq, bq.transpose(0, 1) @ bq
        h_aa, h_ee, h_ae = a @ a.transpose(0, 1), ea @ ea.transpose(0, 1), a @ ea.transpose(0, 1)
        g_ee, g_eq, g_qq, h_aa, h_ee, h_ae = (t.to(d) for t in (g_ee, g_eq, g_qq, h_aa, h_ee, h_ae))
    err = float((g_ee * h_aa).sum() + (g_qq * h_ee).sum() + 2 * (g_eq * h_ae).sum())
    err = max(err, 0.0) * scale * scale
    if not with_signal:
        return err
    g_bb = g_qq + g_eq + g_eq.transpose(0, 1) + g_ee  # bᵀb = (bq+E)ᵀ(bq+E)
    return err, max(float((g_bb * h_aa).sum()), 0.0) * scale * scale


SAMPLE_ROWS = 16  # ΔW rows per module behind the default (sampled) MAE and max error


def sample_rows(n: int, k: int = SAMPLE_ROWS) -> torch.Tensor | None:
    """Deterministic, evenly spaced row indices (first and last included); None when every row is taken."""
    if n <= k:
        return None
    return torch.linspace(0, n - 1, k, dtype=torch.float64).round().long().unique()


def row_sample_stats(b, a, bq, aq, scale: float, eb=None, ea=None, k: int = SAMPLE_ROWS) -> Stats:
    """MAE and max error of ΔW = scale·b@a vs scale·bq@aq on a deterministic sample of k rows of ΔW,
    exactly (float rounding) from the difference form E_b@aq + b@E_a (no cancellation), without forming ΔW.
    Only abs_sum, max_abs and abs_count are meaningful in the result (signal/error stay 0)."""
    w = _work(b, a)
    idx = sample_rows(b.shape[0], k)
    if eb is None or eb.dtype != w:
        eb = b.to(w) - bq.to(w)
    if ea is None or ea.dtype != w:
        ea = a.to(w) - aq.to(w)
    bs, ebs = (b, eb) if idx is None else (b[idx], eb[idx])
    rows = ebs.to(w) @ aq.to(w) + bs.to(w) @ ea
    if not rows.numel():
        return Stats(0.0, 0.0, 0.0, 0.0, 0, abs_count=0)
    lo, hi = torch.aminmax(rows)
    s = abs(scale)
    return Stats(0.0, 0.0, float(rows.abs().sum()) * s, max(-float(lo), float(hi)) * s, 0,
                 abs_count=rows.numel(), sampled=idx is not None)


def dense_stats(ref: torch.Tensor, got: torch.Tensor) -> Stats:
    return tensor_stats(ref, got)


def finalize(stats: Stats) -> dict:
    return stats.as_dict()
