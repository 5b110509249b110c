"""What every LoRA Lens node needs from ComfyUI, imported lazily so the nodes run without it in tests:
the device ComfyUI holds, a progress callback that is also an interrupt point, and the model folders."""
from __future__ import annotations

import os

from ..lens_ops import LensError, LoRAModel, ensure_model
from ..lens_ops.model import LoraStateDict

CATEGORY = "LoRA Lens"
LORA = "LORA_MODEL"


def torch_device():
    """The device ComfyUI computes on (GPU when it has one)."""
    import comfy.model_management
    return comfy.model_management.get_torch_device()


def progress(total: int | None = None):
    """A callback(done, total) that moves the node's progress bar; each update is an interrupt point.

    The bar is made on the first update when `total` is not known in advance (e.g. a file's tensor count).
    """
    import comfy.model_management
    import comfy.utils
    state = {"bar": comfy.utils.ProgressBar(max(int(total), 1)) if total else None}

    def update(done: int, total_now: int | None = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        n = int(total_now or total or 1)
        if state["bar"] is None:
            state["bar"] = comfy.utils.ProgressBar(max(n, 1))
        state["bar"].update_absolute(int(done), n)
    return update


def lora_names() -> list[str]:
    import folder_paths
    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> str:
    """Full path of a file listed in ComfyUI's loras folders (names outside them are refused)."""
    import folder_paths
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise LensError(f"{name!r} is not a file in ComfyUI's loras folders; pick one from the list.")
    return path


def as_model(lora) -> LoRAModel:
    return ensure_model(lora)


def as_socket(model: LoRAModel, metadata: dict | None = None) -> LoraStateDict:
    """LORA_MODEL socket value: core's dict of tensors, with metadata riding along."""
    sd = model.state_dict()
    if metadata is not None:
        sd.metadata = dict(metadata)
    return sd


def output_dir() -> str:
    import folder_paths
    return folder_paths.get_output_directory()


def mtime_of(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return float("nan")
