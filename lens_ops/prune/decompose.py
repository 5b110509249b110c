"""One exact SVD per module, computed once and shared by every recipe of a run.

Plain LoRA / LoCon / Tucker modules go through `lens_ops.lowrank`: the r×r Gram matrices of the
factors (one thin product each, float32 work on half inputs), their Cholesky factors (the R of the
factors' QR), and one r×r core SVD — batched over all modules of equal rank. What is kept per module
is tiny: the singular values S and two r×k transforms (U = B@P, Vh = Qt@A), so new factors are one
thin product per factor at write time and no dense ΔW (n×m) is ever formed. Modules where that route
is not accurate (rank above min(n, m), singular or badly conditioned factors) are redone with the
shared Householder-QR `factored_svd` in float64. LoHa/LoKr modules, only when conversion is asked
for, are decomposed from their dense ΔW (they are not a product of two factors).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LensError
from ..lowrank import core_transforms, factored_svd, gram, work_dtype
from ..parallel import ordered

CHUNK = 48  # modules per batched r×r step (bounds the Gram memory)
F32_MAX_COND = 1e3  # float32 Grams are decomposed in float32 when a's Cholesky diagonal spans less than this


@dataclass
class Decomp:
    module: object            # the LoRAModule
    route: str                # "factored" | "explicit" | "zero" | "dense"
    n: int                    # rows of ΔW (out features)
    m: int                    # columns of flattened ΔW (in features · kernel)
    rank: int | None          # original rank (None for LoKr without a decomposed side)
    scale: float              # ComfyUI's alpha / rank (1 without alpha)
    S: torch.Tensor           # singular values of ΔW (scale included), float64, descending
    P: torch.Tensor | None = None
    Qt: torch.Tensor | None = None
    U: torch.Tensor | None = None
    Vh: torch.Tensor | None = None
    B: torch.Tensor | None = None  # the factors in the work dtype, kept for the build when asked
    A: torch.Tensor | None = None
    base: dict = field(default_factory=dict)   # base-model numbers: fro, spn, subspace (per dim)

    @property
    def name(self) -> str:
        return self.module.name

    @property
    def dims(self) -> int:
        return int(self.S.shape[0])

    def dim_cost(self, elem: int) -> int:
        """Bytes one kept dimension costs in the output (one column of up + one row of down)."""
        return elem * (self.n + self.m)

    def basis(self, device="cpu", b=None, a=None):
        """(U [n×k], Vh [k×m]) float32, the exact singular vectors (built on demand)."""
        if self.U is not None:
            return self.U.to(device), self.Vh.to(device)
        if b is None:
            b, a, _ = self.module.lowrank(torch.float32, device)
        return b @ self.P.to(device), self.Qt.to(device) @ a


def _not_finite(m):
    raise LensError(f"Module {m.name} contains NaN/Inf values; it cannot be pruned (fix or drop that module first).")


def _transforms(gb, ga, scales, dt):
    """`core_transforms` of a batch: float32 Grams wholly in float32 where a is well conditioned
    (F32_MAX_COND), the rest again in float64 (those still not accurate are flagged for Householder QR)."""
    f32 = gb.dtype == torch.float32
    p, s, qt, ok = core_transforms(gb, ga, scales, max_cond=F32_MAX_COND if f32 else 1e4, svd_dtype=dt)
    redo = torch.nonzero(~ok).flatten()
    if f32 and redo.numel():
        p2, s2, qt2, ok2 = core_transforms(gb[redo].double(), ga[redo].double(), scales[redo], svd_dtype=dt)
        p[redo], s[redo], qt[redo], ok[redo] = p2.to(p.dtype), s2, qt2.to(qt.dtype), ok2
    return p, s, qt, ok


def _decompose_chunk(chunk: list, r: int, dt, device, keep_factors: bool) -> dict[str, Decomp]:
    """Decomps of one chunk of modules of rank r: Grams, batched r×r core, fallbacks."""
    out: dict[str, Decomp] = {}
    grams_b, grams_a, scales, shapes, fallback, factors = [], [], [], [], [], []
    for m in chunk:
        b, a = m.kind.lowrank(m, dt, device)
        n, mm = b.shape[0], a.shape[1]
        shapes.append((n, mm))
        factors.append((b, a) if keep_factors else (None, None))
        scales.append(m.scale())
        if r > min(n, mm):
            if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
                _not_finite(m)
            fallback.append("zero" if m.is_zero() else "qr")
        else:
            gb1 = gram(b)
            ga1 = gram(a.transpose(0, 1))
            tb, ta = float(gb1.trace()), float(ga1.trace())
            if not math.isfinite(tb + ta):
                _not_finite(m)
            if tb == 0.0 or ta == 0.0:
                fallback.append("zero")  # an all-zero factor: ΔW = 0
            else:
                fallback.append(None)
                grams_b.append(gb1)
                grams_a.append(ga1)
        del b, a
    fast = [i for i, f in enumerate(fallback) if f is None]
    if fast:
        gb = torch.stack(grams_b)
        ga = torch.stack(grams_a)
        del grams_b, grams_a
        p, s, qt, ok = _transforms(gb, ga, torch.tensor([scales[i] for i in fast], dtype=torch.float64), dt)
        del gb, ga
        for j, i in enumerate(fast):
            m = chunk[i]
            if bool(ok[j]):
                out[m.name] = Decomp(m, "factored", *shapes[i], r, scales[i], s[j].cpu(),
                                     P=p[j].to(dt), Qt=qt[j].to(dt), B=factors[i][0], A=factors[i][1])
            else:
                fallback[i] = "qr"
    for i, f in enumerate(fallback):
        m = chunk[i]
        if f == "zero":
            k = min(r, *shapes[i])
            out[m.name] = Decomp(m, "zero", *shapes[i], r, scales[i], torch.zeros(k, dtype=torch.float64))
        elif f == "qr":
            b, a = m.kind.lowrank(m, torch.float64, device)
            u, s, vh = factored_svd(b, a, scales[i])
            out[m.name] = Decomp(m, "explicit", *shapes[i], r, scales[i], s.cpu(), U=u.to(dt), Vh=vh.to(dt))
    return out


def decompose(modules: list, device="cpu", progress: Callable[[int, int], None] | None = None,
              convert_lyco: bool = False, release: Callable | None = None,
              keep_factors: bool = False, parallel: bool = False) -> dict[str, Decomp]:
    """Exact SVD of every LoRA module (and LoHa/LoKr when `convert_lyco`) in `modules`.

    `release(modules)` is called once a chunk of modules' factors have been read (a memory-mapped input gives
    its pages back). `keep_factors` keeps each factored module's work-dtype factors on its Decomp (B, A)
    so a streamed build that follows at once does not read and convert them again. `parallel` decomposes
    two chunks at once on the CPU (`lens_ops.parallel`; not from inside another parallel pass)."""
    device = torch.device(device)
    todo = [m for m in modules if m.kind.name == "lora"]
    lyco = [m for m in modules if convert_lyco and m.kind.name in ("loha", "lokr") and not m.is_dora]
    total = len(todo) + len(lyco)
    done = 0
    out: dict[str, Decomp] = {}
    by_rank = defaultdict(list)
    for m in todo:
        by_rank[(m.rank(), work_dtype(m.tensors["up"]))].append(m)
    jobs = [(group[start:start + CHUNK], r, dt) for (r, dt), group in by_rank.items()
            for start in range(0, len(group), CHUNK)]

    def work(job):
        return _decompose_chunk(*job, device, keep_factors)
    results = ordered(jobs, work, device, parallel)
    try:
        for (chunk, _, _), decs in zip(jobs, results):
            out.update(decs)
            done += len(chunk)
            if release is not None:
                release(chunk)
            if progress is not None:
                progress(done, total)
    finally:
        results.close()
    for m in lyco:
        pair = m.kind.factor_pair(m, torch.float64, device)
        if pair is not None and pair[0].shape[1] < min(pair[0].shape[0], pair[1].shape[1]):
            # LoKr's kron / LoHa's Hadamard product is exactly scale·B@A of inner size r1·r2: the shared factored
            # SVD gives the same U, S, Vh as a dense SVD, without one of the (possibly wide) n×m ΔW
            if not (bool(torch.isfinite(pair[0]).all()) and bool(torch.isfinite(pair[1]).all())):
                _not_finite(m)
            u, s, vh = factored_svd(pair[0], pair[1], m.scale())
            n_rows, n_cols = pair[0].shape[0], pair[1].shape[1]
        else:
            d = m.delta(torch.float64, device)
            mat = d.reshape(d.shape[0], -1)
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            n_rows, n_cols = mat.shape
        out[m.name] = Decomp(m, "dense", n_rows, n_cols, m.rank(), 1.0, s.cpu(),
                             U=u.float(), Vh=vh.float())
        done += 1
        if progress is not None:
            progress(done, total)
    return out
