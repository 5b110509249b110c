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
            "signal_energy": self.signal,     # ‖ΔW‖² (or Σx²): what SNR and relative error are taken against
            "error_energy": self.error,       # ‖ΔW − ΔŴ‖² (or Σ(x − x̂)²)
        }


SUM_CHUNK = 1 << 20   # float32 entries per float64 partial sum in `_sums64`


def _sums64(v: torch.Tensor) -> tuple[float, float]:
    """(Σv², Σ|v|) of a flat float32 tensor, accumulated in float64 a chunk at a time: one float32 dot product
    over millions of entries drifts by 10⁻⁴–10⁻³ (measured on a real LoKr's 14.7 M-entry ΔW: MSE 0.27 % off),
    and a whole float64 copy would double the memory."""
    sq = ab = 0.0
    for c in v.split(SUM_CHUNK):
        c = c.double()
        sq += float(torch.dot(c, c))
        ab += float(c.abs().sum())
    return sq, ab


def tensor_stats(x: torch.Tensor, xq: torch.Tensor, e: torch.Tensor | None = None) -> Stats:
    """Exact stats of x̂ = xq against x: float64 throughout for small tensors; for big float32 ones the difference
    is formed in float32 (its rounding is ~10⁻⁷ of itself) and summed in float64 (`_sums64`).
    `e` = x − xq may be passed when the caller has it (it must have been computed in x's dtype)."""
    w = torch.float64 if x.numel() <= SMALL or x.dtype == torch.float64 else torch.float32
    if not x.numel():
        return Stats(0.0, 0.0, 0.0, 0.0, 0)
    xf = x.reshape(-1).to(w)
    ef = (xf - xq.reshape(-1).to(w)) if e is None or e.dtype != w else e.reshape(-1)
    lo, hi = torch.aminmax(ef)
    if w == torch.float64:   # reductions: dot/abs().sum() are ~10-25x faster than vector_norm(·, 1) on CPU
        sx, se, sa = float(torch.dot(xf, xf)), float(torch.dot(ef, ef)), float(ef.abs().sum())
    else:
        (sx, _), (se, sa) = _sums64(xf), _sums64(ef)
    return Stats(sx, se, sa, max(-float(lo), float(hi)), x.numel())


def _work(*ts) -> torch.dtype:
    return torch.float64 if sum(t.numel() for t in ts) <= SMALL else torch.float32


def lowrank_signal(b: torch.Tensor, a: torch.Tensor, scale: float) -> float:
    """‖scale·b@a‖_F² exactly from the factors."""
    w = _work(b, a)
    b, a = b.to(w), a.to(w)
    return float(frobenius_inner(b, a, b, a).double()) * scale * scale


INT_GRAM_MAX_ROWS = (2**31 - 1) // (127 * 127)  # int8·int8 products summed in int32 stay exact below this


FINE = 254.0  # each finer int8 level's step: the previous level's rounding error (≤ step/2) fits ±127
MIN_STEP = 1e-30  # below this, 254²/step overflows float32: such (near-zero) factors take the float route


def _code_levels(q: torch.Tensor, e: torch.Tensor, s: float, dim: int):
    """(M, (t₁, t₂), d₃): the stored int8 codes q and two finer int8 levels of its rounding error e (|e| ≤ s/2),
    e = t₁·q₂ + t₂·q₃ + ρ with t₁ = s/254, t₂ = t₁/254, |ρ| ≤ t₂/2, concatenated along `dim` as [q, q₂, q₃];
    d₃ = Σ q₃² per rank component (along `dim`), float64. (The quantizer's own route, fold._int8_candidate, builds
    them from its residual x/s − q directly; this form is for callers that hold e = x − s·q.)"""
    return residual_levels(q, e * (1.0 / float(s)), s, dim)


def residual_levels(q: torch.Tensor, d: torch.Tensor, s: float, dim: int):
    """`_code_levels` from the rounding residual in units of the step, d = x/s − q (|d| ≤ ½), which the int8
    encoder has for free: q₂ = round(254·d), q₃ = round(254·(254·d − q₂)). `q` may be the int8 codes or the
    rounded floats. d is overwritten. The three levels are written straight into one int8 buffer (no
    concatenation pass)."""
    r = q.shape[dim]
    shape = list(q.shape)
    shape[dim] = 3 * r
    out = torch.empty(shape, dtype=torch.int8, device=q.device)
    part = lambda k: out.narrow(dim, k * r, r)
    part(0).copy_(q)
    y = d.mul_(FINE)
    q2 = torch.round(y)
    part(1).copy_(q2)
    q3 = y.sub_(q2).mul_(FINE).round_()          # |y − q₂| ≤ ½, so |q₃| ≤ 127: no clamp needed for either
    part(2).copy_(q3)
    t1 = float(s) / FINE
    return out, (t1, t1 / FINE), q3.square_().sum(1 - dim).double()


