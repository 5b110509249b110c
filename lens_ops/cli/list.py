"""`lora-lens list DB`: what a .loradb collection holds (ours or the LoRA Lens app's v1.0)."""
from __future__ import annotations

NAME = "list"
USES_DEVICE = False
ORDER = 61
HELP = "list the entries of a .loradb collection"


def add_arguments(p):
    p.add_argument("db", metavar="DB", help="a .loradb file")
    p.add_argument("--json", action="store_true", help="print the collection header as JSON")


def format_listing(c) -> str:
    coll = c.collection
    lines = [f"Collection: {coll.get('name') or '(unnamed)'}"
             + (f" by {coll['creator']}" if coll.get("creator") else "")
             + (" [LoRA Lens app v1.0 file: lossy source]" if c.legacy else "")]
    if coll.get("description"):
        lines.append(f"Description: {coll['description']}")
    if coll.get("tags"):
        lines.append("Tags: " + ", ".join(map(str, coll["tags"])))
    if coll.get("created"):
        lines.append(f"Created: {coll['created']}")
    lines.append(f"{'name':32s} {'file':36s} {'arch':8s} {'rank':>5s} {'dtype':6s} {'original':>9s} {'stored':>9s}  kind")
    for e in c.entries:
        err = e.get("error") or {}
        kind = "lossless" if e.get("lossless") else "lossy" + (f" (ΔW SNR {err['snr_db']:.1f} dB)"
                                                                 if isinstance(err.get("snr_db"), (int, float)) else "")
        lines.append(f"{str(e.get('name'))[:32]:32s} {str(e.get('file_name'))[:36]:36s} "
                     f"{str(e.get('architecture'))[:8]:8s} {str(e.get('rank')):>5s} {str(e.get('dtype'))[:6]:6s} "
                     f"{(e.get('original_bytes') or 0) / 2**20:8.2f}M {(e.get('stored_bytes') or 0) / 2**20:8.2f}M  {kind}"
                     + (f"  triggers: {', '.join(map(str, e['trigger_words'][:5]))}" if e.get("trigger_words") else ""))
    for w in c.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def run(args) -> int:
    import json
    from ..loradb import open_collection
    with open_collection(args.db) as c:
        if args.json:
            print(json.dumps({"collection": c.collection, "entries": [{k: v for k, v in e.items() if k != "table"}
                                                                      for e in c.entries]}, indent=2))
        else:
            print(format_listing(c))
    return 0
