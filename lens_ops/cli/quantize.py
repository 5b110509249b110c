"""`lora-lens quantize IN -o OUT [options]`: int8 (or fp8) LoRA with the per-tensor scales folded into
alpha, so stock ComfyUI loads it exactly; or `--dequantize fp16|bf16` back to float tensors."""
from __future__ import annotations

import json
import os

from ..errors import LensError
from ..model import LoRAModel
from ..progress import Bar

NAME = "quantize"
ORDER = 40
HELP = "int8/fp8 LoRA that stock ComfyUI loads exactly (scales folded into alpha), with quality numbers"
DESCRIPTION = (HELP + ". Reports ΔW and stored-tensor SNR, MSE, MAE, max error and relative Frobenius error "
               "per module and in total; warns under --min-snr dB and can keep those modules in fp16.")


def add_quant_options(p, prefix_help: str = "") -> None:
    from ..quantize import DEFAULT_METHOD, DEFAULT_MIN_SNR, METHODS
    p.add_argument("--fp8", action="store_true", help="store fp8 e4m3fn instead of int8 (same scale folding)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=("auto",) + METHODS,
                   help=f"how factor pairs are prepared before rounding, ΔW unchanged (default {DEFAULT_METHOD}, the "
                        "best in the benchmark; auto measures every variant per module and keeps the best, slower)")
    p.add_argument("--min-snr", type=float, default=DEFAULT_MIN_SNR,
                   help=f"warn for modules whose ΔW SNR is under this many dB (default {DEFAULT_MIN_SNR:g})")
    p.add_argument("--keep-fp16", action="store_true",
                   help="keep modules under --min-snr in fp16 instead of int8 (mixed file, still loadable; fp32/bf16 factors are rounded to fp16 and that error is reported)")
    p.add_argument("--metrics", default="auto", choices=("auto", "exact", "sampled"),
                   help="ΔW SNR, MSE and relative error are always exact (from the factors); ΔW MAE and max error "
                        "need the dense ΔW: exact computes it for every module, sampled computes them exactly on a "
                        "deterministic sample of rows per module (labelled sampled-rows), auto = exact on small "
                        "files, sampled on big ones (default)")
    p.add_argument("--dense-metrics", default=None, choices=("auto", "on", "off"),
                   help="older spelling: on = --metrics exact, off = no ΔW MAE/max error, auto = --metrics auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's choice): modules are quantized side by side in this many "
                        "worker threads, one torch thread each; 1 = one module at a time")
    p.add_argument("--json", action="store_true", help="print the full report (with per-module metrics) as JSON")
    p.add_argument("--report", default=None, help="also write the full JSON report to this file")
    p.add_argument("--show", type=int, default=5, help="list this many lowest-SNR modules (default 5)")


def add_arguments(p):
    p.add_argument("input", help="a LoRA .safetensors file (fp16/bf16/fp32, or int8/fp8 for --dequantize)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file (never the input)")
    p.add_argument("--dequantize", choices=("fp16", "bf16"), default=None,
                   help="instead of quantizing, turn int8/fp8 (or app-style int8 with scale keys) into fp16/bf16")
    add_quant_options(p)


def _check_paths(args) -> None:
    if not os.path.isfile(args.input):
        raise LensError(f"{args.input} does not exist or is not a file.")
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise LensError(f"Refusing to overwrite the input file {args.input}; choose another output name.")
    if not args.output.lower().endswith(".safetensors"):
        raise LensError(f"The output name {args.output!r} must end in .safetensors.")
    report = getattr(args, "report", None)
    if report:  # checked before any work: the report must never replace an input or the output
        if os.path.abspath(report) == os.path.abspath(args.output) or (
                os.path.exists(report) and os.path.samefile(report, args.input)):
            raise LensError(f"The report file {report} would overwrite the input or the output LoRA; "
                            "choose another --report name.")
        folder = os.path.dirname(os.path.abspath(report))
        if not os.path.isdir(folder):
            raise LensError(f"The folder of the report file {report} does not exist.")


def set_threads(args) -> None:
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise LensError("--threads must be 1 or more.")
        import torch
        torch.set_num_threads(args.threads)


