"""ConflictScan: do two LoRAs fight? Per-module metrics, per-block and overall scores, a recommended
strength pair, a stability prediction and the list of problem modules (see docs/blend.md for formulas)."""
from __future__ import annotations

import math
import os
import re
import threading
from typing import Callable

import torch

from ..errors import LensError
from ..model import LoRAModel, ensure_model
from ..parallel import ordered
from .matching import match_modules
from .metrics import NonFinite, lowrank_metrics_batch, module_metrics, plain_factors, small_maths

PROBLEM_THRESHOLD = 0.35     # module conflict score at or above which a module is a problem
CANCEL_THRESHOLD = -0.35     # cosine at or below which stacking cancels: a problem too
HOT_THRESHOLD = 0.2          # hot spot
COMPLEMENTARY_OVERLAP = 0.05  # energy overlap below which two modules act in separate subspaces
MAX_LISTED = 25
METRIC_COLUMNS = ["conflict", "cosine", "subspace_overlap", "energy_overlap", "interference", "norm_balance"]


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


BLOCK_ORDER = ["te1", "te2", "te3", "input", "down", "middle", "mid", "output", "up", "double", "single", "joint",
               "block", "layer", "other"]


def block_sort_key(block: str):
    head = block.split(" ")[0]
    return (BLOCK_ORDER.index(head) if head in BLOCK_ORDER else len(BLOCK_ORDER), _natural(block))


def _wmean(pairs):
    tw = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / tw if tw > 0 else None


def _file_info(model: LoRAModel, which: str) -> dict:
    ranks = sorted({r for m in model.modules if (r := m.rank()) is not None})
    return {"file": os.path.basename(model.source) if model.source else f"LoRA {which}",
            "architecture": model.architecture.label, "format": model.convention, "precision": model.precision,
            "modules": len(model.modules), "ranks": ranks}


def recommend_ratio(na: float, nb: float, cos_total: float, overall: float) -> dict:
    """Strengths (w_a, w_b) from the shared-layer norms and how the LoRAs interact (docs/blend.md)."""
    if na <= 0 or nb <= 0:
        return {"a": 1.0 if na > 0 else 0.0, "b": 1.0 if nb > 0 else 0.0, "text": "1 : 1",
                "how": "one LoRA changes nothing on the shared layers"}
    pa, pb = nb / (na + nb), na / (na + nb)                      # equal effect on the shared layers
    e = pa * na                                                    # = pb * nb
    stacked = e * math.sqrt(max(2 + 2 * cos_total, 1e-12))        # ‖T·(pa·ΔWa + pb·ΔWb)‖ / T
    t = max(na, nb) / stacked                                      # stack no stronger than the stronger LoRA alone
    t *= 1 - 0.5 * overall                                         # back off where they conflict
    wa, wb = t * pa, t * pb
    cap = max(wa, wb)
    if cap > 1:                                                    # never recommend above full strength
        wa, wb = wa / cap, wb / cap
    wa, wb = round(wa, 2), round(wb, 2)
    return {"a": wa, "b": wb, "text": f"{wa:g} : {wb:g}",
            "how": (f"equal effect on the shared layers (shares {pa:.2f} : {pb:.2f}, inverse to their norms "
                    f"{na:.3g} : {nb:.3g}), total strength set so the stack is no stronger than the stronger LoRA "
                    f"alone (overall cosine {cos_total:+.2f}), reduced by half the conflict score "
                    f"({overall:.2f}), capped at 1.0")}


def stability(overall: float, problem_share: float, gain_full: float, gain_rec: float) -> dict:
    if overall < 0.1 and problem_share < 0.05:
        label = "stable"
    elif overall < 0.25 and problem_share < 0.2:
        label = "caution"
    else:
        label = "unstable"
    reason = (f"conflict score {overall:.2f}, {100 * problem_share:.0f}% of the shared change sits in problem "
              f"modules; stacked at 1 : 1 the change is {gain_full:.2f}× the stronger LoRA alone, at the "
              f"recommended strengths {gain_rec:.2f}×")
    if gain_full > 1.6 and label == "stable":
        label = "caution"
        reason += " (full strengths over-amplify: use the recommended ratio)"
    return {"prediction": label, "reason": reason}


BATCH_BYTES = 48 << 20   # float buffer per batch of equal-shape modules


def _non_finite(pair, side: int) -> LensError:
    _, ma, mb = pair
    which = ("first", ma) if side == 0 else ("second", mb)
    return LensError(f"Module {which[1].name} of the {which[0]} LoRA contains NaN/Inf values (in a factor or its "
                     "alpha); the LoRAs cannot be compared (fix or remove that module first).")


