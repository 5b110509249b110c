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


def factored_svd_transforms(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0, max_cond: float = 1e4):
    """The same exact SVD of scale·b@a, returned as small r×r transforms of the factors themselves.

    R_B and R_A (the R of the QR of b and of aᵀ) come from the Cholesky factor of the r×r Gram matrices
    bᵀb and a·aᵀ (CholeskyQR: no n×r Q is ever formed); the core scale·R_B·R_Aᵀ = Uc·S·Vcᵀ is decomposed in
    float64. Returns (P [r×k], S [k], Qt [k×r]) with U = b@P and Vh = Qt@a, so a truncation to any kept
    set costs one thin product per factor: up = b@(P[:, keep]·√S), down = (√S·Qt[keep])@a.

    Returns None when this route is not accurate for the given factors (rank > min(n, m), a Gram matrix
    that is not positive definite, or an R whose diagonal spans more than `max_cond`); callers then use
    `factored_svd` (Householder QR), which is exact for any factors.
    """
    n, r = b.shape
    m = a.shape[1]
    if r > min(n, m):
        return None
    gb = (b.transpose(0, 1) @ b).double()
    ga = (a @ a.transpose(0, 1)).double()
    return core_transforms(gb, ga, scale, max_cond, torch.float64 if b.dtype == torch.float64 else torch.float32)


def core_transforms(gb: torch.Tensor, ga: torch.Tensor, scale=1.0, max_cond: float = 1e4,
                    svd_dtype: torch.dtype = torch.float64):
    """Batched second half of `factored_svd_transforms` from float64 Gram matrices [..., r, r].

    `scale` is a float or a tensor broadcastable to [...]. `svd_dtype` float32 runs the r×r SVD in single
    precision (right when the Grams came from float32 factors: its errors, ~1e-7·σ_max, are those the
    Grams already carry, at a quarter of the cost). Returns (P, S, Qt, ok) where `ok` [...] marks
    the entries this route decomposed accurately (the others must be redone with `factored_svd`).
    """
    single = gb.ndim == 2
    if single:
        gb, ga = gb.unsqueeze(0), ga.unsqueeze(0)
    lb, info_b = torch.linalg.cholesky_ex(gb)
    la, info_a = torch.linalg.cholesky_ex(ga)
    ok = (info_b == 0) & (info_a == 0)
    db, da = lb.diagonal(dim1=-2, dim2=-1), la.diagonal(dim1=-2, dim2=-1)
    for d in (db, da):
        ok &= (d.amin(-1) > d.amax(-1) / max_cond) & torch.isfinite(d).all(-1)
    eye = torch.eye(gb.shape[-1], dtype=gb.dtype, device=gb.device)
    # failed entries get the identity so the batched solves below stay finite; they are flagged by `ok`
    lb = torch.where(ok[..., None, None], lb, eye)
    la = torch.where(ok[..., None, None], la, eye)
    s_t = torch.as_tensor(scale, dtype=gb.dtype, device=gb.device)
    if s_t.ndim:
        s_t = s_t.reshape(-1, 1, 1)
    rb, ra = lb.transpose(-2, -1), la.transpose(-2, -1)  # upper-triangular R factors
    core = s_t * (rb @ ra.transpose(-2, -1))
    top = core.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    uc, s, vhc = torch.linalg.svd((core / top).to(svd_dtype), full_matrices=False)
    s = s.double() * top[..., 0]
    p = torch.linalg.solve_triangular(rb, uc.double(), upper=True)                       # R_B⁻¹·Uc
    qt = torch.linalg.solve_triangular(ra, vhc.double().transpose(-2, -1), upper=True).transpose(-2, -1)  # Vcᵀ·R_A⁻ᵀ
    if single:
        return p[0], s[0], qt[0], bool(ok[0])
    return p, s, qt, ok
