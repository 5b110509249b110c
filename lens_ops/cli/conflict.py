"""`lora-lens conflict A B [--json]`: do two LoRAs fight? Per-module cosine, norm ratio, subspace overlap and
interference from factors only; per-block and overall conflict scores, a recommended strength pair, a stability
prediction and the problem modules to exclude when blending."""
from __future__ import annotations

import json
import os

import torch

from ..conflict import format_report, json_safe, problem_list, render, scan
from ..conflict.scan import PROBLEM_THRESHOLD
from ..errors import LensError
from ..model import LoRAModel
from ..progress import Bar
from ..st_io import atomic_write

NAME = "conflict"
ORDER = 40
HELP = "compare two LoRAs: which layers fight, recommended strengths, problem layers"


def add_arguments(p):
    p.add_argument("a", help="first LoRA (.safetensors); module names in the report are this file's")
    p.add_argument("b", help="second LoRA (.safetensors)")
    p.add_argument("--json", action="store_true",
                   help="print the full report as JSON on stdout (per shared module, keyed by its name in A: "
                        "cosine, norm_ratio, subspace_overlap, …)")
    p.add_argument("--problems", metavar="FILE", help="also write the problem-module list (BlendLoRAs' exclude format)")
    p.add_argument("--map", metavar="PNG", help="also write the conflict map image (needs Pillow)")
    p.add_argument("--problem-threshold", type=float, default=PROBLEM_THRESHOLD,
                   help=f"module conflict score counted as a problem (default {PROBLEM_THRESHOLD})")
    p.add_argument("--float64", action="store_true", help="compute the Gram products in float64 (slower)")


def _side_outputs(args) -> None:
    """--problems / --map are checked before any work: never one of the inputs, never each other, in a folder
    that exists."""
    outs = [p for p in (args.problems, args.map) if p]
    if len(outs) == 2 and os.path.abspath(outs[0]) == os.path.abspath(outs[1]):
        raise LensError("--problems and --map name the same file; give each its own.")
    for p in outs:
        for src in (args.a, args.b):
            if os.path.abspath(p) == os.path.abspath(src) or (
                    os.path.exists(p) and os.path.exists(src) and os.path.samefile(p, src)):
                raise LensError(f"Refusing to overwrite the input file {src} with the report; choose another name.")
        folder = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(folder):
            raise LensError(f"The folder of {p} does not exist.")


def run(args) -> int:
    _side_outputs(args)
    a = LoRAModel.load(args.a)
    b = LoRAModel.load(args.b)
    bar = Bar("scanning") if not args.json else None
    report = scan(a, b, device=args.device, dtype=torch.float64 if args.float64 else torch.float32,
                  progress=bar, problem_threshold=args.problem_threshold)
    if args.problems:
        text = problem_list(report) + "\n"

        def write_text(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        atomic_write(args.problems, write_text, forbid=(args.a, args.b))
    if args.map:
        try:
            from PIL import Image
        except ImportError:
            raise LensError("Writing the conflict map needs Pillow (pip install pillow).") from None
        import numpy as np
        img = Image.fromarray((render(report) * 255).astype(np.uint8))
        atomic_write(args.map, lambda tmp: img.save(tmp, format="PNG"), forbid=(args.a, args.b))
    if args.json:
        print(json.dumps(json_safe(report), indent=1))
    else:
        print(format_report(report))
    return 0


def second_lora(ctx):
    """A second SDXL LoRA for the demo that shares some directions with the sample (so there is something to see)."""
    import os
    from ..st_io import atomic_save
    from ..synth import make_lora
    path = ctx.path("second_sdxl.safetensors")
    if os.path.exists(path):
        return path
    from ..conflict.metrics import small_maths
    sample = LoRAModel.load(ctx.sample)
    rank = max((m.rank() or 0) for m in sample.modules) or 16
    with small_maths("cpu", busy_only=True):
        other = make_lora("sdxl_kohya", rank=rank, seed=4321)
    gen = torch.Generator().manual_seed(7)
    # make a third of the modules lean on the sample's directions (some along, some against)
    for i, m in enumerate(sample.modules):
        if i % 3 or m.kind.name != "lora":
            continue
        up_k = m.keys["up"]
        down_k = m.keys["down"]
        if up_k in other and other[up_k].shape == m.tensors["up"].shape:
            sign = -1.0 if i % 2 else 1.0
            mix = 0.6 + 0.3 * torch.rand(1, generator=gen).item()
            other[up_k] = (sign * mix * m.tensors["up"].float() + (1 - mix) * other[up_k].float()).to(other[up_k].dtype)
            other[down_k] = m.tensors["down"].clone()
    meta = dict(other.metadata)
    meta["modelspec.trigger_phrase"] = "lens demo style"
    atomic_save(other, path, meta)
    return path


def demo(ctx):
    second = second_lora(ctx)
    report = scan(LoRAModel.load(ctx.sample), LoRAModel.load(second), device=ctx.device)
    with open(ctx.path("conflict_problems.txt"), "w") as f:
        f.write(problem_list(report) + "\n")
    ctx.say("conflict", format_report(report) + "\n(problem list written to conflict_problems.txt)")
