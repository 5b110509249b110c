"""QuantizeInt8 (int8/fp8 LoRA with scales folded into alpha) and ApplyLoRA (try any LORA_MODEL from the
graph on a model through ComfyUI's own LoRA patching, without saving it first)."""
from __future__ import annotations

import math

import torch

from ..lens_ops import LensError
from ..lens_ops.quantize import DEFAULT_METHOD, DEFAULT_MIN_SNR, METHODS, format_report, quantize_model
from .common import CATEGORY, LORA, as_model, as_socket, progress, torch_device

FORMATS = {"int8": "int8", "fp8 (e4m3fn)": "fp8"}


class QuantizeInt8:
    DESCRIPTION = ("Stores a LoRA's factors as int8 (or fp8) with one scale per tensor, folded into each "
                   "module's alpha, so stock ComfyUI (LoraLoader, Apply LoRA) applies exactly the dequantized "
                   "LoRA: about half the size of fp16. Before rounding, factor pairs are rebalanced and rotated "
                   "in rank space (ΔW unchanged) to maximise ΔW SNR. The report gives ΔW and stored-tensor SNR, "
                   "MSE, MAE, max error and relative Frobenius error.")
    CATEGORY = CATEGORY
    FUNCTION = "quantize"
    RETURN_TYPES = (LORA, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The quantized LoRA (int8/fp8 tensors, float32 alpha); save it with Save LoRA File.",
                       "Quality report: ΔW and stored-tensor metrics, methods used, warnings (also shown in the node).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA, {"tooltip": "The LoRA to quantize (from Load LoRA File or any LoRA Lens node)."}),
                "format": (list(FORMATS), {"default": "int8",
                                           "tooltip": "int8 (symmetric, scale = max|x|/127) or fp8 e4m3fn "
                                                      "(scale = max|x|/448). Both load in stock ComfyUI."}),
                "method": (["auto"] + list(METHODS),
                           {"default": DEFAULT_METHOD,
                            "tooltip": "How each factor pair is prepared before rounding, ΔW unchanged: naive, "
                                       "rebalance (up·D, D⁻¹·down), rotate (Hadamard in rank space) or both "
                                       f"(default {DEFAULT_METHOD}: best in the benchmark). auto measures every "
                                       "candidate's exact ΔW error per module and keeps the best (slower)."}),
                "min_snr_db": ("FLOAT", {"default": DEFAULT_MIN_SNR, "min": 0.0, "max": 200.0, "step": 0.5,
                                         "tooltip": "Warn for modules whose ΔW SNR falls under this many dB."}),
                "keep_fp16_below": ("BOOLEAN", {"default": False,
                                                "tooltip": "Keep modules under the SNR threshold in fp16 instead of "
                                                           "int8 (a mixed file, still loadable everywhere); fp32/bf16 "
                                                           "factors are rounded to fp16 and that error is reported."}),
            },
            "optional": {
                "dense_metrics": (["auto", "on", "off"],
                                  {"default": "auto",
                                   "tooltip": "ΔW SNR, MSE and relative error are always exact (from the factors). "
                                              "ΔW MAE and max error need the dense ΔW: on = every module densely "
                                              "(exact, slow on big LoRAs); auto = exact on small LoRAs, else "
                                              "exactly on a deterministic sample of rows per module (reported as "
                                              "sampled-rows); off = not computed."}),
            },
        }

    def quantize(self, lora, format="int8", method=DEFAULT_METHOD, min_snr_db=DEFAULT_MIN_SNR, keep_fp16_below=False,
                 dense_metrics="auto"):
        if format not in FORMATS:
            raise LensError(f"Unknown format {format!r}; use int8 or fp8 (e4m3fn).")
        model = as_model(lora)
        out, rep = quantize_model(model, fmt=FORMATS[format], method=method, min_snr=float(min_snr_db),
                                  keep_below=bool(keep_fp16_below), dense_metrics=dense_metrics,
                                  device=torch_device(), progress=progress(len(model.modules)))
        text = format_report(rep, per_module=5)
        return {"ui": {"text": [text]}, "result": (as_socket(out, out.metadata), text)}