def _code_grams(qb, eb, sb, qa, ea, sa):
    """The six r×r blocks of `lowrank_error` from two int8 matrix products (see `level_grams`), or None when the
    platform cannot or a scale is too small for float32 steps (the caller then uses floats)."""
    if not code_grams_apply(qb, qa, sb, sa):
        return None
    return level_grams(_code_levels(qb, eb, sb, 1), _code_levels(qa, ea, sa, 0), sb, sa)


def code_grams_apply(qb, qa, sb, sa) -> bool:
    """Whether `level_grams` can serve this pair: int8 codes, int32 sums that cannot overflow, steps that float32
    can hold, and a torch with the int8 product."""
    return qb.dtype == torch.int8 and qa.dtype == torch.int8 and level_route_ok(qb.shape[0], qa.shape[1], sb, sa)


def level_route_ok(n: int, m: int, sb, sa) -> bool:
    """`code_grams_apply` for the shapes and steps alone (the codes are made int8 by `residual_levels`)."""
    return (max(n, m) <= INT_GRAM_MAX_ROWS and hasattr(torch, "_int_mm")
            and MIN_STEP < float(sb) and MIN_STEP < float(sa))


def level_grams(levels_b, levels_a, sb, sa):
    """The six r×r blocks of `lowrank_error` from two int8 matrix products (exact int32; with VNNI ~1.6× faster
    than the four float32 and two int8 products they replace), or None when the platform's int8 product fails.
    `levels_b`/`levels_a` are `residual_levels` of b (along dim 1) and of a (along dim 0).

    Each factor is written in int8 levels: x = s·q + t₁·q₂ + t₂·q₃ + ρ (`residual_levels`), i.e. its stored code q
    and two levels of the rounding error E = t₁·q₂ + t₂·q₃ + ρ. One product per side,
    [q, q₂, q₃]ᵀ·[q, q₂] for b (and its transpose form for a), holds every block needed:
    - b̂ᵀb̂ = s²·qᵀq exactly; E_bᵀb̂ = s·(t₁·q₂ᵀq + t₂·q₃ᵀq), up to ρ, 254⁻² of E;
    - E_bᵀE_b = t₁²·q₂ᵀq₂ + t₁t₂·(q₃ᵀq₂ + q₂ᵀq₃) + t₂²·diag(q₃ᵀq₃): of the last block (≈ 254⁻² of the whole)
      only its diagonal (Σ q₃² per component, one pass) is kept: the rest are sums of uncorrelated terms.
    The error energy is then accurate to ~10⁻⁶ of itself (tested against dense float64 ΔW)."""
    mb, (tb1, tb2), db3 = levels_b
    ma, (ta1, ta2), da3 = levels_a
    r = mb.shape[1] // 3
    try:
        g = torch._int_mm(mb.transpose(0, 1), mb[:, :2 * r])        # rows [q, q₂, q₃] × columns [q, q₂]
        h = torch._int_mm(ma[:2 * r], ma.transpose(0, 1))           # rows [q; q₂] × columns [q; q₂; q₃]
    except (RuntimeError, NotImplementedError):
        return None
    d = torch.float64
    g, h = g.to(d), h.to(d)
    sb, sa = float(sb), float(sa)
    gb = lambda i, j: g[i * r:(i + 1) * r, j * r:(j + 1) * r]    # level i (rows) × level j (columns)
    hb = lambda i, j: h[i * r:(i + 1) * r, j * r:(j + 1) * r]
    g_qq = gb(0, 0) * (sb * sb)
    g_eq = gb(1, 0) * (tb1 * sb) + gb(2, 0) * (tb2 * sb)                  # E_bᵀb̂
    x = gb(2, 1) * (tb1 * tb2)
    g_ee = gb(1, 1) * (tb1 * tb1) + x + x.transpose(0, 1) + torch.diag(db3 * (tb2 * tb2))   # E_bᵀE_b
    h_qq = hb(0, 0) * (sa * sa)
    h_qe = hb(0, 1) * (sa * ta1) + hb(0, 2) * (sa * ta2)                  # â·E_aᵀ
    y = hb(1, 2) * (ta1 * ta2)
    h_ee = hb(1, 1) * (ta1 * ta1) + y + y.transpose(0, 1) + torch.diag(da3 * (ta2 * ta2))   # E_a·E_aᵀ
    h_ae = h_qe + h_ee                                                  # a·E_aᵀ = (â + E_a)·E_aᵀ
    h_aa = h_qq + h_qe + h_qe.transpose(0, 1) + h_ee                    # (â + E_a)(â + E_a)ᵀ
    return g_ee, g_eq, g_qq, h_aa, h_ee, h_ae


def error_from_blocks(blocks, scale: float) -> tuple[float, float]:
    """(‖scale·(b@a − b̂@â)‖², ‖scale·b@a‖²) from the six Gram blocks (see `lowrank_error`)."""
    g_ee, g_eq, g_qq, h_aa, h_ee, h_ae = blocks
    err = float((g_ee * h_aa).sum() + (g_qq * h_ee).sum() + 2 * (g_eq * h_ae).sum())
    err = max(err, 0.0) * scale * scale
    g_bb = g_qq + g_eq + g_eq.transpose(0, 1) + g_ee  # bᵀb = (bq+E)ᵀ(bq+E)
    return err, max(float((g_bb * h_aa).sum()), 0.0) * scale * scale


