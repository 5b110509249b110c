"""Verdicts: the compression estimate, the efficiency and health scores, and plain-language findings.

Formulas (docs/analysis.md repeats them):
- size at effective rank (per energy level p): every plain LoRA/LoCon module is resized in place to
  rank k = max(1, effective_rank_p): up [out, k], down [k, in(, kh, kw)] in its own dtype, other tensors
  (alpha, dora_scale) unchanged; modules where that is not smaller, and all other kinds, keep their size.
  The file size adds the exact safetensors header for the same keys, new shapes and metadata.
- efficiency = 100 · Σ bytes_at_rank(k₉₉) / Σ bytes_now over modules with a spectrum (dead modules
  need 0 bytes): the share of the stored numbers the LoRA really uses at 99 % energy.
- health = min(cap, 100 − Σ penalties); penalties below, cap = 10 when any NaN/Inf is present.
"""
from __future__ import annotations

import json
import math
import statistics

from ..st_io import TORCH_TO_ST

DTYPE_BYTES_BY_NAME = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8, "int8": 1, "uint8": 1,
                       "fp8 (e4m3fn)": 1, "fp8 (e5m2)": 1}
HEADLINE_LEVEL = "99"
KURTOSIS_LIMIT = 10.0
ALPHA_HIGH, ALPHA_LOW = 4.0, 1.0 / 256
EXPLODE_FACTOR = 8.0


def _elem_bytes(model, name):
    m = model.get(name)
    for role in ("up", "down", "diff", "w_norm", "hada_w1_a", "lokr_w1", "lokr_w1_a", "lokr_w2_a"):
        if role in m.tensors:
            return m.tensors[role].element_size(), m.tensors[role].dtype
    t = next(t for r, t in m.tensors.items() if r != "alpha")
    return t.element_size(), t.dtype


