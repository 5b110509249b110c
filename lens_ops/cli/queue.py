"""`lora-lens queue`: one prompt per LoRA through the ComfyUI API, spread over servers by queue length."""
from __future__ import annotations

import json
import os

from ..comfy_api import ComfyClient
from ..errors import LensError
from ..progress import Bar
from ..queue_runner import Job, QueueRunner
from ..workflow import api_prompt, apply_sets, expand_over, job_prompt, load_json, lora_inputs, parse_sets

NAME = "queue"
USES_DEVICE = False
ORDER = 80
HELP = "queue a workflow once per LoRA on one or more ComfyUI servers"


def add_arguments(p):
    p.add_argument("--server", action="append", required=True, metavar="URL",
                   help="ComfyUI server URL (repeat for several servers)")
    p.add_argument("--workflow", required=True, help="API-format workflow JSON (example_workflows/api/*.json)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set an input of a node (node id, class name or title); repeatable")
    p.add_argument("--over", required=True, metavar="FOLDER_OR_GLOB",
                   help="LoRA files, one prompt each; they must be in (a subfolder of) the servers' loras folder")
    p.add_argument("--lora-input", default=None, metavar="NODE.INPUT",
                   help="input that receives the LoRA name (default: every lora_name input)")
    p.add_argument("--names-relative-to", default=None, metavar="DIR",
                   help="folder the servers list LoRA names relative to (default: the --over folder)")
    p.add_argument("--summary", default="lora-lens-queue-summary.json", help="where to write the JSON summary")
    p.add_argument("--per-server", type=int, default=2, help="prompts of ours waiting per server at most")
    p.add_argument("--retries", type=int, default=2, help="re-sends of a prompt whose server went away")


def build_jobs(args) -> list[Job]:
    prompt = apply_sets(api_prompt(load_json(args.workflow), args.workflow), parse_sets(args.set))
    targets = lora_inputs(prompt, args.lora_input)
    files, root = expand_over(args.over)
    root = os.path.abspath(args.names_relative_to or root)
    jobs = []
    for f in files:
        name = os.path.relpath(f, root).replace(os.sep, "/")
        if name.startswith(".."):
            raise LensError(f"{f} is not under {root}; pass --names-relative-to with the servers' loras folder.")
        jobs.append(Job(name, job_prompt(prompt, targets, name)))
    return jobs


def write_summary(path: str, jobs: list[Job]) -> None:
    data = {"total": len(jobs), "succeeded": sum(j.status == "success" for j in jobs),
            "failed": sum(j.status == "error" for j in jobs), "cancelled": sum(j.status == "cancelled" for j in jobs),
            "jobs": [j.summary() for j in jobs]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def print_table(jobs: list[Job]) -> None:
    for j in jobs:
        extra = ", ".join(j.files) if j.status == "success" else (j.error or "")
        print(f"{j.status:9} {j.name}  [{j.server or '-'}]  {extra}")


def run(args) -> int:
    jobs = build_jobs(args)
    runner = QueueRunner([ComfyClient(u) for u in args.server], jobs, per_server=args.per_server,
                         retries=args.retries, progress=Bar(f"queue {len(jobs)} LoRAs"))
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.cancel()
        write_summary(args.summary, jobs)
        print_table(jobs)
        raise
    write_summary(args.summary, jobs)
    print_table(jobs)
    ok = sum(j.status == "success" for j in jobs)
    print(f"{ok}/{len(jobs)} succeeded; summary written to {args.summary}")
    return 0 if ok == len(jobs) else 1
