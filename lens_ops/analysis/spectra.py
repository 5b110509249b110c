"""Per-module numbers: exact spectra and norms of ΔW, element statistics, stored-factor statistics.

LoRA-kind modules (plain, LoCon, Tucker, DoRA's low-rank part) never form ΔW: modules of equal factor
shapes are stacked and go through the factored route of `lens_ops.lowrank` in batches (R of the QR of
up and of downᵀ, singular values of the small core R_B·R_Aᵀ; `batched_singular_values` is the batched
form of `lowrank.singular_values`, tested equal to it). Mean and standard deviation of ΔW come exactly
from the factors (Σ ΔW = s·(1ᵀB)(A1), ‖ΔW‖_F² = Σσ²). Order statistics (percentiles, sign fractions,
extremes) need elements: they are computed on a fixed sample of ΔW elements, each element exact
(s·B[i,:]·A[:,j]) at the crossings of 64 random rows and 64 random columns; modules with at most
SAMPLE elements use all of them. LoKr modules never form ΔW either: their Kronecker structure gives the
spectrum, sums, L1 and max exactly and any element directly (`_kron_module`). LoHa/diff/norm modules
form their dense ΔW (they are rarely large) and use all elements up to DENSE_ALL elements.
"""
from __future__ import annotations

import math
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable

import torch

from ..kinds import UNKNOWN
from ..kinds.base import svdvals_tall
from ..lowrank import work_dtype
from ..model import DTYPE_NAMES, LoRAModel, LoRAModule
from .pages import PageReleaser
from .stats import element_numbers, spectrum_numbers

SAMPLE = 4096
SIDE = 64
DENSE_ALL = 1 << 21
BATCH_ELEMENTS = 1 << 20  # factor elements per stacked batch (bounds extra memory to ~4 MB in float32)
DENSE_KINDS = ("loha", "lokr", "diff", "norm")
WEIGHT_DEPENDENT = ("glora", "oft", "boft")


def batched_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of b[i]@a[i] for stacked factors b [N,n,r], a [N,r,m]: `lowrank.singular_values`
    batched (R-only QR of b and aᵀ, SVD of the r×r cores), [N, min(r,n,m)] descending."""
    rb = torch.linalg.qr(b, mode="r")[1]
    ra = torch.linalg.qr(a.transpose(-2, -1), mode="r")[1]
    return torch.linalg.svdvals(rb @ ra.transpose(-2, -1))


def base_entry(m: LoRAModule) -> dict:
    """Facts every module has, whatever its kind."""
    try:
        shape = m.weight_shape()
    except Exception:
        shape = None
    rank = m.rank() if m.kind is not UNKNOWN else None
    alpha = m.alpha
    dtypes = sorted({DTYPE_NAMES.get(t.dtype, str(t.dtype)) for r, t in m.tensors.items() if r != "alpha"})
    return {
        "kind": m.kind.name,
        "kind_label": m.kind.describe(m) if m.kind is not UNKNOWN else "unknown",
        "component": m.component,
        "block": m.block,
        "shape": list(shape) if shape is not None else None,
        "rank": rank,
        "alpha": alpha,
        "scale": (m.scale() if m.kind is not UNKNOWN else None),
        "alpha_over_rank": (alpha / rank) if (alpha is not None and rank) else None,
        "params": m.params,
        "bytes": m.nbytes,
        "dtype": "/".join(dtypes),
        "dora": m.is_dora,
        "route": "none",
        "note": None,
        "singular_values": None,
        "effective_rank_90": None, "effective_rank_99": None, "effective_rank_999": None,
    }


def factor_numbers(xs: list[torch.Tensor]) -> dict:
    """Exact statistics of one module's stored factor values (tensors cast to float)."""
    return factor_numbers_batched([x.reshape(1, -1) for x in xs])[0]


