"""Quantised-coefficient coding of LoRA collections at a per-LoRA ΔW error budget (the lossy .loradb layer).

Every coded module's ΔW (exact factored SVD, lens_ops.lowrank) is stored as integer codes:

* own directions ΔW ≈ Σ_d b_d·a_dᵀ with b_d = u_d·σ_d and a_d = v_d: the codes of b_d use the LoRA's step Δ
  and those of a_d the step Δ/σ_d, so every code's rounding error costs the same ΔW energy (Δ²/12);
* related LoRAs (variants of one run, a style series) can share a per-module basis: Q′ (n×K) and P′ (m×K),
  stored once with per-column steps, and each LoRA keeps a K×K core C′ᵢ (step Δᵢ) plus its own directions
  for the residual ΔWᵢ − Q′CᵢP′ᵀ.

The error budget is per LoRA (ΔW SNR over the whole LoRA): one step Δᵢ per LoRA is found by bisection on
the real rounding error of all its codes plus the energy of the directions it drops, which is reverse
water-filling across all modules: a direction is kept only where its energy per stored code is above the
water level, whatever module it is in. The extracted tensors are rebuilt from the codes exactly as
extraction rebuilds them (entry.qlr_build), their exact ΔW error against the original is measured and
must meet the budget (Δᵢ shrinks until it does). Codes are grouped by magnitude class into zstd-coded
streams (entropy coding that adapts to each class).
"""
from __future__ import annotations

import math
import os as _os

import numpy as np
import torch

from ..lowrank import factored_svd
from .entry import qlr_build

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
LOG2E2 = 2 * math.pi * math.e       # high-rate entropy of a quantised Gaussian: log2(σ/Δ) + ½log2(2πe)
# tuning knobs (environment overrides for experiments; the defaults are the measured best)
DROP_TAU = float(_os.environ.get("LENS_QC_TAU", 3.0))    # drop a direction when σ² < τ·(n+m)·Δ²/12 (measured best)
BASIS_RHO = float(_os.environ.get("LENS_QC_RHO", 0.7))   # shared basis steps: ρ × the finest step its LoRAs use (measured)
ROUND_F = float(_os.environ.get("LENS_QC_F", 0.5))      # rounding offset (0.5: nearest; below: dead zone)
K_CANDIDATES = tuple(int(x) for x in _os.environ.get("LENS_QC_K", "4,8,12,16,20,24,28,32,40,48,64").split(","))
KMAX_FACTOR = int(_os.environ.get("LENS_QC_KF", 2))
MAX_CODE = 32767
ERROR_CHUNK = 1 << 22   # coefficients per pass when a LoRA's rounding error is evaluated


def quant(x, step):
    """Integer codes of x at `step`: sign(x)·⌊|x|/step + f⌋ (f = ½ is rounding to nearest)."""
    y = np.asarray(x) / step
    return (np.sign(y) * np.floor(np.abs(y) + ROUND_F)).astype(np.int64)


def eligible(m) -> bool:
    roles = set(m.tensors)
    if m.kind.name != "lora" or m.is_dora or roles not in ({"up", "down"}, {"up", "down", "alpha"}):
        return False
    up, down = m.tensors["up"], m.tensors["down"]
    if up.dtype not in FLOATS or down.dtype not in FLOATS or up.dtype != down.dtype:
        return False
    if not (up.ndim == 2 or (up.ndim == 4 and tuple(up.shape[2:]) == (1, 1))):
        return False
    if "alpha" not in roles and abs(m.scale() - 1.0) > 1e-12:
        return False
    return True


def _h(var, step2):
    """Estimated bits per code (entropy-coded uniform quantiser) for values of variance var."""
    return 0.5 * np.log2(1.0 + LOG2E2 * np.asarray(var) / step2)


class _Parked:
    """Singular vectors kept as float32: in a `Spill` file when one is given (a whole collection's factors
    need not fit in RAM), else in memory. `u32`/`vh32` are the stored arrays."""

    def _park(self, u, vh, spill):
        self._spill = spill
        if spill is not None:
            self._u, self._vh = spill.put(u), spill.put(vh)
        else:
            self._u, self._vh = u.to(torch.float32).numpy(), vh.to(torch.float32).numpy()

    @property
    def u32(self) -> np.ndarray:
        return self._spill.get(self._u) if self._spill is not None else self._u

    @property
    def vh32(self) -> np.ndarray:
        return self._spill.get(self._vh) if self._spill is not None else self._vh


