"""The floor of the quantize time target: what the default method's unavoidable products cost by themselves.

`lora-lens quantize` with the default `rebalance+rotate` must, for every module, bring the fp16 factors to float32,
rotate the pair in rank space (b·D·H, Hᵀ·D⁻¹·a: two n×r·r×r products), round them to int8, and measure the exact
ΔW error of that rounding, which needs r×r Gram blocks of both factors and their rounding errors (two finer int8
levels of the error, then metrics.level_grams: two int8 products per module). This script times each of those
steps alone, with the engine's own functions on the real file, side by side in two worker threads as the command
runs them, and adds them to the whole-process load+save baseline measured in the same run (minus what writing a
half-size int8 file saves against writing the fp16 copy). What the command spends beyond that sum is overhead
(report, sampled MAE/max error, the streamed write); if the sum itself is above 1.5× the baseline, the target
cannot be met this way on this machine, whatever else is optimised.

Usage: python bench/quantize_floor.py [--rank 128] [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from _common import ROOT, code_process, generated, run_timed, table

sys.path.insert(0, ROOT)


def _stored(path):
    """(up, down) tensors of every LoRA module as stored in the file (fp16 here)."""
    from lens_ops.model import LoRAModel
    model = LoRAModel.load(path)
    return [(m.tensors["up"], m.tensors["down"]) for m in model.modules
            if m.kind.name == "lora" and "mid" not in m.tensors]


def _as_pair(stored):
    """The float32 (b, a) pair the quantizer works on."""
    import torch
    from lens_ops.kinds.base import as_float
    up, down = stored
    return (as_float(up, torch.float32, "cpu").reshape(up.shape[0], -1),
            as_float(down, torch.float32, "cpu").reshape(down.shape[0], -1))


def _timed_phase(fn, items):
    """Wall seconds of fn over all items in two worker threads with one torch thread each (as the command)."""
    import torch
    with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as ex:
        t = time.perf_counter()
        for _ in ex.map(fn, items):
            pass
        return time.perf_counter() - t


def floor_parts(path, runs):
    import torch
    from lens_ops.quantize import transforms
    from lens_ops.quantize.fold import _residual_code
    from lens_ops.quantize.metrics import level_grams, residual_levels
    stored = _stored(path)
    pairs = [_as_pair(p) for p in stored]
    rotated = [transforms.apply("rebalance+rotate", b, a) for b, a in pairs]
    codes = [(_residual_code(bt, "up"), _residual_code(at, "down")) for bt, at in rotated]

    def levels_of(c):
        (fb, sb, db), (fa, sa, da) = c
        return residual_levels(fb, db.clone(), sb, 1), residual_levels(fa, da.clone(), sa, 0), sb, sa
    levels = [levels_of(c) for c in codes]
    assert level_grams(*levels[0]) is not None, "int8 products unavailable on this platform"
    parts = {
        "fp16 → float32 factors (kinds.base.as_float)": lambda: _timed_phase(_as_pair, stored),
        "rank-space rotation (transforms.apply rebalance+rotate)":
            lambda: _timed_phase(lambda p: transforms.apply("rebalance+rotate", *p), pairs),
        "int8 rounding: x/s, round, residual (fold._residual_code)":
            lambda: _timed_phase(lambda p: (_residual_code(p[0], "up"), _residual_code(p[1], "down")), rotated),
        "two int8 levels of the rounding error (metrics.residual_levels, timed with a copy of its input)": lambda: _timed_phase(levels_of, codes),
        "exact ΔW error products (metrics.level_grams)": lambda: _timed_phase(lambda lv: level_grams(*lv), levels),
    }
    times = {k: statistics.median(f() for _ in range(runs)) for k, f in parts.items()}
    # writing the int8 output instead of an fp16 copy saves this much of the baseline's save
    from safetensors.torch import save_file
    fp16 = {f"{i}.{j}": t.half() for i, p in enumerate(pairs) for j, t in enumerate(p)}
    int8 = {k: torch.empty(v.shape, dtype=torch.int8) for k, v in fp16.items()}
    saves = {"fp16": [], "int8": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            for label, sd in (("fp16", fp16), ("int8", int8)):
                t = time.perf_counter()
                save_file(sd, os.path.join(tmp, label + ".safetensors"))
                saves[label].append(time.perf_counter() - t)
                os.unlink(os.path.join(tmp, label + ".safetensors"))
    med = statistics.median
    return times, med(saves["fp16"]) - med(saves["int8"]), len(pairs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    src = generated("sdxl_kohya", a.rank)
    copy, out = src + ".copy.safetensors", src + ".floor.safetensors"
    plain = run_timed(code_process([sys.executable, "-c", "import safetensors.torch as st; "
                                    f"st.save_file(st.load_file({src!r}), {copy!r})"]), a.runs)["median"]
    ours = run_timed(code_process([sys.executable, "-m", "lens_ops", "quantize", src, "-o", out]), a.runs)["median"]
    for f in (copy, out):
        if os.path.exists(f):
            os.unlink(f)
    times, credit, n = floor_parts(src, a.runs)
    rows = [["whole process: `python -c 'load_file; save_file'` (baseline)", f"{plain:.2f}", "1.00"],
            ["target: 1.5 × baseline", f"{1.5 * plain:.2f}", "1.50"]]
    rows += [[f"{k}, {n} modules", f"{t:.2f}", f"{t / plain:.2f}"] for k, t in times.items()]
    rows.append(["saving an int8 file instead of the fp16 copy (credit)", f"−{credit:.2f}", f"−{credit / plain:.2f}"])
    must = [k for k in times if "rotation" in k or "products" in k]
    floor = plain - credit + sum(times[k] for k in must)
    serial = plain - credit + sum(times.values())
    rows += [["floor: baseline − credit + rotation + error products (every other pass fused or hidden)",
              f"{floor:.2f}", f"**{floor / plain:.2f}**"],
             ["baseline − credit + every step above, one after another", f"{serial:.2f}", f"{serial / plain:.2f}"],
             ["whole process: `lora-lens quantize IN -o OUT` (default)", f"{ours:.2f}", f"{ours / plain:.2f}"]]
    print(f"\nsdxl_kohya rank {a.rank}: {os.path.getsize(src) / 2**20:.0f} MiB fp16, median of {a.runs}")
    print(table(rows, ["step", "seconds", "× baseline"]))
    if floor > 1.5 * plain:
        print("floor above 1.5×: out of reach for the default method with exact ΔW metrics on this machine")
    elif serial > 1.5 * plain:
        print("floor at or below 1.5×: reachable only if the conversion, rounding and level passes cost almost nothing")
    else:
        print("every step together fits in 1.5×: reachable")


if __name__ == "__main__":
    main()
