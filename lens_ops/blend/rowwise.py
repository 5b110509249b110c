"""TIES and DARE one block of rows at a time, so a module's task vectors are never all held whole.

TIES and DARE act entry by entry on the dense task vectors τ_i = w_i·ΔW_i of a module. A FLUX layer has up to
66 M entries (264 MB each in float32): holding both τ_i, their magnitudes, the trimmed copies, the sign sum and the
counts at once took ~2.4 GB for one layer, far above the 1 GB of working memory the blend promises. Here each τ_i
is a `Rows` source that gives any block of rows — recomputed from the module's factors (s·c·B_i[rows]@A_i, cheap at
LoRA ranks) or sliced from a dense ΔW (kinds without factors) — and the merge writes one output matrix block by
block. Blocks of ~256 K entries stay in the CPU cache, so the entrywise steps also run faster than over whole
matrices.

TIES keeps the entries of each τ_i whose magnitude is at least its k-th largest; `magnitude_threshold` finds that
value exactly without holding |τ_i|: a sample of evenly spaced entries brackets it, one pass counts the entries below
the bracket and gathers those inside, and when the bracket misses (or holds too many tied values) histograms of the
float bit patterns narrow it down exactly in a few more passes.
"""
from __future__ import annotations

import math
import threading
from typing import Callable

import torch

from ..parallel import ordered

BLOCK_ENTRIES = 1 << 18      # entries per block of rows (1 MiB in float32: stays in cache)
SAMPLE_ENTRIES = 1 << 18     # entries in the sample that brackets TIES's threshold
GATHER_CAP = 1 << 23         # most entries gathered inside a bracket before narrowing by histograms instead
HIST_BITS = 12               # each histogram pass narrows the bit-pattern range by 2^12


