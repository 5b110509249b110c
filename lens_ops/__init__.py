"""LoRA Lens engine: read, understand, shrink, blend and pack LoRA files (torch + safetensors, no ComfyUI).

Public entry points: `LoRAModel` (load/save/modules), `LensError` (the one error type for bad input).
The model classes are imported on first use (PEP 562), so commands that need no torch (listing or
extracting a lossless .loradb entry) start in a fraction of a second.
"""
__version__ = "0.1.0"

from .errors import LensError  # noqa: E402

_LAZY = {"LoRAModel", "LoRAModule", "LoraStateDict", "ensure_model"}
__all__ = ["LoRAModel", "LoRAModule", "LoraStateDict", "LensError", "ensure_model", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
