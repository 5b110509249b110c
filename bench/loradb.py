""".loradb benchmark: lossless size against `zstd -19` and ZipNN on the same files; generated 10-LoRA
SDXL rank-32 collections (variants of one character, a style series, unrelated) through every layer stack;
extracting one SDXL rank-32 LoRA from a 50-entry collection, against a plain safetensors load+save.

Usage: python bench/loradb.py [--count 10] [--max-modules N] [--every N] [--runs 5] [--skip peers,...]
       [--kinds K,...] [--stacks I,...] [--bound] [--zipnn-python PY]
ZipNN is a bench-only peer: install it in a separate venv (python -m venv --system-site-packages V;
V/bin/pip install zipnn) and pass --zipnn-python V/bin/python. Generated files go to a temp dir.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _rd  # noqa: E402
from _common import table  # noqa: E402
from lens_ops.loradb import open_collection, pack  # noqa: E402
from lens_ops.st_io import save_file  # noqa: E402
from lens_ops.synth import make_lora  # noqa: E402

RECIPE = "energy=0.9999"   # keeps ≥ 99.99 % of each module's ΔW energy (40 dB), leaving room for int8


def _save(sd, path, meta):
    save_file(sd, path, meta)
    return path


def module_filter(every: int | None):
    """Every N-th module of the real SDXL kohya layout (a size-stratified subset), or all modules."""
    if not every or every <= 1:
        return None
    from lens_ops.synth import load_layout
    keep = {m[0] for j, m in enumerate(load_layout("sdxl_kohya")["modules"]) if j % every == 0}
    return lambda name: name in keep


def series_parts(count, max_modules, flt):
    """(common, own) LoRAs of each style: one shared rank-24 aesthetic, a rank-8 part of each style's own."""
    common = make_lora("sdxl_kohya", rank=24, seed=2, dtype=torch.float32, max_modules=max_modules, name_filter=flt)
    for i in range(count):
        yield common, make_lora("sdxl_kohya", rank=8, seed=100 + i, dtype=torch.float32, max_modules=max_modules,
                                name_filter=flt)


def series_factors(common, own) -> dict:
    """Per up key: the common part's scaled factors (cu, cd) and the own part's (ou, od, at half strength): a style
    LoRA's ΔW is cu@cd + ou@od, whatever rank-space basis its file writes them in."""
    out = {}
    for k in common:
        if k.endswith("lora_up.weight"):
            d = k[: -len("lora_up.weight")] + "lora_down.weight"
            a = k[: -len("lora_up.weight")] + "alpha"
            cu, cd = common[k].flatten(1) * float(common[a]) / 24, common[d].flatten(1)
            ou, od = own[k].flatten(1) * 0.5 * float(own[a]) / 8, own[d].flatten(1)
            out[k] = (cu, cd, ou, od, tuple(common[k].shape), tuple(common[d].shape))
    return out


def collections(tmp: str, count: int, max_modules: int | None, every: int | None = None) -> dict[str, list[str]]:
    """Three generated 10-LoRA SDXL rank-32 collections (fp16 files).

    Every LoRA comes from lens_ops.synth.make_lora: the real SDXL kohya key layout, `down` near its kaiming
    init, ΔW = up@down with a decaying spectrum s_i = exp(-i/k)·(1+i)^-p (effective rank k log-normal around
    rank/4, p in 0.3–0.7) plus a 2 % noise floor on `up`. The collections then differ in how LoRAs relate:
    variants = checkpoints of one run (small drifts), series = a shared style subspace, unrelated = none."""
    out = {}
    flt = module_filter(every)
    g = torch.Generator().manual_seed(7)
    # 1. variants of one character = checkpoints of one training run: up factors drifting inside their span
    #    (a rank-space mix drifting from checkpoint to checkpoint) plus a small out-of-span update; down
    #    factors stay near their init with a small drift of their own (every tensor differs: no dedup).
    base = make_lora("sdxl_kohya", rank=32, seed=1, dtype=torch.float32, max_modules=max_modules, name_filter=flt)
    files, mix, ddrift = [], {}, {}
    for i in range(count):
        sd = {}
        for k, v in base.items():
            if k.endswith("lora_up.weight"):
                m = mix.get(k, torch.eye(v.shape[1]))
                m = m + 0.05 * torch.randn(m.shape, generator=g)
                mix[k] = m
                up = v.flatten(1) @ m + 0.002 * v.std() * torch.randn(v.flatten(1).shape, generator=g)
                sd[k] = up.reshape(v.shape).half()
            elif k.endswith("lora_down.weight"):
                dd = ddrift.get(k, torch.zeros_like(v)) + 0.002 * v.std() * torch.randn(v.shape, generator=g)
                ddrift[k] = dd
                sd[k] = (v + dd).half()
            else:
                sd[k] = v.half()
        files.append(_save(sd, os.path.join(tmp, f"char_step{i:02d}.safetensors"), base.metadata))
    out["variants"] = files
    # 2. a style series: a shared aesthetic (rank 24) plus each style's own part (rank 8), each LoRA trained
    #    separately, so its factors sit in an arbitrary rank-space basis (random rotation per LoRA).
    files = []
    for i, (common, own) in enumerate(series_parts(count, max_modules, flt)):
        sd = {}
        for k, (cu, cd, ou, od, up_shape, down_shape) in series_factors(common, own).items():
            q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
            up = torch.cat([cu, ou], 1) @ q
            down = q.T @ torch.cat([cd, od], 0)
            sd[k] = (up * 2).reshape(*up_shape[:1], 32, *up_shape[2:]).half()   # alpha 16 / rank 32
            sd[k[: -len("lora_up.weight")] + "lora_down.weight"] = down.reshape(32, *down_shape[1:]).half()
            sd[k[: -len("lora_up.weight")] + "alpha"] = torch.tensor(16.0).half()
        files.append(_save(sd, os.path.join(tmp, f"style_{i:02d}.safetensors"), common.metadata))
    out["series"] = files
    # 3. unrelated LoRAs
    files = []
    for i in range(count):
        sd = make_lora("sdxl_kohya", rank=32, seed=1000 + i, max_modules=max_modules, name_filter=flt)
        files.append(_save(sd, os.path.join(tmp, f"unrelated_{i:02d}.safetensors"), sd.metadata))
    out["unrelated"] = files
    return out


