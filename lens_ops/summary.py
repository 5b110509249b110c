"""The short summary `lora-lens info` prints and LoadLoRAFile shows: what a file is, in users' words."""
from __future__ import annotations

import os
from collections import Counter

from .model import LoRAModel
from .kinds import UNKNOWN
from .training_meta import training_info

COMPONENT_NAMES = {"unet": "UNet", "transformer": "transformer", "te1": "text encoder 1",
                   "te2": "text encoder 2", "te3": "text encoder 3"}
COMFY_UNREAD = {"cloneofsimo lora_diffusion": "ComfyUI's LoraLoader does not read cloneofsimo keys "
                                              "(unet:<i>:up); convert the file before using it there."}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def summarize(model: LoRAModel, file_size: int | None = None) -> dict:
    """A JSON-able summary (the node's info output and `lora-lens info --json`)."""
    kinds = Counter(m.kind.describe(m) for m in model.modules)
    comps = Counter(m.component for m in model.modules)
    ranks = Counter(r for m in model.modules if (r := m.rank()) is not None)
    alphas = Counter(float(f"{a:.4g}") for m in model.modules if (a := m.alpha) is not None)  # int8 alphas are tiny
    nonfinite = {m.name: n for m in model.modules if (n := m.nonfinite())}
    dead = [m.name for m in model.modules if m.kind is not UNKNOWN and m.is_zero()]
    unknown = [m.name for m in model.modules if m.kind is UNKNOWN]
    arch = model.architecture
    warnings = []
    if nonfinite:
        warnings.append(f"{len(nonfinite)} module(s) contain NaN/Inf values: {', '.join(list(nonfinite)[:5])}")
    if dead:
        warnings.append(f"{len(dead)} module(s) are all zero (untrained)")
    if unknown:
        warnings.append(f"{len(unknown)} tensor group(s) not understood, carried through untouched: "
                        + ", ".join(unknown[:3]))
    if model.convention in COMFY_UNREAD:
        warnings.append(COMFY_UNREAD[model.convention])
    peft_dora = [m.name for m in model.modules if "magnitude" in m.tensors and "dora_scale" not in m.tensors]
    if peft_dora:
        warnings.append(f"{len(peft_dora)} module(s) are PEFT DoRA (lora_magnitude_vector): ComfyUI's LoRA loader "
                        "reads only kohya's .dora_scale, so it applies them as plain LoRA, without the magnitude")
    if any(m.kind.needs_base_weight for m in model.modules):
        warnings.append("some modules (GLoRA/OFT/BOFT) change weights relative to the base model; "
                        "their ΔW needs the base weights")
    return {
        "file": os.path.basename(model.source) if model.source else None,
        "file_bytes": file_size,
        "tensor_bytes": model.nbytes,
        "architecture": arch.label,
        "architecture_id": arch.id,
        "architecture_evidence": arch.evidence,
        "format": model.convention,
        "precision": model.precision,
        "modules": len(model.modules),
        "modules_by_kind": dict(kinds.most_common()),
        "modules_by_component": {COMPONENT_NAMES.get(c, c): n for c, n in comps.most_common()},
        "ranks": {str(r): n for r, n in sorted(ranks.items())},
        "alphas": {str(a): n for a, n in sorted(alphas.items())},
        "params": sum(m.params for m in model.modules),
        "nonfinite_modules": nonfinite,
        "dead_modules": len(dead),
        "unknown_modules": unknown,
        "training": training_info(model.metadata),
        "warnings": warnings,
    }


def _counts(d: dict, sep=", ") -> str:
    return sep.join(f"{k}: {v}" for k, v in d.items())


def format_summary(s: dict) -> str:
    ranks = [int(r) for r in s["ranks"]]
    rank_txt = ("none" if not ranks else str(ranks[0]) if len(ranks) == 1 else
                f"{min(ranks)}–{max(ranks)} (most common {max(s['ranks'], key=s['ranks'].get)})")
    alphas = list(s["alphas"])
    alpha_txt = ("none (scale 1)" if not alphas else alphas[0] if len(alphas) == 1 else
                 f"{len(alphas)} values ({', '.join(alphas[:4])}{', …' if len(alphas) > 4 else ''})")
    lines = []
    if s.get("file"):
        size = s["file_bytes"] if s.get("file_bytes") is not None else s["tensor_bytes"]
        lines.append(f"{s['file']} ({_mib(size)})")
    lines += [
        f"Architecture: {s['architecture']}" + ("" if s["architecture_id"] == "unknown" else f"  ({s['architecture_evidence']})"),
        f"Format: {s['format']}",
        f"Precision: {s['precision']}",
        f"Modules: {s['modules']}  ({_counts(s['modules_by_kind'])})",
        f"Targets: {_counts(s['modules_by_component'])}",
        f"Rank: {rank_txt}   Alpha: {alpha_txt}   Parameters: {s['params']:,}",
    ]
    t = s["training"]
    if t:
        bits = [f"{k.replace('_', ' ')}: {t[k]}" for k in ("base_model", "trainer", "dim", "alpha", "resolution",
                                                            "steps", "epochs") if k in t]
        if bits:
            lines.append("Training: " + "; ".join(bits))
        if t.get("trigger_words"):
            lines.append("Trigger words: " + ", ".join(t["trigger_words"]))
    for w in s["warnings"]:
        lines.append("Warning: " + w)
    return "\n".join(lines)