def _all_metrics(shared, device, dtype, progress) -> list:
    """Metrics of every shared pair, in order. Plain products are grouped by shape (n, m, r₁, r₂) and measured in
    batches (`lowrank_metrics_batch`: one batched matmul per Gram, batched r×r work), copying each stored factor
    once into a float buffer; other kinds go one by one through `module_metrics`."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    total = len(shared)
    results: list = [None] * total
    groups: dict = {}
    single = []
    for i, (_, ma, mb) in enumerate(shared):
        fa = plain_factors(ma, work, device)
        fb = plain_factors(mb, work, device) if fa is not None else None
        if fa is None or fb is None or fa[0].shape[0] != fb[0].shape[0] or fa[1].shape[1] != fb[1].shape[1]:
            single.append(i)
            continue
        shape = (fa[0].shape[0], fa[1].shape[1], fa[0].shape[1], fb[0].shape[1])
        groups.setdefault(shape, []).append((i, fa, fb))
    jobs = []
    for (n, m, r1, r2), items in groups.items():
        per = (n + m) * (r1 + r2) * torch.finfo(work).bits // 8
        size = max(1, min(len(items), BATCH_BYTES // max(per, 1)))
        jobs += [((n, m, r1, r2), items[start:start + size]) for start in range(0, len(items), size)]
    local = threading.local()

    def measure(job):
        """Metrics of one batch, through this thread's float buffers (reused: no fresh pages per batch)."""
        (n, m, r1, r2), chunk = job
        k = len(chunk)
        shapes = ((k, n, r1), (k, r1, m), (k, n, r2), (k, r2, m))
        bufs = getattr(local, "bufs", None)
        if bufs is None or tuple(tuple(b.shape) for b in bufs) != shapes:
            bufs = local.bufs = tuple(torch.empty(s, dtype=work, device=device) for s in shapes)
        for j, (_, fa, fb) in enumerate(chunk):
            bufs[0][j].copy_(fa[0])
            bufs[1][j].copy_(fa[1])
            bufs[2][j].copy_(fb[0])
            bufs[3][j].copy_(fb[1])
        try:
            return lowrank_metrics_batch(*bufs, [fa[2] for _, fa, _ in chunk], [fb[2] for _, _, fb in chunk])
        except NonFinite as e:
            raise _non_finite(shared[chunk[e.index][0]], e.side) from None
    # two batches at once on the CPU (lens_ops.parallel): the r×r LAPACK work of one overlaps the other's Grams
    batches = ordered(jobs, measure, device)
    done = 0
    try:
        for (_, chunk), mets in zip(jobs, batches):
            for (i, _, _), met in zip(chunk, mets):
                results[i] = met
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    finally:
        batches.close()
    for i in single:
        _, ma, mb = shared[i]
        try:
            results[i] = module_metrics(ma, mb, device, dtype)
        except NonFinite as e:
            raise _non_finite(shared[i], e.side) from None
        done += 1
        if progress is not None:
            progress(done, total)
    return results


