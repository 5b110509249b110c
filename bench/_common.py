"""Shared benchmark plumbing: cached generated inputs, timing a step in a fresh process with its peak
memory, medians and a ratio table. Ratios, not seconds: the machine is shared and noisy."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("LENS_BENCH_DIR", os.path.join(tempfile.gettempdir(), "lens-bench"))


def generated(layout: str, rank: int, seed: int = 0, dtype: str = "float16") -> str:
    """Path of a generated LoRA (made once, cached across runs)."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"{layout}_r{rank}_s{seed}_{dtype}.safetensors")
    if not os.path.exists(path):
        sys.path.insert(0, ROOT)
        import torch
        from lens_ops.st_io import atomic_save
        from lens_ops.synth import make_lora
        sd = make_lora(layout, rank=rank, seed=seed, dtype=getattr(torch, dtype))
        atomic_save(sd, path, sd.metadata)
    return path


def run_timed(code: str, runs: int = 3) -> dict:
    """Run `code` (which sets `elapsed`, optionally `cpu_seconds`) in fresh processes; median seconds and max peak RSS (MiB)
    (and median CPU seconds, `cpu_median`, when every run set `cpu_seconds`)."""
    script = textwrap.dedent("""
        import json, resource, sys, time
        sys.path.insert(0, %r)
    """ % ROOT) + textwrap.dedent(code) + textwrap.dedent("""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"elapsed": elapsed, "peak_mib": peak, "cpu": globals().get("cpu_seconds")}))
    """)
    times, peaks, cpus = [], [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        times.append(r["elapsed"])
        peaks.append(r["peak_mib"])
        cpus.append(r.get("cpu"))
    out = {"median": statistics.median(times), "all": times, "peak_mib": max(peaks)}
    if all(c is not None for c in cpus):  # steps that also set `cpu_seconds` (process CPU time of the step)
        out["cpu_median"] = statistics.median(cpus)
    return out


def code_process(argv):
    """Whole process, as a user runs it: interpreter start, imports, work, exit."""
    return f"""
import subprocess
t = time.perf_counter()
subprocess.run({argv!r}, check=True, capture_output=True)
elapsed = time.perf_counter() - t
"""


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])
