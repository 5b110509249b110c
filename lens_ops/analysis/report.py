"""The whole analysis as one JSON-able report, its short text summary and an LLM-ready text."""
from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from typing import Callable

from .. import __version__
from ..errors import LensError
from ..kinds import UNKNOWN
from ..model import LoRAModel
from ..summary import COMFY_UNREAD, COMPONENT_NAMES
from ..training_meta import training_info
from .blocks import block_importance
from .similarity import duplicates, module_map, similarity_groups
from .spectra import analyze_modules
from .stats import PERCENTILES
from .verdicts import compression, efficiency, findings_and_health

REPORT_KIND = "lora-lens.analysis"
REPORT_VERSION = 1
POOLED_BINS = 48
POOLED_RANGE = 6.0


def _pooled_histogram(entries: dict) -> dict:
    """Histogram of the (sampled) ΔW elements of every module in units of that module's exact std,
    pooled: the shape of the weight distribution, comparable across modules of very different scale."""
    import torch
    counts = torch.zeros(POOLED_BINS, dtype=torch.float64)
    under = over = 0
    total = 0
    edges = torch.linspace(-POOLED_RANGE, POOLED_RANGE, POOLED_BINS + 1, dtype=torch.float64)
    for e in entries.values():
        el = e.get("elements")
        if not el or not e.get("std"):
            continue
        h = el["histogram"]
        n = len(h["counts"])
        if h["hi"] <= h["lo"]:
            continue
        # re-bin the module histogram (centres) onto the pooled z-scale, weighted by count
        width = (h["hi"] - h["lo"]) / n
        for i, c in enumerate(h["counts"]):
            if not c:
                continue
            z = (h["lo"] + (i + 0.5) * width - e["mean"]) / e["std"]
            total += c
            if z < -POOLED_RANGE:
                under += c
            elif z >= POOLED_RANGE:
                over += c
            else:
                counts[min(int((z + POOLED_RANGE) / (2 * POOLED_RANGE) * POOLED_BINS), POOLED_BINS - 1)] += c
    return {"unit": "standard deviations of each module's ΔW", "edges": [round(float(x), 4) for x in edges],
            "counts": [int(c) for c in counts], "under": under, "over": over, "total": total}


def _summary(model: LoRAModel, entries: dict, file_bytes: int | None) -> dict:
    """What `lens_ops.summary.summarize` says, from the numbers already computed (no second pass)."""
    kinds = Counter(e["kind_label"] for e in entries.values())
    comps = Counter(e["component"] for e in entries.values())
    ranks = Counter(e["rank"] for e in entries.values() if e["rank"] is not None)
    alphas = Counter(round(e["alpha"], 4) for e in entries.values() if e["alpha"] is not None)
    unknown = [n for n, e in entries.items() if e["kind"] == "unknown"]
    warnings = []
    if unknown:
        warnings.append(f"{len(unknown)} tensor group(s) not understood, carried through untouched: "
                        + ", ".join(unknown[:3]))
    if model.convention in COMFY_UNREAD:
        warnings.append(COMFY_UNREAD[model.convention])
    arch = model.architecture
    return {"file": os.path.basename(model.source) if model.source else None, "file_bytes": file_bytes,
            "tensor_bytes": model.nbytes, "architecture": arch.label, "architecture_id": arch.id,
            "architecture_evidence": arch.evidence, "format": model.convention, "precision": model.precision,
            "modules": len(model.modules), "modules_by_kind": dict(kinds.most_common()),
            "modules_by_component": {COMPONENT_NAMES.get(c, c): n for c, n in comps.most_common()},
            "ranks": {str(r): n for r, n in sorted(ranks.items())},
            "alphas": {str(a): n for a, n in sorted(alphas.items())},
            "params": sum(e["params"] for e in entries.values()), "training": training_info(model.metadata),
            "warnings": warnings}


