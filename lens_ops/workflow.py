"""ComfyUI workflow files: API-format prompts (what /prompt takes) and the UI format (what the editor
saves), with the one conversion the project needs (UI → API, from node definitions) and the
substitutions `lora-lens queue` / `lora-lens batch` make (one LoRA file per prompt, --set NODE.INPUT=VALUE).
"""
from __future__ import annotations

import copy
import glob
import json
import os

from .errors import LensError

LORA_EXTS = (".safetensors",)
NON_EXECUTED = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
SOCKET_TYPES_WITH_WIDGET = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def load_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LensError(f"Workflow file {path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise LensError(f"Workflow file {path} is not JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(data, dict):
        raise LensError(f"Workflow file {path} is not a JSON object.")
    return data


def api_prompt(data: dict, path: str = "workflow") -> dict:
    """Validate an API-format prompt ({id: {class_type, inputs}}); refuse UI files with a hint."""
    if "nodes" in data and "links" in data:
        raise LensError(f"{path} is a UI-format workflow; export it with 'Export (API)' or use the file in "
                        "example_workflows/api/.")
    for nid, node in data.items():
        if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs", {}), dict):
            raise LensError(f"{path}: node {nid!r} is not an API-format node (needs class_type and inputs).")
    return data


def parse_value(text: str):
    """--set values: JSON when it parses (numbers, true/false, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: list[str] | None) -> list[tuple[str, str, object]]:
    out = []
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise LensError(f"--set {item!r} must look like NODE.INPUT=VALUE (NODE is a node id or class name).")
        target, value = item.split("=", 1)
        node, inp = target.split(".", 1)
        out.append((node, inp, parse_value(value)))
    return out


def apply_sets(prompt: dict, sets) -> dict:
    prompt = copy.deepcopy(prompt)
    for node, inp, value in sets:
        ids = [nid for nid, n in prompt.items() if nid == node or n["class_type"] == node
               or n.get("_meta", {}).get("title") == node]
        if not ids:
            raise LensError(f"--set names node {node!r}, which is not in the workflow (ids: {', '.join(prompt)}).")
        for nid in ids:
            prompt[nid]["inputs"][inp] = value
    return prompt


def lora_inputs(prompt: dict, explicit: str | None = None) -> list[tuple[str, str]]:
    """Where a LoRA file name goes: --lora-input NODE.INPUT, else every `lora_name` input."""
    if explicit:
        node, inp = explicit.split(".", 1)
        found = [(nid, inp) for nid, n in prompt.items() if nid == node or n["class_type"] == node]
    else:
        found = [(nid, "lora_name") for nid, n in prompt.items() if "lora_name" in n.get("inputs", {})
                 and not isinstance(n["inputs"]["lora_name"], list)]
    if not found:
        raise LensError("The workflow has no input to put a LoRA file into (no 'lora_name' input); "
                        "name one with --lora-input NODE.INPUT.")
    return found


def expand_over(pattern: str) -> tuple[list[str], str]:
    """(LoRA files, their root): a folder (recursively) or a glob, sorted."""
    if os.path.isdir(pattern):
        root = os.path.abspath(pattern)
        files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(LORA_EXTS)]
    else:
        files = [os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if p.lower().endswith(LORA_EXTS)]
        root = os.path.commonpath([os.path.dirname(f) for f in files]) if files else os.getcwd()
    if not files:
        raise LensError(f"No .safetensors files found in {pattern}.")
    return sorted(files), root


def job_prompt(prompt: dict, targets: list[tuple[str, str]], lora_name: str) -> dict:
    p = copy.deepcopy(prompt)
    for nid, inp in targets:
        p[nid]["inputs"][inp] = lora_name
    return p


# ---------------------------------------------------------------------------------- UI -> API
def _widget_inputs(info: dict) -> list[tuple[str, bool]]:
    """(input name, has control_after_generate) for inputs shown as widgets, in widget order."""
    out = []
    for section in ("required", "optional"):
        for name, decl in info.get("input", {}).get(section, {}).items():
            kind = decl[0]
            opts = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
            if isinstance(kind, list) or kind in SOCKET_TYPES_WITH_WIDGET or kind == "COMBO":
                if opts.get("forceInput"):
                    continue
                ctrl = bool(opts.get("control_after_generate")) or (kind == "INT" and name in ("seed", "noise_seed"))
                out.append((name, ctrl))
    return out


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API prompt using node definitions (/object_info shape)."""
    links = {l[0]: l for l in ui.get("links", [])}
    prompt = {}
    for node in ui["nodes"]:
        ntype = node["type"]
        if ntype in NON_EXECUTED or node.get("mode", 0) in (2, 4):
            continue
        if ntype not in object_info:
            raise LensError(f"Workflow node {node['id']} uses {ntype!r}, which no loaded node pack defines.")
        inputs = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            inputs.update(node["widgets_values"])
            values = []
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, ctrl in _widget_inputs(object_info[ntype]):
            if not values:
                break
            v = values.pop(0)
            if ctrl and values:
                values.pop(0)
            if name not in linked:
                inputs[name] = v
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or object_info[ntype].get("display_name", ntype)}}
    return prompt


def check_prompt(prompt: dict, object_info: dict) -> list[str]:
    """Problems of an API prompt against node definitions: unknown nodes/inputs, bad widget values,
    missing required inputs, links to missing nodes or outputs."""
    problems = []
    for nid, node in prompt.items():
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"node {nid}: unknown node type {node['class_type']}")
            continue
        decls = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in info["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"node {nid} ({node['class_type']}): required input {name} missing")
        for name, value in node["inputs"].items():
            if name not in decls:
                problems.append(f"node {nid} ({node['class_type']}): no input named {name}")
                continue
            kind = decls[name][0]
            opts = decls[name][1] if len(decls[name]) > 1 and isinstance(decls[name][1], dict) else {}
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], str):
                src = prompt.get(value[0])
                if src is None:
                    problems.append(f"node {nid}: input {name} links to missing node {value[0]}")
                else:
                    outs = object_info.get(src["class_type"], {}).get("output", [])
                    if value[1] >= len(outs):
                        problems.append(f"node {nid}: input {name} links to output {value[1]} of {src['class_type']}, "
                                        f"which has {len(outs)}")
                    elif kind not in ("*",) and not isinstance(kind, list) and outs[value[1]] != kind and kind != "COMBO":
                        problems.append(f"node {nid}: input {name} expects {kind} but gets {outs[value[1]]}")
                continue
            if isinstance(kind, list):
                if value not in kind and kind:
                    problems.append(f"node {nid}: {name}={value!r} is not one of its choices")
            elif kind == "COMBO":
                choices = opts.get("options", [])
                if choices and value not in choices:
                    problems.append(f"node {nid}: {name}={value!r} is not one of its choices")
            elif kind == "INT" or kind == "FLOAT":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    problems.append(f"node {nid}: {name} must be a number")
                elif ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
                    problems.append(f"node {nid}: {name}={value} is outside [{opts.get('min')}, {opts.get('max')}]")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"node {nid}: {name} must be true/false")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"node {nid}: {name} must be a string")
    return problems
