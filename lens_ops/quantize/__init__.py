"""QuantizeInt8: int8 (or fp8) LoRAs that stock ComfyUI applies exactly, with honest quality numbers.

`quantize_model(model, ...)` → (LoRAModel, report): every LoRA/LoCon/Tucker/DoRA/LoHa/LoKr module's
factors are stored as int8 with one scale per tensor, and the scales are folded into the module's
alpha (see fold.py), so core's loader (tensors cast to float, times alpha/rank) applies the
dequantized ΔW with no custom code. Before rounding each factor pair may be rebalanced and rotated in
rank space (ΔW unchanged); `method="auto"` measures the candidates' exact ΔW error and keeps the best.
`dequantize_model(model, "fp16"|"bf16")` turns such a file back into plain float tensors.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable

import torch

from ..errors import LensError
from ..model import LoRAModel, ensure_model
from .codec import FORMATS, is_quantized
from .fold import FOLDABLE, ModuleResult, keep_in_fp16, quantize_module
from .metrics import SAMPLE_ROWS, Stats
from .transforms import METHODS

DEFAULT_METHOD = "rebalance+rotate"  # best median ΔW SNR in bench/quantize.py; "auto" measures every candidate
DEFAULT_MIN_SNR = 40.0
DENSE_BUDGET = 1 << 26  # ΔW entries: below this the dense ΔW metrics (MAE, max error) come for free-ish
DENSE_MODES = ("auto", "on", "off")
METRIC_MODES = ("auto", "exact", "sampled")  # how ΔW MAE/max error are obtained (SNR, MSE, rel. error: always exact)
METRIC_LABEL = {"exact": "exact", "sampled": "sampled-rows", "none": "snr-mse-only"}
SMALL_MODULE = 1 << 18  # module elements below which one CPU thread is faster than several
FMT_LABEL = {"int8": "int8", "fp8": "fp8 (e4m3fn)"}

__all__ = ["quantize_model", "dequantize_model", "format_report", "METHODS", "FORMATS", "DEFAULT_METHOD",
           "DEFAULT_MIN_SNR", "METRIC_MODES"]


def _check_finite(model: LoRAModel) -> None:
    """Refuse NaN/Inf anywhere. Factor tensors of foldable modules are checked for free by the codec's
    max|x| (NaN/Inf propagate); everything else (alpha, dora_scale, carried-through kinds) is checked here."""
    for m in model.modules:
        for role, t in m.tensors.items():
            if m.kind.name in FOLDABLE and role != "alpha" and role != "dora_scale":
                continue
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LensError(f"Module {m.name} contains NaN/Inf value(s) in {role}; refusing to quantize "
                                "(fix or remove that module first).")


NO_ALPHA = {"cloneofsimo lora_diffusion"}  # key conventions whose loaders read no alpha (scales cannot be folded)


def _check_foldable(model: LoRAModel) -> None:
    """Refuse a LoRA with nothing to quantize, naming the real reason (tensor groups not understood, or only
    kinds applied without alpha / relative to the base weight), or one whose format has no alpha to carry
    the per-tensor scales."""
    if model.convention in NO_ALPHA:
        raise LensError(f"{model.convention} files have no alpha key to carry the int8/fp8 scales (their loader "
                        "would apply the raw codes), so this LoRA cannot be quantized; nothing is written.")
    if any(m.kind.name in FOLDABLE for m in model.modules):
        return
    unknown = [m.name for m in model.modules if m.kind.name == "unknown"]
    if unknown and len(unknown) == len(model.modules):
        raise LensError(f"This LoRA has no LoRA/LoHa/LoKr modules to quantize: its {len(unknown)} tensor group(s) "
                        f"are not understood (e.g. {unknown[0]!r}), so nothing is written.")
    raise LensError("This LoRA has no LoRA/LoHa/LoKr modules to quantize (only kinds applied "
                    "without alpha or relative to the base weight).")


def _dense_size(model: LoRAModel) -> int:
    total = 0
    for m in model.modules:
        if m.kind.name == "lora":
            total += math.prod(int(d) for d in m.weight_shape())
    return total


def quantize_model(model, fmt: str = "int8", method: str = DEFAULT_METHOD, min_snr: float = DEFAULT_MIN_SNR,
                   keep_below: bool = False, dense_metrics: str | None = None, device="cpu",
                   progress: Callable[[int, int], None] | None = None,
                   metrics: str = "auto", sink=None) -> tuple[LoRAModel, dict]:
    """Quantize every foldable module. Modules whose ΔW SNR is under `min_snr` dB are reported and, with
    `keep_below`, kept in fp16 (a mixed file, still loadable; fp32/bf16 factors are rounded to fp16 and that
    rounding's exact ΔW error is reported; a module with values beyond fp16's range keeps its own dtype).

    ΔW SNR, MSE and relative Frobenius error are always exact (from the factors). `metrics` sets how ΔW MAE
    and max error are obtained: "exact" (dense ΔW of every module), "sampled" (exactly, on a deterministic
    sample of ΔW rows per module; labelled "sampled-rows"), "auto" (exact when the file's LoRA ΔW has at most
    DENSE_BUDGET entries, else sampled). The older `dense_metrics` ("on" = exact, "off" = no MAE/max error,
    "auto"), when given, takes precedence.

    `sink` (an open lens_ops.st_io.StreamWriter): every module's output tensors are written to it as soon as the
    module is done, in file order (writing overlaps the quantizing, and the result is never held whole); the
    returned model then holds the small tensors and only the shapes of the others. The caller closes the sink
    with the returned model's metadata."""
    model = ensure_model(model)
    if fmt not in FORMATS:
        raise LensError(f"Unknown format {fmt!r}; use int8 or fp8.")
    if method != "auto" and method not in METHODS:
        raise LensError(f"Unknown method {method!r}; use auto, {', '.join(METHODS)}.")
    if dense_metrics is not None and dense_metrics not in DENSE_MODES:
        raise LensError(f"dense_metrics must be one of {', '.join(DENSE_MODES)}, not {dense_metrics!r}.")
    if metrics not in METRIC_MODES:
        raise LensError(f"metrics must be one of {', '.join(METRIC_MODES)}, not {metrics!r}.")
    if not isinstance(min_snr, (int, float)) or math.isnan(min_snr):
        raise LensError("The SNR threshold must be a number of dB (e.g. 40).")
    _check_finite(model)
    _check_foldable(model)
    if dense_metrics is not None:
        metrics = {"on": "exact", "off": "none", "auto": "auto"}[dense_metrics]
    if metrics == "auto":
        metrics = "exact" if _dense_size(model) <= DENSE_BUDGET else "sampled"
    dense = metrics == "exact"
    results: list[ModuleResult] = []
    total = len(model.modules)
    for i, (m, res) in enumerate(_quantize_all(model.modules, fmt, method, device, metrics)):
        if res.quantized and keep_below:
            snr = res.delta.snr_db
            if snr is not None and snr < min_snr:
                kept, st, where = keep_in_fp16(m, metrics, device)
                res = ModuleResult(m.name, m.kind.name, kept, "kept (below threshold)",
                                   "+".join(sorted({str(t.dtype).replace("torch.", "") for r, t in kept.tensors.items()
                                                    if r != "alpha"})),
                                   res.delta, Stats(), quantized=False,
                                   note=f"ΔW SNR {snr:.1f} dB < {min_snr:g} dB: {where}", alpha=m.alpha)
                res.delta = st if st is not None else Stats(res.delta.signal, 0.0, 0.0, 0.0, res.delta.count)
                res.kept_snr = snr
        if sink is not None:
            res.module = _written(sink, res.module)
        results.append(res)
        if progress is not None:
            progress(i + 1, total)
    out = model.replace_modules({r.name: r.module for r in results
                                 if r.quantized or sink is not None or r.kept_snr is not None})
    settings = {"format": fmt, "method": method, "min_snr_db": min_snr, "keep_below": bool(keep_below)}
    out.metadata = model.with_provenance("quantize", settings)
    report = build_report(model, out, results, fmt, method, min_snr, keep_below, dense, metrics)
    return out, report