class Mod(_Parked):
    """One coded module of one LoRA: its ΔW as an exact SVD, plus what is needed to rebuild it.

    The SVD is computed in float64, its singular vectors are parked as float32 (_Parked); `u`/`vh` give
    float64 copies for the maths of one module at a time."""

    def __init__(self, m, ref_module, spill=None):
        b, a, sc = m.lowrank(torch.float64, "cpu")
        u, s, vh = factored_svd(b, a, sc)
        keep = s > (s[0] * 1e-12 if s.numel() else 0)
        u, vh = u[:, keep], vh[keep]
        self.s = s[keep]
        self.n, self.m = int(u.shape[0]), int(vh.shape[1])
        self._park(u, vh, spill)
        self.module = m
        self.ref = ref_module
        self.energy = float((self.s ** 2).sum())

    @property
    def u(self) -> torch.Tensor:
        return torch.from_numpy(self.u32.astype(np.float64))

    @property
    def vh(self) -> torch.Tensor:
        return torch.from_numpy(self.vh32.astype(np.float64))


# ------------------------------------------------------------------ shared basis of one module group
def _top_basis(mats, k):
    """Top-k left singular vectors of the column-stack of mats (via its small Gram matrix)."""
    x = torch.cat(mats, dim=1)
    lam, w = torch.linalg.eigh(x.T @ x)
    idx = torch.argsort(lam, descending=True)[:k]
    lam, w = lam[idx].clamp_min(1e-300), w[:, idx]
    q, _ = torch.linalg.qr((x @ w) / lam.sqrt())
    return q, lam


def _col_steps(norms_over_loras, deltas, rho=BASIS_RHO):
    """Per basis column: ρ · min over LoRAs of Δᵢ / ‖row or column j of Cᵢ‖."""
    ratio = np.array([[d / max(n, 1e-300) for n in row] for row, d in zip(norms_over_loras, deltas)])
    return rho * ratio.min(axis=0)


def _int_weights(steps, max_abs):
    """Steps as base·wⱼ with integer weights (exact integer products at extraction)."""
    steps = np.maximum(steps, max_abs / MAX_CODE)
    base = steps.min() / 8.0
    w = np.clip(np.rint(steps / base), 8, 8 * 4096).astype(np.int64)
    return base, w


def _half(g):
    lam, w = torch.linalg.eigh(g)
    keep = lam > lam.max() * 1e-12
    return w[:, keep] * lam[keep].sqrt()


def _resid_sv(s, C, a, b):
    """Singular values of U·S·Vᵀ − Q·C·Pᵀ from QᵀU = a (K×r) and VᵀP = b (r×K) alone."""
    r, K = s.numel(), C.shape[0]
    gx = torch.eye(r + K, dtype=s.dtype)
    gx[:r, r:], gx[r:, :r] = a.T, a
    gy = torch.eye(r + K, dtype=s.dtype)
    gy[:r, r:], gy[r:, :r] = b, b.T
    M = torch.zeros(r + K, r + K, dtype=s.dtype)
    M[:r, :r] = torch.diag(s)
    M[r:, r:] = -C
    return torch.linalg.svdvals(_half(gx).T @ M @ _half(gy))


