"""Rank-space transforms that leave ΔW = B@A unchanged but make the factors friendlier to per-tensor
rounding: rebalancing (B·D, D⁻¹·A, D diagonal) and rotation (B·Q, Qᵀ·A, Q orthogonal).

- rebalance: d_j = sqrt(‖A_j‖/‖B_j‖) gives column j of B and row j of A the same norm. By
  Cauchy–Schwarz this minimises ‖BD‖_F·‖D⁻¹A‖_F over diagonal D, and the rounding noise of a product
  of two per-tensor-quantized factors is ≈ (Δ_B²·n·‖A‖² + Δ_A²·m·‖B‖²)/12.
- rotate: Q = normalised Hadamard (power-of-2 ranks up to 32; Sylvester construction), interleaved
  32×32 Hadamard blocks (ranks 64, 96, 128, …), or a fixed seeded random orthogonal matrix (other ranks). Mixing rank components spreads the energy of the few large
  components of a decaying spectrum over all columns, so max|x| (which sets the step size) drops
  towards the RMS.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

METHODS = ("naive", "rebalance", "rotate", "rebalance+rotate")


@lru_cache(maxsize=64)
def _orthogonal_cpu(r: int) -> torch.Tensor:
    if r & (r - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < r:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(r)
    g = torch.Generator().manual_seed(1000003 + r)
    q, rr = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(rr)).unsqueeze(0)


BLOCK = 32  # ranks above this that are multiples of it rotate in interleaved Hadamard blocks of this size


def _block_plan(r: int) -> int:
    return BLOCK if (r > BLOCK and r % BLOCK == 0) else r


def rotation(r: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The dense r×r orthogonal matrix Q that `apply(..., 'rotate')` uses (b' = b@Q, a' = Qᵀ@a)."""
    bs = _block_plan(r)
    h = _orthogonal_cpu(bs)
    if bs == r:
        return h.to(device=device, dtype=dtype)
    nb = r // bs
    perm = torch.arange(r).reshape(bs, nb).transpose(0, 1).reshape(-1)  # block k holds columns k, k+nb, …
    q = torch.zeros(r, r, dtype=torch.float64)
    for k in range(nb):
        idx = perm[k * bs:(k + 1) * bs]
        q[idx.unsqueeze(1), torch.arange(k * bs, (k + 1) * bs).unsqueeze(0)] = h
    return q.to(device=device, dtype=dtype)


def rotation_name(r: int) -> str:
    bs = _block_plan(r)
    if bs != r:
        return f"interleaved block Hadamard {bs}"
    return "Hadamard" if r & (r - 1) == 0 else "seeded random orthogonal"


def _block_matrices(r: int, d: torch.Tensor | None, dtype, device):
    """(M_b, M_a) for b' = b·diag(d)·Q and a' = Qᵀ·diag(d)⁻¹·a, with the diagonal folded into Q (no extra pass
    over the factors). Full rotation: r×r matrices; interleaved blocks: (r/BLOCK, BLOCK, BLOCK) stacks."""
    bs = _block_plan(r)
    h = _orthogonal_cpu(bs).to(device=device, dtype=dtype)
    if bs == r:
        if d is None:
            return h, h.transpose(0, 1)
        return d.unsqueeze(1) * h, h.transpose(0, 1) / d.unsqueeze(0)
    nb = r // bs
    if d is None:
        return h.expand(nb, bs, bs), h.transpose(0, 1).expand(nb, bs, bs)
    dk = d.reshape(bs, nb).transpose(0, 1)  # dk[k, i] = d[i·nb + k]: the scale of block k's i-th column
    return dk.unsqueeze(2) * h, h.transpose(0, 1).unsqueeze(0) / dk.unsqueeze(1)


def rotate(b: torch.Tensor, a: torch.Tensor, d: torch.Tensor | None = None):
    """(b·D·Q, Qᵀ·D⁻¹·a) with D = diag(d) (identity when d is None). Ranks that are multiples of BLOCK (above
    it) use interleaved blocks: rank component j goes to block j mod (r/BLOCK), so every block mixes large and
    small components of a decaying spectrum; this costs 2·BLOCK instead of 2·r flops per element and measured as
    good as a full Hadamard. Column j = i·nb + k of b is column i of block k, so the blocks are a reshape of b
    (no gather) and one batched product per factor."""
    r = b.shape[1]
    bs = _block_plan(r)
    mb, ma = _block_matrices(r, d, b.dtype, b.device)
    if bs == r:
        return b @ mb, ma @ a
    nb = r // bs
    n, m = b.shape[0], a.shape[1]
    b2 = torch.matmul(b.reshape(n, bs, nb).permute(2, 0, 1), mb)        # (nb, n, bs)
    b2 = b2.permute(1, 0, 2).reshape(n, r)
    a2 = torch.matmul(ma, a.reshape(bs, nb, m).permute(1, 0, 2)).reshape(r, m)  # (nb, bs, m)
    return b2, a2


def rebalance_diag(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """d with (b·d) column norms equal to (a/d) row norms; 1 where either side is zero."""
    nb = (b * b).sum(0)
    na = (a * a).sum(1)
    ok = (nb > 0) & (na > 0)
    return torch.where(ok, (na / torch.where(ok, nb, 1.0)).sqrt().sqrt(), 1.0)


def apply(method: str, b: torch.Tensor, a: torch.Tensor):
    """(b', a') with b'@a' == b@a (up to float rounding) for one of METHODS."""
    if method == "naive":
        return b, a
    if method not in METHODS:
        raise ValueError(method)
    d = rebalance_diag(b, a) if "rebalance" in method else None
    if "rotate" in method:
        return rotate(b, a, d)
    return b * d, a / d.unsqueeze(1)
