"""Exact low-rank linear algebra on factors, never forming the dense ΔW.

For ΔW = s·B@A (B: n×r, A: r×m): QR of B and of Aᵀ, then the SVD of the small r×r core
s·R_B·R_Aᵀ gives ΔW's exact singular values and vectors in O((n+m)·r²) instead of O(n·m·min(n,m)).
Analysis, pruning, blending and packing all use these functions.
"""
from __future__ import annotations

import torch


def work_dtype(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """float32 for half/int inputs (half-precision SVD is unsupported on some devices), float64 kept."""
    if dtype is not None:
        return dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def factored_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0, full: bool = True):
    """Exact SVD of scale·b@a from its factors: (U [n×k], S [k], Vh [k×m]) with k = min(r, n, m).

    With full=False only S is computed (cheaper: no basis products).
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.transpose(0, 1))
    core = scale * (rb @ ra.transpose(0, 1))
    if not full:
        return torch.linalg.svdvals(core)
    uc, s, vhc = torch.linalg.svd(core, full_matrices=False)
    return qb @ uc, s, vhc @ qa.transpose(0, 1)


def singular_values(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Exact singular values of scale·b@a, descending."""
    return factored_svd(b, a, scale, full=False)


def frobenius_inner(b1, a1, b2, a2) -> torch.Tensor:
    """⟨B1A1, B2A2⟩_F = tr((B1ᵀB2)(A2A1ᵀ)) without forming either product."""
    return ((b1.transpose(0, 1) @ b2) * (a1 @ a2.transpose(0, 1))).sum()


def frobenius_norm(b, a) -> torch.Tensor:
    """‖B@A‖_F from the factors."""
    return frobenius_inner(b, a, b, a).clamp_min(0).sqrt()


def balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
    """Truncate an SVD to `rank` and split it evenly: (U·√S, √S·Vh), the optimal rank-`rank` factors."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]
