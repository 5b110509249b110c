"""`lora-lens list DB`: what a .loradb collection holds (ours or the LoRA Lens app's v1.0)."""
from __future__ import annotations

NAME = "list"
USES_DEVICE = False
ORDER = 61
HELP = "list the entries of a .loradb collection"


def add_arguments(p):
    p.add_argument("db", metavar="DB", help="a .loradb file")
    p.add_argument("--json", action="store_true", help="print the collection header as JSON")


def show(v, keep_newlines: bool = False) -> str:
    """Text from a collection header (a stranger's file) made safe to print: any value becomes text, and
    control/format characters (terminal escape sequences, bidi overrides) are shown as escapes."""
    import unicodedata
    s = v if isinstance(v, str) else ("" if v is None else str(v))
    return "".join(c if (c == "\n" and keep_newlines) or unicodedata.category(c) not in
                   ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") else repr(c)[1:-1] for c in s)


def words(v) -> list[str]:
    """A list of words from a header field that should be one (a string counts as one word)."""
    if isinstance(v, str):
        return [v] if v else []
    return [show(x) for x in v] if isinstance(v, list) else []


def mib(v) -> float:
    return v / 2**20 if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e30 else 0.0


def format_listing(c) -> str:
    coll = c.collection if isinstance(c.collection, dict) else {}
    lines = [f"Collection: {show(coll.get('name')) or '(unnamed)'}"
             + (f" by {show(coll['creator'])}" if coll.get("creator") else "")
             + (" [LoRA Lens app v1.0 file: lossy source]" if c.legacy else "")]
    if coll.get("description"):
        lines.append(f"Description: {show(coll['description'], keep_newlines=True)}")
    if words(coll.get("tags")):
        lines.append("Tags: " + ", ".join(map(show, words(coll["tags"]))))
    if coll.get("created"):
        lines.append(f"Created: {show(coll['created'])}")
    lines.append(f"{'name':32s} {'file':36s} {'arch':8s} {'rank':>5s} {'dtype':6s} {'original':>9s} {'stored':>9s}  kind")
    for e in c.entries:
        err = e.get("error") if isinstance(e.get("error"), dict) else {}
        snr = err.get("snr_db")
        exact = snr is None and err.get("rel_error") == 0   # lossy layers that changed nothing (SNR ∞)
        kind = "lossless" if e.get("lossless") else "lossy" + (
            f" (ΔW SNR {snr:.1f} dB)" if isinstance(snr, (int, float)) and not isinstance(snr, bool)
            else " (ΔW SNR ∞: unchanged)" if exact else "")
        trig = words(e.get("trigger_words"))
        lines.append(f"{show(e.get('name'))[:32]:32s} {show(e.get('file_name'))[:36]:36s} "
                     f"{show(e.get('architecture'))[:8]:8s} {show(e.get('rank'))[:5]:>5s} {show(e.get('dtype'))[:6]:6s} "
                     f"{mib(e.get('original_bytes')):8.2f}M {mib(e.get('stored_bytes')):8.2f}M  {kind}"
                     + (f"  triggers: {', '.join(trig[:5])}" if trig else ""))
    for w in c.warnings:
        lines.append(f"warning: {show(w)}")
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
