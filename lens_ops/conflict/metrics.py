"""Per-module comparison of two LoRA modules from their factors only (the dense ΔW is never formed).

With ΔW₁ = s₁B₁A₁ and ΔW₂ = s₂B₂A₂ everything comes from two small Gram matrices,
G_B = [B₁ B₂]ᵀ[B₁ B₂] and G_A = [A₁; A₂][A₁; A₂]ᵀ (one pass over the factors, O((n+m)·(r₁+r₂)²)):

- ‖ΔW₁‖² = s₁²·Σ(B₁ᵀB₁ ⊙ A₁A₁ᵀ), ⟨ΔW₁,ΔW₂⟩_F = s₁s₂·Σ(B₁ᵀB₂ ⊙ A₁A₂ᵀ) = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)),
  cosine = ⟨ΔW₁,ΔW₂⟩ / (‖ΔW₁‖‖ΔW₂‖).
- Orthonormal bases of the column spaces of B₁, B₂ (and of the row spaces, from A₁ᵀ, A₂ᵀ): Q = B·R⁻¹ where R is
  the QR factor of B, obtained from the Gram (BᵀB = RᵀR by Cholesky; an eigen-decomposition instead when that is
  ill-conditioned, dropping directions with singular value < 1e-3·largest). The cosines of the principal angles
  between two spaces are the singular values of Q₁ᵀQ₂ = R₁⁻ᵀ(B₁ᵀB₂)R₂⁻¹; the overlap is their mean square,
  ‖Q₁ᵀQ₂‖²_F / min(k₁, k₂).
- Energy overlap: the share of ΔW₁'s energy inside B's column×row subspaces, ‖Q_B₂ᵀ ΔW₁ Q_A₂‖²/‖ΔW₁‖², and
  the other way round.

LoHa and LoKr modules use their exact two-factor form (`plain_factors`); only kinds without one (full diffs)
use their dense ΔW. Gram products run in
float32 on the given device by default (float64 with dtype=torch.float64); all small-matrix maths is float64.
"""
from __future__ import annotations

import math
import os

import torch

from ..lowrank import gram
from ..model import exact_factors

REL_TOL = 1e-3  # singular values below this fraction of the largest count as numerically zero


class small_maths:
    """Run r×r LAPACK work (Cholesky, eigh, triangular solves) on one CPU thread: multi-threading such tiny
    problems only adds synchronisation, which costs 10–100× when the machine is busy.

    With `busy_only=True` it switches to one thread only when the CPU is oversubscribed (1-minute load average
    above the core count): module-by-module loops then run 5–10× faster on a shared machine."""

    def __init__(self, device, busy_only: bool = False):
        self.cpu = torch.device(device).type == "cpu"
        if self.cpu and busy_only:
            try:
                self.cpu = os.getloadavg()[0] > (os.cpu_count() or 1)
            except OSError:
                self.cpu = False

    def __enter__(self):
        if self.cpu:
            self.saved = torch.get_num_threads()
            if self.saved != 1:
                torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.cpu and self.saved != 1:
            torch.set_num_threads(self.saved)


def _basis(gram: torch.Tensor) -> torch.Tensor:
    """W with Q = X·W orthonormal, spanning the numerically non-zero column space of X (gram = XᵀX).

    Fast path: Cholesky XᵀX = LLᵀ (L = Rᵀ of the QR of X), W = L⁻ᵀ, when L is well conditioned. Otherwise an
    eigen-decomposition drops the directions with singular value below REL_TOL of the largest."""
    if gram.shape[0] == 0:
        return gram.new_zeros(0, 0)
    l, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        d = l.diagonal()
        if bool(d.min() > REL_TOL * d.max()) and bool(torch.isfinite(d).all()):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            return torch.linalg.solve_triangular(l, eye, upper=False).T
    lam, v = torch.linalg.eigh(gram)
    top = lam.max().clamp_min(0)
    keep = lam > (REL_TOL ** 2) * top
    if top <= 0 or not bool(keep.any()):
        return gram.new_zeros(gram.shape[0], 0)
    return v[:, keep] / lam[keep].sqrt()


def _cos2(w1, g12, w2) -> torch.Tensor:
    """Σ cos²θ_k over the principal angles between span(X₁W₁) and span(X₂W₂) (= ‖Q₁ᵀQ₂‖²_F)."""
    if w1.shape[1] == 0 or w2.shape[1] == 0:
        return g12.new_zeros(())
    return (w1.T @ g12 @ w2).pow(2).sum()