class Rows:
    """Rows [i0, i1) of a dense n×m task vector on demand (`get`), and single entries τ[i, j] (`entries`)."""

    def __init__(self, n: int, m: int, dtype, device, get: Callable, entries: Callable):
        self.n, self.m, self.dtype, self.device = n, m, dtype, device
        self.get, self.entries = get, entries

    @classmethod
    def dense(cls, t: torch.Tensor) -> "Rows":
        t2 = t.reshape(t.shape[0], -1)
        return cls(t2.shape[0], t2.shape[1], t2.dtype, t2.device, lambda i0, i1: t2[i0:i1], lambda i, j: t2[i, j])

    @classmethod
    def factors(cls, b: torch.Tensor, a: torch.Tensor, coef: float) -> "Rows":
        """τ = coef·b@a (b: n×r, a: r×m), never formed whole."""
        def get(i0, i1):
            return (b[i0:i1] @ a).mul_(coef)

        def entries(i, j):
            step = max(1, BLOCK_ENTRIES // max(1, b.shape[1]))
            return torch.cat([(b[i[k:k + step]] * a[:, j[k:k + step]].T).sum(1) for k in range(0, i.numel(), step)]
                             ).mul_(coef)
        return cls(b.shape[0], a.shape[1], b.dtype, b.device, get, entries)

    def blocks(self):
        step = max(1, BLOCK_ENTRIES // max(1, self.m))
        for i0 in range(0, self.n, step):
            yield i0, min(self.n, i0 + step)


def _each_block(src: Rows, work: Callable):
    """work((i0, i1)) for every block of rows, two blocks at a time on worker threads (one torch thread each, see
    lens_ops.parallel), results in order."""
    return ordered(list(src.blocks()), work, src.device)


def _bits_dtype(dtype):
    return {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}[dtype]


def magnitude_threshold(src: Rows, k: int) -> torch.Tensor:
    """The k-th largest |τ| over the whole task vector (1 ≤ k ≤ n·m), exactly: what `kthvalue` of the flattened
    magnitudes gives for rank n·m − k + 1. Non-negative floats order like their bit patterns, which the exact
    fallback narrows by histograms."""
    total = src.n * src.m
    j = total - k + 1                                     # 1-based rank from the smallest
    if total <= SAMPLE_ENTRIES:
        return src.get(0, src.n).abs().reshape(-1).kthvalue(j).values
    pos = torch.linspace(0, total - 1, SAMPLE_ENTRIES, dtype=torch.float64).round().long().to(src.device)
    sample = src.entries(pos // src.m, pos % src.m).abs()   # evenly spaced entries: every row, columns cycling
    m, p = sample.numel(), j / total
    spread = 8 * math.sqrt(m * p * (1 - p)) + 16
    lo = sample.kthvalue(max(1, int(p * m - spread))).values
    hi = sample.kthvalue(min(m, int(p * m + spread) + 1)).values
    lock, held = threading.Lock(), [0]

    def count_and_gather(block):
        mag = src.get(*block).abs()
        sel = mag[(mag >= lo) & (mag <= hi)]
        with lock:
            held[0] += sel.numel()
            keep = held[0] <= GATHER_CAP
        return int((mag < lo).sum()), (sel if keep else None)
    below, inside = 0, []
    for n_below, sel in _each_block(src, count_and_gather):
        below += n_below
        inside.append(sel)
    rank = j - below
    if held[0] <= GATHER_CAP and 1 <= rank <= held[0]:
        return torch.cat(inside).kthvalue(rank).values
    return _threshold_by_histograms(src, j)


def _threshold_by_histograms(src: Rows, j: int) -> torch.Tensor:
    """The j-th smallest |τ| by narrowing a range of bit patterns [lo, hi] with one histogram pass each (exact,
    with any number of tied values; at most ⌈bits/HIST_BITS⌉ passes)."""
    bits_dt = _bits_dtype(src.dtype)
    width = torch.finfo(src.dtype).bits
    lo, hi = 0, (1 << (width - 1)) - 1                    # every non-negative pattern (finite inputs only)
    below = 0                                             # entries whose pattern is < lo
    while lo < hi:
        shift = max(0, (hi - lo).bit_length() - HIST_BITS)
        nbins = ((hi - lo) >> shift) + 1

        def histogram(block, lo=lo, hi=hi, shift=shift, nbins=nbins):
            b = src.get(*block).abs().reshape(-1).view(bits_dt).to(torch.long)
            b = b[(b >= lo) & (b <= hi)]
            return torch.bincount((b - lo) >> shift, minlength=nbins)
        hist = sum(_each_block(src, histogram))
        cum = hist.cumsum(0)
        pos = int(torch.searchsorted(cum, torch.tensor(j - below, device=cum.device)))
        below += int(cum[pos - 1]) if pos else 0
        lo, hi = lo + (pos << shift), min(hi, lo + ((pos + 1) << shift) - 1)
    return torch.tensor([lo], dtype=torch.long).to(bits_dt).view(src.dtype)[0].to(src.device)


def ties_rows(srcs: list[Rows], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023) on task vectors given as row sources: keep each τ_i's top `density` fraction by
    magnitude, elect the sign of Σ trimmed τ_i per entry, and average the trimmed entries that agree with it
    (disjoint mean). Returns the merged n×m matrix; only it and one block per input are held."""
    first = srcs[0]
    total = first.n * first.m
    thresholds = []
    for s in srcs:
        k = max(1, int(round(density * total)))
        thresholds.append(None if k >= total else magnitude_threshold(s, k))
    out = torch.empty(first.n, first.m, dtype=first.dtype, device=first.device)
    zero = torch.zeros((), dtype=first.dtype, device=first.device)

    def merge(block):
        trimmed = []
        for s, thr in zip(srcs, thresholds):
            t = s.get(*block)
            trimmed.append(t if thr is None else torch.where(t.abs() >= thr, t, zero))
        sign = trimmed[0].clone()
        for t in trimmed[1:]:
            sign += t
        sign.sign_()
        num = torch.zeros_like(sign)
        cnt = torch.zeros_like(sign)
        for t in trimmed:
            agree = (t * sign) > 0                         # agrees with the elected sign and is non-zero
            num += torch.where(agree, t, zero)
            cnt += agree
        torch.div(num, cnt.clamp_min_(1), out=out[block[0]:block[1]])
    for _ in _each_block(first, merge):
        pass
    return out


def dare_rows(srcs: list[Rows], density: float, seeds: list[int]) -> torch.Tensor:
    """DARE (Yu et al. 2024) on row sources: keep each entry of τ_i with probability `density` (input i's mask drawn
    from a generator seeded with seeds[i], row block after row block: the same stream as one draw of the whole
    matrix), rescale the kept ones by 1/density, and add the task vectors."""
    first = srcs[0]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = torch.zeros(first.n, first.m, dtype=first.dtype, device=first.device)
    zero = torch.zeros((), dtype=first.dtype, device=first.device)
    for i0, i1 in first.blocks():
        acc = out[i0:i1]
        for s, g in zip(srcs, gens):
            keep = (torch.rand((i1 - i0, first.m), generator=g) < density).to(first.device)
            acc += torch.where(keep, s.get(i0, i1) / density, zero)
    return out


def sum_of_squares(d: torch.Tensor) -> float:
    """Σ d² in float64, one block of rows at a time (no float64 copy of a big matrix)."""
    d2 = d.reshape(d.shape[0], -1)
    step = max(1, BLOCK_ENTRIES // max(1, d2.shape[1]))
    return sum(float(d2[i:i + step].double().pow(2).sum()) for i in range(0, d2.shape[0], step))
