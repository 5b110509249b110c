"""`lora-lens convert OLD.loradb NEW.loradb`: rewrite a .loradb (the app's v1.0, or ours compacted)."""
from __future__ import annotations

import os

from ..errors import LensError
from ..progress import Bar

NAME = "convert"
USES_DEVICE = False
ORDER = 63
HELP = "rewrite a .loradb in LoRA Lens's format (reads the LoRA Lens app's v1.0 files; drops removed entries' bytes)"


def add_arguments(p):
    p.add_argument("old", metavar="OLD.loradb", help="the collection to read")
    p.add_argument("new", metavar="NEW.loradb", help="the collection to write (must not exist)")


def run(args) -> int:
    from ..loradb import convert
    from .pack import format_report
    if os.path.exists(args.new):
        raise LensError(f"{args.new} already exists; choose another name.")
    print(format_report(convert(args.old, args.new, progress=Bar("convert"))))
    return 0