STACKS = [("lossless (byte-grouped zstd + dedup)", {}),
          ("shared basis auto", {"shared_basis": "auto"}),
          ("int8 (quantised coefficients)", {"int8": True}),
          ("prune + int8", {"recipe": RECIPE, "int8": True}),
          ("prune + int8 + shared basis auto", {"recipe": RECIPE, "int8": True, "shared_basis": "auto"}),
          ("int8 + shared basis auto (no prune recipe)", {"int8": True, "shared_basis": "auto"})]


def bench_collections(tmp, count, max_modules, kinds=None, stacks=None, every=None):
    cols = collections(tmp, count, max_modules, every)
    rows = []
    for kind, files in cols.items():
        if kinds and kind not in kinds:
            continue
        orig = sum(os.path.getsize(f) for f in files)
        for si, (label, opts) in enumerate(STACKS):
            if stacks and si not in stacks:
                continue
            db = os.path.join(tmp, f"{kind}.loradb")
            t = time.perf_counter()
            rep = pack(db, files, snr_db=35.0, **opts)
            dt = time.perf_counter() - t
            snrs = [(e["error"] or {}).get("snr_db") for e in rep["entries"]]
            lossless = all(e["lossless"] for e in rep["entries"])
            worst = "exact" if lossless else f"{min(s if s is not None else math.inf for s in snrs):.1f}"
            rows.append([kind, label, f"{orig / 2**20:.0f}", f"{rep['loradb_bytes'] / 2**20:.1f}",
                         f"{rep['reduction_percent']:.1f} %", worst, f"{dt:.0f}"])
            os.unlink(db)
            print(" | ".join(rows[-1]), flush=True)
    return rows, cols


def _spectra(b, a):
    from lens_ops.lowrank import factored_svd
    s = factored_svd(b.double(), a.double(), full=False)
    return _rd.coef_vars(s.numpy(), b.shape[0], a.shape[1]), float((s.double() ** 2).sum())


