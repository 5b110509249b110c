"""LoRA Lens for ComfyUI: see inside LoRAs, shrink, quantize, blend and pack them.

ComfyUI imports this folder as a package named after the folder; everything below uses relative imports.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