def _dims(shape) -> tuple[int, int]:
    n = int(shape[0])
    m = int(math.prod(shape[1:])) if len(shape) > 1 else 1
    return n, m


def _finish(out: dict, n1: float, n2: float, inner: float) -> dict:
    tot = n1 * n1 + n2 * n2 + 2 * inner
    summed = math.sqrt(max(tot, 0.0))
    cos = inner / (n1 * n2) if n1 > 0 and n2 > 0 else 0.0
    cos = max(-1.0, min(1.0, cos))
    balance = 2 * n1 * n2 / (n1 * n1 + n2 * n2) if (n1 or n2) else 0.0
    eo = out.get("energy_overlap")
    ov = eo if eo is not None else abs(cos)
    out.update({
        "cosine": cos,
        "norm_a": n1, "norm_b": n2,
        "norm_ratio": (n1 / n2) if n2 > 0 else None,
        "inner": inner,
        "interference": summed / (n1 + n2) if (n1 + n2) > 0 else None,
        "stack_gain": summed / max(n1, n2) if max(n1, n2) > 0 else None,
        "balance": balance,
        "conflict": balance * ov * (1 - cos) / 2,
    })
    return out


def _chance(k1: int, k2: int, dim: int) -> float:
    """Mean cos² of the principal angles between random k1- and k2-dim subspaces of R^dim."""
    return max(k1, k2) / dim if dim else 0.0


def lowrank_metrics(f1, f2, dtype=torch.float32) -> dict:
    """Metrics of s₁B₁A₁ vs s₂B₂A₂ from factors (B: n×r, A: r×m, on one device)."""
    (b1, a1, s1), (b2, a2, s2) = f1, f2
    b1, b2, a1, a2 = (t.to(dtype) for t in (b1, b2, a1, a2))
    gb11, gb12, gb22 = (b1.T @ b1).double(), (b1.T @ b2).double(), (b2.T @ b2).double()
    ga11, ga12, ga22 = (a1 @ a1.T).double(), (a1 @ a2.T).double(), (a2 @ a2.T).double()
    with small_maths(gb11.device):
        return _from_grams(gb11, gb12, gb22, ga11, ga12, ga22, s1, s2, b1.shape[0], a1.shape[1])


def _from_grams(gb11, gb12, gb22, ga11, ga12, ga22, s1, s2, n, m) -> dict:
    n1 = abs(s1) * math.sqrt(max(float((gb11 * ga11).sum()), 0.0))
    n2 = abs(s2) * math.sqrt(max(float((gb22 * ga22).sum()), 0.0))
    inner = s1 * s2 * float((gb12 * ga12).sum())
    wb1, wb2, wa1, wa2 = _basis(gb11), _basis(gb22), _basis(ga11), _basis(ga22)
    col, row = _cos2(wb1, gb12, wb2), _cos2(wa1, ga12, wa2)
    out = _subspace_fields(col, row, (wb1.shape[1], wb2.shape[1]), (wa1.shape[1], wa2.shape[1]), n, m)
    # energy of ΔW₁ inside B's column × row spaces: ‖(Q_b2ᵀB₁)(A₁Q_a2)‖²
    if n1 > 0 and n2 > 0 and wb2.shape[1] and wa2.shape[1] and wb1.shape[1] and wa1.shape[1]:
        p12 = (wb2.T @ gb12.T) @ (ga12 @ wa2)          # Q_b2ᵀ B₁ A₁ Q_a2   (k×k)
        p21 = (wb1.T @ gb12) @ (ga12.T @ wa1)          # Q_b1ᵀ B₂ A₂ Q_a1
        e12 = min(1.0, s1 * s1 * float(p12.pow(2).sum()) / (n1 * n1))
        e21 = min(1.0, s2 * s2 * float(p21.pow(2).sum()) / (n2 * n2))
        out["energy_overlap"] = math.sqrt(e12 * e21)
        out["energy_a_in_b"], out["energy_b_in_a"] = e12, e21
    else:
        out["energy_overlap"] = 0.0
    out["method"] = "factors"
    return _finish(out, n1, n2, inner)