class Group:
    def __init__(self, name, members, mods, deltas, spill=None):
        self.name, self.members = name, members    # LoRA indices
        self.mods = mods                            # Mod per member
        self.deltas = deltas
        self.spill = spill                          # where residual factors are parked (None: in RAM)
        self.K = 0

    def choose(self, mode: str):
        mods = self.mods
        n, m = mods[0].n, mods[0].m
        T = sum(md.s.numel() for md in mods)
        kmax = min(T, n, m, KMAX_FACTOR * max(md.s.numel() for md in mods))
        uv = [(md.u, md.vh) for md in mods]
        Qa, _ = _top_basis([u * md.s for (u, _), md in zip(uv, mods)], kmax)
        Pa, _ = _top_basis([vh.T * md.s for (_, vh), md in zip(uv, mods)], kmax)
        self._proj = [(Qa.T @ u, vh @ Pa) for u, vh in uv]
        del uv
        best = None
        cands = ([0] if mode == "auto" else []) + [k for k in K_CANDIDATES if k <= kmax]
        if kmax and kmax not in cands and kmax < K_CANDIDATES[-1]:
            cands.append(kmax)
        for K in cands:
            j = self._cost(K, Qa[:, :K], Pa[:, :K], n, m)
            if j is not None and (best is None or j < best[0]):
                best = (j, K)
        self._proj = None
        if best is None or best[1] == 0:
            return False
        self.K = best[1]
        self.Q, self.P = Qa[:, :self.K].clone(), Pa[:, :self.K].clone()
        return True

    def _cost(self, K, Q, P, n, m):
        """Lagrangian rate + distortion/slope estimate of coding the group with a shared basis of size K
        (small matrices only: U, V, Q, P are orthonormal, so every product reduces to r×K blocks)."""
        total = 0.0
        rows, colsn = [], []
        for md, d, (A, Bm) in zip(self.mods, self.deltas, self._proj):
            th = d * d / 12
            lam = 1.0 / (2 * math.log(2) * th)
            if K:
                a, b = A[:K], Bm[:, :K]                # QᵀU (K×r), VᵀP (r×K)
                C = (a * md.s) @ b
                rows.append(C.norm(dim=1).numpy())
                colsn.append(C.norm(dim=0).numpy())
                cv = (C ** 2).reshape(-1).numpy()
                total += float(_h(cv, d * d).sum()) + lam * float(np.minimum(cv, th).sum())
                sv = _resid_sv(md.s, C, a, b)
            else:
                sv = md.s
            sv2 = (sv ** 2).numpy()
            keep = sv2 > DROP_TAU * (n + m) * th
            own_bits = n * _h(sv2 / n, d * d) + m * _h(sv2 / m, d * d)
            total += float(own_bits[keep].sum()) + lam * (float(sv2[~keep].sum()) + float(keep.sum()) * (n + m) * th)
        if K:
            sq = _col_steps(rows, self.deltas)
            sp = _col_steps(colsn, self.deltas)
            total += float((n * _h(1.0 / n, sq ** 2)).sum() + (m * _h(1.0 / m, sp ** 2)).sum())
        return total

    def quantise(self):
        """Quantise the basis (per-column integer-weighted steps) and compute each member's core/residual."""
        rows, colsn = [], []
        for md in self.mods:
            u, vh = md.u, md.vh
            C = (self.Q.T @ (u * md.s)) @ (vh @ self.P)
            rows.append(C.norm(dim=1).numpy())
            colsn.append(C.norm(dim=0).numpy())
        Qn, Pn = self.Q.numpy(), self.P.numpy()
        self.q_base, self.q_w = _int_weights(_col_steps(rows, self.deltas), np.abs(Qn).max(axis=0))
        self.q_codes = np.rint(Qn / (self.q_base * self.q_w)).astype(np.int32)
        sp = np.maximum(_col_steps(colsn, self.deltas), np.abs(Pn).max(axis=0) / MAX_CODE)
        self.p_steps = sp
        self.p_codes = np.rint(Pn / sp).astype(np.int32)
        self.Q = self.P = Qn = Pn = None   # only the codes are needed from here on
        Qq = torch.from_numpy(self.q_codes * (self.q_base * self.q_w))
        Pq = torch.from_numpy(self.p_codes * sp)
        pq = torch.linalg.pinv(Qq)
        pp = torch.linalg.pinv(Pq)
        self.cores, self.residuals = [], []
        for md in self.mods:
            u0, vh0 = md.u, md.vh
            C = (pq @ (u0 * md.s)) @ (vh0 @ pp.T)
            b = torch.cat([u0 * md.s, -(Qq @ C)], 1)
            a = torch.cat([vh0, Pq.T], 0)
            u, s, vh = factored_svd(b, a)
            keep = s > (s[0] * 1e-12 if s.numel() and s[0] > 0 else 0)
            self.cores.append(C.numpy())
            self.residuals.append(_Residual(u[:, keep], s[keep], vh[keep], self.spill))
        qmax = np.abs(self.q_codes * self.q_w).max(initial=0)
        return qmax


class _Residual(_Parked):
    """A member's own directions beyond the shared basis: s in RAM, u and vh parked."""

    def __init__(self, u, s, vh, spill):
        self.s = s
        self._park(u, vh, spill)


