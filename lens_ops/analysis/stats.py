"""Numbers derived from one module's singular values and from a vector of ΔW elements.

Definitions (also in docs/analysis.md):
- energy = Σσᵢ² = ‖ΔW‖²_F; effective rank at p = the smallest k with Σ_{i≤k} σᵢ² ≥ p·energy (0 for ΔW = 0);
- stable rank = ‖ΔW‖²_F / σ₁²; nuclear norm = Σσᵢ; spectral norm = σ₁;
- energy captured by the top-k = Σ_{i≤k} σᵢ² / energy.
"""
from __future__ import annotations

import math

import torch

ENERGY_LEVELS = {"90": 0.90, "99": 0.99, "999": 0.999}
TOP_K = (1, 2, 4, 8, 16, 32)
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
HIST_BINS = 24
NEAR_ZERO = 1e-3  # |x| < NEAR_ZERO · std(ΔW) counts as near zero (a relative threshold: ΔW scales differ a lot)


def effective_rank(s: torch.Tensor, p: float) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ p·Σσᵢ² (σ descending); 0 when all σ are 0."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total <= 0.0:
        return 0
    c = torch.cumsum(e, 0) / total
    # a tiny tolerance so p = 0.999 is reached by a spectrum whose cumulative sum rounds to 0.99899999…
    k = int(torch.searchsorted(c, torch.tensor([p - 1e-12], dtype=c.dtype)).item()) + 1
    return min(k, int(s.numel()))


def spectrum_numbers(s: torch.Tensor, rank: int | None) -> dict:
    """Everything the report says about one spectrum (σ descending, float)."""
    s = s.double().clamp_min(0)
    e = s.pow(2)
    energy = float(e.sum())
    s1 = float(s[0]) if s.numel() else 0.0
    out = {
        "singular_values": [_r(x) for x in s.tolist()],
        "spectral_norm": s1,
        "frobenius_norm": math.sqrt(energy),
        "nuclear_norm": float(s.sum()),
        "energy": energy,
        "stable_rank": (energy / (s1 * s1)) if s1 > 0 else 0.0,
        "top_singular_values": [_r(x) for x in s[:8].tolist()],
    }
    for key, p in ENERGY_LEVELS.items():
        out[f"effective_rank_{key}"] = effective_rank(s, p)
    cum = torch.cumsum(e, 0)
    out["energy_top"] = {str(k): (float(cum[min(k, s.numel()) - 1]) / energy if energy > 0 else 0.0)
                         for k in TOP_K if rank is None or k <= max(rank, 1)}
    return out


def element_numbers(x: torch.Tensor, exact: bool, total: int, std_exact) -> list[dict]:
    """Distribution numbers of ΔW elements, batched: x [N, K] (all elements of each module when `exact`,
    else a sample), `std_exact` [N] the modules' exact ΔW std (for the near-zero threshold)."""
    x = x.double()
    if x.ndim == 1:
        x = x.unsqueeze(0)
    N, K = x.shape
    std_exact = torch.as_tensor(std_exact, dtype=torch.float64).reshape(N)
    if K == 0:
        return [{"source": "all elements", "count": 0} for _ in range(N)]
    q = torch.quantile(x, torch.tensor([p / 100 for p in PERCENTILES], dtype=x.dtype), dim=1).T  # [N, P]
    mu = x.mean(1, keepdim=True)
    c = x - mu
    var = c.pow(2).mean(1)
    kurt = torch.where(var > 0, c.pow(4).mean(1) / var.clamp_min(1e-300) ** 2 - 3.0, torch.zeros_like(var))
    lo, hi = x.amin(1), x.amax(1)
    width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    idx = ((x - lo[:, None]) / width[:, None] * HIST_BINS).floor().clamp(0, HIST_BINS - 1).long()
    counts = torch.zeros(N, HIST_BINS, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(x))
    ax = x.abs()
    pos, neg, zero = (x > 0).double().mean(1), (x < 0).double().mean(1), (x == 0).double().mean(1)
    near = (ax < NEAR_ZERO * std_exact[:, None]).double().mean(1)
    abs_mean = ax.mean(1)
    l1 = ax.sum(1) if exact else abs_mean * total
    out = []
    for k in range(N):
        lo_k, hi_k = float(lo[k]), float(hi[k])
        out.append({
            "source": "all elements" if exact else "sampled elements",
            "count": K,
            "min": lo_k, "max": hi_k,
            "median": float(q[k, 3]),
            "percentiles": {str(p): float(v) for p, v in zip(PERCENTILES, q[k].tolist())},
            "positive_fraction": float(pos[k]), "negative_fraction": float(neg[k]), "zero_fraction": float(zero[k]),
            "near_zero_fraction": float(near[k]),
            "abs_mean": float(abs_mean[k]),
            "l1_norm": float(l1[k]),
            "linf_norm": max(abs(lo_k), abs(hi_k)),
            "excess_kurtosis": float(kurt[k]),
            "histogram": {"lo": lo_k, "hi": hi_k, "counts": [int(v) for v in counts[k].tolist()]},
        })
    return out


def _r(x: float) -> float:
    """7 significant digits: float32 precision, smaller JSON."""
    return float(f"{x:.7g}")
