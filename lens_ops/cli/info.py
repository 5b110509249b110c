"""`lora-lens info FILE`: what a LoRA is (architecture, format, precision, modules, rank, metadata)."""
from __future__ import annotations

import json
import os

from ..model import LoRAModel
from ..summary import format_summary, summarize

NAME = "info"
USES_DEVICE = False
ORDER = 10
HELP = "print a short summary of a LoRA file"


def add_arguments(p):
    p.add_argument("file", help="a LoRA .safetensors file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    model = LoRAModel.load(args.file)
    s = summarize(model, os.path.getsize(args.file))
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def demo(ctx):
    """Load the sample and print its summary (the first demo step)."""
    model = LoRAModel.load(ctx.sample)
    ctx.say("info", format_summary(summarize(model, os.path.getsize(ctx.sample))))
