"""`lora-lens blend A.safetensors:0.7 B.safetensors:0.3 --method concat|svd|pca|ties|dare [--rank N] -o OUT`:
blend LoRAs so that the result at strength 1 equals loading each input at its weight."""
from __future__ import annotations

import argparse
import json
import os
import re

from ..blend import METHODS, blend, blend_to_file
from ..errors import LensError
from ..model import LoRAModel
from ..progress import Bar

NAME = "blend"
ORDER = 45
HELP = "blend LoRAs exactly (concat/svd) or with pca, TIES, DARE; result = stacking at the given weights"


def add_arguments(p):
    p.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]",
                   help="two or more LoRA files, each optionally with :weight (default 1; negative allowed)")
    p.add_argument("--method", default="concat", choices=list(METHODS),
                   help="concat (exact, rank r1+r2), svd (optimal truncation), pca/randomized, ties, dare")
    p.add_argument("--rank", type=_rank, default=0,
                   help="target rank, or 0 / 'exact' to keep every non-zero direction (concat is always exact)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (never one of the inputs)")
    p.add_argument("--include", help="only blend modules matching these names/regexes (comma separated or @FILE)")
    p.add_argument("--exclude", help="leave out modules matching these names/regexes (comma separated or @FILE, "
                                      "e.g. @problems.txt from `lora-lens conflict --problems`)")
    p.add_argument("--excluded-keep", choices=["none", "first"], default="none",
                   help="for excluded modules: none = leave them out, first = keep the first LoRA's at its weight")
    p.add_argument("--block-weights", default="", help="SD.Next-style weights, e.g. 'te=0.5:unet=1', "
                                                         "'in=0:mid=1:out=0.5', 'double0-9=0.8:single=0.5'")
    p.add_argument("--density", type=float, default=0.5, help="kept fraction for TIES/DARE (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed for DARE and pca (default 0)")
    p.add_argument("--allow-disjoint", action="store_true", help="allow LoRAs that share no layer")
    p.add_argument("--json", action="store_true", help="print the blend report as JSON")


def _rank(text: str) -> int:
    if str(text).lower() == "exact":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rank (a whole number, or 'exact')") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the rank must be 0/exact or positive")
    return value


def parse_input(spec: str) -> tuple[str, float]:
    m = re.match(r"^(.*?):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$", spec)
    if m and not os.path.exists(spec):
        return m.group(1), float(m.group(2))
    return spec, 1.0


def _text(arg: str | None) -> str | None:
    if not arg:
        return None
    if arg.startswith("@"):
        path = arg[1:]
        if not os.path.isfile(path):
            raise LensError(f"{path} does not exist (given as {arg}).")
        return open(path, encoding="utf-8").read()
    return arg


def run(args) -> int:
    if len(args.inputs) < 2:
        raise LensError("Give at least two LoRA files to blend, e.g. A.safetensors:0.7 B.safetensors:0.3.")
    specs = [parse_input(s) for s in args.inputs]
    if not args.output.lower().endswith(".safetensors"):
        raise LensError(f"The output name {args.output!r} must end in .safetensors.")
    out_abs = os.path.abspath(args.output)
    for path, _ in specs:
        if os.path.exists(path) and os.path.exists(out_abs) and os.path.samefile(path, out_abs):
            raise LensError(f"Refusing to overwrite the input file {path}; choose another output name.")
    models = [LoRAModel.load(p) for p, _ in specs]
    weights = [w for _, w in specs]
    bar = Bar(f"blending ({args.method})") if not args.json else None
    # streamed: each blended module goes to the output file as soon as it is made (working memory: one module)
    result, report = blend_to_file(models, weights, args.output, method=args.method, rank=args.rank,
                                   device=args.device, include=_text(args.include), exclude=_text(args.exclude),
                                   excluded_keep=args.excluded_keep, block_weights=args.block_weights,
                                   density=args.density, seed=args.seed, allow_disjoint=args.allow_disjoint,
                                   progress=bar)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_blend(report))
    return 0


def format_blend(r: dict) -> str:
    ins = ", ".join(f"{i['file']} × {i['weight']:g}" for i in r["inputs"])
    st = r["modules"]
    lossy = r["method"] in ("ties", "dare")  # they change ΔW by design: not "exact" even at full rank
    size = f" (rank {r['target_rank']})" if r["target_rank"] else (" (full rank)" if lossy else " (exact)")
    what = "Difference from w1·ΔW1 + w2·ΔW2 (by design for TIES/DARE)" if lossy else \
        "Truncation error (relative to w1·ΔW1 + w2·ΔW2)"
    lines = [f"Blended {ins} with {r['method']}" + size,
             f"Modules: {st['blended']} blended, {st['carried']} carried from one LoRA, {st['excluded']} excluded"
             + (f", {st['zero_weight']} at weight 0" if st["zero_weight"] else ""),
             f"Output: {r['output']['modules']} modules, {r['output']['format']}, {r['output']['dtype']}, ranks "
             f"{', '.join(map(str, r['output']['ranks'][:6]))}{'…' if len(r['output']['ranks']) > 6 else ''}, "
             f"{r['output']['tensor_bytes'] / 2**20:.1f} MiB",
             f"{what}: max {r['relative_error']['max']:.2e}, "
             f"mean {r['relative_error']['mean']:.2e}"]
    if r["output"].get("file"):
        lines.append(f"Wrote {r['output']['file']}")
    lines += ["Note: " + n for n in r["notes"]] + ["Warning: " + w for w in r["warnings"]]
    return "\n".join(lines)


def demo(ctx):
    from .conflict import second_lora
    second = second_lora(ctx)
    a, b = LoRAModel.load(ctx.sample), LoRAModel.load(second)
    exact, rep = blend([a, b], [0.7, 0.3], "concat", device=ctx.device)
    p1 = exact.save(ctx.path("blend_concat.safetensors"))
    rank = max((m.rank() or 0) for m in a.modules) or 16
    small, rep2 = blend([a, b], [0.7, 0.3], "svd", rank, device=ctx.device)
    p2 = small.save(ctx.path("blend_svd.safetensors"))
    ctx.say("blend", format_blend({**rep, "output": {**rep["output"], "file": p1}}) + "\n\n"
            + format_blend({**rep2, "output": {**rep2["output"], "file": p2}}))