class ApplyLoRA:
    DESCRIPTION = ("Applies a LORA_MODEL from the graph (pruned, quantized, blended, extracted, ...) to a model "
                   "and its CLIP through ComfyUI's own LoRA patching (comfy.sd.load_lora_for_models, the code "
                   "LoraLoader uses), so you can try the result on images without saving it first.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The diffusion model with the LoRA patched in.", "The CLIP with the LoRA patched in.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the LoRA to."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s) to apply the LoRA's text-encoder modules to."}),
                "lora": (LORA, {"tooltip": "Any LORA_MODEL (dict of tensors) from the graph."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "How strongly to apply the LoRA to the diffusion model."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                            "tooltip": "How strongly to apply the LoRA to the text encoder(s)."}),
            },
        }

    def apply(self, model, clip, lora, strength_model=1.0, strength_clip=1.0):
        import comfy.lora
        import comfy.lora_convert
        import comfy.sd
        if not isinstance(lora, dict) or not lora:
            raise LensError("The lora input is empty or not a LoRA (expected a dict of tensors).")
        bad = [k for k, v in lora.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LensError(f"LoRA entry {bad[0]!r} is not a tensor.")
        for name, v in (("strength_model", strength_model), ("strength_clip", strength_clip)):
            if not math.isfinite(float(v)):
                raise LensError(f"The {name} value is {v}; use a finite number.")
        if strength_model == 0 and strength_clip == 0:
            return {"ui": {"text": ["Strengths are 0: nothing applied."]}, "result": (model, clip)}
        sd = dict(lora)
        lm = as_model(lora)
        for m in lm.modules:
            if m.nonfinite():
                raise LensError(f"LoRA module {m.name} contains {m.nonfinite()} NaN/Inf value(s); applying it would "
                                "turn the model's outputs into NaN (fix or remove that module first).")
        key_map = {}
        if model is not None:
            key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
        if clip is not None:
            key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        matched = len(comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(sd)), key_map, log_missing=False))
        _check_fit(lm, key_map, matched, model, clip)
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, sd, strength_model, strength_clip)
        text = (f"Applied {matched} weight patch(es) from {len(lm.modules)} LoRA module(s) "
                f"(strength model {strength_model:g}, clip {strength_clip:g}).")
        return {"ui": {"text": [text]}, "result": (new_model, new_clip)}


# ComfyUI's model config classes in the words users know (others: the class name)
_MODEL_LABELS = {"SD15": "SD 1.5", "SD15_instructpix2pix": "SD 1.5", "SD20": "SD 2.x", "SD21UnclipL": "SD 2.x",
                 "SD21UnclipH": "SD 2.x", "SDXL": "SDXL", "SDXLRefiner": "SDXL refiner", "SDXL_instructpix2pix": "SDXL",
                 "SD3": "SD3", "Flux": "FLUX.1", "FluxSchnell": "FLUX.1", "FluxInpaint": "FLUX.1"}


def _model_label(model) -> str:
    name = type(getattr(getattr(model, "model", None), "model_config", None)).__name__
    return _MODEL_LABELS.get(name, name if name != "NoneType" else "this")


def _check_fit(lm, key_map: dict, matched: int, model, clip) -> None:
    """Refuse a LoRA none of whose modules names a layer of the model, or whose layers have other shapes than
    the model's (core would patch the rest and skip those with log errors at sampling time)."""
    arch = lm.architecture
    what = f"This {arch.label} LoRA" if arch.id != "unknown" else "This LoRA"
    target = f"the {_model_label(model)} model"
    if matched == 0:
        raise LensError(f"{what} changes no layer of {target} (none of its {len(lm.modules)} module names match): "
                        "it was made for another base model.")
    shapes = {}
    if model is not None:
        shapes.update({k: tuple(v.shape) for k, v in model.model.state_dict().items()})
    if clip is not None:
        shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
    checked, bad = 0, []
    for m in lm.modules:
        key = key_map.get(m.name)
        try:
            ws = m.weight_shape()
        except Exception:  # a kind whose shape cannot be read is left to core
            ws = None
        if key is None or ws is None or len(ws) < 2:
            continue
        if isinstance(key, tuple):
            base, (dim, _start, size) = key[0], key[1][:3]
            shape = list(shapes.get(base, ()))
            if not shape:
                continue
            shape[dim] = size
        else:
            shape = shapes.get(key)
            if shape is None:
                continue
        checked += 1
        if ws[0] != shape[0] or math.prod(ws) != math.prod(shape):
            bad.append((m.name, ws, tuple(shape)))
    if bad:
        name, ws, shape = bad[0]
        dims = lambda s: "×".join(str(x) for x in s)  # noqa: E731
        raise LensError(f"{what} does not fit {target}: {len(bad)} of the {checked} layers it changes have other "
                        f"shapes (e.g. {name}: {dims(ws)} in the LoRA, {dims(shape)} in the model); use a LoRA made "
                        f"for this model.")


NODE_CLASS_MAPPINGS = {"QuantizeInt8": QuantizeInt8, "ApplyLoRA": ApplyLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"QuantizeInt8": "Quantize LoRA to int8 (LoRA Lens)",
                              "ApplyLoRA": "Apply LoRA (LoRA Lens)"}