def scan(a, b, device="cpu", dtype=torch.float32, progress: Callable[[int, int], None] | None = None,
         problem_threshold: float = PROBLEM_THRESHOLD) -> dict:
    """Compare two LoRAs (LoRAModel or LORA_MODEL dicts) module by module; returns the JSON-able report."""
    a, b = ensure_model(a), ensure_model(b)
    match = match_modules(a, b, require_overlap=True)
    modules, not_compared = {}, []
    with torch.no_grad(), small_maths(device, busy_only=True):
        results = _all_metrics(match.shared, device, dtype, progress)
    for (key, ma, mb), met in zip(match.shared, results):
        if met is None:
            not_compared.append(ma.name)
        else:
            met.update({"name_b": mb.name, "block": ma.block, "component": ma.component, "key": key})
            modules[ma.name] = met
    if not modules:
        raise LensError("None of the shared modules has a stand-alone ΔW (OFT/GLoRA/set_weight need the base "
                        "model), so the LoRAs cannot be compared.")
    for name, m in modules.items():
        if m["conflict"] >= problem_threshold or m["cosine"] <= CANCEL_THRESHOLD:
            m["verdict"] = "problem"
        elif m["conflict"] >= HOT_THRESHOLD:
            m["verdict"] = "hot spot"
        elif m["energy_overlap"] < COMPLEMENTARY_OVERLAP:
            m["verdict"] = "complementary"
        elif m["cosine"] >= 0.5:
            m["verdict"] = "redundant"
        else:
            m["verdict"] = "mild"
    only_energy = {}
    heads_a = {m.block.split(" ")[0] for m in a.modules}
    for which, lst in (("a", match.only_a), ("b", match.only_b)):
        for _, m in lst:
            blk = m.block
            if which == "b" and match.cross_scheme and match.architecture == "sd3":
                # one SD3 block, one label: MMDiT names say 'joint N', diffusers names 'double N'; A's word wins
                head, _, idx = blk.partition(" ")
                other = {"joint": "double", "double": "joint"}.get(head)
                if other in heads_a and head not in heads_a:
                    blk = f"{other} {idx}"
            f = m.lowrank(torch.float32, device)
            if f is not None:
                bb, aa, s = f
                e = float((s * s) * ((bb.T @ bb) * (aa @ aa.T)).sum())
            else:
                d = m.delta(torch.float32, device)
                e = float(d.double().pow(2).sum()) if d is not None else 0.0
            only_energy[blk] = only_energy.get(blk, 0.0) + e
    # ---- per block
    blocks: dict[str, dict] = {}
    for name, m in modules.items():
        blk = blocks.setdefault(m["block"], {"items": []})
        blk["items"].append(m)
    block_rows = {}
    for blk in sorted(set(blocks) | set(only_energy), key=block_sort_key):
        items = blocks.get(blk, {"items": []})["items"]
        w = [x["norm_a"] ** 2 + x["norm_b"] ** 2 for x in items]
        tw = sum(w) + only_energy.get(blk, 0.0)
        na = math.sqrt(sum(x["norm_a"] ** 2 for x in items))
        nb = math.sqrt(sum(x["norm_b"] ** 2 for x in items))
        inner = sum(x["inner"] for x in items)
        row = {"modules": len(items),
               "only_in_one_energy_share": only_energy.get(blk, 0.0) / tw if tw > 0 else 0.0,
               "conflict_score": sum(x["conflict"] * wi for x, wi in zip(items, w)) / tw if tw > 0 else 0.0,
               "cosine": inner / (na * nb) if na > 0 and nb > 0 else None,
               "norm_ratio": na / nb if nb > 0 else None,
               "subspace_overlap": _wmean([(x["subspace_overlap"], wi) for x, wi in zip(items, w)
                                           if x["subspace_overlap"] is not None]),
               "energy_overlap": _wmean([(x["energy_overlap"], wi) for x, wi in zip(items, w)]),
               "interference": (math.sqrt(max(na * na + nb * nb + 2 * inner, 0)) / (na + nb)) if na + nb > 0 else None,
               "norm_balance": 2 * na * nb / (na * na + nb * nb) if na or nb else None,
               "problems": sum(1 for x in items if x["verdict"] == "problem")}
        block_rows[blk] = row
    # ---- overall
    items = list(modules.values())
    w = [x["norm_a"] ** 2 + x["norm_b"] ** 2 for x in items]
    tw_all = sum(w) + sum(only_energy.values())
    overall_score = sum(x["conflict"] * wi for x, wi in zip(items, w)) / tw_all if tw_all > 0 else 0.0
    na = math.sqrt(sum(x["norm_a"] ** 2 for x in items))
    nb = math.sqrt(sum(x["norm_b"] ** 2 for x in items))
    inner = sum(x["inner"] for x in items)
    cos_total = inner / (na * nb) if na > 0 and nb > 0 else 0.0
    ratio = recommend_ratio(na, nb, cos_total, overall_score)
    problems = sorted((n for n, m in modules.items() if m["verdict"] == "problem"),
                      key=lambda n: -modules[n]["conflict"] * (modules[n]["norm_a"] + modules[n]["norm_b"]))
    shared_energy = sum(w)
    problem_share = (sum(wi for x, wi in zip(items, w) if x["verdict"] == "problem") / shared_energy
                     if shared_energy > 0 else 0.0)
    gain_full = math.sqrt(max(na * na + nb * nb + 2 * inner, 0)) / max(na, nb) if max(na, nb) > 0 else 0.0
    wa, wb = ratio["a"], ratio["b"]
    gain_rec = (math.sqrt(max((wa * na) ** 2 + (wb * nb) ** 2 + 2 * wa * wb * inner, 0)) / max(na, nb)
                if max(na, nb) > 0 else 0.0)
    hot = sorted((n for n, m in modules.items() if m["conflict"] >= HOT_THRESHOLD),
                 key=lambda n: -modules[n]["conflict"])
    comp = sorted((n for n, m in modules.items() if m["verdict"] == "complementary"),
                  key=lambda n: -(modules[n]["norm_a"] * modules[n]["norm_b"]))
    report = {
        "a": _file_info(a, "A"), "b": _file_info(b, "B"),
        "architecture": a.architecture.label if a.architecture.id != "unknown" else b.architecture.label,
        "shared_modules": len(match.shared),
        "compared_modules": len(modules),
        "only_in_a": [m.name for _, m in match.only_a],
        "only_in_b": [m.name for _, m in match.only_b],
        "not_compared": not_compared,
        "overall": {"conflict_score": overall_score, "cosine": cos_total,
                    "norm_ratio": na / nb if nb > 0 else None,
                    "subspace_overlap": _wmean([(x["subspace_overlap"], wi) for x, wi in zip(items, w)
                                                if x["subspace_overlap"] is not None]),
                    "energy_overlap": _wmean([(x["energy_overlap"], wi) for x, wi in zip(items, w)]),
                    "interference": math.sqrt(max(na * na + nb * nb + 2 * inner, 0)) / (na + nb) if na + nb else None,
                    "norm_a": na, "norm_b": nb,
                    "problem_energy_share": problem_share},
        "recommended_ratio": ratio,
        "stability": stability(overall_score, problem_share, gain_full, gain_rec),
        "hot_spots": hot[:MAX_LISTED],
        "complementary": comp[:MAX_LISTED],
        "complementary_count": len(comp),
        "problem_modules": problems,
        "problem_threshold": problem_threshold,
        "blocks": block_rows,
        "modules": modules,
        "warnings": list(match.warnings),
    }
    if not_compared:
        report["warnings"].append(f"{len(not_compared)} shared module(s) have no stand-alone ΔW (OFT/GLoRA/"
                                  "set_weight) and were not compared.")
    return report