# ------------------------------------------------------------------ per-LoRA allocation
class LoraCoder:
    """All coded modules of one LoRA: own directions (residuals or whole modules) and shared-group cores."""

    def __init__(self, index, budget):
        self.index, self.budget = index, budget
        self.items = []      # (name, n, m, u, s, vh, group or None, core or None)

    def add(self, name, n, m, u, s, vh, group=None, core=None):
        """u, vh: float32 (or float64) arrays, kept by reference (Mod.u32 views cost no RAM)."""
        self.items.append((name, n, m, u.numpy() if torch.is_tensor(u) else u, s.numpy() if torch.is_tensor(s) else s,
                           vh.numpy() if torch.is_tensor(vh) else vh, group, core))

    def estimate_delta(self):
        """Δ from the high-rate model: Σ dropped σ² + Σ kept (n+m)Δ²/12 = budget."""
        es, ws = [], []   # energy and stored codes of every direction (σ², n+m), then of every core entry (c², 1)
        for _, n, m, _, s, _, _, _ in self.items:
            s = np.asarray(s, dtype=np.float64).reshape(-1)
            es.append(s * s)
            ws.append(np.full(s.size, float(n + m)))
        for it in self.items:
            if it[7] is not None:
                c = np.asarray(it[7], dtype=np.float64).reshape(-1)
                es.append(c * c)
                ws.append(np.ones(c.size))
        e = np.concatenate(es) if es else np.zeros(0)
        if not e.size:
            return 1.0
        w = np.concatenate(ws)
        lo, hi = 1e-30, math.sqrt(12 * e.max()) * 10
        for _ in range(100):
            d = math.sqrt(lo * hi)
            th = d * d / 12
            keep = e > DROP_TAU * w * th
            dist = e[~keep].sum() + (w[keep] * th).sum()
            lo, hi = (d, hi) if dist < self.budget else (lo, d)
        return lo

    def prepare(self):
        """Flatten every coefficient once so the error of any Δ is a few vectorised numpy passes.
        Direction k's coefficients (its b part, then its a part) are one contiguous run starting at
        dir_start[k]; chunks of whole directions are evaluated side by side (numpy releases the GIL)."""
        total = sum(s.shape[0] * (n + m) for _, n, m, _, s, _, _, _ in self.items)
        self.coef = np.empty(total)   # filled in place: no per-direction temporaries (they fragment the heap)
        dir_e, dir_w, starts = [], [], []
        pos = 0
        for name, n, m, u, s, vh, g, core in self.items:
            for d in range(s.shape[0]):
                sd = float(s[d])
                b, a = self.coef[pos:pos + n], self.coef[pos + n:pos + n + m]
                b[:] = u[:, d]
                b *= sd
                a[:] = vh[d]
                a *= sd
                starts.append(pos)
                pos += n + m
                dir_e.append(sd ** 2)
                dir_w.append(n + m)
        self.ndir = len(starts)
        self.dir_start = np.array(starts, dtype=np.int64)
        self.dir_e = np.array(dir_e)
        self.dir_w = np.array(dir_w, dtype=np.float64)
        cores = [it[7].reshape(-1) for it in self.items if it[7] is not None]
        self.core_coef = np.concatenate(cores) if cores else np.zeros(0)
        self.chunks = []   # (first direction, end direction) with about ERROR_CHUNK coefficients each
        k = 0
        while k < self.ndir:
            end = int(np.searchsorted(self.dir_start, self.dir_start[k] + ERROR_CHUNK, side="left"))
            end = max(end, k + 1)
            self.chunks.append((k, end))
            k = end

    def _chunk_error(self, job):
        (k0, k1), delta = job
        a = int(self.dir_start[k0])
        b = int(self.dir_start[k1]) if k1 < self.ndir else self.coef.size
        c = self.coef[a:b]
        if ROUND_F == 0.5:   # rounding to nearest: the same codes as quant() (ties have measure zero)
            r = np.rint(c / delta)
            r *= -delta
            r += c
        else:
            r = c - delta * quant(c, delta)
        r *= r
        return k0, np.add.reduceat(r, self.dir_start[k0:k1] - a)

    def error_at(self, delta, fixed=0.0):
        """Exact rounding error of every kept direction at step Δ, plus the energy of the dropped ones."""
        from .codec import _POOL
        th = delta * delta / 12
        keep = self.dir_e > DROP_TAU * self.dir_w * th
        per = np.zeros(self.ndir)
        for k0, part in _POOL.map(self._chunk_error, [(ch, delta) for ch in self.chunks]):
            per[k0:k0 + part.size] = part
        err = float(per[keep].sum() + self.dir_e[~keep].sum())
        c = self.core_coef
        err += float(((c - delta * quant(c, delta)) ** 2).sum())
        return err + fixed

    def solve_delta(self, fixed=0.0, target=None):
        target = self.budget if target is None else target
        d0 = self.estimate_delta()
        lo, hi = d0 / 64, d0 * 8
        if self.error_at(lo, fixed) > target:
            return lo
        for _ in range(40):
            d = math.sqrt(lo * hi)
            lo, hi = (d, hi) if self.error_at(d, fixed) <= target else (lo, d)
            if hi / lo < 1.002:
                break
        return lo