def analyze(model: LoRAModel, device="cpu", progress: Callable[[int, int], None] | None = None,
            block_share: float = 0.9, file_bytes: int | None = None) -> dict:
    """Analyse a LoRA: per-module spectra and statistics, blocks, similarity, map, scores, findings."""
    t0 = time.perf_counter()
    if not model.modules:
        raise LensError("The LoRA contains no modules to analyse.")
    if all(m.kind is UNKNOWN for m in model.modules):
        raise LensError(f"No LoRA modules found: all {len(model.modules)} tensor group(s) are of unknown kind "
                        f"(e.g. {model.modules[0].name!r}); this is not a LoRA file LoRA Lens can analyse.")
    entries = analyze_modules(model, device=device, progress=progress)
    summ = _summary(model, entries, file_bytes)
    blocks = block_importance(entries, block_share)
    dups = duplicates(model, entries, device)
    sim = similarity_groups(model, entries, device)
    mmap = module_map(entries)
    comp = compression(model, entries)
    eff = efficiency(model, entries)
    analysed = [e for e in entries.values() if e.get("energy") is not None]
    ranked = [e for e in analysed if e["rank"]]
    summary = {
        "file": summ["file"], "file_bytes": summ["file_bytes"], "tensor_bytes": summ["tensor_bytes"],
        "architecture": summ["architecture"], "architecture_id": summ["architecture_id"],
        "architecture_evidence": summ["architecture_evidence"], "format": summ["format"],
        "precision": summ["precision"], "modules": summ["modules"], "modules_analysed": len(analysed),
        "modules_by_kind": summ["modules_by_kind"], "modules_by_component": summ["modules_by_component"],
        "ranks": summ["ranks"], "alphas": summ["alphas"], "params": summ["params"],
        "nominal_rank": (statistics.median(e["rank"] for e in ranked) if ranked else None),
        "nominal_rank_max": (max(e["rank"] for e in ranked) if ranked else None),
        "effective_rank_median": {lvl: (statistics.median(e[f"effective_rank_{lvl}"] for e in analysed)
                                        if analysed else None) for lvl in ("90", "99", "999")},
        "dead_modules": sum(1 for e in analysed if e["energy"] == 0),
        "nonfinite_modules": sum(1 for e in entries.values() if e.get("factors") and
                                 (e["factors"]["nan"] or e["factors"]["inf"])),
        "training": summ["training"], "trigger_words": summ["training"].get("trigger_words", []),
        "warnings": summ["warnings"],
    }
    findings, health = findings_and_health(model, entries, blocks, dups, summary, eff, comp)
    return {
        "report": REPORT_KIND, "version": REPORT_VERSION, "tool": f"LoRA Lens {__version__}",
        "summary": summary,
        "scores": {"efficiency": eff["score"], "health": health["score"], "efficiency_detail": eff,
                   "health_detail": health},
        "compression": comp,
        "findings": findings,
        "blocks": blocks,
        "similarity": sim,
        "duplicates": dups,
        "map": mmap,
        "histogram": _pooled_histogram(entries),
        "modules": entries,
        "definitions": DEFINITIONS,
        "seconds": round(time.perf_counter() - t0, 3),
    }


DEFINITIONS = {
    "singular_values": "exact singular values of ΔW = scale·up@down (factored route; LoKr: σ(W1)⊗σ(W2); LoHa/diff: dense ΔW)",
    "effective_rank_p": "smallest k whose top-k singular values hold p of Σσ² (p = 90 %, 99 %, 99.9 %)",
    "stable_rank": "‖ΔW‖²_F / σ₁²",
    "mean/std": "of all ΔW elements, exact from factors",
    "elements": "order statistics of ΔW elements: all elements when source = 'all elements', else a fixed "
                "sample of 4096 positions (each element exact)",
    "factors": "exact statistics of the stored factor values (up and down; Tucker: up and mid-folded down)",
    "linf_bound": "upper bound on max |ΔW| from factor row/column norms (exact max for dense kinds)",
    "energy": "‖ΔW‖²_F = Σσ²",
}


def _mib(n):
    return f"{n / 2**20:.1f} MiB"


def format_report(rep: dict, top: int = 10) -> str:
    """The short human summary (CLI default output, the node's summary)."""
    s, sc, comp = rep["summary"], rep["scores"], rep["compression"]
    lines = []
    if s.get("file"):
        lines.append(f"{s['file']} ({_mib(s['file_bytes'] or s['tensor_bytes'])})")
    er = s["effective_rank_median"]
    lines += [
        f"Architecture: {s['architecture']}   Format: {s['format']}   Precision: {s['precision']}",
        f"Modules: {s['modules']} ({', '.join(f'{k}: {v}' for k, v in s['modules_by_kind'].items())}); "
        f"analysed {s['modules_analysed']}",
        f"Rank: nominal {s['nominal_rank']:g}" if s["nominal_rank"] is not None else "Rank: n/a",
    ]
    if er["99"] is not None:
        lines[-1] += f", effective (median) {er['90']:g} / {er['99']:g} / {er['999']:g} at 90 / 99 / 99.9 % energy"
    lines.append(f"Efficiency: {sc['efficiency']:.0f}/100   Health: {sc['health']:.0f}/100")
    lines.append(f"Size at effective rank (99 % energy): {_mib(comp['file_bytes_at_effective_rank'])} "
                 f"instead of {_mib(comp['file_bytes_now'])} ({comp['saving_fraction']:.0%} smaller)")
    b = rep["blocks"]
    if b["smallest_set"]:
        lines.append(f"{len(b['smallest_set'])} of {len(b['blocks'])} blocks hold {b['smallest_set_share']:.0%} "
                     f"of ΔW energy: {', '.join(b['smallest_set'][:8])}{' …' if len(b['smallest_set']) > 8 else ''}")
    for f in rep["findings"]:
        lines.append(f"[{f['severity']}] {f['title']}: {f['text']}")
    return "\n".join(lines)


