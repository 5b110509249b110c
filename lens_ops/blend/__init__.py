"""BlendLoRAs engine: exact low-rank blends (concat, svd, randomized) and TIES/DARE, module by module."""
from .engine import METHODS, blend
from .stream import blend_to_file
from .methods import concat_factors, dare_merge, dense_to_factors, randomized_blend, svd_blend, ties_merge
from .weights import LayerFilter, parse_block_weights

__all__ = ["METHODS", "blend", "blend_to_file", "concat_factors", "dare_merge", "dense_to_factors", "randomized_blend", "svd_blend",
           "ties_merge", "LayerFilter", "parse_block_weights"]
