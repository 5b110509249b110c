"""Rate–distortion bounds for coding LoRA collections at a per-LoRA ΔW error budget (bench/loradb.py --bound).

A module's ΔW = Σ_d σ_d·u_d·v_dᵀ is stored as its direction coefficients: n numbers of variance σ_d²/n (u_d·σ_d)
and m of variance σ_d²/m (v_d, error-weighted by σ_d), about Gaussian (singular vectors of trained factors). For
independent Gaussian coefficients the fewest bits at total squared error D is reverse water-filling: every
coefficient of variance v > θ costs ½·log₂(v/θ) bits and adds θ to the error, one below θ is dropped (adds v),
with θ set so the errors add up to D. Entropy-coded scalar quantisers (what .loradb and every practical coder
use) pay about `ECSQ_GAP` = ½·log₂(πe/6) ≈ 0.254 bit more per coded coefficient at high rate.

`independent_bits` bounds LoRAs coded one by one; `shared_bits` bounds a collection whose LoRAs are a common
part plus their own parts, when the coder knows that split exactly (an oracle: a real coder must find it).
"""
from __future__ import annotations

import math

import numpy as np

ECSQ_GAP = 0.5 * math.log2(math.pi * math.e / 6)


def coef_vars(s, n: int, m: int):
    """(variances, counts) of one module's direction coefficients from its singular values s."""
    s2 = np.asarray(s, dtype=np.float64) ** 2
    s2 = s2[s2 > 0]
    return np.concatenate([s2 / n, s2 / m]), np.concatenate([np.full(s2.size, float(n)), np.full(s2.size, float(m))])


def distortion(vws, theta: float) -> float:
    return float(sum((w * np.minimum(v, theta)).sum() for v, w in vws))


def bits(vws, theta: float, gap: float = 0.0) -> float:
    total = 0.0
    for v, w in vws:
        keep = v > theta
        total += float((w[keep] * (0.5 * np.log2(v[keep] / theta) + gap)).sum())
    return total


def water_level(vws, budget: float) -> float:
    """θ whose reverse water-filling error equals `budget` (bisection in log space)."""
    top = max((float(v.max()) for v, _ in vws if v.size), default=1.0)
    if distortion(vws, top) <= budget:
        return top
    lo, hi = top * 1e-30, top
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if distortion(vws, mid) < budget else (lo, mid)
        if hi / lo < 1 + 1e-9:
            break
    return lo


def independent_bits(loras, budgets, gap: float = 0.0) -> float:
    """Fewest bits for LoRAs coded one by one; loras[i] is a list of coef_vars, budgets[i] its error budget."""
    return sum(bits(vws, water_level(vws, b), gap) for vws, b in zip(loras, budgets))


def shared_bits(common, owns, budgets, gap: float = 0.0, steps: int = 39) -> float:
    """Fewest bits when every LoRA i is common + owns[i] and the split is known: the common part is coded once
    and its error counts in every LoRA's budget. The common part's share of the smallest budget is searched."""
    best = math.inf
    for share in np.linspace(0.0, 1.0, steps + 2)[1:-1]:
        theta = water_level(common, share * min(budgets))
        dc = distortion(common, theta)
        total = bits(common, theta, gap)
        for vws, b in zip(owns, budgets):
            total += bits(vws, water_level(vws, b - dc), gap)
        best = min(best, total)
    return best
