"""Engine load+save vs a plain safetensors load+save of the same large LoRA (issue 2 target: ≤1.2×).

Usage: python bench/io.py [--layout sdxl_kohya] [--rank 128] [--runs 3]
Each measurement runs in a fresh process (median of --runs; peak RSS of the process).
"""
import argparse
import os

from _common import generated, run_timed, table

PLAIN = """
from safetensors.torch import load_file, save_file
t = time.perf_counter()
sd = load_file({src!r})
save_file(sd, {dst!r}, metadata={{}})
elapsed = time.perf_counter() - t
"""
ENGINE = """
from lens_ops import LoRAModel
t = time.perf_counter()
m = LoRAModel.load({src!r})
m.save({dst!r})
elapsed = time.perf_counter() - t
"""
ENGINE_INFO = """
from lens_ops import LoRAModel
from lens_ops.summary import summarize
t = time.perf_counter()
m = LoRAModel.load({src!r})
s = summarize(m)
elapsed = time.perf_counter() - t
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="sdxl_kohya")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    src = generated(a.layout, a.rank)
    size = os.path.getsize(src) / 2**20
    dst = src + ".out.safetensors"
    plain = run_timed(PLAIN.format(src=src, dst=dst), a.runs)
    engine = run_timed(ENGINE.format(src=src, dst=dst), a.runs)
    info = run_timed(ENGINE_INFO.format(src=src), a.runs)
    os.unlink(dst)
    rows = [["plain safetensors load+save (baseline)", f"{plain['median']:.2f}", "1.00", f"{plain['peak_mib']:.0f}",
             f"{plain['peak_mib'] / size:.2f}"],
            ["LoRA Lens load+save (LoRAModel)", f"{engine['median']:.2f}", f"{engine['median'] / plain['median']:.2f}",
             f"{engine['peak_mib']:.0f}", f"{engine['peak_mib'] / size:.2f}"],
            ["LoRA Lens load+summary (lora-lens info)", f"{info['median']:.2f}", f"{info['median'] / plain['median']:.2f}",
             f"{info['peak_mib']:.0f}", f"{info['peak_mib'] / size:.2f}"]]
    print(f"{a.layout} rank {a.rank}: {size:.0f} MiB, median of {a.runs} fresh-process runs")
    print(table(rows, ["step", "seconds", "× baseline", "peak MiB", "peak / file"]))


if __name__ == "__main__":
    main()