def lowrank_error(b, a, bq, aq, scale: float, with_signal: bool = False, eb=None, ea=None, qb=None, sb=None,
                  qa=None, sa=None):
    """‖scale·(b@a − bq@aq)‖_F² exactly from the factors (no dense ΔW); with_signal also returns
    ‖scale·b@a‖_F² from the same Gram blocks. `eb` = b − bq and `ea` = a − aq may be passed precomputed.

    With E_b = b − bq, E_a = a − aq: b@a − bq@aq = E_b@a + bq@E_a, so
    ‖·‖² = ⟨E_b@a, E_b@a⟩ + ⟨bq@E_a, bq@E_a⟩ + 2⟨E_b@a, bq@E_a⟩, each term evaluated as in
    lens_ops.lowrank.frobenius_inner (⟨B1A1, B2A2⟩ = Σ (B1ᵀB2) ⊙ (A1A2ᵀ)): six r×r products, no cancellation
    (every product involving an error factor is formed from the error itself, never as a difference of big
    Grams), and bᵀb for the signal comes from the same blocks. The r×r blocks are combined in float64.

    When the int8 codes and scales are given (bq = qb·sb, aq = qa·sa) on a big module, the six blocks come from
    two int8 products of the codes and two finer int8 levels of their rounding errors (`_code_grams`; a·aᵀ and
    a·E_aᵀ assembled from â·âᵀ, â·E_aᵀ and E_a·E_aᵀ: sums of large terms, no cancellation)."""
    w = _work(b, a)
    if eb is None or eb.dtype != w:
        eb = b.to(w) - bq.to(w)
    if ea is None or ea.dtype != w:
        ea = a.to(w) - aq.to(w)
    d = torch.float64
    blocks = None
    if w == torch.float32 and qb is not None and qa is not None:
        blocks = _code_grams(qb, eb, sb, qa, ea, sa)
    if blocks is not None:
        g_ee, g_eq, g_qq, h_aa, h_ee, h_ae = blocks
    else:
        ebt = eb.transpose(0, 1)
        a, bq = a.to(w), bq.to(w)
        g_ee, g_eq, g_qq = ebt @ eb, ebt @ bq, bq.transpose(0, 1) @ bq
        h_aa, h_ee, h_ae = a @ a.transpose(0, 1), ea @ ea.transpose(0, 1), a @ ea.transpose(0, 1)
        g_ee, g_eq, g_qq, h_aa, h_ee, h_ae = (t.to(d) for t in (g_ee, g_eq, g_qq, h_aa, h_ee, h_ae))
    err, signal = error_from_blocks((g_ee, g_eq, g_qq, h_aa, h_ee, h_ae), scale)
    return (err, signal) if with_signal else err


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


def residual_abs(d: torch.Tensor, s: float) -> tuple[float, float]:
    """(Σ|e|, max|e|) of a tensor's rounding error e = s·d from the encoder's residual d = x/s − q: the step scales
    out of the reductions, so no dequantized copy or error tensor is formed. (Σx² and Σe² come from the traces of
    the Gram blocks: `level_grams`.)"""
    if not d.numel():
        return 0.0, 0.0
    df = d.reshape(-1).to(torch.float64 if d.numel() <= SMALL else d.dtype)
    lo, hi = torch.aminmax(df)
    return float(df.abs().sum()) * s, max(-float(lo), float(hi)) * s


def residual_row_stats(qb, db, sb: float, a, da, sa: float, scale: float, k: int = SAMPLE_ROWS) -> Stats:
    """`row_sample_stats` from the int8 encoder's residuals (b̂ = s_b·q_b, E_b = s_b·d_b, E_a = s_a·d_a):
    the sampled rows of ΔW − ΔŴ = E_b@a + b̂@E_a = s_b·(d_b@a + s_a·q_b@d_a), exactly (float rounding)."""
    idx = sample_rows(qb.shape[0], k)
    dbs, qbs = (db, qb) if idx is None else (db[idx], qb[idx])
    rows = dbs @ a
    rows.addmm_(qbs.to(a.dtype), da, alpha=float(sa))
    if not rows.numel():
        return Stats(0.0, 0.0, 0.0, 0.0, 0, abs_count=0)
    lo, hi = torch.aminmax(rows)
    f = abs(scale) * float(sb)
    return Stats(0.0, 0.0, float(rows.abs().sum()) * f, max(-float(lo), float(hi)) * f, 0,
                 abs_count=rows.numel(), sampled=idx is not None)


def dense_stats(ref: torch.Tensor, got: torch.Tensor) -> Stats:
    return tensor_stats(ref, got)


def finalize(stats: Stats) -> dict:
    return stats.as_dict()
