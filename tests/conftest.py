"""Shared test set-up: the pack imported exactly as ComfyUI imports it, and a stand-in for the few
ComfyUI modules the nodes touch (folder_paths, comfy.model_management, comfy.utils) when the real
ComfyUI is not importable."""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, TESTS)
sys.path.insert(1, ROOT)


def import_pack():
    """Load the repo as ComfyUI does: a package named after its folder, from its __init__.py."""
    name = os.path.basename(ROOT)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class FakeProgressBar:
    updates: list = []

    def __init__(self, total):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        FakeProgressBar.updates.append((value, total or self.total))

    def update(self, value):
        FakeProgressBar.updates.append((value, self.total))


@pytest.fixture
def comfy_env(tmp_path, monkeypatch):
    """Fake ComfyUI folders: output/ and loras/ under tmp_path; returns (pack, paths)."""
    out, loras = tmp_path / "output", tmp_path / "loras"
    out.mkdir()
    loras.mkdir()
    fp = types.ModuleType("folder_paths")
    fp.get_output_directory = lambda: str(out)
    fp.get_folder_paths = lambda kind: [str(loras)] if kind == "loras" else [str(tmp_path / kind)]

    def get_filename_list(kind):
        base = fp.get_folder_paths(kind)[0]
        if not os.path.isdir(base):
            return []
        return sorted(os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs
                      if not f.startswith("."))

    def get_full_path(kind, name):
        base = os.path.realpath(fp.get_folder_paths(kind)[0])
        full = os.path.realpath(os.path.join(base, name))
        if os.path.commonpath([base, full]) != base or not os.path.isfile(full):
            return None
        return full

    def get_full_path_or_raise(kind, name):
        p = get_full_path(kind, name)
        if p is None:
            raise FileNotFoundError(name)
        return p

    def get_save_image_path(prefix, output_dir, w=0, h=0):
        full = os.path.join(output_dir, os.path.dirname(prefix))
        if os.path.commonpath((output_dir, os.path.abspath(full))) != output_dir:
            raise Exception("Saving image outside the output folder is not allowed.")
        os.makedirs(full, exist_ok=True)
        return full, os.path.basename(prefix), 1, os.path.dirname(prefix), prefix

    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_full_path_or_raise = get_full_path_or_raise
    fp.get_save_image_path = get_save_image_path
    fp.add_model_folder_path = lambda *a, **k: None
    fp.folder_names_and_paths = {"loras": ([str(loras)], {".safetensors"})}
    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: "cpu"
    mm.throw_exception_if_processing_interrupted = lambda: None
    mm.processing_interrupted = lambda: False
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = FakeProgressBar
    comfy.model_management, comfy.utils = mm, utils
    for name, mod in {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    FakeProgressBar.updates = []
    return import_pack(), {"output": out, "loras": loras, "root": tmp_path}


@pytest.fixture(scope="session")
def pack():
    return import_pack()


def shared_path(*parts):
    p = os.path.join(SHARED, *parts)
    if not os.path.exists(p):
        pytest.skip(f"../shared/{'/'.join(parts)} is not present on this machine")
    return p
