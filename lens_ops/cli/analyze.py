"""`lora-lens analyze FILE [--json]`: what is inside a LoRA — spectra, effective ranks, blocks, scores, findings.

With --json the JSON report (and only it) goes to stdout; `report["modules"][name]` holds each module's
numbers under the module's name as written in the file (rank, alpha, effective_rank_90/99/999,
singular_values, norms, statistics).
"""
from __future__ import annotations

import json
import os
import sys

from ..analysis import analyze, format_report, format_table, llm_text, render_heatmap
from ..model import LoRAModel
from ..progress import Bar

NAME = "analyze"
ORDER = 20
HELP = "analyse a LoRA: exact spectra, effective rank, block importance, scores and findings"


def add_arguments(p):
    p.add_argument("file", help="a LoRA .safetensors file")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON (only the JSON, on stdout)")
    p.add_argument("--table", type=int, default=0, metavar="N",
                   help="also print the N most energetic modules as a table (text output)")
    p.add_argument("--llm", action="store_true", help="print the LLM-ready text of the report instead")
    p.add_argument("--block-share", type=float, default=0.9,
                   help="share of ΔW energy for the smallest block set (default 0.9)")
    p.add_argument("--image", default=None, metavar="PNG", help="also write the spectrum heatmap as a PNG file")


def _write_png(path: str, img) -> None:
    import struct
    import zlib

    import numpy as np
    a = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def run(args) -> int:
    if not 0 < args.block_share <= 1:
        from ..errors import LensError
        raise LensError(f"--block-share must be in (0, 1], got {args.block_share}.")
    if args.image:
        from ..errors import LensError
        if os.path.exists(args.image) and os.path.exists(args.file) and os.path.samefile(args.image, args.file):
            raise LensError(f"Refusing to overwrite the input file {args.file} with the --image PNG; "
                            "choose another name.")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.image))):
            raise LensError(f"The folder of --image {args.image} does not exist.")
    model = LoRAModel.load(args.file)
    bar = Bar("analysing") if not args.json else None
    rep = analyze(model, device=args.device, progress=bar, block_share=args.block_share,
                  file_bytes=os.path.getsize(args.file))
    if args.image:
        _write_png(args.image, render_heatmap(rep))
    if args.json:
        sys.stdout.write(json.dumps(rep, ensure_ascii=False) + "\n")
    elif args.llm:
        print(llm_text(rep))
    else:
        print(format_report(rep))
        if args.table:
            print()
            print(format_table(rep, args.table))
    return 0


def demo(ctx):
    """Analyse the sample: scores, effective rank, findings, and the heatmap image."""
    model = LoRAModel.load(ctx.sample)
    rep = analyze(model, device=ctx.device, file_bytes=os.path.getsize(ctx.sample))
    png = ctx.path("sample_analysis.png")
    _write_png(png, render_heatmap(rep))
    with open(ctx.path("sample_analysis.json"), "w") as f:
        json.dump(rep, f)
    ctx.say("analyze", format_report(rep) + f"\n(report: sample_analysis.json, heatmap: {os.path.basename(png)}, "
                                             f"{rep['seconds']:.1f}s)")