def bench_bounds(cols, count, max_modules, every, snr_db=35.0):
    """The most any coder can shrink each collection at the per-LoRA ΔW SNR budget (bench/_rd.py): LoRAs coded
    one by one from their own spectra, and for the series also with its common part known exactly (an oracle).
    Shannon: the Gaussian rate–distortion bound; ECSQ: with the ~0.25 bit per coded coefficient any entropy-coded
    scalar quantiser pays. Payload only (no header), so these reductions are upper limits."""
    from lens_ops.model import LoRAModel
    rows = []
    for kind, files in cols.items():
        orig = sum(os.path.getsize(f) for f in files)
        loras, budgets = [], []
        for f in files:
            vws, energy = [], 0.0
            for m in LoRAModel.load(f).modules:
                b, a, sc = m.lowrank(torch.float64, "cpu")
                v, e = _spectra(b * sc, a)
                vws.append(v)
                energy += e
            loras.append(vws)
            budgets.append(energy * 10 ** (-snr_db / 10))
        red = lambda bits: f"{100 * (1 - bits / 8 / orig):.1f} %"
        rows.append([kind, "each LoRA on its own", red(_rd.independent_bits(loras, budgets)),
                     red(_rd.independent_bits(loras, budgets, _rd.ECSQ_GAP))])
        if kind == "series":
            common, owns = [], []
            for i, (c, o) in enumerate(series_parts(count, max_modules, module_filter(every))):
                fac = series_factors(c, o)
                if i == 0:
                    common = [_spectra(cu, cd)[0] for cu, cd, *_ in fac.values()]
                owns.append([_spectra(ou, od)[0] for _, _, ou, od, *_ in fac.values()])
            rows.append([kind, "common part coded once (oracle split)",
                         red(_rd.shared_bits(common, owns, budgets)),
                         red(_rd.shared_bits(common, owns, budgets, _rd.ECSQ_GAP))])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def bench_peers(tmp, files, zipnn_python):
    rows = []
    tot = {"orig": 0, "ours": 0, "zstd": 0, "zipnn": 0}
    for f in files:
        size = os.path.getsize(f)
        db = os.path.join(tmp, "one.loradb")
        pack(db, [f])
        ours = os.path.getsize(db)
        os.unlink(db)
        z = subprocess.run(["zstd", "-19", "-T2", "-q", "-c", f], capture_output=True, check=True).stdout
        zn = None
        if zipnn_python:
            code = ("import sys, zipnn; d = open(sys.argv[1], 'rb').read(); "
                    "dt = 'float32' if sys.argv[2] == 'F32' else 'bfloat16' if sys.argv[2] == 'BF16' else 'float16'; "
                    "z = zipnn.ZipNN(bytearray_dtype=dt); c = z.compress(d); assert z.decompress(c) == d; print(len(c))")
            r = subprocess.run([zipnn_python, "-c", code, f, "F16"], capture_output=True, text=True)
            zn = int(r.stdout.strip()) if r.returncode == 0 else None
        rows.append([os.path.basename(f), f"{size / 2**20:.1f}", f"{ours / size:.4f}", f"{len(z) / size:.4f}",
                     f"{zn / size:.4f}" if zn else "n/a"])
        tot["orig"] += size
        tot["ours"] += ours
        tot["zstd"] += len(z)
        tot["zipnn"] += zn or 0
        print(" | ".join(rows[-1]), flush=True)
    rows.append(["all", f"{tot['orig'] / 2**20:.1f}", f"{tot['ours'] / tot['orig']:.4f}", f"{tot['zstd'] / tot['orig']:.4f}",
                 f"{tot['zipnn'] / tot['orig']:.4f}" if zipnn_python else "n/a"])
    return rows


