"""ComfyUI nodes of LoRA Lens. Every sibling module exporting NODE_CLASS_MAPPINGS is collected here,
so a node family is added by adding its module (relative imports only: ComfyUI has its own `nodes`)."""
import importlib
import pkgutil

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name.startswith("_") or _info.name == "common":
        continue
    _mod = importlib.import_module(f".{_info.name}", __name__)
    NODE_CLASS_MAPPINGS.update(getattr(_mod, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))
