"""AnalyzeLoRA speed and memory on a large generated LoRA, against baselines measured in the same run.

Usage: python bench/analyze.py [--layout sdxl_kohya] [--rank 128] [--runs 3] [--dense-per-shape 1]

Rows (each in a fresh process; median of --runs; peak RSS of the process):
- plain safetensors load (the issue's baseline: `safetensors.torch.load_file`, which maps the file lazily)
- plain load + touching every tensor once (reads every byte: the least any analysis must do)
- LoRA Lens: `LoRAModel.load` + the whole `analyze()` report (all modules, spectra, stats, blocks,
  similarity, map, scores, findings)
- dense route: ΔW = module.delta() formed densely and `torch.linalg.svdvals` on it, timed on
  --dense-per-shape module(s) of every distinct weight shape and extrapolated by the number of modules
  of that shape (a full dense run takes far too long); the same modules are timed through the
  factored route for a per-module comparison (both single-threaded, unbatched).
"""
import argparse
import json
import os
import subprocess
import sys

from _common import ROOT, generated, run_timed, table

PLAIN = """
from safetensors.torch import load_file
t = time.perf_counter()
sd = load_file({src!r})
elapsed = time.perf_counter() - t
"""
TOUCH = """
from safetensors.torch import load_file
t = time.perf_counter()
sd = load_file({src!r})
s = 0.0
for v in sd.values():
    s += float(v.float().sum())
elapsed = time.perf_counter() - t
"""
ENGINE = """
from lens_ops import LoRAModel
from lens_ops.analysis import analyze
t = time.perf_counter()
m = LoRAModel.load({src!r})
rep = analyze(m)
elapsed = time.perf_counter() - t
"""
DENSE = """
import json, sys, time, collections
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)  # per-module timings: one thread for both routes (stable on a busy machine)
from lens_ops import LoRAModel
from lens_ops.analysis.spectra import batched_singular_values
m = LoRAModel.load({src!r})
groups = collections.defaultdict(list)
for mod in m.modules:
    if mod.lowrank() is not None:
        groups[tuple(mod.weight_shape())].append(mod)
dense_est = 0.0
fact_est = 0.0
rows = []
for shape, mods in groups.items():
    pick = mods[:{per}]
    t = time.perf_counter()
    for mod in pick:
        d = mod.delta(torch.float32)
        torch.linalg.svdvals(d.reshape(d.shape[0], -1))
    dt = (time.perf_counter() - t) / len(pick)
    t = time.perf_counter()
    for mod in pick:
        b, a, s = mod.lowrank(torch.float32)
        batched_singular_values(b[None], a[None])
    ft = (time.perf_counter() - t) / len(pick)
    dense_est += dt * len(mods)
    fact_est += ft * len(mods)
    rows.append([list(shape), len(mods), dt, ft])
print(json.dumps({{"dense_est": dense_est, "fact_est": fact_est, "rows": rows}}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="sdxl_kohya")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dense-per-shape", type=int, default=1)
    a = ap.parse_args()
    src = generated(a.layout, a.rank)
    size = os.path.getsize(src) / 2**20
    plain = run_timed(PLAIN.format(src=src), a.runs)
    touch = run_timed(TOUCH.format(src=src), a.runs)
    engine = run_timed(ENGINE.format(src=src), a.runs)
    out = subprocess.run([sys.executable, "-c", DENSE.format(root=ROOT, src=src, per=a.dense_per_shape)],
                         capture_output=True, text=True, check=True)
    dense = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [
        ["plain safetensors load (baseline)", f"{plain['median']:.2f}", "1.00", f"{plain['peak_mib']:.0f}",
         f"{plain['peak_mib'] / size:.2f}"],
        ["plain load + read every tensor once", f"{touch['median']:.2f}", f"{touch['median'] / plain['median']:.1f}",
         f"{touch['peak_mib']:.0f}", f"{touch['peak_mib'] / size:.2f}"],
        ["LoRA Lens load + analyze (whole report)", f"{engine['median']:.2f}",
         f"{engine['median'] / plain['median']:.1f}", f"{engine['peak_mib']:.0f}", f"{engine['peak_mib'] / size:.2f}"],
        ["dense ΔW + svdvals, all modules (extrapolated)", f"{dense['dense_est']:.1f}",
         f"{dense['dense_est'] / plain['median']:.0f}", "-", "-"],
    ]
    print(f"{a.layout} rank {a.rank}: {size:.0f} MiB, {a.runs} fresh-process runs each (median), "
          f"torch threads {os.cpu_count()}")
    print(table(rows, ["step", "seconds", "× plain load", "peak MiB", "peak / file"]))
    print(f"\nwhole analysis vs dense spectra: {dense['dense_est'] / engine['median']:.1f}× faster "
          f"(dense extrapolated from {a.dense_per_shape} module(s) per shape over {len(dense['rows'])} shapes)")
    print(f"spectra alone, one module at a time on one thread, factored vs dense: {dense['dense_est'] / dense['fact_est']:.0f}× "
          f"({dense['fact_est']:.2f} s vs {dense['dense_est']:.1f} s, extrapolated the same way)")
    print(f"analysis vs plain load + reading every byte: {engine['median'] / touch['median']:.1f}×")


if __name__ == "__main__":
    main()