def bench_extract(tmp, runs):
    """One SDXL r32 entry (full SDXL layout) inside a 50-entry collection (49 SD1.5 r32 LoRAs around it)."""
    target = _save(sd := make_lora("sdxl_kohya", rank=32, seed=4242), os.path.join(tmp, "target.safetensors"), sd.metadata)
    small = make_lora("sd15_kohya", rank=32, seed=9)
    files = []
    for i in range(49):
        s2 = {k: (v.float() * (1 + 0.01 * i)).half() if "lora_up" in k else v for k, v in small.items()}
        files.append(_save(s2, os.path.join(tmp, f"sd15_{i:02d}.safetensors"), small.metadata))
    db = os.path.join(tmp, "fifty.loradb")
    pack(db, files[:25] + [target] + files[25:])
    ours, base = [], []
    for r in range(runs):
        out = os.path.join(tmp, f"x{r}")
        t = time.perf_counter()
        with open_collection(db) as c:
            res = c.extract_to(out, ["target"])
        ours.append(time.perf_counter() - t)
        assert not res["damaged"]
        # baseline: plain safetensors load + save of the same file
        from safetensors.torch import load_file, save_file as st_save
        t = time.perf_counter()
        st_save(load_file(target), os.path.join(tmp, f"plain{r}.safetensors"))
        base.append(time.perf_counter() - t)
        shutil.rmtree(out)
        os.unlink(os.path.join(tmp, f"plain{r}.safetensors"))
    same = hashlib.sha256(open(target, "rb").read()).hexdigest()
    # the command line: a new process each time (interpreter start + imports + the same extraction), once
    # through the interpreter directly and once as `lora-lens` found on PATH (what a user types: with pyenv
    # that is a shim script, which costs ~45 ms by itself here), alternating
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    on_path = shutil.which("lora-lens")
    forms = {"python": [sys.executable, "-m", "lens_ops"]}
    if on_path:
        forms["path"] = [on_path]
    cli = {k: [] for k in forms}
    cli_cpu = {k: [] for k in forms}
    noop = []
    for r in range(runs):
        for k, cmd in forms.items():
            out = os.path.join(tmp, f"c{r}{k}")
            c0 = os.times()
            t = time.perf_counter()
            subprocess.run(cmd + ["extract", db, "target", "-o", out], check=True, capture_output=True, cwd=repo)
            cli[k].append(time.perf_counter() - t)
            c1 = os.times()
            cli_cpu[k].append((c1.children_user - c0.children_user) + (c1.children_system - c0.children_system))
            assert hashlib.sha256(open(os.path.join(out, "target.safetensors"), "rb").read()).hexdigest() == same
            shutil.rmtree(out)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lens_ops", "--help"], check=True, capture_output=True, cwd=repo)
        noop.append(time.perf_counter() - t)
    mo, mb = statistics.median(ours), statistics.median(base)
    mn = statistics.median(noop)
    rows = [["extract 1 SDXL r32 entry from 50-entry .loradb, in process (open + decode + verify + write)",
             f"{mo:.3f}", f"{mo / mb:.2f}", "< 0.3 s: " + ("met" if mo < 0.3 else "MISSED")]]
    labels = {"python": "`python -m lens_ops extract DB target -o DIR` (new process)",
              "path": f"`lora-lens extract DB target -o DIR` (new process, {on_path})"}
    for k in forms:
        mc = statistics.median(cli[k])
        rows.append([labels[k], f"{mc:.3f}", f"{mc / mb:.2f}", f"CPU {statistics.median(cli_cpu[k]):.2f} s; "
                     + ("< 0.3 s: met" if mc < 0.3 else "< 0.3 s: MISSED") + f"; runs {[round(x, 3) for x in cli[k]]}"])
    rows += [["`lora-lens --help` (new process: interpreter + every command module, torch included)", f"{mn:.3f}",
              f"{mn / mb:.2f}", ""],
             ["plain safetensors load + save of the same file (baseline)", f"{mb:.3f}", "1.00", ""]]
    return rows, f"{os.path.getsize(target) / 2**20:.0f} MiB entry, sha256 {same[:12]}…, in-process runs " \
                 f"{[round(x, 3) for x in ours]}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--max-modules", type=int, default=None, help="first N modules of the SDXL layout only (faster)")
    ap.add_argument("--every", type=int, default=None, help="every N-th module of the SDXL layout (a size-stratified "
                    "subset; faster than whole LoRAs, same mix of module shapes)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--zipnn-python", default=None)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: peers,collections,extract")
    ap.add_argument("--kinds", default="", help="collections to run (variants,series,unrelated; default all)")
    ap.add_argument("--bound", action="store_true", help="also print the rate–distortion limit of each collection "
                    "at the 35 dB budget (bench/_rd.py)")
    ap.add_argument("--stacks", default="", help="indices of STACKS to run (e.g. 0,4; default all)")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    tmp = tempfile.mkdtemp(prefix="lens-bench-loradb-")
    try:
        if "extract" not in skip:
            rows, note = bench_extract(tmp, a.runs)
            print(f"\n## Extraction ({note}; median of {a.runs})")
            print(table(rows, ["step", "seconds", "× baseline", "target"]), flush=True)
        cols = None
        if "collections" not in skip:
            rows, cols = bench_collections(tmp, a.count, a.max_modules, set(filter(None, a.kinds.split(","))),
                                           {int(x) for x in a.stacks.split(",") if x}, a.every)
            print(f"\n## Collections of {a.count} SDXL rank-32 LoRAs"
                  + (f" (first {a.max_modules} modules)" if a.max_modules else "")
                  + (f" (every {a.every}th module)" if a.every else ""))
            print(table(rows, ["collection", "layers", "originals MiB", ".loradb MiB", "reduction", "worst ΔW SNR dB",
                               "pack s"]), flush=True)
        if a.bound:
            cols = cols or collections(tmp, a.count, a.max_modules, a.every)
            rows = bench_bounds({k: v for k, v in cols.items() if not a.kinds or k in a.kinds.split(",")},
                                a.count, a.max_modules, a.every)
            print(f"\n## Limits at 35 dB ΔW SNR per LoRA: the largest reduction any coder reaches (payload only)")
            print(table(rows, ["collection", "model", "Shannon bound", "entropy-coded scalar quantiser"]), flush=True)
        if "peers" not in skip:
            if cols is None:
                cols = collections(tmp, 2, a.max_modules, a.every)
            files = [cols["variants"][0], cols["series"][0], cols["unrelated"][0]]
            rows = bench_peers(tmp, files, a.zipnn_python)
            print("\n## Lossless: compressed size / original size (lower is better)")
            print(table(rows, ["file", "MiB", ".loradb (ours)", "zstd -19", "ZipNN"]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
