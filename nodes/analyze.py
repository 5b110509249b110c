"""AnalyzeLoRA: the analysis report of a LORA_MODEL as JSON, text, an image and an LLM-ready text,
and the same report sent to the node's dashboard in the browser (web/lens_views.js)."""
from __future__ import annotations

import json

from ..lens_ops.analysis import analyze, format_report, llm_text, render_heatmap
from ..lens_ops import LensError
from .common import CATEGORY, LORA, as_model, progress, torch_device

UI_KEY = "lens_analysis"


class AnalyzeLoRA:
    DESCRIPTION = ("Looks inside a LoRA: exact singular values of every module's ΔW (from its factors), effective "
                   "rank at 90/99/99.9 % energy, norms and weight statistics, block importance, layer similarity, a "
                   "3-D module map, efficiency and health scores (0–100) and plain-language findings. Draws a "
                   "dashboard inside the node.")
    CATEGORY = CATEGORY
    FUNCTION = "analyze"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("report_json", "summary", "heatmap", "llm_text")
    OUTPUT_TOOLTIPS = (
        "The whole report as JSON (per-module numbers under report['modules'][name]); the same text the node's "
        "dashboard draws.",
        "A short text summary: scores, effective rank, compression available, findings.",
        "Spectrum/energy heatmap: one row per module, σᵢ/σ₁ on a log scale, white dots at the 99 % effective rank.",
        "The whole report as plain text for an LLM node (ask e.g. 'is it over-trained?').",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA, {"tooltip": "The LoRA to analyse (from Load LoRA File or any LORA_MODEL output)."}),
            },
            "optional": {
                "block_share": ("FLOAT", {"default": 0.9, "min": 0.05, "max": 1.0, "step": 0.05,
                                          "tooltip": "Share of total ΔW energy for the 'smallest set of blocks' "
                                                     "answer (0.9 = the fewest blocks holding 90 %)."}),
            },
        }

    def analyze(self, lora, block_share=0.9):
        import torch
        if not 0.0 < float(block_share) <= 1.0:   # also refuses NaN
            raise LensError(f"The block_share value is {block_share}; use a share in (0, 1], e.g. 0.9.")
        model = as_model(lora)
        n = max(1, len(model.modules))
        rep = analyze(model, device=torch_device(), progress=progress(n), block_share=float(block_share))
        text = json.dumps(rep, ensure_ascii=False)
        img = torch.from_numpy(render_heatmap(rep)).unsqueeze(0).contiguous()
        return {"ui": {UI_KEY: [text]},
                "result": (text, format_report(rep), img, llm_text(rep))}


NODE_CLASS_MAPPINGS = {"AnalyzeLoRA": AnalyzeLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"AnalyzeLoRA": "Analyze LoRA (LoRA Lens)"}
