"""The blend maths for one module, on factors where possible.

With ΔW_i = s_i·B_i@A_i and strengths w_i (c_i = w_i·s_i):
- concat: B = [c₁B₁ | c₂B₂ | …], A = [A₁; A₂; …]  →  B@A = Σ c_i B_i A_i exactly (rank Σ r_i).
- svd: the exact SVD of that sum from the concatenated factors (QR/Cholesky of the factors + a small core SVD,
  `lens_ops.lowrank`), truncated to the target rank and split evenly (U√S, √S Vh): the optimal rank-k
  approximation (Eckart–Young) without forming ΔW.
- pca (alias randomized): a seeded randomized range finder on the same factored operator (never dense), for
  very large concatenated ranks; near-optimal, the report gives the achieved error.
- ties / dare: on the dense ΔW entries, one module at a time and one block of rows at a time (`rowwise`),
  re-factored by SVD.
"""
from __future__ import annotations

import zlib

import torch

from .. import lowrank as lr
from ..conflict.metrics import small_maths
from .rowwise import Rows, dare_rows, sum_of_squares, ties_rows

ZERO_TOL = 1e-6   # singular values below this fraction of the largest are dropped by "exact" SVD routes


def concat_factors(factors, coefs):
    """factors: [(B_i, A_i, s_i)], coefs: [w_i] → (B, A) with B@A = Σ w_i s_i B_i A_i."""
    b = torch.cat([f[0] * (w * f[2]) for f, w in zip(factors, coefs)], 1)
    a = torch.cat([f[1] for f in factors], 0)
    return b, a


def exact_svd(b: torch.Tensor, a: torch.Tensor):
    """(U, S, Vh) of b@a from the factors (the shared kernels of lens_ops.lowrank)."""
    core = getattr(lr, "core_transforms", None)
    if core is not None and b.shape[1] <= min(b.shape[0], a.shape[1]):
        gb = (b.transpose(0, 1) @ b).double()
        ga = (a @ a.transpose(0, 1)).double()
        with small_maths(b.device):
            p, s, qt, ok = core(gb, ga)
        if ok:
            return b @ p.to(b.dtype), s.to(b.dtype), qt.to(b.dtype) @ a
    return lr.factored_svd(b, a)


def keep_rank(s: torch.Tensor, rank: int) -> int:
    """Target rank capped by what exists; rank 0 keeps every numerically non-zero direction."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    nz = int((s > s[0] * ZERO_TOL).sum())
    return nz if rank <= 0 else min(rank, nz)


def truncation_error(s: torch.Tensor, k: int) -> float:
    """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F of the optimal rank-k truncation, from the singular values."""
    tot = float(s.double().pow(2).sum())
    return (float(s[k:].double().pow(2).sum()) / tot) ** 0.5 if tot > 0 else 0.0


def svd_blend(factors, coefs, rank: int):
    b, a = concat_factors(factors, coefs)
    u, s, vh = exact_svd(b, a)
    k = keep_rank(s, rank)
    up, down = lr.balanced_factors(u, s, vh, k)
    return up, down, truncation_error(s, k)


def _seed(seed: int, key: str, i: int = 0) -> int:
    return (int(seed) * 1000003 + zlib.crc32(key.encode()) * 31 + i) % (2 ** 63 - 1)


def randomized_blend(factors, coefs, rank: int, seed: int = 0, key: str = "", oversample: int = 10, iters: int = 2):
    """Randomized SVD of Σ c_i B_i A_i on the factored operator (falls back to exact when it cannot save work)."""
    b, a = concat_factors(factors, coefs)
    big_r = b.shape[1]
    k = rank if rank > 0 else big_r
    width = min(k + oversample, big_r, b.shape[0], a.shape[1])
    if width >= big_r or k >= big_r:
        return svd_blend(factors, coefs, rank)
    g = torch.Generator().manual_seed(_seed(seed, key))
    omega = torch.randn(a.shape[1], width, generator=g, dtype=torch.float32).to(device=b.device, dtype=b.dtype)
    y = b @ (a @ omega)
    for _ in range(iters):
        q, _ = torch.linalg.qr(y)
        z, _ = torch.linalg.qr(a.T @ (b.T @ q))
        y = b @ (a @ z)
    q, _ = torch.linalg.qr(y)
    c = (q.T @ b) @ a                                   # width × m
    uc, s, vh = torch.linalg.svd(c, full_matrices=False)
    u = q @ uc
    kk = keep_rank(s, k)
    up, down = lr.balanced_factors(u, s, vh, kk)
    # achieved error ‖ΔW − up@down‖ from factors: ‖ΔW‖² − ‖P ΔW‖² + ‖(P ΔW) − trunc‖² with P = QQᵀ
    tot = float(lr.frobenius_norm(b, a).double() ** 2)
    err2 = tot - float(s[:kk].double().pow(2).sum())
    return up, down, (max(err2, 0.0) / tot) ** 0.5 if tot > 0 else 0.0


def ties_merge(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023) on dense task vectors τ_i = w_i·ΔW_i: keep each τ_i's top `density` fraction by
    magnitude, elect the sign of Σ trimmed τ_i per entry, and average the trimmed entries that agree with it
    (disjoint mean). The blend itself feeds `rowwise.ties_rows` row sources (never every τ_i whole)."""
    return ties_rows([Rows.dense(t) for t in taus], density).reshape(taus[0].shape)


def dare_seeds(seed: int, key: str, n: int) -> list[int]:
    """The generator seed of each input's DARE mask for module `key` (reproducible on any device)."""
    return [_seed(seed, key, i + 1) for i in range(n)]


def dare_masks(shape, density: float, seed: int, key: str, n: int):
    """The seeded keep-masks DARE uses for module `key`, whole (`rowwise.dare_rows` draws the same, block by block)."""
    return [torch.rand(shape, generator=torch.Generator().manual_seed(s)) < density
            for s in dare_seeds(seed, key, n)]


def dare_merge(taus: list[torch.Tensor], density: float, seed: int = 0, key: str = "") -> torch.Tensor:
    """DARE (Yu et al. 2024) on dense τ_i = w_i·ΔW_i: drop entries at random (keep probability `density`, seeded
    per module and input), rescale the kept ones by 1/density, and add the task vectors."""
    merged = dare_rows([Rows.dense(t) for t in taus], density, dare_seeds(seed, key, len(taus)))
    return merged.reshape(taus[0].shape)


def dense_to_factors(d: torch.Tensor, rank: int, exact_limit: int = 1 << 20):
    """(up, down, relative error) of the best rank-`rank` factors of a dense 2-D ΔW: exact SVD for small
    matrices (≤ `exact_limit` entries or rank ≥ ¼ of the smaller side), else a randomized SVD with 4 power
    iterations (near-optimal; the returned error is the achieved one)."""
    n, m = d.shape
    k_max = min(n, m)
    if d.numel() <= exact_limit or rank <= 0 or rank * 4 >= k_max:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = keep_rank(s, rank)
        up, down = lr.balanced_factors(u, s, vh, k)
        return up, down, truncation_error(s, k)
    u, s, v = torch.svd_lowrank(d, q=min(rank + 10, k_max), niter=4)
    k = keep_rank(s, rank)
    up, down = lr.balanced_factors(u, s, v.T, k)
    tot = sum_of_squares(d)
    err2 = tot - float(s[:k].double().pow(2).sum())
    return up, down, (max(err2, 0.0) / tot) ** 0.5 if tot > 0 else 0.0