def problem_list(report: dict) -> str:
    """The problem modules as BlendLoRAs' exclude list: a comment line, then one module name per line."""
    lines = [f"# {len(report['problem_modules'])} problem module(s) from ConflictScan "
             f"(conflict ≥ {report['problem_threshold']:.2f} or cosine ≤ {CANCEL_THRESHOLD})"]
    return "\n".join(lines + list(report["problem_modules"]))


def format_report(r: dict, top: int = 8) -> str:
    o = r["overall"]
    lines = [f"A: {r['a']['file']}  ({r['a']['architecture']}, {r['a']['format']}, rank {_ranks(r['a']['ranks'])})",
             f"B: {r['b']['file']}  ({r['b']['architecture']}, {r['b']['format']}, rank {_ranks(r['b']['ranks'])})",
             f"Shared modules: {r['shared_modules']}   only in A: {len(r['only_in_a'])}   only in B: {len(r['only_in_b'])}",
             f"Conflict score: {o['conflict_score']:.3f} (0 = independent, 1 = fully opposed; lower is better)",
             f"Overall cosine {o['cosine']:+.3f}, norm ratio A/B {_f(o['norm_ratio'])}, subspace overlap "
             f"{_f(o['subspace_overlap'])}, energy overlap {_f(o['energy_overlap'])}",
             f"Recommended strengths: {r['recommended_ratio']['text']}",
             f"Stability: {r['stability']['prediction']} ({r['stability']['reason']})"]
    blocks = sorted(r["blocks"].items(), key=lambda kv: -kv[1]["conflict_score"])[:top]
    if blocks:
        lines.append("Most conflicting blocks: " + ", ".join(f"{k} {v['conflict_score']:.2f}" for k, v in blocks))
    if r["hot_spots"]:
        lines.append("Hot spots: " + ", ".join(f"{n} ({r['modules'][n]['conflict']:.2f})" for n in r["hot_spots"][:top]))
    lines.append(f"Complementary modules: {r['complementary_count']}")
    lines.append(f"Problem modules to exclude: {len(r['problem_modules'])}"
                 + (": " + ", ".join(r["problem_modules"][:top]) + (" …" if len(r["problem_modules"]) > top else "")
                    if r["problem_modules"] else ""))
    for w in r["warnings"]:
        lines.append("Warning: " + w)
    return "\n".join(lines)


def _ranks(rs):
    return "–".join(str(x) for x in (rs[:1] + rs[-1:] if len(rs) > 1 else rs)) or "n/a"


def _f(x):
    return "n/a" if x is None else f"{x:.3f}"


def json_safe(x):
    """The report with non-finite floats as null (JSON has no NaN/Inf), for the CLI and the node alike."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x
