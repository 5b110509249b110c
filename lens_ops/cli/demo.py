"""`lora-lens demo`: make a realistic SDXL sample LoRA and run every engine step on it, saying what it did.

Each command module may define `demo(ctx)`; they run in their ORDER after the sample is made.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

NAME = "demo"
ORDER = 1
HELP = "make a realistic sample SDXL LoRA and run every step of the engine on it"


def add_arguments(p):
    p.add_argument("--out", default=None, help="folder for the sample and results (default: a temp folder)")
    p.add_argument("--rank", type=int, default=32, help="rank of the sample LoRA (default 32)")
    p.add_argument("--layout", default="sdxl_kohya", help="key layout of the sample (default sdxl_kohya)")


class DemoContext:
    def __init__(self, out: str, sample: str, device):
        self.out = out
        self.sample = sample
        self.device = device

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def say(self, step: str, text: str) -> None:
        print(f"\n== {step} ==\n{text}", flush=True)


def roundtrip_step(ctx: DemoContext) -> None:
    """Load → save → compare: untouched LoRAs write back bit for bit; ΔW equals a float64 reference."""
    from ..model import LoRAModel
    model = LoRAModel.load(ctx.sample)
    out = model.save(ctx.path("sample_roundtrip.safetensors"))
    same = open(ctx.sample, "rb").read() == open(out, "rb").read()
    m = next(x for x in model.modules if x.lowrank() is not None)
    up, down = m.tensors["up"].double().flatten(1), m.tensors["down"].double().flatten(1)
    ref = (m.alpha / down.shape[0]) * (up @ down)
    err = (m.delta(torch.float64).reshape(ref.shape) - ref).norm() / ref.norm()
    ctx.say("round trip", f"saved {os.path.basename(out)}: {'bit-identical to the input' if same else 'DIFFERENT bytes'}\n"
                          f"ΔW of {m.name}: relative error vs float64 reference {err:.2e}")


def run(args) -> int:
    from ..synth import make_lora
    from ..st_io import atomic_save
    from . import command_modules
    out = args.out or tempfile.mkdtemp(prefix="lora-lens-demo-")
    os.makedirs(out, exist_ok=True)
    t = time.time()
    sd = make_lora(args.layout, rank=args.rank, seed=1234)
    sample = atomic_save(sd, os.path.join(out, f"sample_{args.layout}_r{args.rank}.safetensors"), sd.metadata)
    ctx = DemoContext(out, sample, args.device)
    ctx.say("sample", f"made {os.path.basename(sample)} ({os.path.getsize(sample) / 2**20:.1f} MiB, "
                      f"{len(sd)} tensors, real {args.layout} key layout, decaying spectra) in {time.time() - t:.1f}s")
    roundtrip_step(ctx)
    for mod in command_modules():
        if hasattr(mod, "demo") and mod.NAME != NAME:
            t = time.time()
            mod.demo(ctx)
            print(f"({mod.NAME}: {time.time() - t:.1f}s)")
    print(f"\nAll outputs are in {out}")
    return 0
