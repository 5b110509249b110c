"""LoRA Lens engine: read, understand, shrink, blend and pack LoRA files (torch + safetensors, no ComfyUI).

Public entry points: `LoRAModel` (load/save/modules), `LensError` (the one error type for bad input).
"""
__version__ = "0.1.0"

from .errors import LensError  # noqa: E402
from .model import LoRAModel, LoRAModule, LoraStateDict, ensure_model  # noqa: E402

__all__ = ["LoRAModel", "LoRAModule", "LoraStateDict", "LensError", "ensure_model", "__version__"]
