"""QuantizeInt8 benchmark: quality of each rank-space preparation (naive per-tensor vs rebalanced vs
rotated vs both vs auto) on generated SDXL r32 / FLUX r64 layouts, file size, and time against a plain
safetensors load+save of an SDXL rank-128 file.

Usage: python bench/quantize.py [--quality] [--time] [--runs 3] [--time-rank 128] [--time-methods default,naive]
       [--slice N] [--threads N]
Quality runs in this process (deterministic). Timings run each step in a fresh process (median of --runs):
the in-process rows time load → quantize → report → save inside that process; the whole-process rows (full
files, default threads) time `lora-lens quantize` as a user runs it — interpreter start, imports, work, exit —
against `python -c 'load_file; save_file'` run the same way.
"""
import argparse
import os
import statistics
import sys
import time

from _common import ROOT, code_process, generated, run_timed, table

sys.path.insert(0, ROOT)

METHODS = ["naive", "rebalance", "rotate", "rebalance+rotate", "auto"]  # rebalance+rotate is the default

PLAIN = """
from safetensors.torch import load_file, save_file
t, c = time.perf_counter(), time.process_time()
sd = load_file({src!r})
save_file(sd, {dst!r}, metadata={{}})
elapsed, cpu_seconds = time.perf_counter() - t, time.process_time() - c
"""
QUANT = """
import torch
if {threads}: torch.set_num_threads({threads})
from lens_ops.cli import main
t, c = time.perf_counter(), time.process_time()
rc = main(["quantize", {src!r}, "-o", {dst!r}] + {extra!r})  # exactly what a user runs (report printed)
elapsed, cpu_seconds = time.perf_counter() - t, time.process_time() - c
assert rc == 0
"""

# label -> extra CLI arguments; "default" is `lora-lens quantize IN -o OUT` with nothing else
VARIANTS = {"default": [], "naive": ["--method", "naive"], "auto": ["--method", "auto"],
            "exact": ["--metrics", "exact"]}


def quality(layouts, methods=METHODS):
    import torch  # noqa: F401
    from lens_ops import LoRAModel
    from lens_ops.quantize import DEFAULT_METHOD, quantize_model
    rows = []
    for layout, rank in layouts:
        src = generated(layout, rank)
        model = LoRAModel.load(src)
        size_in = os.path.getsize(src)
        naive_med = None
        for meth in methods:
            t = time.perf_counter()
            out, rep = quantize_model(model, method=meth)
            secs = time.perf_counter() - t
            dst = src + f".{meth}.q.safetensors"
            out.save(dst, out.metadata)
            ratio = os.path.getsize(dst) / size_in
            os.unlink(dst)
            snrs = [p["delta"]["snr_db"] for p in rep["per_module"] if isinstance(p["delta"]["snr_db"], float)]
            med = statistics.median(snrs)
            naive_med = med if meth == "naive" else naive_med
            if naive_med is None:
                raise SystemExit("--quality-methods must start with naive (the reference)")
            used = ", ".join(f"{k} {v}" for k, v in sorted(rep["methods"].items(), key=lambda kv: -kv[1]))
            label = meth + (" (default)" if meth == DEFAULT_METHOD else "")
            rows.append([f"{layout} r{rank}", label, f"{med:.2f}", f"{min(snrs):.2f}", f"{med - naive_med:+.2f}",
                         f"{rep['delta']['snr_db']:.2f}", f"{100 * ratio:.1f} %", f"{secs:.1f}", used])
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(table(rows, ["LoRA", "method", "median ΔW SNR dB", "min dB", "vs naive dB", "total ΔW SNR dB",
                       "file / fp16", "seconds", "chosen per module"]))


