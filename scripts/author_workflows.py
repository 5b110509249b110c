"""Write the UI-format example workflows from compact specs (widget values by input name, links by
output name), so widget order always matches the node definitions. Run it once per change of the specs,
then scripts/build_api_workflows.py derives the API twins.

Usage: python scripts/author_workflows.py
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lens_ops.workflow import SOCKET_TYPES_WITH_WIDGET  # noqa: E402
from scripts.workflow_defs import ROOT, all_object_info  # noqa: E402
from scripts.workflow_specs import WORKFLOWS  # noqa: E402

WF_DIR = os.path.join(ROOT, "example_workflows")


def _is_widget(decl) -> bool:
    kind = decl[0]
    opts = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
    return (isinstance(kind, list) or kind in SOCKET_TYPES_WITH_WIDGET or kind == "COMBO") and not opts.get("forceInput")


def build_ui(spec: dict, info: dict) -> dict:
    nodes, links = [], []
    by_id = {n["id"]: n for n in spec["nodes"]}
    out_links: dict[tuple[int, int], list[int]] = {}
    link_id = 0
    for order, n in enumerate(spec["nodes"]):
        d = info[n["type"]]
        decls = {**d["input"].get("required", {}), **d["input"].get("optional", {})}
        inputs, widgets = [], []
        for name, decl in decls.items():
            src = n.get("links", {}).get(name)
            if src is not None:
                src_id, out = src
                src_def = info[by_id[src_id]["type"]]
                slot = out if isinstance(out, int) else src_def["output_name"].index(out)
                link_id += 1
                typ = src_def["output"][slot]
                links.append([link_id, src_id, slot, n["id"], len(inputs), typ])
                out_links.setdefault((src_id, slot), []).append(link_id)
                entry = {"name": name, "type": typ if not isinstance(decl[0], list) else "COMBO", "link": link_id}
                if _is_widget(decl):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif not _is_widget(decl) and name in d["input"].get("required", {}):
                inputs.append({"name": name, "type": decl[0], "link": None})
            if _is_widget(decl):
                opts = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
                value = n.get("widgets", {}).get(name, opts.get("default", decl[0][0] if isinstance(decl[0], list) and decl[0] else None))
                widgets.append(value)
                if opts.get("control_after_generate") or (decl[0] == "INT" and name in ("seed", "noise_seed")):
                    widgets.append("fixed")
        nodes.append({"id": n["id"], "type": n["type"], "pos": list(n["pos"]), "size": list(n.get("size", (320, 160))),
                      "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                      "outputs": [], "properties": {"Node name for S&R": n["type"]}, "widgets_values": widgets,
                      **({"title": n["title"]} if n.get("title") else {})})
    for node in nodes:
        d = info[node["type"]]
        node["outputs"] = [{"name": nm, "type": t, "links": out_links.get((node["id"], i), []), "slot_index": i,
                            **({"shape": 6} if d.get("output_is_list", [False] * 99)[i] else {})}
                           for i, (nm, t) in enumerate(zip(d["output_name"], d["output"]))]
    next_id = max(n["id"] for n in spec["nodes"]) + 1
    for i, (text, pos, size) in enumerate(spec.get("notes", [])):
        nodes.append({"id": next_id + i, "type": "MarkdownNote", "pos": list(pos), "size": list(size), "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def main():
    names = sorted({w for s in WORKFLOWS for n in s["nodes"] for w in n.get("widgets", {}).values()
                    if isinstance(w, str) and w.endswith(".safetensors")}) or ["example.safetensors"]
    info = all_object_info(names)
    for spec in WORKFLOWS:
        ui = build_ui(spec, info)
        with open(os.path.join(WF_DIR, spec["name"] + ".json"), "w") as f:
            json.dump(ui, f, indent=1)
            f.write("\n")
        print("wrote", spec["name"])


if __name__ == "__main__":
    main()
