"""Which dimensions each module keeps: kohya's dynamic rules, the energy rule, resize_lora's scores with
thr=/size= selection, and a global size budget by ΔW energy per byte.

All functions take singular values S of a module's ΔW (float64, descending, alpha scale included) and
return either a count k (keep the first k) or a boolean mask over S.
"""
from __future__ import annotations

import math

import torch

KOHYA_MIN_SV = 1e-6  # kohya: a module whose largest singular value is at most this is "zero" -> rank 1


def energy_rank(S: torch.Tensor, e: float) -> int:
    """Fewest dimensions whose Σσ² is at least e·Σσ² (all of them for e = 1)."""
    sq = S.double().pow(2)
    total = float(sq.sum())
    if total <= 0:
        return 0
    if e >= 1.0:
        return int((S > 0).sum())
    frac = torch.cumsum(sq, 0) / total
    return min(int(torch.searchsorted(frac, torch.tensor([e], dtype=frac.dtype)).item()) + 1, len(S))


def kohya_rank(S: torch.Tensor, method: str, target: float) -> int:
    """kohya sd-scripts resize_lora.py: index rules (clamped to [0, len-1]) plus one."""
    n = len(S)
    if method == "sv_ratio":
        idx = int((S > S[0] / target).sum()) - 1
    elif method == "sv_fro":
        sq = S.pow(2)
        cum = torch.cumsum(sq, 0) / float(sq.sum())
        idx = int(torch.searchsorted(cum, torch.tensor([target ** 2], dtype=cum.dtype)).item())
    elif method == "sv_cumulative":
        cum = torch.cumsum(S, 0) / float(S.sum())
        idx = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype)).item())
    else:  # pragma: no cover
        raise ValueError(method)
    return max(0, min(idx, n - 1)) + 1


def rule_rank(S: torch.Tensor, rules: dict, scale: float = 1.0) -> int:
    """The rank the recipe's per-module rules give (smallest over the rules), at most len(S)."""
    n = len(S)
    k = n
    if n == 0 or float(S[0]) <= 0:
        return 0
    unscaled_max = float(S[0]) / abs(scale) if scale else float(S[0])
    for name, v in rules.items():
        if name == "energy":
            k = min(k, energy_rank(S, v))
        elif name == "rank":
            k = min(k, int(v))
        else:
            k = min(k, kohya_rank(S, name, v))
    if unscaled_max <= KOHYA_MIN_SV and any(r in rules for r in ("sv_ratio", "sv_fro", "sv_cumulative", "rank")):
        k = min(k, 1)  # kohya: zero matrix -> dim 1
    return k


def scores(dec, weights: dict, rescale: float = 1.0) -> torch.Tensor:
    """resize_lora's log10 score per dimension: log10(σ_i) + log10(rescale) − Σ_j w_j·log10(ref_j)."""
    S = dec.S.double()
    with torch.no_grad():
        out = torch.log10(S) + math.log10(rescale)
    for key, w in weights.items():
        if key == "spn_lora":
            ref = torch.log10(S[0])
        elif key == "fro_lora":
            ref = torch.log10(torch.linalg.vector_norm(S))
        elif key == "spn_ckpt":
            ref = math.log10(dec.base["spn"])
        elif key == "fro_ckpt":
            ref = math.log10(dec.base["fro"])
        elif key == "subspace":
            ref = torch.log10(dec.base["subspace"].double().abs())
        elif key == "params":
            ref = math.log10(dec.n + dec.m)
        else:  # pragma: no cover
            raise ValueError(key)
        out = out - w * ref
    return out


def threshold_for_size(flat_scores: torch.Tensor, flat_costs: torch.Tensor, budget: float) -> float:
    """resize_lora's greedy: sort all scores (descending), accumulate the bytes of each dimension, and
    take the score where the running total reaches the budget; dimensions scoring strictly above it stay."""
    if flat_scores.numel() == 0:
        return -math.inf
    s, order = flat_scores.sort(descending=True)
    cum = flat_costs[order].double().cumsum(0)
    if budget >= float(cum[-1]):
        return -math.inf
    i = int(torch.searchsorted(cum, torch.tensor([float(budget)], dtype=cum.dtype)).item())
    return float(s[min(i, len(s) - 1)])


def budget_select(items: list, budget: float) -> dict:
    """Whole-file budget, best ΔW error per byte: greedy over all candidate dimensions by σ²/bytes.

    items: (name, S_candidates (descending), cost_per_dim). Returns name -> k kept. Since σ² falls and
    the cost per dimension is constant within a module, each module keeps a prefix.
    """
    vals, costs, owners = [], [], []
    for j, (name, S, cost) in enumerate(items):
        vals.append(S.double().pow(2) / cost)
        costs.append(torch.full((len(S),), float(cost), dtype=torch.float64))
        owners.append(torch.full((len(S),), j, dtype=torch.long))
    if not vals:
        return {}
    v, c, o = torch.cat(vals), torch.cat(costs), torch.cat(owners)
    order = torch.sort(v, descending=True, stable=True).indices
    cum = c[order].cumsum(0)
    kept = order[cum <= budget]
    counts = torch.bincount(o[kept], minlength=len(items))
    return {items[j][0]: int(counts[j]) for j in range(len(items))}
