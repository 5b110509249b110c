"""ConflictScan: two LoRAs in, whether and where they fight out (report, summary, map, problem list, ratios)."""
from __future__ import annotations

import json

from ..lens_ops.conflict import format_report, json_safe, problem_list, render, scan, view_data
from ..lens_ops.conflict.scan import PROBLEM_THRESHOLD
from ..lens_ops import LensError
from .common import CATEGORY, LORA, as_model, progress, torch_device


class ConflictScan:
    DESCRIPTION = ("Compares two LoRAs layer by layer from their factors (never the full weight change): cosine "
                   "of their changes, norm ratio, overlap of the subspaces they write to, and how stacking them "
                   "interferes. Gives per-block and overall conflict scores (lower is better), hot spots, "
                   "complementary layers, a recommended strength pair, a stability prediction and the problem "
                   "layers to exclude; the problem list and the ratios plug straight into BlendLoRAs. Works across "
                   "key conventions (kohya, PEFT/diffusers, ComfyUI) and refuses LoRAs for different base models.")
    CATEGORY = CATEGORY
    FUNCTION = "scan"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "IMAGE", "STRING", "FLOAT", "FLOAT")
    RETURN_NAMES = ("report", "summary", "conflict_map", "problem_layers", "ratio_a", "ratio_b")
    OUTPUT_TOOLTIPS = (
        "The full report as JSON: per shared module (keyed by its name in LoRA A) cosine, norm_ratio, "
        "subspace_overlap, energy_overlap, interference, conflict; per block and overall scores; recommendations.",
        "A short readable summary (also shown in the node).",
        "Conflict map: blocks (rows) × metrics (columns); green = fine, red = conflicting.",
        "Problem layers, one module name per line: connect to BlendLoRAs' exclude input as is.",
        "Recommended strength for LoRA A (connect to BlendLoRAs' weight_a).",
        "Recommended strength for LoRA B (connect to BlendLoRAs' weight_b).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_a": (LORA, {"tooltip": "First LoRA (any convention, any rank; int8 too). Module names in the "
                                             "report and the problem list are this LoRA's."}),
                "lora_b": (LORA, {"tooltip": "Second LoRA, for the same base model as the first."}),
            },
            "optional": {
                "problem_threshold": ("FLOAT", {"default": PROBLEM_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.05,
                                                "tooltip": "A module whose conflict score reaches this (or whose "
                                                           "changes oppose each other, cosine ≤ −0.35) is listed as "
                                                           "a problem layer."}),
            },
        }

    def scan(self, lora_a, lora_b, problem_threshold=PROBLEM_THRESHOLD):
        import torch
        if not 0.0 <= float(problem_threshold) <= 1.0:   # also refuses NaN
            raise LensError(f"The problem_threshold value is {problem_threshold}; use a number from 0 to 1.")
        a, b = as_model(lora_a), as_model(lora_b)
        n = sum(1 for _ in a.modules)
        report = scan(a, b, device=torch_device(), progress=progress(n), problem_threshold=problem_threshold)
        summary = format_report(report)
        image = torch.from_numpy(render(report)).unsqueeze(0)
        problems = problem_list(report)
        ratio = report["recommended_ratio"]
        text = json.dumps(json_safe(report))
        return {"ui": {"text": [summary], "lens_conflict": [json_safe(view_data(report))]},
                "result": (text, summary, image, problems, float(ratio["a"]), float(ratio["b"]))}


NODE_CLASS_MAPPINGS = {"ConflictScan": ConflictScan}
NODE_DISPLAY_NAME_MAPPINGS = {"ConflictScan": "Conflict Scan (LoRA Lens)"}