def factor_numbers_batched(parts: list[torch.Tensor]) -> list[dict]:
    """Exact statistics of stored factor values, batched: each part [N, ...] holds one factor of N modules."""
    N = parts[0].shape[0]
    dims = [tuple(range(1, p.ndim)) for p in parts]
    n = sum(p[0].numel() for p in parts)
    l1 = sum(torch.linalg.vector_norm(p, 1, dim=d).double() for p, d in zip(parts, dims))
    finite = torch.isfinite(l1)
    allfinite = bool(finite.all())
    if not allfinite:
        nan = sum(torch.isnan(p).sum(d) for p, d in zip(parts, dims))
        inf = sum(torch.isinf(p).sum(d) for p, d in zip(parts, dims))
        parts = [torch.where(finite.reshape((N,) + (1,) * (p.ndim - 1)), p, torch.zeros((), dtype=p.dtype))
                 for p in parts]
    l2 = sum(torch.linalg.vector_norm(p, 2, dim=d).double() ** 2 for p, d in zip(parts, dims)).sqrt()
    s = sum(p.sum(d, dtype=torch.float64) for p, d in zip(parts, dims))
    mm = [torch.aminmax(p.reshape(N, -1), dim=1) for p in parts]
    lo = torch.stack([x.min for x in mm]).amin(0)
    hi = torch.stack([x.max for x in mm]).amax(0)
    out = []
    for k in range(N):
        if not bool(finite[k]):
            out.append({"count": n, "nan": int(nan[k]), "inf": int(inf[k]), "min": None, "max": None,
                        "l1_norm": None, "l2_norm": None, "linf_norm": None, "mean": None, "std": None})
            continue
        mean = float(s[k]) / n if n else 0.0
        l2k = float(l2[k])
        out.append({"count": n, "nan": 0, "inf": 0, "min": float(lo[k]), "max": float(hi[k]),
                    "l1_norm": float(l1[k]), "l2_norm": l2k, "linf_norm": max(abs(float(lo[k])), abs(float(hi[k]))),
                    "mean": mean, "std": math.sqrt(max(l2k * l2k / n - mean * mean, 0.0)) if n else 0.0})
    return out


def _finish(entry: dict, s: torch.Tensor | None, mean: float, numel: int, elems: dict | None):
    if s is None:
        return
    entry.update(spectrum_numbers(s, entry["rank"]))
    energy = entry["energy"]
    entry["mean"] = mean
    entry["std"] = math.sqrt(max(energy / numel - mean * mean, 0.0)) if numel else 0.0
    entry["numel"] = numel
    entry["elements"] = elems
    entry["l2_norm"] = entry["frobenius_norm"]  # of ΔW (= Frobenius), exact
    entry["all_zero"] = entry["energy"] == 0.0


