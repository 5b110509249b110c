"""`lora-lens ultra IN -o OUT --recipe RECIPE`: "ultra compress" = PruneRank by RECIPE, then QuantizeInt8,
in one call (one load, one save). All quantize options apply (--fp8, --min-snr, --keep-fp16, ...)."""
from __future__ import annotations

import os

from ..errors import LensError
from ..model import LoRAModel
from ..progress import Bar
from ..quantize import _check_finite, _check_foldable, dequantize_model
from ..quantize.fold import FOLDABLE
from ..quantize.codec import is_quantized
from ..quantize.end_to_end import end_to_end
from .quantize import _check_paths, add_quant_options, quantize_and_print, set_threads

NAME = "ultra"
ORDER = 41
HELP = "ultra compress: prune the rank by a recipe, then int8 (one command)"
DESCRIPTION = ("Prune every module's rank by RECIPE (see `lora-lens prune`, docs/prune.md), then quantize the "
               "pruned factors to int8 with scales folded into alpha. The output loads in stock ComfyUI.")


def add_arguments(p):
    p.add_argument("input", help="a LoRA .safetensors file")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file (never the input)")
    p.add_argument("--recipe", "-r", default="energy=0.99",
                   help="prune recipe, e.g. energy=0.99, rank=16, sv_fro=0.99 (default energy=0.99)")
    p.add_argument("--base", default=None, metavar="CKPT",
                   help="base checkpoint .safetensors for recipes with ckpt scores (spn_ckpt, fro_ckpt, ...)")
    add_quant_options(p)


def _prune():
    try:
        from ..prune import prune_model
    except ImportError as e:
        raise LensError("Ultra compress needs the PruneRank engine (lens_ops.prune), which is not part of this "
                        f"installation ({e}).") from None
    return prune_model


def run(args) -> int:
    _check_paths(args)
    set_threads(args)
    prune_model = _prune()
    if ":" in args.recipe:
        raise LensError("ultra takes one recipe (no ':'); run `lora-lens prune` for several outputs.")
    model = LoRAModel.load(args.input)
    _check_finite(model)  # before pruning: a NaN alpha would otherwise surface later as NaN factors
    _check_foldable(model)  # before pruning: nothing to prune or quantize is said as such, not after a prune report
    stored = None
    if any(is_quantized(t) for m in model.modules for t in m.tensors.values()):
        stored = model
        model, _ = dequantize_model(model, "fp32")  # exact float factors for the pruner; re-quantized below
        model.source = os.path.abspath(args.input)
    kw = {}
    if args.base:
        from ..prune import CheckpointBase
        kw["base"] = CheckpointBase(args.base)
    pruned, prune_report = prune_model(model, args.recipe, device=args.device, progress=Bar("prune"), **kw)
    if not args.json:
        try:
            from ..prune import format_report as prune_format
            text = prune_format(prune_report, limit=5)
        except Exception:  # report text is a courtesy; the numbers are in --json / --report
            text = f"Pruned by recipe {args.recipe}."
        print(text)
    if not any(m.kind.name in FOLDABLE for m in pruned.modules):
        raise LensError(f"Pruning {os.path.basename(args.input)} by recipe {args.recipe} left no LoRA module to "
                        "quantize (every module's ΔW is zero or was removed); nothing is written.")
    if stored is not None:  # modules the prune left as they were go back to their stored int8/fp8 codes
        floats = {m.name: m for m in model.modules}
        codes = {m.name: m for m in stored.modules}
        pruned = pruned.replace_modules({m.name: codes[m.name] for m in pruned.modules
                                         if floats.get(m.name) is m and m.name in codes})
    pruned.source = model.source
    full = quantize_and_print(pruned, args, extra_report={"recipe": args.recipe, "prune": prune_report},
                              augment=lambda r: r.update(end_to_end=end_to_end(prune_report, r["quantize"])))
    q = full["quantize"]
    if not args.json:
        print(f"Ultra compress: {q['input_file_bytes'] / 2**20:.2f} MiB -> {q['output_file_bytes'] / 2**20:.2f} MiB "
              f"({100 * q['file_ratio']:.1f} % of {os.path.basename(args.input)}).")
        print(_end_to_end_line(full["end_to_end"]))
    return 0


def _end_to_end_line(e2e) -> str:
    if e2e is None:
        return ("End to end (vs the original): not given — the recipe rescales the kept singular values, so the prune "
                "and int8 errors do not simply add up.")
    def db(x):
        return "n/a" if x is None else (f"{x:.2f} dB" if isinstance(x, float) else f"{x} dB")
    return (f"End to end (this file vs the original): ΔW SNR {db(e2e['snr_db'])} total, relative error "
            f"{e2e['rel_frobenius']:.4g}; per module median {db(e2e['median_snr_db'])}, min {db(e2e['min_snr_db'])} "
            f"({e2e['worst_module']}).")


def demo(ctx):
    """Prune the sample (energy=0.99), then int8."""
    from ..quantize import quantize_model
    prune_model = _prune()
    model = LoRAModel.load(ctx.sample)
    pruned, _ = prune_model(model, "energy=0.99", device=ctx.device)
    out, rep = quantize_model(pruned, device=ctx.device)
    path = out.save(ctx.path("sample_ultra.safetensors"), out.metadata)
    d = rep["delta"]
    ctx.say("ultra (prune energy=0.99, then int8)",
            f"{os.path.getsize(ctx.sample) / 2**20:.1f} MiB -> {os.path.getsize(path) / 2**20:.1f} MiB "
            f"({100 * os.path.getsize(path) / os.path.getsize(ctx.sample):.1f} %); int8 step: ΔW SNR vs the pruned "
            f"LoRA {d['snr_db']:.2f} dB total, median {d['median_snr_db']:.2f} dB per module; saved {os.path.basename(path)}")
