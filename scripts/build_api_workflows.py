"""Generate example_workflows/api/<name>.json from each UI workflow example_workflows/<name>.json.

The UI file is the one source; its API twin is always derived here (never edited by hand).
Usage: python scripts/build_api_workflows.py [--check]   (--check: fail if an API file is stale)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lens_ops.workflow import ui_to_api  # noqa: E402
from scripts.workflow_defs import ROOT, all_object_info  # noqa: E402

WF_DIR = os.path.join(ROOT, "example_workflows")


def ui_files() -> list[str]:
    return sorted(f for f in glob.glob(os.path.join(WF_DIR, "*.json")) if not f.endswith("core_nodes.json"))


def lora_names_in(ui: dict) -> list[str]:
    names = []
    for node in ui["nodes"]:
        for v in node.get("widgets_values") or []:
            if isinstance(v, str) and v.endswith(".safetensors"):
                names.append(v)
    return names


def build(check: bool = False) -> int:
    stale = []
    files = ui_files()
    all_names = sorted({n for f in files for n in lora_names_in(json.load(open(f)))}) or ["example.safetensors"]
    info = all_object_info(all_names)
    os.makedirs(os.path.join(WF_DIR, "api"), exist_ok=True)
    for f in files:
        api = ui_to_api(json.load(open(f)), info)
        text = json.dumps(api, indent=2) + "\n"
        out = os.path.join(WF_DIR, "api", os.path.basename(f))
        if check:
            if not os.path.exists(out) or open(out).read() != text:
                stale.append(os.path.basename(f))
        else:
            with open(out, "w") as g:
                g.write(text)
    if stale:
        print("stale API workflows (run scripts/build_api_workflows.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    sys.exit(build(ap.parse_args().check))
