"""`lora-lens batch`: what `lora-lens queue` does, in this process without a server (LoRA Lens nodes only)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time

from ..errors import LensError
from ..progress import Bar
from ..queue_runner import Job
from .queue import build_jobs, print_table, write_summary

NAME = "batch"
ORDER = 81
HELP = "run a workflow once per LoRA in this process (no ComfyUI server needed)"


def add_arguments(p):
    p.add_argument("--workflow", required=True, help="API-format workflow JSON (example_workflows/api/*.json)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set an input of a node (node id, class name or title); repeatable")
    p.add_argument("--over", required=True, metavar="FOLDER_OR_GLOB", help="LoRA files, one run each")
    p.add_argument("--lora-input", default=None, metavar="NODE.INPUT",
                   help="input that receives the LoRA name (default: every lora_name input)")
    p.add_argument("--names-relative-to", default=None, metavar="DIR",
                   help="folder LoRA names are relative to (default: the --over folder)")
    p.add_argument("-o", "--output", default="lora-lens-batch-out", help="output folder (like ComfyUI's output/)")
    p.add_argument("--loradb-dir", default=None, help="folder for .loradb collections (default: OUTPUT/loradb)")
    p.add_argument("--summary", default=None, help="JSON summary path (default: OUTPUT/summary.json)")


def load_pack():
    """Import the node pack that ships beside this lens_ops (a checkout or ComfyUI's custom_nodes)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isfile(os.path.join(root, "nodes", "_runtime.py")):
        raise LensError("`lora-lens batch` needs the LoRA Lens node pack beside lens_ops (run it from a checkout "
                        "or the ComfyUI custom_nodes folder), or use `lora-lens queue` with a server.")
    name = "lora_lens_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name], importlib.import_module(f"{name}.nodes._runtime")


def run(args) -> int:
    jobs: list[Job] = build_jobs(args)
    files_root = os.path.abspath(args.names_relative_to or (args.over if os.path.isdir(args.over)
                                                             else os.path.dirname(args.over) or "."))
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    folders = {"loras": files_root, "loradb": os.path.abspath(args.loradb_dir or os.path.join(out, "loradb"))}
    os.makedirs(folders["loradb"], exist_ok=True)
    pack = runtime = None
    bar = Bar(f"batch {len(jobs)} LoRAs")
    for i, job in enumerate(jobs):
        t = time.monotonic()
        job.attempts, job.server = 1, "local"
        before = _files(out)
        try:
            if pack is None:
                pack, runtime = load_pack()
            with runtime.comfy_standins(folders, out, args.device):
                uis = runtime.execute(job.prompt, pack.NODE_CLASS_MAPPINGS)
            job.status = "success"
            for ui in uis.values():
                job.reports += [t for t in ui.get("text", []) if isinstance(t, str)]
            job.files = sorted(os.path.relpath(p, out) for p in _files(out) - before)
        except KeyboardInterrupt:
            job.status, job.error = "cancelled", "cancelled by the user"
            for j in jobs[i + 1:]:
                j.status, j.error = "cancelled", "cancelled by the user"
            write_summary(args.summary or os.path.join(out, "summary.json"), jobs)
            raise
        except Exception as e:  # one bad LoRA must not stop the batch; its error is in the summary
            if getattr(args, "debug", False):
                raise
            job.status, job.error = "error", str(e) or type(e).__name__
        job.seconds = round(time.monotonic() - t, 2)
        bar(i + 1, len(jobs))
    summary = args.summary or os.path.join(out, "summary.json")
    write_summary(summary, jobs)
    print_table(jobs)
    ok = sum(j.status == "success" for j in jobs)
    print(f"{ok}/{len(jobs)} succeeded; outputs in {out}; summary written to {summary}")
    return 0 if ok == len(jobs) else 1


def _files(out: str) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f != "summary.json"}
