"""Block-level importance: ΔW energy (‖ΔW‖²_F, exact from the spectra) summed per block and component,
each block's share of the total, and the smallest set of blocks holding a chosen share."""
from __future__ import annotations

import re
from collections import OrderedDict

COMPONENT_ORDER = {"unet": 0, "transformer": 0, "te1": 1, "te2": 2, "te3": 3}


def _block_key(name: str):
    """Natural order: input 0..11, middle, output 0..11; double 0..18, single 0..37; te last."""
    order = {"input": 0, "down": 0, "middle": 1, "mid": 1, "output": 2, "up": 2, "double": 3, "joint": 3,
             "block": 4, "single": 5, "layer": 6, "other": 7, "te1": 8, "te2": 9, "te3": 10}
    m = re.match(r"([a-z0-9]+?)(?: (\d+))?$", name)
    word = m.group(1) if m else name
    return (order.get(word, 7), int(m.group(2)) if m and m.group(2) else -1, name)


def smallest_block_set(shares: dict[str, float], target: float) -> list[str]:
    """Fewest blocks whose shares sum to ≥ target (largest first; exact for this greedy-optimal problem)."""
    chosen, acc = [], 0.0
    for name, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        if acc >= target - 1e-12:
            break
        chosen.append(name)
        acc += share
    return chosen


def block_importance(entries: dict[str, dict], target: float = 0.9) -> dict:
    blocks: dict[str, dict] = {}
    comps: dict[str, dict] = {}
    total = 0.0
    for name, e in entries.items():
        energy = e.get("energy")
        if energy is None:
            continue
        total += energy
        for table, key in ((blocks, e["block"]), (comps, e["component"])):
            b = table.setdefault(key, {"modules": 0, "energy": 0.0, "params": 0, "max_spectral_norm": 0.0,
                                       "frobenius_sum": 0.0, "component": e["component"]})
            b["modules"] += 1
            b["energy"] += energy
            b["params"] += e["params"]
            b["frobenius_sum"] += e["frobenius_norm"]
            b["max_spectral_norm"] = max(b["max_spectral_norm"], e["spectral_norm"])
    for table in (blocks, comps):
        for b in table.values():
            b["share"] = b["energy"] / total if total > 0 else 0.0
            b["mean_frobenius"] = b.pop("frobenius_sum") / b["modules"]
    ordered = OrderedDict(sorted(blocks.items(), key=lambda kv: _block_key(kv[0])))
    shares = {k: v["share"] for k, v in ordered.items()}
    chosen = smallest_block_set(shares, target) if total > 0 else []
    return {
        "total_energy": total,
        "blocks": ordered,
        "components": OrderedDict(sorted(comps.items(), key=lambda kv: COMPONENT_ORDER.get(kv[0], 9))),
        "target_share": target,
        "smallest_set": chosen,
        "smallest_set_share": sum(shares[c] for c in chosen),
    }
