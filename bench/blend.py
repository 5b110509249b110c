"""ConflictScan and BlendLoRAs benchmarks (issue 6), each step in a fresh process, baselines in the same run.

1. Conflict scan of two SDXL rank-128 LoRAs vs loading them (target: scan ≤ 2× load).
2. Blend to rank 64 of two SDXL rank-64 LoRAs on a module subset: LoRA Lens svd / concat vs the dense
   SVD-merge baseline (dense ΔW₁+ΔW₂ per module, torch.linalg.svd, truncate), time and peak memory.
3. Whole-file blends (SDXL r64 pair, FLUX r64 pair): time and working memory beyond the loaded inputs
   (peak RSS after the blend minus peak RSS once the memory-mapped inputs are resident), for the in-memory result
   the node returns (output tensors included, shown separately) and for the CLI path that streams every module to
   the output file as it is made (`blend_to_file`).
4. TIES and DARE to rank 64 on FLUX r64 layers (the modules of one double and one single block, --flux-subset):
   LoRA Lens (row blocks, `rowwise.py`) vs a straightforward whole-matrix TIES/DARE (dense τ_i, kthvalue, the
   same re-factoring), time and working memory.

Usage: python bench/blend.py [--runs 3] [--steps 1,2,3,4] [--skip-flux] [--subset REGEX] [--flux-subset REGEX]
On a busy shared machine set LENS_BENCH_THREADS=1 so that every measured process, baseline included, runs on one
thread (oversubscribed OpenMP makes small LAPACK calls 10–100× slower and the numbers meaningless).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

from _common import ROOT, generated, table

PRE = """
import json, resource, sys, time
sys.path.insert(0, %r)
import os, torch
torch.set_grad_enabled(False)
if os.environ.get("LENS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["LENS_BENCH_THREADS"]))
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def touch(*models):  # loading is memory-mapped: fault the inputs in so that "extra" excludes them
    return sum(float(t.float().sum()) for m in models for mod in m.modules for t in mod.tensors.values())
from lens_ops import LoRAModel
"""

LOAD_AND_SCAN = """
t, c = time.perf_counter(), time.process_time()
a = LoRAModel.load({a!r}); b = LoRAModel.load({b!r})
load, load_cpu = time.perf_counter() - t, time.process_time() - c
from lens_ops.conflict import scan
t, c = time.perf_counter(), time.process_time()
rep = scan(a, b)
out = {{"load": load, "scan": time.perf_counter() - t, "load_cpu": load_cpu, "scan_cpu": time.process_time() - c,
        "modules": rep["shared_modules"]}}
"""

LOAD_AND_READ = """
t, c = time.perf_counter(), time.process_time()
a = LoRAModel.load({a!r}); b = LoRAModel.load({b!r})
n = sum(int(t.reshape(-1)[::512].sum() != 0) for m in (a, b) for mod in m.modules for t in mod.tensors.values()
        if t.numel())                     # fault every page of the memory-mapped tensors in (read them)
out = {{"load_read": time.perf_counter() - t, "load_read_cpu": time.process_time() - c}}
"""

SUBSET = """
import re
rx = re.compile({subset!r})
a = LoRAModel.load({a!r}); b = LoRAModel.load({b!r})
a.modules = [m for m in a.modules if rx.search(m.name)]; b.modules = [m for m in b.modules if rx.search(m.name)]
touch(a, b)
base = rss()
t = time.perf_counter()
{body}
out = {{"elapsed": time.perf_counter() - t, "extra_mib": rss() - base, "modules": len(a.modules)}}
"""

OURS = """
from lens_ops.blend import blend
res, rep = blend([a, b], [0.7, 0.3], {method!r}, {rank})
"""

DENSE = """
# the dense SVD-merge baseline: form w1·ΔW1 + w2·ΔW2, full SVD, keep the top `rank`
res = {{}}
for ma, mb in zip(a.modules, b.modules):
    d = 0.7 * ma.delta(torch.float32) + 0.3 * mb.delta(torch.float32)
    d = d.reshape(d.shape[0], -1)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = {rank}
    res[ma.name] = ((u[:, :k] * s[:k].sqrt()).half(), (s[:k].sqrt()[:, None] * vh[:k]).half())
"""

DENSE_TIES_DARE = """
# the straightforward whole-matrix route: every τ_i dense, TIES threshold by kthvalue, then the same re-factoring
from lens_ops.blend.methods import dare_masks, dense_to_factors
from lens_ops.conflict.matching import canonical_key
res = {{}}
for ma, mb in zip(a.modules, b.modules):
    taus = [0.7 * ma.delta(torch.float32), 0.3 * mb.delta(torch.float32)]
    taus = [x.reshape(x.shape[0], -1) for x in taus]
    if {method!r} == "ties":
        trimmed = []
        for tau in taus:
            k = max(1, int(round(0.2 * tau.numel())))
            thr = tau.abs().reshape(-1).kthvalue(tau.numel() - k + 1).values
            trimmed.append(torch.where(tau.abs() >= thr, tau, torch.zeros((), dtype=tau.dtype)))
        sign = torch.sign(trimmed[0] + trimmed[1])
        agree = [(x * sign) > 0 for x in trimmed]
        merged = sum(torch.where(g, x, torch.zeros((), dtype=x.dtype)) for g, x in zip(agree, trimmed))
        merged = merged / (agree[0].float() + agree[1].float()).clamp_min(1)
    else:
        masks = dare_masks(taus[0].shape, 0.2, 0, canonical_key(ma), 2)
        merged = taus[0] * masks[0] / 0.2 + taus[1] * masks[1] / 0.2
    res[ma.name] = dense_to_factors(merged, 64)[:2]
"""

WHOLE = """
a = LoRAModel.load({a!r}); b = LoRAModel.load({b!r})
inputs = (a.nbytes + b.nbytes) / 2**20
touch(a, b)
base = rss()
from lens_ops.blend import blend
t = time.perf_counter()
res, rep = blend([a, b], [0.7, 0.3], {method!r}, {rank})
out = {{"elapsed": time.perf_counter() - t, "extra_mib": rss() - base, "inputs_mib": inputs,
        "output_mib": res.nbytes / 2**20}}
"""

WHOLE_STREAM = """
import tempfile
a = LoRAModel.load({a!r}); b = LoRAModel.load({b!r})
inputs = (a.nbytes + b.nbytes) / 2**20
touch(a, b)
base = rss()
from lens_ops.blend import blend_to_file
out_dir = tempfile.mkdtemp(prefix="lens-blend-")
t = time.perf_counter()
res, rep = blend_to_file([a, b], [0.7, 0.3], os.path.join(out_dir, "out.safetensors"), method={method!r}, rank={rank})
elapsed = time.perf_counter() - t
size = os.path.getsize(rep["output"]["file"]) / 2**20
os.unlink(rep["output"]["file"]); os.rmdir(out_dir)
out = {{"elapsed": elapsed, "extra_mib": rss() - base, "inputs_mib": inputs, "output_mib": size}}
"""


def run(code: str, runs: int) -> dict:
    script = textwrap.dedent(PRE % ROOT) + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    rows = []
    for _ in range(runs):
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    keys = rows[0].keys()
    return {k: (statistics.median(r[k] for r in rows) if isinstance(rows[0][k], float) else rows[0][k]) for k in keys} | \
        {"peak_extra": max(r.get("extra_mib", 0) for r in rows)}


def whole_process(argv: list, runs: int) -> float:
    """Median wall seconds of a command run as a fresh process (output discarded)."""
    import time
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-flux", action="store_true")
    ap.add_argument("--steps", default="1,2,3,4", help="which parts to run (comma separated)")
    ap.add_argument("--flux-subset", default=r"(double|single)_blocks_0_")
    ap.add_argument("--subset", default=r"input_blocks_[45]_1_transformer_blocks_[01]_|te1_text_model_encoder_layers_[01]_")
    args = ap.parse_args()

    steps = set(args.steps.split(","))
    if "1" in steps:
        step1(args)
    if "2" in steps:
        step2(args)
    if "3" in steps:
        step3(args)
    if "4" in steps and not args.skip_flux:
        step4(args)


def step1(args):
    print("1. Conflict scan vs load, two SDXL rank-128 LoRAs (fp16)")
    a128, b128 = generated("sdxl_kohya", 128, 0), generated("sdxl_kohya", 128, 1)
    r = run(LOAD_AND_SCAN.format(a=a128, b=b128), args.runs)
    rd = run(LOAD_AND_READ.format(a=a128, b=b128), args.runs)
    size = (os.path.getsize(a128) + os.path.getsize(b128)) / 2**20
    # as a user runs them: interpreter start, imports, work, exit; the baseline loads both files the way ComfyUI's
    # load_torch_file does (safetensors load_file: every tensor read into memory)
    plain = whole_process([sys.executable, "-c", "import safetensors.torch as st; "
                           f"a = st.load_file({a128!r}); b = st.load_file({b128!r})"], args.runs)
    cli = whole_process([sys.executable, "-m", "lens_ops", "conflict", a128, b128, "--json"], args.runs)
    print(table([["LoRAModel.load both (memory-mapped, baseline)", f"{r['load']:.2f}", "1.00", "—",
                  f"{r['load_cpu']:.2f}", "1.00", "—"],
                 ["load both + read every tensor once (baseline)", f"{rd['load_read']:.2f}",
                  f"{rd['load_read'] / r['load']:.2f}", "1.00", f"{rd['load_read_cpu']:.2f}",
                  f"{rd['load_read_cpu'] / r['load_cpu']:.2f}", "1.00"],
                 [f"conflict scan ({r['modules']} shared modules)", f"{r['scan']:.2f}", f"{r['scan'] / r['load']:.2f}",
                  f"{r['scan'] / rd['load_read']:.2f}", f"{r['scan_cpu']:.2f}", f"{r['scan_cpu'] / r['load_cpu']:.2f}",
                  f"{r['scan_cpu'] / rd['load_read_cpu']:.2f}"],
                 ["whole process: python -c 'load_file(A); load_file(B)' (baseline)", f"{plain:.2f}", "—", "—", "—",
                  "—", "—"],
                 ["whole process: lora-lens conflict A B --json", f"{cli:.2f}", f"{cli / plain:.2f} × whole-process load",
                  "—", "—", "—", "—"]],
                ["step", "seconds", "× load", "× load+read", "CPU s", "CPU × load", "CPU × load+read"]) +
          f"\n(inputs {size:.0f} MiB; target: scan ≤ 2.00 × load; 1-min load average at the end "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch threads "
          f"{os.environ.get('LENS_BENCH_THREADS', 'default')})\n")


def step2(args):
    print(f"2. Blend to rank 64, two SDXL rank-64 LoRAs, module subset /{args.subset}/")
    a64, b64 = generated("sdxl_kohya", 64, 0), generated("sdxl_kohya", 64, 1)
    dense = run(SUBSET.format(subset=args.subset, a=a64, b=b64, body=DENSE.format(rank=64)), args.runs)
    rows = [["dense ΔW + torch.linalg.svd (baseline)", f"{dense['elapsed']:.2f}", "1.00", f"{dense['peak_extra']:.0f}"]]
    for method, rank in (("svd", 64), ("concat", 0), ("pca", 64)):
        o = run(SUBSET.format(subset=args.subset, a=a64, b=b64, body=OURS.format(method=method, rank=rank)), args.runs)
        rows.append([f"LoRA Lens {method}" + (f" rank {rank}" if rank else " (exact, rank 128)"),
                     f"{o['elapsed']:.2f}", f"{o['elapsed'] / dense['elapsed']:.3f}", f"{o['peak_extra']:.0f}"])
    print(table(rows, ["method", "seconds", "× baseline", "extra MiB"]) + f"\n({dense['modules']} modules)\n")


def step4(args):
    print(f"4. TIES / DARE to rank 64 (density 0.2), two FLUX rank-64 LoRAs, module subset /{args.flux_subset}/")
    a, b = generated("flux_kohya", 64, 0), generated("flux_kohya", 64, 1)
    rows = []
    for method in ("ties", "dare"):
        base = run(SUBSET.format(subset=args.flux_subset, a=a, b=b, body=DENSE_TIES_DARE.format(method=method)),
                   args.runs)
        ours = run(SUBSET.format(subset=args.flux_subset, a=a, b=b,
                                 body=OURS.replace("{rank})", "{rank}, density=0.2)").format(method=method, rank=64)),
                   args.runs)
        rows.append([f"{method}: whole matrices (baseline)", f"{base['elapsed']:.2f}", "1.00", f"{base['peak_extra']:.0f}"])
        rows.append([f"{method}: LoRA Lens (row blocks)", f"{ours['elapsed']:.2f}",
                     f"{ours['elapsed'] / base['elapsed']:.2f}", f"{ours['peak_extra']:.0f}"])
    print(table(rows, ["route", "seconds", "× baseline", "extra MiB (peak)"]) + f"\n({ours['modules']} modules)\n")


def step3(args):
    a64, b64 = generated("sdxl_kohya", 64, 0), generated("sdxl_kohya", 64, 1)
    print("3. Whole-file blends: time and working memory beyond the loaded inputs (output included)")
    rows = []
    pairs = [("SDXL r64", a64, b64)]
    if not args.skip_flux:
        pairs.append(("FLUX r64", generated("flux_kohya", 64, 0), generated("flux_kohya", 64, 1)))
    for label, a, b in pairs:
        for method, rank in (("svd", 64), ("concat", 0)):
            o = run(WHOLE.format(a=a, b=b, method=method, rank=rank), max(1, args.runs - 2))
            rows.append([label, method, "in memory (node)", f"{o['elapsed']:.1f}", f"{o['inputs_mib']:.0f}",
                         f"{o['output_mib']:.0f}", f"{o['peak_extra']:.0f}", f"{o['peak_extra'] - o['output_mib']:.0f}"])
            o = run(WHOLE_STREAM.format(a=a, b=b, method=method, rank=rank), max(1, args.runs - 2))
            rows.append([label, method, "streamed to file (CLI)", f"{o['elapsed']:.1f}", f"{o['inputs_mib']:.0f}",
                         f"{o['output_mib']:.0f}", f"{o['peak_extra']:.0f}", "—"])
    print(table(rows, ["pair", "method", "output", "seconds", "inputs MiB", "output MiB", "extra MiB (peak)",
                       "extra − output MiB"]) + "\n(target: ≤ 1024 MiB working memory beyond the inputs)")


if __name__ == "__main__":
    main()
