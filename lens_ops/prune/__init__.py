"""PruneRank: exact, fast rank pruning of LoRA files (see docs/prune.md).

`prune_model(model, recipe, device, progress, base) -> (LoRAModel, report)` prunes by one recipe;
`prune_many` runs several recipes from one decomposition; `parse_recipe` validates a recipe string.
"""
from .base import CheckpointBase, DictBase, norms_cache_dir
from .core import PruneSession, prune_many, prune_model
from .recipe import ALLOWED, Recipe, parse_recipe, parse_recipes
from .report import format_report

__all__ = ["prune_model", "prune_many", "parse_recipe", "parse_recipes", "Recipe", "PruneSession",
           "format_report", "CheckpointBase", "DictBase", "norms_cache_dir", "ALLOWED"]
