"""Rank-space transforms that leave ΔW = B@A unchanged but make the factors friendlier to per-tensor
rounding: rebalancing (B·D, D⁻¹·A, D diagonal) and rotation (B·Q, Qᵀ·A, Q orthogonal).

- rebalance: d_j = sqrt(‖A_j‖/‖B_j‖) gives column j of B and row j of A the same norm. By
  Cauchy–Schwarz this minimises ‖BD‖_F·‖D⁻¹A‖_F over diagonal D, and the rounding noise of a product
  of two per-tensor-quantized factors is ≈ (Δ_B²·n·‖A‖² + Δ_A²·m·‖B‖²)/12.
- rotate: Q = normalised Hadamard (power-of-2 ranks; Sylvester construction) or a fixed seeded random
  orthogonal matrix (other ranks). Mixing rank components spreads the energy of the few large
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


def rotation(r: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The r×r orthogonal matrix used for rotation (Hadamard when r is a power of 2)."""
    return _orthogonal_cpu(int(r)).to(device=device, dtype=dtype)


def rotation_name(r: int) -> str:
    return "Hadamard" if r & (r - 1) == 0 else "seeded random orthogonal"


def rebalance_diag(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """d with (b·d) column norms equal to (a/d) row norms; 1 where either side is zero."""
    nb = b.norm(dim=0)
    na = a.norm(dim=1)
    ok = (nb > 0) & (na > 0)
    d = torch.ones_like(nb)
    d[ok] = (na[ok] / nb[ok]).sqrt()
    return d


def apply(method: str, b: torch.Tensor, a: torch.Tensor):
    """(b', a') with b'@a' == b@a (up to float rounding) for one of METHODS."""
    if method == "naive":
        return b, a
    if method not in METHODS:
        raise ValueError(method)
    if "rebalance" in method:
        d = rebalance_diag(b, a)
        b, a = b * d, a / d.unsqueeze(1)
    if "rotate" in method:
        q = rotation(b.shape[1], b.dtype, b.device)
        b, a = b @ q, q.transpose(0, 1) @ a
    return b, a
