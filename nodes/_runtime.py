"""Run an API-format prompt in this process, without a ComfyUI server (`lora-lens batch`).

The pack's nodes need three ComfyUI modules (folder_paths, comfy.model_management, comfy.utils); when
ComfyUI is not importable, small stand-ins serve the given loras/output folders, the chosen device and a
no-op progress bar. Nodes run in dependency order; list outputs (OUTPUT_IS_LIST) fan out over the
nodes that take single values, as in ComfyUI.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types


def _standins(folders: dict[str, str], output_dir: str, device) -> dict[str, types.ModuleType]:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = os.path.dirname(folders.get("loras", output_dir))
    fp.folder_names_and_paths = {k: ([v], {".safetensors", ".loradb"}) for k, v in folders.items()}
    fp.get_output_directory = lambda: output_dir
    fp.get_folder_paths = lambda kind: list(fp.folder_names_and_paths.get(kind, ([],))[0])

    def add_model_folder_path(kind, path, is_default=False):
        fp.folder_names_and_paths.setdefault(kind, ([], {".safetensors"}))[0].append(path)

    def get_filename_list(kind):
        out = []
        for base in fp.get_folder_paths(kind):
            for d, _, fs in os.walk(base):
                out += [os.path.relpath(os.path.join(d, f), base).replace(os.sep, "/") for f in fs
                        if not f.startswith(".")]
        return sorted(out)

    def get_full_path(kind, name):
        for base in fp.get_folder_paths(kind):
            base = os.path.realpath(base)
            full = os.path.realpath(os.path.join(base, name))
            if os.path.commonpath([base, full]) == base and os.path.isfile(full):
                return full
        return None

    def get_full_path_or_raise(kind, name):
        p = get_full_path(kind, name)
        if p is None:
            raise FileNotFoundError(f"{name} not found in {kind}")
        return p

    def get_save_image_path(prefix, out_dir, w=0, h=0):
        full = os.path.abspath(os.path.join(out_dir, os.path.dirname(prefix)))
        if os.path.commonpath((os.path.abspath(out_dir), full)) != os.path.abspath(out_dir):
            raise ValueError("Saving outside the output folder is not allowed.")
        os.makedirs(full, exist_ok=True)
        base = os.path.basename(prefix)
        nums = [int(f[len(base) + 1:].split("_")[0]) for f in os.listdir(full)
                if f.startswith(base + "_") and f[len(base) + 1:].split("_")[0].isdigit()]
        return full, base, max(nums, default=0) + 1, os.path.dirname(prefix), prefix

    for name, fn in list(locals().items()):
        if callable(fn) and name.startswith(("get_", "add_")):
            setattr(fp, name, fn)
    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: device
    mm.throw_exception_if_processing_interrupted = lambda: None
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            pass

        def update(self, value):
            pass
    utils.ProgressBar = ProgressBar
    comfy.model_management, comfy.utils = mm, utils
    return {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils}


@contextlib.contextmanager
def comfy_standins(folders: dict[str, str], output_dir: str, device="cpu"):
    """Install stand-ins for the duration (only where the real ComfyUI modules are absent)."""
    saved = {k: sys.modules.get(k) for k in ("folder_paths", "comfy", "comfy.model_management", "comfy.utils")}
    if saved["folder_paths"] is not None and hasattr(saved["folder_paths"], "base_path"):
        yield  # real ComfyUI already loaded
        return
    sys.modules.update(_standins(folders, output_dir, device))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _order(prompt: dict) -> list[str]:
    done, order = set(), []

    def visit(nid, stack=()):
        if nid in done:
            return
        if nid in stack:
            raise ValueError(f"the workflow has a cycle through node {nid}")
        for v in prompt[nid]["inputs"].values():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in prompt:
                visit(v[0], stack + (nid,))
        done.add(nid)
        order.append(nid)
    for nid in prompt:
        visit(nid)
    return order


def execute(prompt: dict, node_classes: dict) -> dict:
    """Run every node; return {node id: ui dict} for nodes that produced one."""
    results, uis = {}, {}
    for nid in _order(prompt):
        node = prompt[nid]
        cls = node_classes.get(node["class_type"])
        if cls is None:
            raise ValueError(f"node {nid} uses {node['class_type']!r}, which `lora-lens batch` cannot run "
                             "without a ComfyUI server (only LoRA Lens nodes run in-process)")
        kwargs, list_inputs = {}, []
        for name, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in prompt:
                src_cls = node_classes[prompt[v[0]]["class_type"]]
                value = results[v[0]][v[1]]
                if getattr(src_cls, "OUTPUT_IS_LIST", (False,) * 99)[v[1]]:
                    list_inputs.append(name)
                kwargs[name] = value
            else:
                kwargs[name] = v
        obj = cls()
        fn = getattr(obj, cls.FUNCTION)
        if getattr(cls, "INPUT_IS_LIST", False):
            calls = [{k: (v if k in list_inputs else [v]) for k, v in kwargs.items()}]
        elif list_inputs:
            n = max(len(kwargs[k]) for k in list_inputs)
            calls = [{k: (v[min(i, len(v) - 1)] if k in list_inputs else v) for k, v in kwargs.items()}
                     for i in range(n)]
        else:
            calls = [kwargs]
        outs, ui = [], {}
        for call in calls:
            r = fn(**call)
            if isinstance(r, dict):
                for k, v in (r.get("ui") or {}).items():
                    ui.setdefault(k, []).extend(v if isinstance(v, list) else [v])
                r = r.get("result", ())
            outs.append(tuple(r or ()))
        n_out = len(cls.RETURN_TYPES)
        if len(calls) == 1:
            results[nid] = outs[0] if outs[0] else (None,) * n_out
        else:
            results[nid] = tuple([o[i] for o in outs] for i in range(n_out))
        if ui:
            uis[nid] = ui
    return uis