def _sample_grid(n: int, m: int, gen: torch.Generator, device):
    """Rows and columns whose crossings are the sampled ΔW elements: all of them when n·m ≤ SAMPLE,
    else SIDE distinct random rows × SIDE distinct random columns (SIDE² = SAMPLE elements)."""
    if n * m <= SAMPLE:
        return torch.arange(n, device=device), torch.arange(m, device=device), True
    rows = torch.randperm(n, generator=gen)[:min(n, SIDE)].to(device)
    cols = torch.randperm(m, generator=gen)[:min(m, max(SIDE, SAMPLE // rows.numel()))].to(device)
    return rows, cols, False


def _factored_batch(mods: list[LoRAModule], entries: dict, dtype, device, gen):
    facs = [m.lowrank(dtype, device) for m in mods]
    b = torch.stack([f[0] for f in facs])
    a = torch.stack([f[1] for f in facs])
    N, n, _ = b.shape
    mcols = a.shape[2]
    sc = torch.tensor([float(f[2]) for f in facs], dtype=torch.float64)
    del facs
    fstats = factor_numbers_batched([b, a])
    bad = [k for k, fs in enumerate(fstats) if fs["nan"] or fs["inf"]]
    if bad:
        b[bad] = 0
        a[bad] = 0
    s = batched_singular_values(b, a).double() * sc.abs()[:, None]       # [N, k]
    numel = n * mcols
    sums = (b.sum(1, dtype=torch.float64) * a.sum(2, dtype=torch.float64)).sum(1) * sc   # 1ᵀΔW1
    mean = sums / numel
    std = (s.pow(2).sum(1) / numel - mean.pow(2)).clamp_min(0).sqrt()
    rows, cols, exact = _sample_grid(n, mcols, gen, device)
    x = (b.index_select(1, rows) @ a.index_select(2, cols)).reshape(N, -1).double() * sc[:, None]
    elems = element_numbers(x, exact, numel, std)
    # ‖ΔW‖_max ≤ |s|·max_i‖B_i‖·max_j‖A_j‖ (Cauchy–Schwarz): an exact upper bound, no elements needed
    bound = sc.abs() * b.norm(dim=2).amax(1).double() * a.norm(dim=1).amax(1).double()
    for k, m in enumerate(mods):
        e = entries[m.name]
        e["route"] = "factored"
        e["factors"] = fstats[k]
        if k in bad:
            e["note"] = "contains NaN/Inf: no spectrum"
            continue
        _finish(e, s[k], float(mean[k]), numel, elems[k])
        e["linf_bound"] = float(bound[k])
        if m.is_dora:
            e["note"] = ("DoRA: numbers are for the low-rank part scale·up@down; the applied change also "
                         "re-normalises the base weight with dora_scale")


def _kron_module(m: LoRAModule, entry: dict, dtype, device, gen) -> bool:
    """LoKr, ΔW = s·kron(W1, W2), without forming ΔW (a conv LoKr's ΔW can be 10⁷ elements, its factors 10³):
    singular values σ(W1)⊗σ(W2), Σ ΔW = s·ΣW1·ΣW2, ‖ΔW‖₁ = |s|·‖W1‖₁‖W2‖₁ and max|ΔW| = |s|·max|W1|·max|W2|
    exactly; order statistics from the same element grid as the factored route, each element exact
    (ΔW[i, j] = s·W1[i // c, j // d]·W2[i % c, j % d]). False when the module has no such form."""
    sides = m.kind.kron_sides(m, dtype, device) if hasattr(m.kind, "kron_sides") else None
    if sides is None:
        return False
    w1, w2 = (w.double() for w in sides)
    (a, b), (c, d) = w1.shape, w2.shape
    xs = [t.to(device=device, dtype=dtype).flatten() for r, t in m.tensors.items()
          if r != "alpha" and (t.is_floating_point() or t.dtype in (torch.int8, torch.uint8))]
    fs = factor_numbers(xs)
    entry["factors"] = fs
    entry["route"] = "kronecker"
    if fs["nan"] or fs["inf"]:
        entry["note"] = "contains NaN/Inf: no spectrum"
        return True
    sc = float(m.scale())
    sv = m.kind.singular_values(m, dtype, device)
    n, cols = a * c, b * d
    numel = n * cols
    mean = sc * float(w1.sum()) * float(w2.sum()) / numel
    std = math.sqrt(max(float(sv.double().pow(2).sum()) / numel - mean * mean, 0.0))
    rows, cc, exact = _sample_grid(n, cols, gen, device)
    x = sc * w1[rows // c][:, cc // d] * w2[rows % c][:, cc % d]
    elems = element_numbers(x.reshape(-1), exact, numel, [std])[0]
    elems["l1_norm"] = abs(sc) * float(w1.abs().sum()) * float(w2.abs().sum())
    entry["linf_bound"] = abs(sc) * float(w1.abs().max()) * float(w2.abs().max())
    _finish(entry, sv, mean, numel, elems)
    return True


def _dense_module(m: LoRAModule, entry: dict, dtype, device, gen):
    if m.kind.name == "lokr" and _kron_module(m, entry, dtype, device, gen):
        return
    d = m.delta(dtype, device)
    xs = [t.to(device=device, dtype=dtype).flatten() for r, t in m.tensors.items()
          if r != "alpha" and (t.is_floating_point() or t.dtype in (torch.int8, torch.uint8))]  # int8: quantized
    fs = factor_numbers(xs)
    entry["factors"] = fs
    entry["route"] = "dense"
    if d is None:
        entry["route"] = "none"
        entry["note"] = "no ΔW in this module (bias only)"
        return
    if fs["nan"] or fs["inf"]:
        entry["note"] = "contains NaN/Inf: no spectrum"
        return
    mat = d.reshape(d.shape[0], -1) if d.ndim >= 2 else d.reshape(-1, 1)
    s = m.kind.singular_values(m, dtype, device)
    if s is None:
        s = svdvals_tall(mat)
    flat = mat.flatten()
    numel = flat.numel()
    mean = float(flat.sum(dtype=torch.float64)) / numel
    std = math.sqrt(max(float(s.double().pow(2).sum()) / numel - mean * mean, 0.0))
    if numel <= DENSE_ALL:
        elems = element_numbers(flat, True, numel, [std])[0]
    else:
        idx = torch.randint(0, numel, (SAMPLE,), generator=gen).to(device)
        elems = element_numbers(flat[idx], False, numel, [std])[0]
    entry["linf_bound"] = float(flat.abs().max())
    _finish(entry, s, mean, numel, elems)


def analyze_modules(model: LoRAModel, device="cpu", progress: Callable[[int, int], None] | None = None,
                    seed: int = 0, release_pages: bool = True) -> dict[str, dict]:
    """{module name: numbers} for every module, in file order. With `release_pages`, the file pages of
    analysed modules are given back to the OS as it goes (see pages.py; data is never changed)."""
    entries = {m.name: base_entry(m) for m in model.modules}
    pages = PageReleaser(model.source if release_pages else None)
    groups: dict[tuple, list[LoRAModule]] = defaultdict(list)
    singles = []
    for m in model.modules:
        kind = m.kind.name
        if kind == "lora":
            b_shape = tuple(m.tensors["up"].shape)
            key = ("mid" in m.tensors, b_shape, tuple(m.tensors["down"].shape),
                   tuple(m.tensors["mid"].shape) if "mid" in m.tensors else (), work_dtype(m.tensors["up"]))
            groups[key].append(m)
        elif kind in DENSE_KINDS:
            singles.append(m)
        else:
            e = entries[m.name]
            floats = [t.float().flatten() for r, t in m.tensors.items() if r != "alpha" and t.is_floating_point()]
            if floats:
                e["factors"] = factor_numbers(floats)
                e["all_zero"] = e["factors"]["l1_norm"] == 0.0
            if kind in WEIGHT_DEPENDENT:
                e["note"] = (f"{m.kind.label}: the change depends on the base weight; no stand-alone ΔW, "
                             "so no spectrum")
            elif kind == "set":
                e["note"] = "set_weight replaces the base weight; no ΔW"
            else:
                e["note"] = "tensors not understood; carried through untouched"
    jobs = []
    for key, mods in groups.items():
        per = max(1, sum(t.numel() for r, t in mods[0].tensors.items() if r != "alpha"))
        step = max(1, min(64, BATCH_ELEMENTS // per))
        for k in range(0, len(mods), step):
            jobs.append((_factored_batch, mods[k:k + step], key[-1], _seed(seed, key)))
    for m in singles:
        dtype = work_dtype(next(t for r, t in m.tensors.items() if r != "alpha"))
        jobs.append((_dense_batch, [m], dtype, _seed(seed, (m.name,))))
    total = sum(len(j[1]) for j in jobs)
    workers = max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1
    before = torch.get_num_threads()
    done = 0
    try:
        if workers > 1:
            # one intra-op thread per worker, modules in parallel: no OpenMP barriers between tiny ops,
            # which matters on a busy machine; torch releases the GIL inside every kernel
            torch.set_num_threads(1)
        # initializer: torch's thread count is per thread; a new worker would start at the core count
        with ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = {pool.submit(fn, mods, entries, dtype, device, torch.Generator().manual_seed(sd)): (len(mods), mods)
                       for fn, mods, dtype, sd in jobs}
            for fut in as_completed(futures):
                fut.result()
                pages.release([t for m in futures[fut][1] for t in m.tensors.values()])
                done += futures[fut][0]
                if progress is not None:
                    progress(done, total)
    finally:
        torch.set_num_threads(before)
        pages.close()
    return entries


def _seed(seed: int, key) -> int:
    return (seed * 1000003 + zlib.crc32(repr(key).encode())) & 0x7FFFFFFF


def _dense_batch(mods, entries, dtype, device, gen):
    for m in mods:
        _dense_module(m, entries[m.name], dtype, device, gen)