def _exp_balance(up_rms, down_rms):
    """A power of two 2^e that makes up·2^-e and down·2^e about equally large (exact in float64)."""
    if up_rms <= 0 or down_rms <= 0:
        return 0
    return int(round(0.5 * math.log2(up_rms / down_rms)))


def _short(x: float) -> float:
    """A step with 4 significant digits (short in the JSON table; any step works if pack and extract agree)."""
    return float(f"{x:.4g}")


def module_parts(n, m, u, s, vh, delta, group=None, gi=None, core=None):
    """The rebuild recipe of one coded module: up (n×R) column parts and down (R×m) row parts, with codes
    as numpy int arrays (stream references are filled in when the codes are written)."""
    th = delta * delta / 12
    up_parts, down_parts = [], []
    R = 0
    if group is not None:
        cc = quant(core, delta)
        if np.abs(cc).max(initial=0) > MAX_CODE:
            return None
        qw = group.q_codes * group.q_w
        bound = group.K * float(np.abs(qw).max(initial=0)) * float(np.abs(cc).max(initial=0))
        if bound >= 2.0 ** 53:
            return None
        if np.any(cc):
            # torch's pool, not numpy's BLAS: the two pools spin against each other (entry.qlr_build)
            up_val = (torch.from_numpy(qw.astype(np.float64)) @ torch.from_numpy(cc.astype(np.float64))).numpy() \
                * (group.q_base * delta)
            down_val = group.p_codes * group.p_steps
            e = _exp_balance(float(np.sqrt((up_val ** 2).mean())), float(np.sqrt((down_val ** 2).mean())))
            up_parts.append(["qc", _short(group.q_base * delta * 2.0 ** -e), [("shared", gi, j) for j in range(group.K)],
                             [int(x) for x in group.q_w], cc, group.K])
            for j in range(group.K):
                down_parts.append(["v", ("shared", gi, group.K + j), _short(float(group.p_steps[j] * 2.0 ** e))])
            R += group.K
    for d in range(s.shape[0]):
        sd = float(s[d])
        if sd * sd <= DROP_TAU * (n + m) * th:
            continue
        e = _exp_balance(sd / math.sqrt(n), 1 / math.sqrt(m))
        su, sa = _short(delta * 2.0 ** -e), _short((delta / sd) * 2.0 ** e)
        cb = quant(u[:, d].astype(np.float64) * (sd * 2.0 ** -e), su)
        ca = quant(vh[d].astype(np.float64) * 2.0 ** e, sa)
        if not cb.any() or not ca.any():
            continue
        if max(np.abs(cb).max(), np.abs(ca).max()) > MAX_CODE:
            return None
        up_parts.append(["v", cb.astype(np.int32), su])   # |codes| ≤ MAX_CODE: int32 halves what a LoRA holds
        down_parts.append(["v", ca.astype(np.int32), sa])
        R += 1
    return R, up_parts, down_parts


def build_local(rows, cols, axis, parts, shared_codes, dtype):
    """Rebuild a tensor from in-memory parts with the very function extraction uses."""
    def vec(ref, count):
        if isinstance(ref, tuple):
            return shared_codes[ref]
        return ref

    conv = []
    for p in parts:
        if p[0] == "v":
            conv.append(["v", p[1], p[2]])
        else:
            _, step, qrefs, w, cc, K = p
            conv.append(["qc", step, list(qrefs), w, cc.reshape(-1), int(cc.shape[1])])
    return qlr_build(rows, cols, axis, conv, vec, dtype, "pack")