def _subspace_fields(col2, row2, kb, ka, n, m) -> dict:
    """col2/row2: Σ cos² of the principal angles (column / row spaces); kb/ka: subspace dimensions."""
    kc, kr = min(kb), min(ka)
    co = min(1.0, float(col2) / kc) if kc else 0.0
    ro = min(1.0, float(row2) / kr) if kr else 0.0
    return {
        "subspace_overlap": math.sqrt(co * ro),
        "column_overlap": co, "row_overlap": ro,
        "column_overlap_chance": _chance(*kb, n), "row_overlap_chance": _chance(*ka, m),
        "rank_a": int(kb[0]), "rank_b": int(kb[1]),
    }


DENSE_EXACT_LIMIT = 1 << 18   # dense ΔW up to this many entries get a full SVD; larger ones their top subspaces
DENSE_TOP_K = 64


def _dense_subspaces(d: torch.Tensor):
    """(U, S, V) of the numerically non-zero part of d: full SVD when small, else the top DENSE_TOP_K
    directions from a randomized SVD (documented as an approximation for large dense modules)."""
    if d.numel() <= DENSE_EXACT_LIMIT or min(d.shape) <= DENSE_TOP_K:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        v = vh.T
    else:
        g = torch.random.fork_rng(devices=[]) if d.device.type == "cpu" else None
        with g if g is not None else _null():
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(d, q=DENSE_TOP_K, niter=3)
    k = int((s > REL_TOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return u[:, :k], s[:k], v[:, :k]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def dense_metrics(d1: torch.Tensor, d2: torch.Tensor) -> dict:
    """The same metrics from two dense ΔW (LoHa, LoKr, diffs): norms and cosine exactly in float64; subspaces
    from a full SVD for small modules and from the top 64 singular directions for large ones."""
    d1, d2 = d1.double().reshape(d1.shape[0], -1), d2.double().reshape(d2.shape[0], -1)
    n1, n2 = float(d1.norm()), float(d2.norm())
    inner = float((d1 * d2).sum())
    if d1.shape[1] == 1:  # 1-D changes (norm weights, biases): no subspaces
        out = {"subspace_overlap": None, "column_overlap": None, "row_overlap": None,
               "energy_overlap": abs(inner) / (n1 * n2) if n1 and n2 else 0.0}
    else:
        exact = d1.numel() <= DENSE_EXACT_LIMIT or min(d1.shape) <= DENSE_TOP_K
        work = torch.float64 if exact else torch.float32
        u1, _, v1 = _dense_subspaces(d1.to(work))
        u2, _, v2 = _dense_subspaces(d2.to(work))
        k1, k2 = u1.shape[1], u2.shape[1]
        col = (u1.T @ u2).pow(2).sum() if k1 and k2 else d1.new_zeros(())
        row = (v1.T @ v2).pow(2).sum() if k1 and k2 else d1.new_zeros(())
        out = _subspace_fields(col, row, (k1, k2), (k1, k2), d1.shape[0], d1.shape[1])
        if k1 and k2 and n1 and n2:
            e12 = float((u2.T @ d1.to(work) @ v2).double().pow(2).sum()) / (n1 * n1)
            e21 = float((u1.T @ d2.to(work) @ v1).double().pow(2).sum()) / (n2 * n2)
            out["energy_overlap"] = math.sqrt(min(e12, 1.0) * min(e21, 1.0))
            out["energy_a_in_b"], out["energy_b_in_a"] = e12, e21
        else:
            out["energy_overlap"] = 0.0
        if not exact:
            out["subspaces"] = f"top {DENSE_TOP_K} directions (randomized SVD)"
    out["method"] = "dense"
    return _finish(out, n1, n2, inner)


def module_metrics(ma, mb, device="cpu", dtype=torch.float32) -> dict | None:
    """Metrics for one pair of modules, or None when either has no stand-alone ΔW (OFT, GLoRA, set_weight).
    Raises NonFinite (side 0 = ma, 1 = mb, index 0) when either has NaN/Inf."""
    fa, fb = ma.lowrank(torch.float64 if dtype == torch.float64 else torch.float32, device), None
    if fa is not None:
        fb = mb.lowrank(fa[0].dtype, device)
    if fa is not None and fb is not None:
        for side, (b, a, sc) in enumerate((fa, fb)):
            if not (math.isfinite(float(sc)) and bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
                raise NonFinite(side, 0)
        return lowrank_metrics(fa, fb, dtype)
    da, db = ma.delta(torch.float64, device), mb.delta(torch.float64, device)
    if da is None or db is None:
        return None
    for side, d in enumerate((da, db)):
        if not bool(torch.isfinite(d).all()):
            raise NonFinite(side, 0)
    return dense_metrics(da, db)


# ---------------------------------------------------------------- batched route (many modules of one shape)

class _Bases:
    """Batched `_basis` of K Gram matrices g (K×r×r, float64), kept as what is cheapest to apply: Q = X·W with
    W = L⁻ᵀ (L the Cholesky factor) where that is well conditioned — applied by triangular solves, never formed —
    and, for the others, an eigen-decomposition that drops the directions with singular value below REL_TOL of
    the largest (W = V·Λ^-½, dropped directions as zero columns). `k` is the kept dimension per module."""

    def __init__(self, g: torch.Tensor):
        n_mod, r, _ = g.shape
        self.k = torch.full((n_mod,), r, dtype=torch.long, device=g.device)
        self.l = self.w = None
        self.good = self.bad = None
        if r == 0 or n_mod == 0:
            self.w = torch.zeros_like(g)
            return
        l, info = torch.linalg.cholesky_ex(g)
        d = l.diagonal(dim1=-2, dim2=-1)
        ok = (info == 0) & torch.isfinite(d).all(-1)
        ok &= d.min(-1).values > REL_TOL * d.max(-1).values
        if bool(ok.all()):
            self.l = l
            return
        self.good, self.bad = ok.nonzero().squeeze(1), (~ok).nonzero().squeeze(1)
        self.l = l[self.good]
        lam, v = torch.linalg.eigh(g[self.bad])
        top = lam.max(-1).values.clamp_min(0)
        keep = (lam > (REL_TOL ** 2) * top[:, None]) & (top[:, None] > 0)
        inv = torch.where(keep, lam.clamp_min(torch.finfo(g.dtype).tiny).rsqrt(),
                          torch.zeros((), dtype=g.dtype, device=g.device))
        self.w = v * inv[:, None, :]
        self.k[self.bad] = keep.sum(-1)

    def wt(self, m: torch.Tensor) -> torch.Tensor:
        """Wᵀ·m for every module of the batch (m: K×r×c): L⁻¹·m by a triangular solve, or Wᵀ·m."""
        if self.good is None:
            if self.l is None:
                return self.w.mT @ m
            return torch.linalg.solve_triangular(self.l, m, upper=False)
        out = torch.empty_like(m)
        if self.good.numel():
            out[self.good] = torch.linalg.solve_triangular(self.l, m[self.good], upper=False)
        out[self.bad] = self.w.mT @ m[self.bad]
        return out

    def right(self, m: torch.Tensor) -> torch.Tensor:
        """m·W for every module of the batch (m: K×c×r)."""
        return self.wt(m.mT).mT


def lowrank_metrics_batch(b1, a1, b2, a2, s1, s2) -> list[dict]:
    """`lowrank_metrics` for K modules of one shape at once: b1 K×n×r1, a1 K×r1×m, b2 K×n×r2, a2 K×r2×m
    (float32 or float64, on one device), s1/s2 the K scales. Gram products are one batched matmul each in the
    factors' dtype; all r×r work (Cholesky, triangular inverses, eigen fallbacks, whitened cross Grams) is
    batched in float64. Returns one metrics dict per module, equal to `lowrank_metrics` up to float rounding."""
    n, m = b1.shape[1], a1.shape[2]
    gb11, gb12, gb22 = gram(b1).double(), (b1.mT @ b2).double(), gram(b2).double()
    ga11, ga12, ga22 = gram(a1.mT).double(), (a1 @ a2.mT).double(), gram(a2.mT).double()
    _check_finite([gb11, ga11], s1, 0)
    _check_finite([gb22, ga22], s2, 1)
    with small_maths(gb11.device):          # r×r LAPACK work: one thread (see small_maths)
        return _batch_from_grams(gb11, gb12, gb22, ga11, ga12, ga22, s1, s2, n, m)


class NonFinite(Exception):
    """Module `index` of a batch (of LoRA `side` 0 = A, 1 = B) has NaN/Inf in a factor or its scale."""

    def __init__(self, side: int, index: int):
        super().__init__(side, index)
        self.side, self.index = side, index


def _check_finite(grams, scales, side: int) -> None:
    """A NaN/Inf anywhere in a factor reaches the diagonal of its Gram (a sum of squares), so the traces tell,
    at r×r cost, which module cannot be compared (the eigen-solvers would fail on it with a raw LAPACK error)."""
    ok = torch.ones(grams[0].shape[0], dtype=torch.bool, device=grams[0].device)
    for g in grams:
        ok &= torch.isfinite(g.diagonal(dim1=-2, dim2=-1).sum(-1))
    for k, (good, sc) in enumerate(zip(ok.tolist(), scales)):
        if not good or not math.isfinite(float(sc)):
            raise NonFinite(side, k)


def _batch_from_grams(gb11, gb12, gb22, ga11, ga12, ga22, s1, s2, n, m) -> list[dict]:
    dev = gb11.device
    s1t = torch.tensor([float(x) for x in s1], dtype=torch.float64, device=dev)
    s2t = torch.tensor([float(x) for x in s2], dtype=torch.float64, device=dev)
    sq1 = (gb11 * ga11).sum((1, 2)).clamp_min(0)
    sq2 = (gb22 * ga22).sum((1, 2)).clamp_min(0)
    inner = s1t * s2t * (gb12 * ga12).sum((1, 2))
    b1, b2, a1, a2 = _Bases(gb11), _Bases(gb22), _Bases(ga11), _Bases(ga22)
    mb, ma = b2.right(gb12), a2.right(ga12)               # B₁ᵀQ_b2, A₁Q_a2 (r1×r2)
    col = b1.wt(mb).pow(2).sum((1, 2))                    # ‖Q_b1ᵀQ_b2‖²
    row = a1.wt(ma).pow(2).sum((1, 2))
    p12 = (mb.mT @ ma).pow(2).sum((1, 2))                 # ‖Q_b2ᵀ B₁A₁ Q_a2‖²
    p21 = (b1.wt(gb12) @ a1.wt(ga12).mT).pow(2).sum((1, 2))   # ‖(Q_b1ᵀB₂)(A₂Q_a1)‖² = ‖Q_b1ᵀ B₂A₂ Q_a1‖²
    rows = torch.stack([sq1, sq2, inner, col, row, p12, p21]).T.tolist()
    ks = torch.stack([b1.k, b2.k, a1.k, a2.k]).T.tolist()
    out = []
    for (q1, q2, inn, c2, r2, e12, e21), (k_b1, k_b2, k_a1, k_a2), x1, x2 in zip(rows, ks, s1, s2):
        n1, n2 = abs(x1) * math.sqrt(q1), abs(x2) * math.sqrt(q2)
        res = _subspace_fields(c2, r2, (k_b1, k_b2), (k_a1, k_a2), n, m)
        if n1 > 0 and n2 > 0 and k_b1 and k_b2 and k_a1 and k_a2:
            e12 = min(1.0, x1 * x1 * e12 / (n1 * n1))
            e21 = min(1.0, x2 * x2 * e21 / (n2 * n2))
            res["energy_overlap"] = math.sqrt(e12 * e21)
            res["energy_a_in_b"], res["energy_b_in_a"] = e12, e21
        else:
            res["energy_overlap"] = 0.0
        res["method"] = "factors"
        out.append(_finish(res, n1, n2, inn))
    return out


def plain_factors(module, dtype=torch.float32, device="cpu"):
    """(B, A, scale) of a module as stored, without a float copy for plain LoRA modules (the batched route copies
    them once, into its float buffer); other product kinds through `module.lowrank`; LoKr and LoHa through their
    exact two-factor form (`kind.factor_pair`: rank r₁·r₂ for LoHa, kron of the sides' factors for LoKr) when it is
    thinner than the layer, so they too are compared from factors, never from a dense ΔW (which took ~0.1 s per
    module for the dense SVDs). None when not a product."""
    t = module.tensors
    if module.kind.name == "lora" and "up" in t and "down" in t and "mid" not in t:
        up, down = t["up"], t["down"]
        return up.flatten(start_dim=1), down.flatten(start_dim=1), module.scale()
    f = module.lowrank(dtype, device)
    if f is None and not module.is_dora:
        p = exact_factors(module, dtype, device)
        if p is not None and p[0].ndim == 2 and p[1].ndim == 2 and p[0].shape[1] < min(p[0].shape[0], p[1].shape[1]):
            f = p
    return f