def _written(sink, module):
    """Write a module's tensors to the sink; keep a copy that holds only their shapes (small ones kept)."""
    from ..model import LoRAModule
    for role, key in module.keys.items():
        sink.add(key, module.tensors[role])
    light = {r: (t if t.numel() <= 16 else torch.empty_like(t, device="meta")) for r, t in module.tensors.items()}
    return LoRAModule(module.name, dict(module.keys), light, module.kind, module.component)


def _quantize_all(modules, fmt, method, device, metrics):
    """(module, result) in file order. On a CPU with several torch threads, modules are quantized side by side
    in that many worker threads with one torch thread each (per-module matrices are small: splitting each
    product over threads wastes more than it gains, while modules are independent). The results do not
    depend on this (every module's maths runs the same single-threaded way)."""
    threads = torch.get_num_threads()
    on_cpu = torch.device(device).type == "cpu"
    if not on_cpu or threads < 2 or len(modules) < 2:
        for m in modules:
            small = sum(t.numel() for t in m.tensors.values()) < SMALL_MODULE
            if small and threads > 1:  # tiny matrices: thread start-up and contention cost more than the maths
                torch.set_num_threads(1)
            try:
                res = quantize_module(m, fmt, method, device=device, mae_max=metrics)
            finally:
                if small and threads > 1:
                    torch.set_num_threads(threads)
            yield m, res
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    torch.set_num_threads(1)
    # each worker sets its own torch thread count: the setting is per thread (OpenMP), and a new thread does not
    # inherit the main thread's 1 but starts at the core count (measured: 2 workers × 2 OpenMP threads on 2 cores
    # spent ~35 % more CPU, spinning at barriers)
    ex = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lens-quantize",
                            initializer=torch.set_num_threads, initargs=(1,))
    try:
        # a bounded window of submitted modules keeps at most ~2 per worker in flight (memory stays per-module)
        window, futs = 2 * threads, deque()
        for m in modules:
            if len(futs) >= window:
                done, f = futs.popleft()
                yield done, f.result()
            futs.append((m, ex.submit(quantize_module, m, fmt, method, device=device, mae_max=metrics)))
        while futs:
            done, f = futs.popleft()
            yield done, f.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _median(xs):
    return statistics.median(xs) if xs else None


