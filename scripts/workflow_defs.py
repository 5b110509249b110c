"""Node definitions in /object_info shape for workflow tooling: the pack's own nodes (read from their
classes, without ComfyUI) plus a stored snapshot of the few core ComfyUI nodes the examples use."""
from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lens_ops.cli.batch import load_pack  # noqa: E402  (the one place that imports the pack by path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_SNAPSHOT = os.path.join(ROOT, "scripts", "core_nodes.json")


def _plain(value):
    """INPUT_TYPES declarations as JSON (what /object_info sends)."""
    return json.loads(json.dumps(value, default=str))


def pack_object_info(lora_names=("example.safetensors",)) -> dict:
    """/object_info entries of the pack's nodes, with a loras folder holding `lora_names`."""
    pack, runtime = load_pack()
    tmp = tempfile.mkdtemp(prefix="lens-defs-")
    loras = os.path.join(tmp, "loras")
    os.makedirs(os.path.join(tmp, "loradb"), exist_ok=True)
    for n in lora_names:
        os.makedirs(os.path.dirname(os.path.join(loras, n)), exist_ok=True)
        open(os.path.join(loras, n), "wb").close()
    info = {}
    with runtime.comfy_standins({"loras": loras, "loradb": os.path.join(tmp, "loradb")}, tmp):
        for name, cls in pack.NODE_CLASS_MAPPINGS.items():
            info[name] = {
                "input": _plain(cls.INPUT_TYPES()),
                "output": list(cls.RETURN_TYPES),
                "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
                "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
                "name": name,
                "display_name": pack.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                "category": cls.CATEGORY,
                "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
            }
    return info


def core_object_info() -> dict:
    with open(CORE_SNAPSHOT) as f:
        return json.load(f)


def all_object_info(lora_names=("example.safetensors",)) -> dict:
    return {**core_object_info(), **pack_object_info(lora_names)}
