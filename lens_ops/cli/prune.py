"""`lora-lens prune IN -o OUT --recipe RECIPE`: exact rank pruning (PruneRank).

Several recipes joined by ':' give several outputs from one decomposition; several inputs with -o DIR
run as a batch with a progress bar.
"""
from __future__ import annotations

import json
import os
import sys
import time

from ..errors import LensError
from ..model import LoRAModel
from ..progress import Bar

NAME = "prune"
ORDER = 30
HELP = "shrink a LoRA by dropping the dimensions it does not use (exact, fast)"
DESCRIPTION = ("Prune the rank of LoRA modules exactly (factored SVD, balanced factors, alpha kept right). "
               "RECIPE is e.g. energy=0.99, rank=16, sv_ratio=10, sv_fro=0.99, sv_cumulative=0.9, "
               "spn_lora=1,thr=-1, fro_ckpt=0.8,params=0.2,size=50 (needs --base), budget=20, ...,rescale=0.9; "
               "join recipes with ':' for several outputs from one decomposition.")


def add_arguments(p):
    p.add_argument("inputs", nargs="+", metavar="IN", help="LoRA .safetensors file(s)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file (one input, one recipe) or folder (several inputs or recipes)")
    p.add_argument("--recipe", "-r", default="energy=0.99",
                   help="prune recipe(s), ':'-separated (default energy=0.99); see docs/prune.md")
    p.add_argument("--base", default=None, metavar="CKPT",
                   help="base model checkpoint .safetensors for spn_ckpt/fro_ckpt/subspace and rle_ckpt")
    p.add_argument("--report", default=None, metavar="JSON", help="write the full per-module report(s) as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="print one line per output only")


def _outputs(inputs, out, recipes) -> list[list[str]]:
    """Output path per (input, recipe)."""
    many_in, many_rec = len(inputs) > 1, len(recipes) > 1
    as_dir = os.path.isdir(out) or many_in or out.endswith(os.sep) or not out.lower().endswith(".safetensors")
    if many_in and os.path.exists(out) and not os.path.isdir(out):
        raise LensError(f"With several inputs, -o must be a folder; {out} is a file.")
    paths = []
    for src in inputs:
        stem = os.path.splitext(os.path.basename(src))[0]
        row = []
        for r in recipes:
            if as_dir:
                name = f"{stem}_{r.short_name()}.safetensors" if many_rec else f"{stem}_pruned.safetensors"
                row.append(os.path.join(out, name))
            else:
                base, ext = os.path.splitext(out)
                row.append(f"{base}_{r.short_name()}{ext}" if many_rec else out)
        paths.append(row)
    flat = [p for row in paths for p in row]
    if len(set(map(os.path.abspath, flat))) != len(flat):
        raise LensError("Two outputs would get the same file name (same input name twice?); "
                        "give inputs with different names.")
    for src in inputs:
        for p in flat:
            if os.path.exists(p) and os.path.samefile(src, p):
                raise LensError(f"Refusing to overwrite the input file {src}; choose another output name.")
    return paths


def run(args) -> int:
    from ..prune import CheckpointBase, format_report, parse_recipes, prune_many
    recipes = parse_recipes(args.recipe)
    for src in args.inputs:
        if not os.path.isfile(src):
            raise LensError(f"{src} does not exist or is not a file.")
    paths = _outputs(args.inputs, args.output, recipes)
    if args.report:
        rep = os.path.abspath(args.report)
        if rep in {os.path.abspath(p) for row in paths for p in row} or any(
                os.path.exists(rep) and os.path.samefile(rep, src) for src in args.inputs):
            raise LensError(f"--report {args.report} is an input or output LoRA file; choose another name.")
    base = CheckpointBase(args.base) if args.base else None
    if any(r.needs_base for r in recipes) and base is None:
        raise LensError("This recipe uses a ckpt score (spn_ckpt, fro_ckpt or subspace): give the base model "
                        "with --base CHECKPOINT.safetensors.")
    batch = Bar(f"prune {len(args.inputs)} files") if len(args.inputs) > 1 else None
    all_reports, failures = [], 0
    for i, (src, outs) in enumerate(zip(args.inputs, paths)):
        t0 = time.perf_counter()
        try:
            model = LoRAModel.load(src, mapped=True)  # CPU mapping; the work runs on args.device
            bar = None if batch else Bar(f"prune {os.path.basename(src)}")
            results = prune_many(model, recipes, args.device, bar, base, outputs=outs)
            for (_, report), out in zip(results, outs):
                path = report["output"]
                report["output"] = path
                report["input"] = os.path.abspath(src)
                report["file_bytes_in"] = os.path.getsize(src)
                report["file_bytes_out"] = os.path.getsize(path)
                all_reports.append(report)
                count = f"[{i + 1}/{len(args.inputs)}] " if len(args.inputs) > 1 else ""
                line = (f"{count}{os.path.basename(src)} → {os.path.basename(path)}: "
                        f"{report['file_bytes_in'] / 2**20:.2f} → {report['file_bytes_out'] / 2**20:.2f} MiB, "
                        f"ΔW error {100 * report['total']['rel_error']:.2f}%")
                print(line if args.quiet else format_report(report, 15) + f"\nwrote {path}\n", flush=True)
            if not args.quiet:
                print(f"({time.perf_counter() - t0:.1f}s)")
        except LensError as e:
            if len(args.inputs) == 1:
                raise
            failures += 1
            print(f"lora-lens: {src}: {e}", file=sys.stderr)
        if batch:
            batch(i + 1, len(args.inputs))
    if base is not None:
        base.save_cache()
    if args.report:
        tmp = args.report + ".tmp"
        with open(tmp, "w") as f:
            json.dump(all_reports if len(all_reports) != 1 else all_reports[0], f, indent=1, default=str)
        os.replace(tmp, args.report)
    return 2 if failures else 0


def demo(ctx):
    """Prune the sample by energy=0.99 and rank=8 from one decomposition and say what it saved."""
    from ..prune import prune_many
    model = LoRAModel.load(ctx.sample)
    t = time.perf_counter()
    results = prune_many(model, "energy=0.99:rank=8", ctx.device)
    lines = []
    for (out, rep), tag in zip(results, ("energy99", "rank8")):
        path = out.save(ctx.path(f"sample_pruned_{tag}.safetensors"))
        tt = rep["total"]
        snr = "exact" if tt["snr_db"] is None else f"SNR {tt['snr_db']:.1f} dB"
        ranks = (f", mean rank {tt['old_rank_mean']:.0f} → {tt['new_rank_mean'] or 0:.1f}"
                 if tt["old_rank_mean"] else "")
        lines.append(f"{rep['recipe']}: {os.path.getsize(ctx.sample) / 2**20:.1f} → {os.path.getsize(path) / 2**20:.1f} MiB "
                     f"(saved {100 * tt['saved_fraction']:.0f}%){ranks}, ΔW error {100 * tt['rel_error']:.2f}% "
                     f"({snr}) → {os.path.basename(path)}")
    lines.append(f"both outputs from one decomposition in {time.perf_counter() - t:.1f}s")
    ctx.say("prune", "\n".join(lines))