def build_report(src: LoRAModel, out: LoRAModel, results: list[ModuleResult], fmt, method, min_snr,
                 keep_below, dense, metrics: str = "exact") -> dict:
    delta, tens = Stats(), Stats()
    snrs, below, methods, kept = [], [], {}, []
    zero = 0
    for r in results:
        if r.quantized:
            delta.add(r.delta)
            tens.add(r.tensors)
            s = r.delta.snr_db
            if s is None:
                zero += 1
            else:
                snrs.append(s if math.isfinite(s) else 999.0)
                if s < min_snr:
                    below.append({"name": r.name, "snr_db": round(s, 2)})
            key = r.method.split(" (")[0] if "carried" not in r.method else "carrier"
            methods[key] = methods.get(key, 0) + 1
        else:
            kept.append({"name": r.name, "kind": r.kind, "reason": r.note})
            if r.kept_snr is not None:
                delta.add(r.delta)
                below.append({"name": r.name, "snr_db": round(r.kept_snr, 2), "kept": True})
    in_bytes, out_bytes = src.nbytes, out.nbytes
    warnings = []
    if below:
        names = ", ".join(b["name"] for b in below[:5]) + (", …" if len(below) > 5 else "")
        if keep_below:
            warnings.append(f"{len(below)} module(s) under {min_snr:g} dB ΔW SNR were kept in fp16 instead of "
                            f"{FMT_LABEL[fmt]}: {names}")
        else:
            warnings.append(f"{len(below)} module(s) under {min_snr:g} dB ΔW SNR: {names}. Use keep_fp16 "
                            "(--keep-fp16) to keep them in fp16 (a mixed file, still loadable).")
    return {
        "format": FMT_LABEL[fmt], "method": method, "min_snr_db": min_snr, "keep_below": bool(keep_below),
        "modules": len(results), "modules_quantized": sum(r.quantized for r in results),
        "modules_kept": kept, "zero_modules": zero,
        "input_tensor_bytes": in_bytes, "output_tensor_bytes": out_bytes,
        "size_ratio": out_bytes / in_bytes if in_bytes else None,
        "metrics": delta.label if delta.count else METRIC_LABEL[metrics],
        "delta": {**delta.as_dict(), "median_snr_db": _median(snrs),
                  "min_snr_db": min(snrs) if snrs else None, "dense": bool(dense),
                  "sampled_entries": delta.abs_n if delta.sampled else None},
        "stored": tens.as_dict(),
        "methods": methods,
        "below_threshold": below,
        "warnings": warnings,
        "per_module": [r.record() for r in results],
    }


def _num(x, unit="") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:.3g}{unit}"


def _metric_line(d: dict) -> str:
    snr = d["snr_db"]
    snr_txt = "exact (no error)" if snr == "inf" else ("n/a" if snr is None else f"{snr:.2f} dB")
    rel = d["rel_frobenius"]
    return (f"SNR {snr_txt}, MSE {_num(d['mse'])}, MAE {_num(d['mae'])}, max error {_num(d['max_error'])}, "
            f"relative Frobenius error {'n/a' if rel is None else f'{100 * rel:.3f} %'}")