def module_table(rep: dict, limit: int | None = None, sort: str = "energy") -> list[tuple]:
    rows = []
    for name, e in rep["modules"].items():
        rows.append((name, e["kind"], e["block"], e["rank"], e["alpha"], e.get("effective_rank_90"),
                     e.get("effective_rank_99"), e.get("effective_rank_999"), e.get("spectral_norm"),
                     e.get("frobenius_norm"), e.get("energy")))
    rows.sort(key=lambda r: -(r[10] or 0))
    return rows[:limit] if limit else rows


def _num(x, fmt=".4g"):
    return "-" if x is None else format(x, fmt) if isinstance(x, float) else str(x)


def format_table(rep: dict, limit: int | None = 40) -> str:
    rows = module_table(rep, limit)
    head = f"{'module':60s} {'kind':6s} {'block':10s} {'rank':>4s} {'alpha':>7s} {'k90':>4s} {'k99':>4s} {'k999':>4s} {'σ1':>10s} {'‖ΔW‖F':>10s}"
    out = [head]
    for r in rows:
        out.append(f"{r[0][-60:]:60s} {r[1]:6s} {r[2][:10]:10s} {_num(r[3]):>4s} {_num(r[4]):>7s} {_num(r[5]):>4s} "
                   f"{_num(r[6]):>4s} {_num(r[7]):>4s} {_num(r[8]):>10s} {_num(r[9]):>10s}")
    return "\n".join(out)


def llm_text(rep: dict, max_modules: int = 40) -> str:
    """A self-contained plain-text version of the whole report for an LLM node (questions like
    "is it over-trained?"): facts, scores with their formulas, findings with evidence, blocks, the
    most important modules, and what each number means."""
    s = rep["summary"]
    parts = ["LoRA ANALYSIS REPORT (LoRA Lens). Answer questions about this LoRA from these facts only.", "",
             "## Overview", format_report(rep), "",
             "## Scores",
             f"Efficiency {rep['scores']['efficiency']}/100 = {rep['scores']['efficiency_detail']['formula']}.",
             f"Health {rep['scores']['health']}/100 = {rep['scores']['health_detail']['formula']}; penalties: "
             + (", ".join(f"{p['finding']} −{p['points']}" for p in rep['scores']['health_detail']['penalties']) or "none")
             + ".", "", "## Findings (with evidence)"]
    for f in rep["findings"] or []:
        parts.append(f"- [{f['severity']}] {f['title']}: {f['text']} Evidence: {f['evidence']}")
    if not rep["findings"]:
        parts.append("- none")
    parts += ["", "## Training metadata"]
    parts.append(", ".join(f"{k}: {v}" for k, v in s["training"].items()) or "none recorded")
    parts += ["", "## Blocks (share of total ΔW energy ‖ΔW‖²_F)"]
    for name, b in rep["blocks"]["blocks"].items():
        parts.append(f"- {name}: {b['share']:.2%} ({b['modules']} modules, mean ‖ΔW‖_F {b['mean_frobenius']:.4g}, "
                     f"max σ₁ {b['max_spectral_norm']:.4g})")
    parts += ["", f"## Top {max_modules} modules by energy", format_table(rep, max_modules), "",
              "## Weight distribution",
              f"Pooled ΔW elements in units of each module's std: {rep['histogram']['over'] + rep['histogram']['under']} of "
              f"{rep['histogram']['total']} sampled elements lie beyond ±{POOLED_RANGE:g} std.",
              "", "## Definitions"]
    parts += [f"- {k}: {v}" for k, v in rep["definitions"].items()]
    parts.append(f"- percentiles: {', '.join(str(p) for p in PERCENTILES)}")
    if rep["map"]["outliers"]:
        parts += ["", "## Outlier modules (3-D map)", ", ".join(rep["map"]["outliers"])]
    return "\n".join(parts)


def analyze_file(path: str, device="cpu", progress=None) -> dict:
    model = LoRAModel.load(path)
    return analyze(model, device=device, progress=progress, file_bytes=os.path.getsize(path))


def kinds_count(rep: dict) -> Counter:
    return Counter(e["kind"] for e in rep["modules"].values())
