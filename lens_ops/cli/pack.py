"""`lora-lens pack -o OUT.loradb FILES...`: many LoRAs in one small, safe .loradb collection."""
from __future__ import annotations

import os

from ..errors import LensError
from ..progress import Bar

NAME = "pack"
ORDER = 60
HELP = "pack LoRA files into one .loradb collection (lossless unless --recipe/--int8/--shared-basis)"


def add_arguments(p):
    p.add_argument("files", nargs="+", metavar="FILES", help="LoRA .safetensors files to pack")
    p.add_argument("-o", "--output", required=True, metavar="OUT.loradb", help="the .loradb file to write")
    p.add_argument("--name", default="", help="collection name (default: the output file's name)")
    p.add_argument("--creator", default="", help="collection creator")
    p.add_argument("--description", default="", help="collection description")
    p.add_argument("--tag", action="append", default=[], help="a tag (repeat for more)")
    p.add_argument("--recipe", default=None, metavar="R", help="prune every LoRA with this PruneRank recipe first (lossy)")
    p.add_argument("--int8", action="store_true",
                   help="store every module as int8 quantised-coefficient codes, entropy coded at the --snr budget "
                        "(lossy; the smallest; entries extract as fp16 LoRAs equal to what was recorded)")
    p.add_argument("--int8-folded", action="store_true",
                   help="store each LoRA as QuantizeInt8 writes it: int8 factors with their scales folded into "
                        "alpha (lossy; entries extract as exactly those int8 files, which stock ComfyUI loads)")
    p.add_argument("--shared-basis", choices=["auto", "on", "off"], default="off",
                   help="code related LoRAs on one shared basis per module (lossy; auto: only where it saves "
                        "bytes at the error budget)")
    p.add_argument("--snr", type=float, default=35.0, help="error budget for lossy layers: ΔW SNR in dB per LoRA (default 35)")
    p.add_argument("--level", type=int, default=None, help="zstd level for the byte planes (default 3, measured best)")
    p.add_argument("--no-dedup", action="store_true", help="do not de-duplicate identical tensors")
    p.add_argument("--append", action="store_true", help="add FILES to the existing OUT.loradb in place (lossless)")
    p.add_argument("--remove", action="store_true", help="remove the entries named by FILES from OUT.loradb (header only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def format_report(rep: dict) -> str:
    from .list import mib, show, words   # (names and records may come from a stranger's file: convert)
    lines = [f"{'entry':40s} {'original':>10s} {'stored':>10s} {'ratio':>7s}  layers / error"]
    for e in rep["entries"]:
        err = e.get("error") if isinstance(e.get("error"), dict) else {}
        note = ", ".join(words(e.get("layers")))
        if err:
            def db(k):   # None: no error at all
                v = err.get(k)
                return "∞" if v is None else f"{v:.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) \
                    else "?"
            note += f"; ΔW SNR {db('snr_db')} dB (worst module {db('worst_module_snr_db')} dB)"
        ratio = e["ratio"] if isinstance(e.get("ratio"), float) else 0.0
        lines.append(f"{show(e['name'])[:40]:40s} {mib(e['original_bytes']):9.2f}M "
                     f"{mib(e['stored_bytes']):9.2f}M {ratio:7.3f}  {note}")
    n = len(rep["entries"])
    if not rep["original_bytes"]:   # an empty collection (every entry removed): no ratio to speak of
        lines.append(f"{n} entr{'y' if n == 1 else 'ies'}, {rep['loradb_bytes'] / 2**20:.2f} MiB in {rep['path']}")
    else:
        lines.append(f"{n} entr{'y' if n == 1 else 'ies'}: {rep['original_bytes'] / 2**20:.2f} MiB -> "
                     f"{rep['loradb_bytes'] / 2**20:.2f} MiB ({rep['reduction_percent']:.1f} % smaller) in {rep['path']}")
    return "\n".join(lines)


def run(args) -> int:
    import json
    from ..loradb import append, pack, remove
    from ..loradb.spec import DEFAULT_LEVEL
    level = args.level or DEFAULT_LEVEL
    if not 0.0 < args.snr < float("inf"):   # also refuses nan
        raise LensError(f"--snr {args.snr} is not an error budget; give a finite number of dB, e.g. --snr 35.")
    if args.remove:
        rep = remove(args.output, args.files)
    elif args.append:
        if args.recipe or args.int8 or args.int8_folded or args.shared_basis != "off":
            raise LensError("--append adds entries losslessly; lossy options need a new collection.")
        rep = append(args.output, args.files, level=level, progress=Bar("append"))
    else:
        if os.path.exists(args.output):
            raise LensError(f"{args.output} already exists; use --append to add to it or choose another name.")
        rep = pack(args.output, args.files, name=args.name, creator=args.creator, description=args.description,
                   tags=args.tag, recipe=args.recipe, int8=args.int8, shared_basis=args.shared_basis,
                   dedup=not args.no_dedup, level=level, snr_db=args.snr, device=args.device,
                   progress=Bar("pack"), int8_folded=args.int8_folded)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0


def demo(ctx):
    """Pack the sample with two related variants, list, extract one and check it is bit-identical."""
    import torch
    from ..loradb import open_collection, pack
    from ..model import LoRAModel
    base = LoRAModel.load(ctx.sample)
    files = [ctx.sample]
    for i in (1, 2):   # later checkpoints of one run: same down factors, drifting up factors
        g = torch.Generator().manual_seed(i)
        new = {m.name: m.with_tensors({**m.tensors, "up": (m.tensors["up"].float() * (1 + 0.1 * i) + 0.002 *
                                        torch.randn(m.tensors["up"].shape, generator=g)).to(m.tensors["up"].dtype)})
               for m in base.modules if "up" in m.tensors}
        files.append(base.replace_modules(new).save(ctx.path(f"sample_step{i}.safetensors")))
    out = ctx.path("sample_collection.loradb")
    if os.path.exists(out):
        os.unlink(out)
    rep = pack(out, files, name="Demo pack", creator="lora-lens demo", tags=["demo"], device=ctx.device)
    with open_collection(out) as c:
        res = c.extract_to(ctx.path("extracted"), [c.entries[1]["name"]], overwrite=True)
    same = open(res["written"][0]["path"], "rb").read() == open(files[1], "rb").read()
    ctx.say("pack (.loradb)", format_report(rep) + f"\nextracted {os.path.basename(res['written'][0]['path'])}: "
            f"{'bit-identical to the original' if same else 'DIFFERENT bytes'}")
