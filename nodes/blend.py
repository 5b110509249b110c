"""BlendLoRAs: two LoRAs (chain the node for more) → one LoRA equal to stacking them at the given strengths."""
from __future__ import annotations

from ..lens_ops.blend import blend
from ..lens_ops.cli.blend import format_blend
from .common import CATEGORY, LORA, as_model, as_socket, progress, torch_device

METHODS = ["concat", "svd", "pca", "ties", "dare"]


class BlendLoRAs:
    DESCRIPTION = ("Blends two LoRAs into one. The blend at weights w1, w2 equals loading both LoRAs at those "
                   "strengths (exactly with concat; svd truncates optimally to the target rank without forming "
                   "the full weight change). Kohya-style separate up/down merging is not equivalent and is not "
                   "used. Mismatched ranks, conventions and FLUX/DiT LoRAs work; modules only one LoRA has are "
                   "carried at its weight. Chain the node to blend more than two LoRAs.")
    CATEGORY = CATEGORY
    FUNCTION = "blend"
    RETURN_TYPES = (LORA, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The blended LoRA, in LoRA A's key convention and dtype, metadata of both merged.",
                       "What was done: modules blended/carried/excluded, output ranks, truncation errors.")

    @classmethod
    def INPUT_TYPES(cls):
        same = " The blend at weights w1, w2 equals loading both LoRAs at those strengths."
        return {
            "required": {
                "lora_a": (LORA, {"tooltip": "First LoRA; the output uses its key names and dtype."}),
                "lora_b": (LORA, {"tooltip": "Second LoRA (same base model; any convention and rank)."}),
                "weight_a": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "Strength w1 of LoRA A (negative subtracts it)." + same}),
                "weight_b": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "Strength w2 of LoRA B (negative subtracts it)." + same}),
                "rank": ("INT", {"default": 0, "min": 0, "max": 4096,
                                 "tooltip": "Target rank of every blended module; 0 = exact (concat: r1+r2; svd: "
                                            "every non-zero direction; ties/dare: r1+r2)."}),
                "method": (METHODS, {"default": "concat",
                                     "tooltip": "concat: exact, rank r1+r2. svd: optimal truncation to the target "
                                                "rank from the factors. pca: randomized, for very large ranks. "
                                                "ties / dare: TIES or DARE on the weight changes (lossy by design), "
                                                "re-factored to the target rank." + same.replace("equals", "(concat/svd) equals")}),
            },
            "optional": {
                "exclude": ("STRING", {"default": "", "multiline": True,
                                       "tooltip": "Modules to leave out: names or regular expressions, one per line "
                                                  "(# starts a comment). ConflictScan's problem_layers output works "
                                                  "as is."}),
                "include": ("STRING", {"default": "", "multiline": False,
                                       "tooltip": "Only blend modules matching these names/regexes (comma "
                                                  "separated); empty = all."}),
                "block_weights": ("STRING", {"default": "", "multiline": False,
                                             "tooltip": "SD.Next-style weights multiplied into both LoRAs: te=0.5:"
                                                        "unet=1, in=0:mid=1:out=0.5, double0-9=0.8:single=0.5, "
                                                        "out4-8=0.7 (see docs/blend.md)."}),
                "density": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "TIES/DARE: fraction of entries kept."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1,
                                 "tooltip": "DARE/pca random seed: the same seed gives the same blend."}),
                "excluded_keep": (["none", "first"], {"default": "none",
                                                      "tooltip": "Excluded modules: none = leave them out; first = "
                                                                 "keep LoRA A's module at weight_a."}),
                "allow_disjoint": ("BOOLEAN", {"default": False,
                                               "tooltip": "Allow LoRAs that change no layer in common (otherwise "
                                                          "that is refused as a likely mistake)."}),
            },
        }

    def blend(self, lora_a, lora_b, weight_a=1.0, weight_b=1.0, rank=0, method="concat", exclude="", include="",
              block_weights="", density=0.5, seed=0, excluded_keep="none", allow_disjoint=False):
        a, b = as_model(lora_a), as_model(lora_b)
        keys = {m.name for m in a.modules} | {m.name for m in b.modules}
        result, report = blend([a, b], [weight_a, weight_b], method, int(rank), device=torch_device(),
                               include=include or None, exclude=exclude or None, excluded_keep=excluded_keep,
                               block_weights=block_weights or None, density=density, seed=int(seed),
                               allow_disjoint=bool(allow_disjoint), progress=progress(len(keys)))
        text = format_blend(report)
        return {"ui": {"text": [text]}, "result": (as_socket(result, result.metadata), text)}


NODE_CLASS_MAPPINGS = {"BlendLoRAs": BlendLoRAs}
NODE_DISPLAY_NAME_MAPPINGS = {"BlendLoRAs": "Blend LoRAs (LoRA Lens)"}
