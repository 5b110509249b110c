"""PruneRank: exact rank pruning of a LORA_MODEL (lens_ops.prune), with the per-module result drawn in
the node (web/lens_prune_view.js) and the report as text."""
from __future__ import annotations

import json

from ..lens_ops import LensError
from ..lens_ops.prune import ALLOWED, DictBase, format_report, prune_model
from ..lens_ops.prune.base import fingerprint
from .common import CATEGORY, LORA, as_model, as_socket, progress, torch_device

UI_KEY = "lens_prune"
METHODS = ["energy", "rank", "sv_ratio", "sv_fro", "sv_cumulative", "budget", "recipe"]


def recipe_from_widgets(method: str, value: float, recipe: str, lyco: str = "keep", dtype: str = "keep") -> str:
    """The recipe string the widgets describe ('recipe' uses the text field as it is)."""
    if method == "recipe":
        text = (recipe or "").strip()
        if not text:
            raise LensError(f"method 'recipe' needs a recipe text. Allowed: {ALLOWED}.")
    elif method in METHODS:
        v = int(value) if method == "rank" else float(value)
        text = f"{method}={v:g}" if method != "rank" else f"rank={v}"
    else:
        raise LensError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    extra = []
    if lyco != "keep" and "lyco=" not in text:
        extra.append(f"lyco={lyco}")
    if dtype != "keep" and "dtype=" not in text:
        extra.append(f"dtype={dtype}")
    return ",".join([text] + extra)


def base_from_comfy(model=None, clip=None):
    """Base weights from ComfyUI's MODEL / CLIP in memory, keyed the way comfy/lora.py maps LoRA keys."""
    if model is None and clip is None:
        return None
    import comfy.lora
    key_map: dict = {}
    state: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
        state.update(model.model.state_dict())
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        state.update(clip.cond_stage_model.state_dict())

    def lookup(name: str):
        target = key_map.get(name)
        if target is None:
            return None
        if isinstance(target, tuple):
            key, (dim, start, size) = target[0], target[1][:3]
            w = state.get(key)
            return None if w is None else w.narrow(dim, start, size)
        return state.get(target)
    ident = fingerprint(sorted(state.items())[:: max(1, len(state) // 64)])
    cache_dir = None
    try:
        import os
        import folder_paths
        cache_dir = os.path.join(folder_paths.get_user_directory(), "lora_lens", "norms")
    except Exception:  # older ComfyUI without a user directory: the default cache folder
        pass
    return DictBase(lookup, ident, cache_dir)


def view_data(report: dict) -> dict:
    """Compact per-module data for the node's view (names, blocks, ranks, errors, bytes)."""
    mods = [{"name": e["name"], "block": e["block"], "old": e["old_rank"], "new": e["new_rank"],
             "err": e["rel_error"], "snr": e["snr_db"], "saved": e["bytes_saved"], "note": e["note"]}
            for e in report["modules"]]
    thr = report.get("threshold")
    return {"recipe": report["recipe"], "total": report["total"],
            "threshold": thr if thr is not None and abs(thr) != float("inf") else None,
            "modules": mods}


class PruneRank:
    DESCRIPTION = ("Shrinks a LoRA by dropping the dimensions it does not use, exactly: the SVD of every module's "
                   "ΔW from its factors (no dense ΔW), balanced new factors and alpha chosen so the kept part of "
                   "ΔW is reproduced exactly. Rules: energy kept, fixed rank, kohya's sv_ratio/sv_fro/"
                   "sv_cumulative, resize_lora recipes (spn_lora, fro_ckpt, ..., thr=/size=, rescale=) and a "
                   "whole-file size budget. Never raises a rank, never makes the file larger; modules with "
                   "nothing to drop stay bit-identical; other keys and metadata are carried.")
    CATEGORY = CATEGORY
    FUNCTION = "prune"
    OUTPUT_NODE = True
    RETURN_TYPES = (LORA, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The pruned LoRA (same keys and convention; metadata updated with the recipe).",
                       "Per-module and total report: old→new rank, bytes saved, relative ΔW error, "
                       "rle_lora/rle_ckpt, SNR in dB.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA, {"tooltip": "The LoRA to prune (from Load LoRA File or any LORA_MODEL output)."}),
                "method": (METHODS, {"default": "energy",
                                     "tooltip": "energy: keep this share of each module's ΔW energy; rank: at most "
                                                "this rank; sv_ratio/sv_fro/sv_cumulative: kohya's dynamic rules; "
                                                "budget: whole-file size in MiB (best error per byte); recipe: "
                                                "use the recipe text below."}),
                "value": ("FLOAT", {"default": 0.99, "min": 0.0, "max": 100000.0, "step": 0.001,
                                    "tooltip": "The method's number: energy 0.99, rank 16, sv_ratio 10, sv_fro 0.99, "
                                               "sv_cumulative 0.9, budget 50 (MiB). Ignored for 'recipe'."}),
                "recipe": ("STRING", {"default": "spn_lora=1,thr=-1.2", "multiline": False,
                                      "tooltip": "Full recipe, used when method is 'recipe': e.g. energy=0.99,rank=32; "
                                                 "spn_lora=1,thr=-1; fro_ckpt=0.8,params=0.2,size=50 (needs MODEL/CLIP); "
                                                 "...,rescale=0.9; budget=20."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "Optional base model: enables spn_ckpt/fro_ckpt/subspace scores, "
                                               "rle_ckpt, and pruning of input-axis DoRA modules."}),
                "clip": ("CLIP", {"tooltip": "Optional text encoder(s) of the base model, for the text-encoder "
                                             "modules' ckpt scores."}),
                "lyco": (["keep", "convert"], {"default": "keep",
                                               "tooltip": "LoHa/LoKr modules: keep them as they are, or convert "
                                                          "them to plain LoRA (pruned from their ΔW)."}),
                "dtype": (["keep", "fp16", "bf16", "fp32"], {"default": "keep",
                                                             "tooltip": "Precision of the new factors (keep = "
                                                                        "the input's)."}),
            },
        }

    def prune(self, lora, method="energy", value=0.99, recipe="", model=None, clip=None, lyco="keep",
              dtype="keep"):
        text = recipe_from_widgets(method, value, recipe, lyco, dtype)
        lm = as_model(lora)
        base = base_from_comfy(model, clip)
        out, report = prune_model(lm, text, device=torch_device(), progress=progress(max(1, len(lm.modules))),
                                  base=base)
        if base is not None:
            base.save_cache()
        if lm.modules and not out.modules:   # an empty LORA_MODEL would only fail in the next node
            raise LensError(f"Recipe {text!r} removes every module of this LoRA (its ΔW is all zero, or every "
                            "dimension falls below the threshold); ask for a milder recipe.")
        summary = format_report(report, limit=30)
        return {"ui": {"text": [summary], UI_KEY: [json.dumps(view_data(report), default=str)]},
                "result": (as_socket(out, out.metadata), summary)}


NODE_CLASS_MAPPINGS = {"PruneRank": PruneRank}
NODE_DISPLAY_NAME_MAPPINGS = {"PruneRank": "Prune Rank (LoRA Lens)"}
