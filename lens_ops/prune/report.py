"""The prune report: per module old→new rank, bytes, relative ΔW error, resize_lora's rle_lora/rle_ckpt,
SNR in dB; totals over the file; and a text table for the command line and the node."""
from __future__ import annotations

import math

import torch


def _db(signal: float, noise: float):
    if noise <= 0:
        return None  # exact: infinite SNR
    if signal <= 0:
        return None
    return 20.0 * math.log10(signal / noise)


def module_entry(src, new, dec, idx, rescale: float, note: str, have_base: bool) -> dict:
    """One module's line. `dec`/`idx` give the singular values and the kept set (None: not decomposed)."""
    e = {"name": src.name, "kind": src.kind.describe(src), "block": src.block, "component": src.component,
         "old_rank": src.rank(), "new_rank": (new.rank() if new is not None else 0),
         "bytes_in": src.nbytes, "bytes_out": new.nbytes if new is not None else 0}
    e["bytes_saved"] = e["bytes_in"] - e["bytes_out"]
    if dec is not None:
        S = dec.S.double()
        keep = torch.zeros(len(S), dtype=torch.bool)
        keep[idx] = True
        norm_in = float(S.norm())
        dropped = float(S[~keep].norm())
        kept_change = float(((rescale - 1.0) * S[keep]).norm())
        err = math.hypot(dropped, kept_change)
        e["delta_norm"] = norm_in
        e["error_norm"] = err
        e["rel_error"] = err / norm_in if norm_in > 0 else 0.0
        e["snr_db"] = _db(norm_in, err)
        sr = S * rescale
        e["rle_lora"] = float(sr[~keep].norm() / sr.norm()) if float(sr.norm()) > 0 else 1.0
        fro = dec.base.get("fro")
        e["rle_ckpt"] = float(sr[~keep].norm() / fro) if fro else None
        e["energy_kept"] = float(S[keep].pow(2).sum() / S.pow(2).sum()) if norm_in > 0 else 1.0
    else:
        d = None
        if rescale != 1.0 and new is not None and src.kind.name not in ("unknown", "set"):
            d = src.delta(torch.float32)
        e["delta_norm"] = float(d.norm()) if d is not None else None
        e["error_norm"] = abs(rescale - 1.0) * e["delta_norm"] if d is not None else 0.0
        e["rel_error"] = abs(rescale - 1.0) if d is not None else 0.0
        e["snr_db"] = _db(1.0, abs(rescale - 1.0)) if d is not None else None
        e["rle_lora"] = None
        e["rle_ckpt"] = None
        e["energy_kept"] = None
    e["note"] = note
    return e


def totals(entries: list, src_model, out_model) -> dict:
    sig = sum(e["delta_norm"] ** 2 for e in entries if e.get("delta_norm"))
    err = sum(e["error_norm"] ** 2 for e in entries if e.get("delta_norm"))
    old_ranks = [e["old_rank"] for e in entries if e["old_rank"]]
    new_ranks = [e["new_rank"] for e in entries if e["old_rank"] and e["new_rank"]]
    t = {"modules": len(entries),
         "pruned": sum(1 for e in entries if e["note"].startswith("pruned") or "converted" in e["note"]),
         "kept": sum(1 for e in entries if e["note"].startswith("kept")),
         "removed": sum(1 for e in entries if e["note"].startswith("removed")),
         "carried": sum(1 for e in entries if e.get("energy_kept") is None),
         "bytes_in": src_model.nbytes, "bytes_out": out_model.nbytes}
    t["bytes_saved"] = t["bytes_in"] - t["bytes_out"]
    t["saved_fraction"] = t["bytes_saved"] / t["bytes_in"] if t["bytes_in"] else 0.0
    t["rel_error"] = math.sqrt(err / sig) if sig > 0 else 0.0
    t["snr_db"] = _db(math.sqrt(sig), math.sqrt(err)) if sig > 0 else None
    t["old_rank_mean"] = sum(old_ranks) / len(old_ranks) if old_ranks else None
    t["new_rank_mean"] = sum(new_ranks) / len(new_ranks) if new_ranks else None
    t["max_rel_error"] = max((e["rel_error"] for e in entries if e.get("delta_norm")), default=0.0)
    return t


def _pct(x):
    return "–" if x is None else f"{100 * x:.2f}%"


def format_report(report: dict, limit: int = 40) -> str:
    """Text summary: totals first, then the modules with the largest errors (at most `limit`)."""
    t = report["total"]
    snr = "exact" if t["snr_db"] is None else f"{t['snr_db']:.1f} dB"
    lines = [f"Recipe {report['recipe']}" + (f" (threshold {report['threshold']:.3f})"
                                             if report.get("threshold") not in (None,) and
                                             math.isfinite(report["threshold"]) else ""),
             f"{t['bytes_in'] / 2 ** 20:.2f} MiB → {t['bytes_out'] / 2 ** 20:.2f} MiB "
             f"(saved {t['bytes_saved'] / 2 ** 20:.2f} MiB, {100 * t['saved_fraction']:.1f}%)",
             f"ΔW error {_pct(t['rel_error'])} (SNR {snr}); modules: {t['pruned']} pruned, {t['kept']} kept, "
             f"{t['removed']} removed, {t['carried']} carried through"]
    if t["old_rank_mean"]:
        lines.append(f"mean rank {t['old_rank_mean']:.1f} → {t['new_rank_mean'] or 0:.1f}")
    rows = sorted(report["modules"], key=lambda e: -(e["rel_error"] or 0))[:limit]
    lines.append(f"{'rank':>9}  {'rel err':>8}  {'rle_lora':>8}  {'rle_ckpt':>8}  {'SNR dB':>7}  module")
    for e in rows:
        rank = f"{e['old_rank'] if e['old_rank'] is not None else '-'}→{e['new_rank'] if e['new_rank'] is not None else '-'}"
        snr_m = "inf" if e["snr_db"] is None else f"{e['snr_db']:.1f}"
        lines.append(f"{rank:>9}  {_pct(e['rel_error']):>8}  {_pct(e['rle_lora']):>8}  {_pct(e['rle_ckpt']):>8}  "
                     f"{snr_m:>7}  {e['name']}  [{e['note']}]")
    if len(report["modules"]) > limit:
        lines.append(f"… {len(report['modules']) - limit} more modules (full list in the JSON report)")
    return "\n".join(lines)