def _header_bytes(model, shapes: dict[str, dict[str, tuple]], metadata: dict) -> int:
    """Exact length of the safetensors header (8-byte length + padded JSON) save_file would write."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for m in model.modules:
        sh = shapes.get(m.name)
        for role, key in m.keys.items():
            t = m.tensors[role]
            shape = list(sh[role]) if sh and role in sh else list(t.shape)
            n = math.prod(shape) * t.element_size()
            header[key] = {"dtype": TORCH_TO_ST[t.dtype], "shape": shape, "data_offsets": [off, off + n]}
            off += n
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return 8 + len(raw) + (-len(raw) % 8)


def compression(model, entries: dict) -> dict:
    levels = {}
    for level in ("90", "99", "999"):
        tensors_now = model.nbytes
        saved = 0
        shapes = {}
        for name, e in entries.items():
            k = e.get(f"effective_rank_{level}")
            if k is None or not e.get("shape"):
                continue
            m = model.get(name)
            eb, _ = _elem_bytes(model, name)
            sh = e["shape"]
            n_out, n_in = sh[0], (math.prod(sh[1:]) if len(sh) > 1 else 1)
            if e["kind"] != "lora" or "mid" in m.tensors:
                continue  # only plain LoRA/LoCon modules are resized in place (same keys); others keep their size
            k = max(k, 1)  # a rank-0 module would not load (alpha / 0); dead modules keep rank 1
            up, down = m.tensors["up"], m.tensors["down"]
            new = m.nbytes - (up.numel() + down.numel()) * eb + k * (n_out + n_in) * eb
            if new < m.nbytes:
                saved += m.nbytes - new
                shapes[name] = {"up": (up.shape[0], k) + tuple(up.shape[2:]), "down": (k,) + tuple(down.shape[1:])}
        size = tensors_now - saved
        header = _header_bytes(model, shapes, {k: v for k, v in model.metadata.items()
                                               if k != "lora_lens.provenance"})
        levels[level] = {"tensor_bytes": size, "file_bytes": size + header,
                         "relative_error": math.sqrt(max(0.0, 1 - {"90": .9, "99": .99, "999": .999}[level]))}
    now_header = _header_bytes(model, {}, {k: v for k, v in model.metadata.items() if k != "lora_lens.provenance"})
    now = model.nbytes + now_header
    head = levels[HEADLINE_LEVEL]
    return {"file_bytes_now": now, "tensor_bytes_now": model.nbytes, "levels": levels, "headline_level": HEADLINE_LEVEL,
            "file_bytes_at_effective_rank": head["file_bytes"],
            "saving_fraction": 1 - head["file_bytes"] / now if now else 0.0}


def efficiency(model, entries: dict) -> dict:
    used = total = 0
    for name, e in entries.items():
        if e.get("energy") is None or not e.get("shape"):
            continue
        m = model.get(name)
        eb, _ = _elem_bytes(model, name)
        sh = e["shape"]
        n_out, n_in = sh[0], (math.prod(sh[1:]) if len(sh) > 1 else 1)
        now = m.params * eb
        k = e["effective_rank_99"]
        used += min(now, k * (n_out + n_in) * eb)
        total += now
    score = 100.0 * used / total if total else 0.0
    return {"score": round(score, 1), "used_bytes": used, "stored_bytes": total,
            "formula": "100 × Σ min(stored, k99·(out+in)·element bytes) / Σ stored, over modules with a spectrum"}


def _fmt_mib(n):
    return f"{n / 2**20:.1f} MiB"


def findings_and_health(model, entries: dict, blocks: dict, dups: list, summary: dict, eff: dict,
                        comp: dict) -> tuple[list[dict], dict]:
    F = []
    penalties = []

    def add(fid, severity, title, text, evidence, points=0.0):
        F.append({"id": fid, "severity": severity, "title": title, "text": text, "evidence": evidence})
        if points:
            penalties.append({"finding": fid, "points": round(points, 1)})

    analysed = {n: e for n, e in entries.items() if e.get("energy") is not None}
    nonfinite = {n: e["factors"]["nan"] + e["factors"]["inf"] for n, e in entries.items()
                 if e.get("factors") and (e["factors"]["nan"] or e["factors"]["inf"])}
    if nonfinite:
        worst = sorted(nonfinite.items(), key=lambda kv: -kv[1])[:5]
        add("nonfinite", "critical", "NaN/Inf values",
            f"{len(nonfinite)} module(s) contain NaN or Inf values; applying this LoRA will corrupt images "
            "(black or noise outputs). Re-export it from a good checkpoint or drop those modules.",
            {"modules": len(nonfinite), "values": sum(nonfinite.values()), "worst": dict(worst)}, 60)
    lora_like = [e for e in entries.values() if e["kind"] not in ("unknown",)]
    dead = [n for n, e in analysed.items() if e["energy"] == 0.0]
    if dead:
        frac = len(dead) / max(len(analysed), 1)
        add("dead_modules", "warning" if frac < 0.5 else "critical", "Untrained (all-zero) modules",
            f"{len(dead)} of {len(analysed)} modules change nothing (ΔW = 0): they were never trained or were "
            "zeroed. They cost file space only; pruning removes them.",
            {"modules": len(dead), "fraction": round(frac, 4), "examples": dead[:5]}, 40 * frac)
    # rank inflation
    ranked = [e for e in analysed.values() if e["rank"] and e["energy"] > 0]
    if ranked:
        nominal = statistics.median(e["rank"] for e in ranked)
        k99 = statistics.median(e["effective_rank_99"] for e in ranked)
        if eff["score"] < 50:
            add("rank_inflation", "warning", "Rank inflation",
                f"The LoRA stores rank {nominal:g} but the median module needs only {k99:g} directions for 99 % "
                f"of its ΔW energy; efficiency {eff['score']:.0f}/100. Resizing to the effective rank would make "
                f"the file {_fmt_mib(comp['file_bytes_at_effective_rank'])} instead of {_fmt_mib(comp['file_bytes_now'])} "
                f"(≤ 10 % relative ΔW error per module).",
                {"nominal_rank_median": nominal, "effective_rank_99_median": k99, "efficiency": eff["score"]})
    # alpha / rank
    # int8/fp8 factors carry their per-tensor scales in alpha (QuantizeInt8 folds them there): a tiny
    # alpha/rank is then by design, not a trainer setting to check
    scales = [(n, e["alpha_over_rank"]) for n, e in entries.items() if e.get("alpha_over_rank") is not None
              and not any(q in (e.get("dtype") or "") for q in ("int8", "fp8", "uint8"))]
    extreme = [(n, s) for n, s in scales if abs(s) >= ALPHA_HIGH or abs(s) <= ALPHA_LOW]
    if extreme:
        add("extreme_alpha", "warning", "Extreme alpha/rank",
            f"{len(extreme)} module(s) have alpha/rank outside [1/256, 4] (e.g. {extreme[0][1]:g}); the stored "
            "factors are scaled by it when applied, so tiny or huge factors are hidden behind it. Check the "
            "strength you use and the trainer's alpha setting.",
            {"modules": len(extreme), "examples": {n: s for n, s in extreme[:5]}}, 10)
    # exploding norms per block
    bl = blocks["blocks"]
    if len(bl) >= 3:
        med = statistics.median(b["mean_frobenius"] for b in bl.values())
        hot = {k: b["mean_frobenius"] / med for k, b in bl.items() if med > 0 and b["mean_frobenius"] > EXPLODE_FACTOR * med}
        if hot:
            add("exploding_norms", "warning", "Exploding norms in a block",
                f"Block(s) {', '.join(list(hot)[:4])} have a mean module ‖ΔW‖ more than {EXPLODE_FACTOR:g}× the "
                "median block: a sign of over-training or a too-high learning rate there; lower their block "
                "weight or retrain.", {"blocks": {k: round(v, 2) for k, v in hot.items()}}, min(20, 10 * len(hot)))
    # heavy tails
    heavy = {n: e["elements"]["excess_kurtosis"] for n, e in analysed.items()
             if e.get("elements") and e["elements"]["excess_kurtosis"] > KURTOSIS_LIMIT and e["energy"] > 0}
    if heavy:
        worst = sorted(heavy.items(), key=lambda kv: -kv[1])[:5]
        add("heavy_tails", "warning" if len(heavy) > 0.1 * len(analysed) else "info", "Heavy-tailed weights",
            f"{len(heavy)} module(s) have ΔW elements with excess kurtosis above {KURTOSIS_LIMIT:g} (a normal "
            "distribution has 0): a few very large weights dominate, typical of over-training or outlier "
            "images; such LoRAs quantize badly and overpower prompts.",
            {"modules": len(heavy), "worst": {n: round(v, 2) for n, v in worst}},
            min(15, 5 * math.ceil(len(heavy) / max(1, 0.05 * len(analysed)))))
    if dups:
        add("duplicates", "warning", "Duplicated modules",
            f"{len(dups)} pair(s) of modules carry the same ΔW (cosine ≥ 0.99999, equal norms), e.g. "
            f"{dups[0][0]} = {dups[0][1]}: usually a conversion or merge mistake.", {"pairs": dups[:10]},
            min(10, 5 * len(dups)))
    # text encoders
    comps = blocks["components"]
    tes = {c: v for c, v in comps.items() if c.startswith("te")}
    arch = summary.get("architecture_id")
    if tes:
        te_share = sum(v["share"] for v in tes.values())
        expected = {"sdxl": ("te1", "te2")}.get(arch)
        missing = [t for t in (expected or ()) if t not in tes]
        if missing:
            add("te_mismatch", "warning", "Mismatched text-encoder training",
                f"{arch.upper()} has two text encoders but only {', '.join(sorted(tes))} was trained "
                f"({', '.join(missing)} missing): the trainer probably trained one encoder by mistake.",
                {"trained": sorted(tes), "missing": missing}, 5)
        elif len(tes) >= 2:
            means = {c: v["mean_frobenius"] for c, v in tes.items()}
            hi, lo = max(means.values()), min(means.values())
            if lo == 0 or hi / lo > 10:
                add("te_mismatch", "warning", "Mismatched text-encoder training",
                    "The text encoders were trained to very different strengths (mean ‖ΔW‖ "
                    + ", ".join(f"{c}: {v:.3g}" for c, v in means.items()) + "); one was likely frozen or "
                    "given a different learning rate.", {"mean_frobenius": means}, 5)
        if te_share > 0.5:
            add("te_heavy", "info", "Text encoders dominate",
                f"{te_share:.0%} of the ΔW energy is in the text encoders: the LoRA changes prompt understanding "
                "more than the image model; it may bleed into unrelated prompts.", {"te_share": round(te_share, 4)})
    if not summary.get("trigger_words"):
        add("no_trigger_words", "info", "No trigger words recorded",
            "The file's metadata names no trigger words or caption tags; check the LoRA's page for how to "
            "prompt it.", {"metadata_keys": len(model.metadata)}, 0)
    dora = [n for n, e in entries.items() if e.get("dora")]
    if dora:
        add("dora", "info", "DoRA modules",
            f"{len(dora)} module(s) are DoRA: numbers describe their low-rank part scale·up@down; the applied "
            "change also re-normalises the base weight (dora_scale), which needs the base model.",
            {"modules": len(dora)})
    wd = [n for n, e in entries.items() if e["kind"] in ("glora", "oft", "boft", "set")]
    if wd:
        add("weight_dependent", "info", "Modules without a stand-alone ΔW",
            f"{len(wd)} module(s) (GLoRA/OFT/BOFT/set_weight) change weights relative to the base model; "
            "they are listed but have no spectrum here.", {"modules": len(wd), "examples": wd[:5]})
    saving = comp["saving_fraction"]
    if saving > 0.05:
        add("compression", "info", "Compression available",
            f"At the rank each module really uses (99 % energy) the file would be "
            f"{_fmt_mib(comp['file_bytes_at_effective_rank'])} instead of {_fmt_mib(comp['file_bytes_now'])} "
            f"({saving:.0%} smaller) with at most 10 % relative ΔW error per module.",
            {"file_bytes_now": comp["file_bytes_now"], "file_bytes_at_effective_rank": comp["file_bytes_at_effective_rank"]})
    cap = 10.0 if nonfinite else 100.0
    health = max(0.0, min(cap, 100.0 - sum(p["points"] for p in penalties)))
    del lora_like
    order = {"critical": 0, "warning": 1, "info": 2}
    F.sort(key=lambda f: order[f["severity"]])
    return F, {"score": round(health, 1), "penalties": penalties, "cap": cap,
               "formula": "min(cap, 100 − Σ penalties); cap 10 when any NaN/Inf is present, else 100"}
