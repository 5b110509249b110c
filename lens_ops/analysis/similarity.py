"""Layer similarity and the 3-D module map.

Similarity: cosine between ΔW of modules of equal shape, cos = ⟨ΔW₁,ΔW₂⟩/(‖ΔW₁‖‖ΔW₂‖) with
⟨s₁B₁A₁, s₂B₂A₂⟩ = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)), for every pair among the most energetic modules of the
largest shape groups, computed from factors (all Gram blocks at once: Bcatᵀ·Bcat and Acat·Acatᵀ).
Exact while the cost 2·(n+m)·(N·r)² stays in the budget; above it (high ranks), the inner products are
estimated from a shared Gaussian sketch Ω_L·ΔW·Ω_R (32×32, unbiased), and the report says so.

Duplicates: modules with identical shapes and spectra are compared exactly (cosine from factors).

Map: PCA (SVD of the standardised feature matrix) of per-module features to 3 coordinates, plus a
robust outlier score (RMS of median/MAD z-scores).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..lowrank import frobenius_inner, work_dtype
from ..model import LoRAModel, exact_factors

MAX_MODULES = 24
MAX_GROUPS = 2
FLOP_BUDGET = 1e9
SKETCH = 32


def _factors(m, dtype, device):
    """(B, A, scale) with the flattened ΔW = scale·B@A: the LoRA factors, the exact low-rank form of LoKr/LoHa
    (`factor_pair`), or the dense ΔW with A = None standing for the identity (never materialised: for a conv
    layer it would be in·kh·kw squared)."""
    f = exact_factors(m, dtype, device)
    if f is not None:
        return f[0], f[1].reshape(f[1].shape[0], -1), f[2]
    d = m.delta(dtype, device)
    if d is None:
        return None
    mat = d.reshape(d.shape[0], -1) if d.ndim >= 2 else d.reshape(-1, 1)
    return mat, None, 1.0


def _inner_size(m) -> int:
    r = m.rank()
    if m.kind.name == "lora" and r:
        return r
    if m.kind.name in ("lokr", "loha"):
        fp = m.kind.factor_pair(m, torch.float32, "meta")   # shapes only
        if fp is not None:
            return fp[0].shape[1]
    shape = m.weight_shape()
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _flat_shape(e):
    s = e["shape"]
    if not s:
        return None
    return (s[0], math.prod(s[1:]) if len(s) > 1 else 1)


def similarity_groups(model: LoRAModel, entries: dict, device="cpu") -> list[dict]:
    groups = defaultdict(list)
    for name, e in entries.items():
        if e.get("energy") and _flat_shape(e):
            groups[_flat_shape(e)].append(name)
    ranked = sorted(groups.items(), key=lambda kv: -sum(entries[n]["energy"] for n in kv[1]))
    out = []
    for shape, names in ranked:
        if len(names) < 2:
            continue
        if len(out) >= MAX_GROUPS:
            break
        names = sorted(names, key=lambda n: -entries[n]["energy"])[:MAX_MODULES]
        names = [n for n in entries if n in set(names)]  # file order reads best in a heatmap
        mods = [model.get(n) for n in names]
        dtype = torch.float64 if any(work_dtype(next(iter(m.tensors.values()))) == torch.float64 for m in mods) \
            else torch.float32
        n, mm = shape
        N = len(mods)
        kk = max(_inner_size(m) for m in mods)
        if 2.0 * (n + mm) * (N * kk) ** 2 <= FLOP_BUDGET:
            method = "exact (from factors)"
            facs = [_factors(m, dtype, device) for m in mods]   # small by the budget
            bs = [f[0] * f[2] for f in facs]
            as_ = [f[1] if f[1] is not None else torch.eye(f[0].shape[1], dtype=dtype, device=device) for f in facs]
            # pad every module to the same inner size (zero columns of B / rows of A add nothing)
            bcat = torch.cat([torch.nn.functional.pad(b, (0, kk - b.shape[1])) for b in bs], 1)
            acat = torch.cat([torch.nn.functional.pad(a, (0, 0, 0, kk - a.shape[0])) for a in as_], 0)
            gb = (bcat.transpose(0, 1) @ bcat).double().reshape(N, kk, N, kk)   # B_iᵀB_j blocks
            ga = (acat @ acat.transpose(0, 1)).double().reshape(N, kk, N, kk)   # A_iA_jᵀ blocks
            # ⟨B_iA_i, B_jA_j⟩ = tr((B_iᵀB_j)(A_jA_iᵀ)) = Σ_ab (B_iᵀB_j)[a,b]·(A_iA_jᵀ)[a,b]
            inner = torch.einsum("iajb,iajb->ij", gb, ga)
        else:
            method = f"estimated with a {SKETCH}×{SKETCH} Gaussian sketch (from factors; typical error ±0.05)"
            g = torch.Generator().manual_seed(n * 7919 + mm)
            om_l = (torch.randn(SKETCH, n, generator=g) / math.sqrt(SKETCH)).to(device=device, dtype=dtype)
            om_r = (torch.randn(mm, SKETCH, generator=g) / math.sqrt(SKETCH)).to(device=device, dtype=dtype)
            ys = []
            for m in mods:  # one module's factors at a time: memory stays small
                b, a, s = _factors(m, dtype, device)
                ys.append(((om_l @ b) @ (om_r if a is None else a @ om_r)).reshape(-1).double() * s)
            ys = torch.stack(ys)
            inner = ys @ ys.transpose(0, 1)   # E[⟨Ω_L X Ω_R, Ω_L Y Ω_R⟩] = ⟨X, Y⟩
        norms = inner.diagonal().clamp_min(0).sqrt()
        cos = inner / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
        out.append({"shape": list(shape), "modules": names, "method": method, "matrix": [[round(float(x), 5) for x in row] for row in cos]})
    return out


def _cols(f) -> int:
    return (f[0] if f[1] is None else f[1]).shape[1]


def _inner(f1, f2) -> float:
    """⟨ΔW₁, ΔW₂⟩_F from `_factors` results; A = None (a dense ΔW) is the identity, never materialised."""
    (b1, a1, s1), (b2, a2, s2) = f1, f2
    if a1 is None and a2 is None:
        ip = (b1 * b2).sum()
    elif a1 is None:
        ip = ((b1 @ a2.transpose(0, 1)) * b2).sum()
    elif a2 is None:
        ip = ((b2 @ a1.transpose(0, 1)) * b1).sum()
    else:
        ip = frobenius_inner(b1, a1, b2, a2)
    return float(ip) * s1 * s2


def duplicates(model: LoRAModel, entries: dict, device="cpu", tol: float = 1e-5) -> list[list[str]]:
    """Pairs of modules with the same ΔW (cosine ≥ 1−tol and equal norms), confirmed exactly from factors."""
    buckets = defaultdict(list)
    for name, e in entries.items():
        if e.get("energy"):
            sv = e["singular_values"][:8]
            buckets[(tuple(e["shape"]), tuple(float(f"{x:.4g}") for x in sv))].append(name)
    pairs = []
    for names in buckets.values():
        if len(names) < 2:
            continue
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                m1, m2 = model.get(names[i]), model.get(names[j])
                f1, f2 = _factors(m1, torch.float64, device), _factors(m2, torch.float64, device)
                if f1 is None or f2 is None or f1[0].shape[0] != f2[0].shape[0] or _cols(f1) != _cols(f2):
                    continue
                ip = _inner(f1, f2)
                n1, n2 = entries[names[i]]["frobenius_norm"], entries[names[j]]["frobenius_norm"]
                if n1 > 0 and n2 > 0 and ip / (n1 * n2) >= 1 - tol and abs(n1 - n2) <= tol * max(n1, n2):
                    pairs.append([names[i], names[j]])
    return pairs


FEATURES = ["log10 ‖ΔW‖_F", "log10 σ₁", "effective rank 99 / rank", "stable rank / rank",
            "top-1 energy share", "log10 |alpha/rank|", "excess kurtosis (clipped)"]


def _features(e):
    r = e["rank"] or max(len(e["singular_values"]), 1)
    scale = e.get("scale") or 1.0
    kurt = e["elements"]["excess_kurtosis"] if e.get("elements") else 0.0
    return [math.log10(max(e["frobenius_norm"], 1e-30)), math.log10(max(e["spectral_norm"], 1e-30)),
            e["effective_rank_99"] / r, e["stable_rank"] / r, e["energy_top"].get("1", 1.0),
            math.log10(max(abs(scale), 1e-30)), max(-3.0, min(kurt, 50.0))]


def module_map(entries: dict) -> dict:
    names = [n for n, e in entries.items() if e.get("energy")]
    if len(names) < 2:
        return {"features": FEATURES, "modules": names, "points": [[0.0, 0.0, 0.0]] * len(names),
                "explained": [0.0, 0.0, 0.0], "outlier_score": [0.0] * len(names), "outliers": []}
    x = torch.tensor([_features(entries[n]) for n in names], dtype=torch.float64)
    z = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-12)
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    k = min(3, s.numel())
    pts = (u[:, :k] * s[:k])
    if k < 3:
        pts = torch.cat([pts, torch.zeros(len(names), 3 - k, dtype=pts.dtype)], 1)
    var = s.pow(2)
    explained = (var[:3] / var.sum().clamp_min(1e-300)).tolist() + [0.0] * (3 - k)
    med = x.median(0).values
    mad = (x - med).abs().median(0).values * 1.4826
    rz = (x - med) / torch.maximum(mad, x.std(0, unbiased=False) * 0.1 + 1e-12)
    score = rz.pow(2).mean(1).sqrt()
    order = torch.argsort(score, descending=True)
    outliers = [names[i] for i in order.tolist() if score[i] > 4.0][:12]
    return {"features": FEATURES, "modules": names,
            "points": [[round(float(v), 5) for v in p] for p in pts],
            "explained": [round(float(v), 5) for v in explained],
            "outlier_score": [round(float(v), 4) for v in score], "outliers": outliers}
