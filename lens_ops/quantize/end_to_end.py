"""ΔW quality of prune-then-quantize (`lora-lens ultra`) against the ORIGINAL LoRA, from the two steps' exact
per-module error energies.

Per module, with ΔW₀ the original, ΔW₁ = U_k·S_k·V_kᵀ its SVD truncation (PruneRank) and ΔW₂ the int8 copy of ΔW₁:
ΔW₀ − ΔW₂ = R + E with R = ΔW₀ − ΔW₁ (the dropped directions) and E = ΔW₁ − ΔW₂ = E_b·A + B̂·E_a (the rounding of
the pruned factors B, A; B̂ = B − E_b). R's column and row spaces are orthogonal to U_k and V_k, which B's columns
and A's rows span, so ⟨R, E_b·A⟩ = ⟨R, B·E_a⟩ = 0 and

    ‖ΔW₀ − ΔW₂‖² = ‖R‖² + ‖E‖² − 2⟨R, E_b·E_a⟩:

the two exact energies add up, to a term of the order of a product of two rounding errors (measured ~10⁻⁴ of the
total on real and generated LoRAs). With a recipe's `rescale=F` (kept singular values scaled by F ≠ 1), R has a
part inside ΔW₁'s spaces and the cross term is first order: no end-to-end figure is given then.
"""
from __future__ import annotations

import math
import statistics


def _snr(signal: float, error: float) -> float | None:
    if error <= 0:
        return None if signal <= 0 else math.inf
    return -math.inf if signal <= 0 else 10 * math.log10(signal / error)


def end_to_end(prune_report: dict, quant_report: dict) -> dict | None:
    """{'snr_db', 'rel_frobenius', 'median_snr_db', 'min_snr_db', 'worst_module', 'modules'} of the ultra output
    against the original, per module and in total; None when the prune rescaled (see the module docstring)."""
    try:
        rescale = float(prune_report.get("settings", {}).get("rescale", 1.0))
    except (TypeError, ValueError):
        return None
    if rescale != 1.0:
        return None
    quant = {m["name"]: m for m in quant_report.get("per_module", [])}
    signal = error = 0.0
    per = []
    for m in prune_report.get("modules", []):
        s0, ep = m.get("delta_norm"), m.get("error_norm") or 0.0
        q = quant.get(m["name"])
        quantized = q is not None and q.get("quantized")
        if s0 is not None:
            s = s0 * s0
        elif ep == 0.0 and quantized:                  # left as it was by the prune (e.g. LoKr): ΔW₁ = ΔW₀
            s = q["delta"].get("signal_energy") or 0.0
        else:
            continue                                   # no stand-alone ΔW (diffs, norms, …): nothing to measure
        e = ep * ep + ((q["delta"].get("error_energy") or 0.0) if quantized else 0.0)
        signal, error = signal + s, error + e
        snr = _snr(s, e)
        if snr is not None:
            per.append((snr, m["name"]))
    if signal <= 0:
        return None
    finite = [x for x in per if math.isfinite(x[0])]
    worst = min(per) if per else None
    total = _snr(signal, error)
    return {
        "snr_db": total if math.isfinite(total) else "inf",
        "rel_frobenius": math.sqrt(error / signal),
        "median_snr_db": statistics.median(x[0] for x in finite) if finite else None,
        "min_snr_db": (worst[0] if math.isfinite(worst[0]) else "inf") if worst else None,
        "worst_module": worst[1] if worst else None,
        "modules": len(per),
        "how": "prune error + int8 error per module (exact energies; they add up to a second-order term)",
    }
