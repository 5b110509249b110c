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


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx for x [..., n, r] from three of its four r/2 blocks (it is symmetric): ~15 % less work than
    one full product on the big thin factors LoRAs have (torch exposes no syrk)."""
    r = x.shape[-1]
    if r < 32:
        return x.transpose(-2, -1) @ x
    h = r // 2
    top = x[..., :h].transpose(-2, -1) @ x
    g = torch.empty(x.shape[:-2] + (r, r), dtype=x.dtype, device=x.device)
    g[..., :h, :] = top
    g[..., h:, :h] = top[..., h:].transpose(-2, -1)
    g[..., h:, h:] = x[..., h:].transpose(-2, -1) @ x[..., h:]
    return g


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
    gb = gram(b).double()
    ga = gram(a.transpose(0, 1)).double()
    return core_transforms(gb, ga, scale, max_cond, torch.float64 if b.dtype == torch.float64 else torch.float32)


def core_transforms(gb: torch.Tensor, ga: torch.Tensor, scale=1.0, max_cond: float = 1e4,
                    svd_dtype: torch.dtype = torch.float64):
    """Batched second half of `factored_svd_transforms` from Gram matrices [..., r, r].

    With a·aᵀ = L·Lᵀ (Cholesky), a = L·Q_Aᵀ with Q_A orthonormal, so ΔW = scale·b@a = (scale·b·L)·Q_Aᵀ and
    ΔWᵀΔW's nonzero spectrum is that of the r×r matrix M = scale²·Lᵀ(bᵀb)L = V·Λ·Vᵀ: σ = √Λ,
    Vh = Vᵀ·L⁻¹·a, U = scale·b·L·V·Σ⁻¹. One Cholesky and one symmetric eigensolver per module (about a
    third of the cost of the r×r SVD); only a's Gram is inverted, so b may be rank-deficient.

    `scale` is a float or a tensor broadcastable to [...]. `svd_dtype` float32 runs the eigensolver in
    single precision: right when the Grams came from float32 factors, whose rounding (~1e-7·σ_max² on σ²)
    is of the same size. The Cholesky and the r×r products run in the Grams' own dtype: float32 Grams
    (of float32 factors) are decomposed wholly in float32 — Cholesky and triangular solves are backward
    stable, so on a well-conditioned a (callers pass a tight `max_cond` there) they add rounding of the
    size the Grams already carry — at half the cost of float64. Returns (P, S, Qt, ok) where `ok` [...]
    marks the entries this route decomposed accurately (the others must be redone in float64 or with
    `factored_svd`); S is float64; columns of P for σ = 0 are zero.
    """
    single = gb.ndim == 2
    if single:
        gb, ga = gb.unsqueeze(0), ga.unsqueeze(0)
    la, info_a = torch.linalg.cholesky_ex(ga)
    ok = (info_a == 0) & torch.isfinite(gb).all(-1).all(-1)
    da = la.diagonal(dim1=-2, dim2=-1)
    ok &= (da.amin(-1) > da.amax(-1) / max_cond) & torch.isfinite(da).all(-1)
    eye = torch.eye(gb.shape[-1], dtype=gb.dtype, device=gb.device)
    # failed entries get the identity so the batched steps below stay finite; they are flagged by `ok`
    la = torch.where(ok[..., None, None], la, eye)
    gb = torch.where(ok[..., None, None], gb, eye)
    s_t = torch.as_tensor(scale, dtype=torch.float64, device=gb.device)
    if s_t.ndim:
        s_t = s_t.reshape(-1, 1, 1)
    tiny = torch.finfo(gb.dtype).tiny
    m = la.transpose(-2, -1) @ gb @ la
    m = 0.5 * (m + m.transpose(-2, -1))
    top = m.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(tiny)[..., None, None]
    lam, v = torch.linalg.eigh((m / top).to(svd_dtype))
    lam = lam.flip(-1).double().clamp_min(0) * top[..., 0].double()
    v = v.flip(-1).to(gb.dtype)
    s = (s_t.abs()[..., 0] if s_t.ndim else s_t.abs()) * lam.sqrt()                    # float64
    inv = torch.where(s * torch.finfo(gb.dtype).max > 1, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    p = (s_t.to(gb.dtype) * (la @ v)) * inv.to(gb.dtype).unsqueeze(-2)                   # scale·L·V·Σ⁻¹
    qt = torch.linalg.solve_triangular(la.transpose(-2, -1), v, upper=True).transpose(-2, -1)  # Vᵀ·L⁻¹
    if single:
        return p[0], s[0], qt[0], bool(ok[0])
    return p, s, qt, ok
