"""ConflictScan engine: pair the modules of two LoRAs across key conventions and measure, from factors only,
whether they fight (cosine, norm ratio, subspace overlap, interference), per module, block and overall."""
from .heatmap import render, view_data
from .matching import Matching, canonical_key, check_architectures, match_modules
from .metrics import dense_metrics, lowrank_metrics, module_metrics
from .scan import format_report, json_safe, problem_list, recommend_ratio, scan

__all__ = ["json_safe", "Matching", "canonical_key", "check_architectures", "match_modules", "dense_metrics", "lowrank_metrics",
           "module_metrics", "format_report", "problem_list", "recommend_ratio", "scan", "render", "view_data"]