def format_report(rep: dict, per_module: int = 0) -> str:
    lines = [f"Quantized {rep['modules_quantized']} of {rep['modules']} modules to {rep['format']} "
             f"(method {rep['method']}; per-tensor scales folded into alpha, loads in stock ComfyUI)."]
    if rep["size_ratio"] is not None:
        lines.append(f"Tensor bytes: {rep['input_tensor_bytes'] / 2**20:.2f} MiB -> "
                     f"{rep['output_tensor_bytes'] / 2**20:.2f} MiB ({100 * rep['size_ratio']:.1f} %).")
    d = rep["delta"]
    med = "n/a" if d["median_snr_db"] is None else f"{d['median_snr_db']:.2f} dB"
    mn = "n/a" if d["min_snr_db"] is None else f"{d['min_snr_db']:.2f} dB"
    lines.append(f"ΔW (what the model sees): {_metric_line(d)}; per-module SNR median {med}, min {mn}.")
    label = d.get("metrics", "exact" if d["dense"] else "snr-mse-only")
    if label == "sampled-rows":
        lines.append(f"  (SNR, MSE and relative error are exact, from the factors; ΔW MAE and max error are exact "
                     f"on a deterministic sample of {SAMPLE_ROWS} rows per module ({d['sampled_entries']} ΔW "
                     "entries), not on every entry — metrics 'exact' / --metrics exact computes them densely.)")
    elif label == "snr-mse-only":
        lines.append("  (SNR, MSE and relative error are exact, from the factors; ΔW MAE and max error were not "
                     "computed — metrics 'exact' / --metrics exact computes them densely.)")
    lines.append(f"Stored tensors: {_metric_line(rep['stored'])}.")
    if rep["methods"]:
        lines.append("Methods: " + ", ".join(f"{k} {v}" for k, v in sorted(rep["methods"].items(), key=lambda kv: -kv[1])) + ".")
    if rep["modules_kept"]:
        lines.append(f"Kept unquantized: {len(rep['modules_kept'])} module(s) "
                     f"({rep['modules_kept'][0]['name']}: {rep['modules_kept'][0]['reason']}).")
    if rep["zero_modules"]:
        lines.append(f"{rep['zero_modules']} all-zero module(s) (no ΔW, stored as zeros).")
    for w in rep["warnings"]:
        lines.append("Warning: " + w)
    if per_module:
        rows = sorted((m for m in rep["per_module"] if m["quantized"]),
                      key=lambda m: (m["delta"]["snr_db"] if isinstance(m["delta"]["snr_db"], float) else 1e9))
        lines.append(f"Lowest ΔW SNR modules (of {len(rows)}):")
        for m in rows[:per_module]:
            lines.append(f"  {m['name']}: {_num(m['delta']['snr_db'], ' dB')} ({m['method']})")
    return "\n".join(lines)


def dequantize_model(model, dtype: str = "fp16") -> tuple[LoRAModel, dict]:
    """Every int8/fp8 module tensor back to fp16/bf16 with the folded scale moved out of alpha
    (alpha = rank, each quantized factor times (scale)^(1/k)); ΔW unchanged up to fp16/bf16 rounding."""
    model = ensure_model(model)
    target = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    if target is None:
        raise LensError(f"Cannot dequantize to {dtype!r}; use fp16 or bf16.")
    new, n = {}, 0
    for m in model.modules:
        if m.kind.name not in FOLDABLE:
            continue
        roles = [r for r, t in m.tensors.items() if r != "alpha" and (is_quantized(t) or t.is_floating_point())]
        qroles = [r for r in roles if is_quantized(m.tensors[r])]
        t = dict(m.tensors)
        rank = m.rank()
        if qroles and rank is not None:
            s = m.scale()
            k = abs(s) ** (1.0 / len(qroles)) if s != 0 else 1.0
            sign = -1.0 if s < 0 else 1.0
            for i, r in enumerate(qroles):
                f = k * (sign if i == 0 else 1.0)
                t[r] = (m.tensors[r].to(torch.float32) * f).to(target)
            t["alpha"] = torch.tensor(float(rank), dtype=torch.float32)
        for r in roles:
            if r not in qroles or rank is None:
                t[r] = m.tensors[r].to(torch.float32).to(target)
        if qroles or any(m.tensors[r].dtype != target for r in roles):
            n += 1
            new[m.name] = m.with_tensors(t)
    out = model.replace_modules(new)
    out.metadata = model.with_provenance("dequantize", {"dtype": dtype})
    return out, {"modules_converted": n, "dtype": dtype}
