"""LoadLoRAFile and SaveLoRAFile: LoRA files in and out of the graph as core's LORA_MODEL."""
from __future__ import annotations

import math
import os
import re

from ..lens_ops import LensError, LoRAModel
from ..lens_ops.st_io import atomic_save, safe_join
from ..lens_ops.summary import format_summary, summarize
from .common import CATEGORY, LORA, as_model, as_socket, lora_names, lora_path, mtime_of, output_dir, progress


class LoadLoRAFile:
    DESCRIPTION = ("Loads a LoRA file from ComfyUI's loras folders as a LORA_MODEL (the same dict of tensors "
                   "core's 'Load LoRA Model' and 'Save LoRA Weights' use) without applying it to a model, "
                   "and says what it is: architecture, format, precision, modules, rank, training metadata.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (LORA, "STRING")
    RETURN_NAMES = ("lora", "info")
    OUTPUT_TOOLTIPS = ("The LoRA's tensors, keys exactly as in the file, metadata carried along.",
                       "A short summary of the file (also shown in the node).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (lora_names(), {"tooltip": "A .safetensors LoRA from ComfyUI's loras folders."}),
            },
            "optional": {
                "bake_strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                            "tooltip": "1.0 loads the file as it is (strength-free). Another value "
                                                       "multiplies every module's ΔW exactly, as if the LoRA were "
                                                       "applied at that strength."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, bake_strength=1.0):
        try:
            return f"{lora_name}:{mtime_of(lora_path(lora_name))}:{bake_strength}"
        except LensError:
            return lora_name

    def load(self, lora_name, bake_strength=1.0):
        if not math.isfinite(float(bake_strength)):
            raise LensError(f"The bake_strength value is {bake_strength}; use a finite number (1.0 = as in the file).")
        path = lora_path(lora_name)
        model = LoRAModel.load(path, progress=progress())
        info = format_summary(summarize(model, os.path.getsize(path)))
        metadata = model.metadata
        if bake_strength != 1.0:
            model = model.scaled(bake_strength)
            metadata = model.with_provenance("bake_strength", {"strength": bake_strength, "source": lora_name})
            info += f"\nStrength {bake_strength} baked into every module."
        return {"ui": {"text": [info]}, "result": (as_socket(model, metadata), info)}


class SaveLoRAFile:
    DESCRIPTION = ("Saves a LORA_MODEL as a standard .safetensors file in ComfyUI's output folder (and, if "
                   "asked, in the loras folder so LoraLoader lists it at once). Keys, dtypes and metadata are "
                   "kept; a provenance entry records what was done.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the file written to the output folder.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA, {"tooltip": "The LoRA to save (from any node that outputs LORA_MODEL)."}),
                "filename_prefix": ("STRING", {"default": "loras/LoRA-Lens",
                                               "tooltip": "File name prefix inside the output folder; a counter "
                                                          "and .safetensors are appended. Subfolders allowed."}),
                "copy_to_loras": ("BOOLEAN", {"default": False,
                                              "tooltip": "Also write the file into the first loras folder, so "
                                                         "LoraLoader lists it without a restart."}),
            },
            "optional": {
                "note": ("STRING", {"default": "", "multiline": False,
                                    "tooltip": "Optional note stored in the provenance entry of the file."}),
            },
        }

    def save(self, lora, filename_prefix="loras/LoRA-Lens", copy_to_loras=False, note=""):
        import folder_paths
        model = as_model(lora)
        out_root = output_dir()
        if not str(filename_prefix).strip(" /\\."):
            raise LensError("The filename_prefix is empty; give a name such as loras/LoRA-Lens.")
        if any(c in str(filename_prefix) for c in "\0\n\r"):
            raise LensError("The filename_prefix contains a NUL or line-break character; use a plain file name.")
        # the file name gets '_00001_.safetensors' appended; every part must fit the file system's 255 bytes
        if any(len(part.encode()) > 255 - len("_00001_.safetensors") for part in re.split(r"[/\\]", filename_prefix)):
            raise LensError("The filename_prefix is too long: each folder or file name in it must stay under "
                            f"{255 - len('_00001_.safetensors')} bytes.")
        try:
            safe_join(out_root, filename_prefix)
        except LensError:
            raise LensError(f"filename_prefix {filename_prefix!r} points outside ComfyUI's output folder; "
                            "use a name inside it (subfolders are fine).") from None
        folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_root)
        safe_join(out_root, os.path.relpath(folder, out_root))
        name = f"{stem}_{counter:05}_.safetensors"
        while os.path.exists(os.path.join(folder, name)):
            counter += 1
            name = f"{stem}_{counter:05}_.safetensors"
        settings = {"file": name, "copy_to_loras": bool(copy_to_loras)}
        if note:
            settings["note"] = note
        metadata = model.with_provenance("save", settings)
        state = model.state_dict()
        path = atomic_save(state, os.path.join(folder, name), metadata)
        lines = [f"Saved {os.path.join(subfolder, name) if subfolder else name} "
                 f"({os.path.getsize(path) / 2**20:.1f} MiB) to the output folder."]
        if copy_to_loras:
            lora_root = folder_paths.get_folder_paths("loras")[0]
            target = safe_join(lora_root, name)
            n = counter
            while os.path.exists(target):
                n += 1
                target = safe_join(lora_root, f"{stem}_{n:05}_.safetensors")
            atomic_save(state, target, metadata)
            lines.append(f"Copied to loras as {os.path.basename(target)}.")
        text = "\n".join(lines)
        files = [{"filename": name, "subfolder": subfolder, "type": "output"}]
        return {"ui": {"text": [text], "lora_files": files}, "result": (path,)}


NODE_CLASS_MAPPINGS = {"LoadLoRAFile": LoadLoRAFile, "SaveLoRAFile": SaveLoRAFile}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadLoRAFile": "Load LoRA File (LoRA Lens)",
                              "SaveLoRAFile": "Save LoRA File (LoRA Lens)"}
