"""`lora-lens extract DB [ENTRY...] -o DIR`: entries back as standard .safetensors, verified."""
from __future__ import annotations

import os
import sys

from ..errors import LensError
from ..progress import Bar

NAME = "extract"
USES_DEVICE = False
ORDER = 62
HELP = "extract entries of a .loradb collection as .safetensors files (all when no ENTRY is given)"


def add_arguments(p):
    p.add_argument("db", metavar="DB", help="a .loradb file (ours or the LoRA Lens app's v1.0)")
    p.add_argument("entries", nargs="*", metavar="ENTRY", help="entry names (default: all)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the extracted files")
    p.add_argument("--overwrite", action="store_true", help="replace files that already exist in DIR")


def run(args) -> int:
    if "numpy" not in sys.modules:
        # numpy (imported to rebuild lossless entries) starts OpenBLAS's worker threads, which spin on the
        # CPU for a while; this command never uses BLAS (measured: ~50 ms of CPU taken from the decoding
        # on a 2-core machine). A user's own setting wins.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ..loradb import open_collection
    with open_collection(args.db) as c:
        res = c.extract_to(args.output, args.entries or None, progress=Bar("extract"), overwrite=args.overwrite)
        legacy = bool(c.legacy)
    for w in res["written"]:
        note = "bit-identical to the packed file (sha256)" if w["lossless"] else \
            ("lossy source (app v1.0 deltas)" if legacy else "lossy entry, equal to what was recorded (sha256)")
        print(f"{w['path']}  {w['bytes'] / 2**20:.2f} MiB  {note}")
    if res["damaged"] and all(d.get("exists") or d.get("write") for d in res["damaged"]):
        names = ", ".join(repr(d["name"]) for d in res["damaged"])
        ok = f"; the other {len(res['written'])} entries were extracted" if res["written"] else ""
        hint = " (or pass --overwrite)" if res["damaged"][0].get("exists") else ""
        raise LensError(f"Entr{'y' if len(res['damaged']) == 1 else 'ies'} {names} not extracted: "
                        f"{res['damaged'][0]['error'].rstrip('.')}{hint}{ok}.")
    if res["damaged"]:
        res["damaged"].sort(key=lambda d: bool(d.get("exists") or d.get("write")))   # real damage first
        names = ", ".join(repr(d["name"]) for d in res["damaged"])
        first = res["damaged"][0]["error"].rstrip(".")
        ok = f"; the other {len(res['written'])} entries were extracted" if res["written"] else ""
        raise LensError(f"Damaged entr{'y' if len(res['damaged']) == 1 else 'ies'} {names} not extracted "
                        f"({first}){ok}.")
    return 0
