"""PruneRank benchmark: whole-process prune (load → factored SVD → prune → save) against a plain
safetensors load+save of the same file and against the dense-SVD route (ΔW = up@down, torch.linalg.svd,
as kohya's resize_lora does), all measured in this run. Prints a ratio table.

    python bench/prune.py [--runs 3] [--dense-every 25] [--threads N] [--skip-flux]

The dense route is timed on every Nth module (default 25th) and extrapolated to the whole file by the
SVD cost model Σ n·m·min(n, m) of all modules over that of the timed ones (stated in the table).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import code_process, generated, run_timed, table  # noqa: E402

THREADS = ""


def code_loadsave(path):
    return THREADS + f"""
import safetensors.torch as st
out = {path!r} + ".copy.safetensors"
t = time.perf_counter()
sd = st.load_file({path!r})
st.save_file(sd, out)
elapsed = time.perf_counter() - t
"""


def code_prune(path, recipe):
    return THREADS + f"""
from lens_ops import LoRAModel
from lens_ops.prune import prune_many
import os
out = {path!r} + ".pruned.safetensors"
if os.path.exists(out):
    os.unlink(out)
t = time.perf_counter()
m = LoRAModel.load({path!r}, mapped=True)   # what `lora-lens prune` does: mapped input, streamed output
(o, rep), = prune_many(m, {recipe!r}, outputs=[out])
elapsed = time.perf_counter() - t
print("SAVED", os.path.getsize(out), rep["total"]["rel_error"], file=sys.stderr)
"""


def code_import():
    return THREADS + """
import torch
from lens_ops import LoRAModel
from lens_ops.prune import prune_model
elapsed = 0.0
"""


def code_dense(path, every):
    return THREADS + f"""
import torch
from lens_ops import LoRAModel
m = LoRAModel.load({path!r})
mods = [x for x in m.modules if x.kind.name == "lora"]
cost = lambda x: x.weight_shape()[0] * (x.lowrank()[1].shape[1]) * min(x.weight_shape()[0], x.lowrank()[1].shape[1])
total_cost = sum(cost(x) for x in mods)
sub = mods[::{every}]
sub_cost = sum(cost(x) for x in sub)
t = time.perf_counter()
for x in sub:
    up = x.tensors["up"].float().flatten(1)
    down = x.tensors["down"].float().flatten(1)
    w = up @ down
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
sub_time = time.perf_counter() - t
elapsed = sub_time * total_cost / sub_cost
print("DENSE", len(sub), len(mods), sub_time, file=sys.stderr)
"""


def main():
    global THREADS
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dense-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--recipe", default="energy=0.99")
    ap.add_argument("--skip-flux", action="store_true")
    args = ap.parse_args()
    if args.threads:
        THREADS = f"import torch\ntorch.set_num_threads({args.threads})\n"
    rows = []
    sdxl = generated("sdxl_kohya", 128)
    size = os.path.getsize(sdxl)
    base = run_timed(code_loadsave(sdxl), args.runs)
    ours = run_timed(code_prune(sdxl, args.recipe), args.runs)
    imp = run_timed(code_import(), 1)
    copy = sdxl + ".copy.safetensors"
    base_proc = run_timed(code_process([sys.executable, "-c", "import safetensors.torch as st; "
                                        f"st.save_file(st.load_file({sdxl!r}), {copy!r})"]), args.runs)
    cli_proc = run_timed(code_process([sys.executable, "-m", "lens_ops", "prune", sdxl, "-o",
                                       sdxl + ".cli.safetensors", "--recipe", args.recipe, "-q"]), args.runs)
    dense = run_timed(code_dense(sdxl, args.dense_every), 1)
    mib = size / 2 ** 20
    rows.append(["SDXL r128 fp16 (%.0f MiB)" % mib, "plain safetensors load+save", "%.2f" % base["median"], "1.00×",
                 "%.0f (%.2f× file)" % (base["peak_mib"], base["peak_mib"] / mib)])
    rows.append(["", f"prune {args.recipe} (load→SVD→prune→save)", "%.2f" % ours["median"],
                 "%.2f× load+save" % (ours["median"] / base["median"]),
                 "%.0f (%.2f× file; %.2f× above import)" % (ours["peak_mib"], ours["peak_mib"] / mib,
                                                           (ours["peak_mib"] - imp["peak_mib"]) / mib)])
    rows.append(["", f"dense SVD route (1/{args.dense_every} of modules timed, extrapolated)",
                 "%.1f" % dense["median"], "ours %.0f× faster" % (dense["median"] / ours["median"]), "–"])
    rows.append(["", "python + torch + lens_ops import only", "–", "–", "%.0f" % imp["peak_mib"]])
    rows.append(["", "whole process: python -c 'load_file; save_file'", "%.2f" % base_proc["median"], "1.00×", "–"])
    rows.append(["", f"whole process: lora-lens prune --recipe {args.recipe}", "%.2f" % cli_proc["median"],
                 "%.2f× whole-process load+save" % (cli_proc["median"] / base_proc["median"]), "–"])
    if not args.skip_flux:
        flux = generated("flux_kohya", 64)
        fm = os.path.getsize(flux) / 2 ** 20
        fb = run_timed(code_loadsave(flux), args.runs)
        fo = run_timed(code_prune(flux, args.recipe), args.runs)
        rows.append(["FLUX r64 fp16 (%.0f MiB)" % fm, "plain safetensors load+save", "%.2f" % fb["median"], "1.00×",
                     "%.0f" % fb["peak_mib"]])
        rows.append(["", f"prune {args.recipe}", "%.2f" % fo["median"], "%.2f× load+save (target: < 30 s)" %
                     (fo["median"] / fb["median"]), "%.0f (%.2f× file)" % (fo["peak_mib"], fo["peak_mib"] / fm)])
    print(table(rows, ["file", "step", "median s", "ratio", "peak RSS MiB"]))
    print(f"\nruns={args.runs}, threads={args.threads or 'default'}; times are median wall seconds from the start of "
          "loading to the end of saving, in fresh processes.")


if __name__ == "__main__":
    main()