def _header_bound(model) -> int:
    """An upper bound of the quantized file's safetensors header: the input's keys plus an alpha key per
    module, every dtype written as long as the longest name (F8_E4M3), offsets with as many digits as twice the
    input's size, and room for the provenance metadata."""
    from ..st_io import _header_bytes
    big = 2 * model.nbytes + 4096
    entries = {}
    for m in model.modules:
        for role in list(m.tensors) + ([] if "alpha" in m.tensors else ["alpha"]):
            t = m.tensors.get(role)
            entries[m.key_for(role)] = {"dtype": "F8_E4M3", "shape": list(t.shape) if t is not None else [],
                                        "data_offsets": [big, big]}
    return 8 + len(_header_bytes(entries, model.metadata)) + 4096


def quantize_and_print(model, args, extra_report: dict | None = None, augment=None) -> dict:
    """Quantize to args.output (streamed), then write/print the report; `augment(full_report)` may add to the
    report before it is written or printed."""
    from ..quantize import format_report, quantize_model
    from ..st_io import StreamWriter
    bar = Bar("quantize")
    # modules are written as they are done (the write overlaps the work); nothing is left behind on an error
    sink = StreamWriter(args.output, forbid=(model.source,) if model.source else (),
                        header_reserve=_header_bound(model))
    try:
        out, rep = quantize_model(model, fmt="fp8" if args.fp8 else "int8", method=args.method,
                                  min_snr=args.min_snr, keep_below=args.keep_fp16, dense_metrics=args.dense_metrics,
                                  metrics=args.metrics, device=args.device, progress=bar, sink=sink)
        # unused header reserve stays as spaces only while it is ≤ 0.2 % of the file (else the payload moves up)
        path = sink.close(out.metadata, max_padding=out.nbytes // 500)
    except BaseException:
        sink.abort()
        raise
    rep["output"] = path
    rep["input_file_bytes"] = os.path.getsize(args.input)
    rep["output_file_bytes"] = os.path.getsize(path)
    rep["file_ratio"] = rep["output_file_bytes"] / rep["input_file_bytes"]
    if extra_report:
        rep = {**extra_report, "quantize": rep}
    full = rep
    if augment is not None:
        augment(full)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(full, f, indent=2, default=str)
    if args.json:
        print(json.dumps(full, indent=2, default=str))
    else:
        q = full["quantize"] if extra_report else full
        print(format_report(q, per_module=args.show))
        print(f"File: {q['input_file_bytes'] / 2**20:.2f} MiB -> {q['output_file_bytes'] / 2**20:.2f} MiB "
              f"({100 * q['file_ratio']:.1f} %), written to {path}")
    return full


def run(args) -> int:
    _check_paths(args)
    set_threads(args)
    model = LoRAModel.load(args.input)
    if args.dequantize:
        from ..quantize import dequantize_model
        out, rep = dequantize_model(model, args.dequantize)
        if not rep["modules_converted"]:
            raise LensError(f"{os.path.basename(args.input)} has no int8/fp8 tensors and is already "
                            f"{args.dequantize}: nothing to dequantize.")
        path = out.save(args.output, out.metadata)
        rep.update(output=path, output_file_bytes=os.path.getsize(path), input_file_bytes=os.path.getsize(args.input))
        if args.json:
            print(json.dumps(rep, indent=2))
        else:
            print(f"Dequantized {rep['modules_converted']} module(s) to {args.dequantize}; "
                  f"{rep['input_file_bytes'] / 2**20:.2f} MiB -> {rep['output_file_bytes'] / 2**20:.2f} MiB, "
                  f"written to {path}")
        return 0
    quantize_and_print(model, args)
    return 0


def demo(ctx):
    """Quantize the sample to int8, reload it and check ΔW against the fp16 original."""
    import torch
    from ..quantize import format_report, quantize_model
    model = LoRAModel.load(ctx.sample)
    out, rep = quantize_model(model, device=ctx.device)
    path = out.save(ctx.path("sample_int8.safetensors"), out.metadata)
    back = LoRAModel.load(path)
    m0 = next(m for m in model.modules if m.kind.name == "lora")
    m1 = back.get(m0.name)
    d0, d1 = m0.delta(torch.float64), m1.delta(torch.float64)
    rel = float((d1 - d0).norm() / d0.norm())
    ctx.say("quantize (int8)", format_report(rep, per_module=0) +
            f"\nsaved {os.path.basename(path)} ({os.path.getsize(path) / 2**20:.1f} MiB vs "
            f"{os.path.getsize(ctx.sample) / 2**20:.1f} MiB); reloaded ΔW of {m0.name}: relative error {rel:.2e}")