def sliced(src: str, n: int) -> str:
    """The first n UNet modules of a generated file, as their own file (whole-file runs can be too slow on
    an overloaded machine)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    dst = src.replace(".safetensors", f"_unet{n}.safetensors")
    if os.path.exists(dst):
        return dst
    base = lambda k: k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
    with safe_open(src, "pt") as f:
        keys = list(f.keys())
        mods = list(dict.fromkeys(base(k) for k in keys if k.startswith("lora_unet_")))[:n]
        keep = set(mods)
        save_file({k: f.get_tensor(k) for k in keys if base(k) in keep}, dst)
    return dst


def timing(rank, runs, methods, slice_modules=0, threads=0):
    """Baseline and quantize runs interleaved (plain, q1, q2, plain, q1, q2, …) so load drift on a shared
    machine hits every step alike; each run is a fresh process."""
    src = generated("sdxl_kohya", rank)
    if slice_modules:
        src = sliced(src, slice_modules)
    dst = src + ".bench.safetensors"
    size = os.path.getsize(src) / 2**20
    steps = [("plain safetensors load+save (baseline)", PLAIN.format(src=src, dst=dst))]
    for v in methods:
        extra = VARIANTS[v]
        label = "lora-lens quantize IN -o OUT" + (" " + " ".join(extra) if extra else " (default)")
        steps.append((label, QUANT.format(src=src, dst=dst, extra=extra, threads=threads)))
    whole = "whole process: python -c 'load_file; save_file'"
    if not slice_modules and not threads:  # as a user runs them: interpreter start, imports, work, exit
        plain_copy = src + ".copy.safetensors"
        steps.append((whole, code_process([sys.executable, "-c", "import safetensors.torch as st; "
                                           f"st.save_file(st.load_file({src!r}), {plain_copy!r})"])))
        for v in methods:
            steps.append((f"whole process: lora-lens quantize IN -o OUT {' '.join(VARIANTS[v])}".rstrip(),
                          code_process([sys.executable, "-m", "lens_ops", "quantize", src, "-o", dst] + VARIANTS[v])))
    times = {label: [] for label, _ in steps}
    cpus = {label: [] for label, _ in steps}
    peaks = {label: 0.0 for label, _ in steps}
    for i in range(runs):
        for label, code in steps:
            r = run_timed(code, 1)
            times[label].append(r["median"])
            cpus[label].append(r.get("cpu_median"))
            peaks[label] = max(peaks[label], r["peak_mib"])
            print(f"run {i + 1}: {label}: {r['median']:.2f} s", flush=True)
    for f in (dst, src + ".copy.safetensors"):
        if os.path.exists(f):
            os.unlink(f)
    base = statistics.median(times[steps[0][0]])
    cbase = statistics.median(cpus[steps[0][0]])
    rows = []
    for label, _ in steps:
        med = statistics.median(times[label])
        if label.startswith("whole process"):  # against the whole-process baseline; the child's CPU is not seen here
            wbase = statistics.median(times[whole])
            rows.append([label, f"{med:.2f}", f"{med / wbase:.2f} (whole process)", "–", "–", "–",
                         " ".join(f"{t:.1f}" for t in times[label])])
            continue
        cmed = statistics.median(cpus[label])
        rows.append([label, f"{med:.2f}", f"{med / base:.2f}", f"{cmed:.2f}", f"{cmed / cbase:.2f}",
                     f"{peaks[label]:.0f}", " ".join(f"{t:.1f}" for t in times[label])])
    what = f"first {slice_modules} UNet modules of " if slice_modules else ""
    print(f"\n{what}sdxl_kohya rank {rank}: {size:.0f} MiB fp16, median of {runs} interleaved fresh-process runs"
          + (f", quantize with {threads} thread(s)" if threads else ""))
    print(table(rows, ["step", "seconds", "× baseline", "CPU s", "CPU × baseline", "peak MiB", "all runs (s)"]))
    print("(CPU s = process CPU time of the step: on a shared machine it is steadier than wall seconds)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--quality-methods", default=",".join(METHODS),
                    help="comma-separated methods for --quality (naive first: it is the reference)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--time-rank", type=int, default=128)
    ap.add_argument("--time-methods", default="default",
                    help=f"comma-separated variants to time: {', '.join(VARIANTS)} (default: default)")
    ap.add_argument("--slice", type=int, default=0, help="time only the first N UNet modules of the file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the quantize runs (0: default)")
    a = ap.parse_args()
    both = not (a.quality or a.time)
    if a.quality or both:
        quality([("sdxl_kohya", 32), ("flux_kohya", 64)], a.quality_methods.split(","))
    if a.time or both:
        timing(a.time_rank, a.runs, a.time_methods.split(","), a.slice, a.threads)


if __name__ == "__main__":
    main()
