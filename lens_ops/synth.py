"""Realistic synthetic LoRAs from real trainer key layouts (names, shapes, dtypes as trainers write them).

The layouts in `layouts/` were taken from the trainers' own module-selection code (kohya sd-scripts,
LyCORIS, ai-toolkit, diffusers/PEFT). Factors follow what trained LoRAs look like: `down` stays near its
kaiming-uniform init, `up` carries the structure, and ΔW = up@down has a decaying singular spectrum
s_i = exp(-i/k)·(1+i)^-p with a per-module effective rank k. Never zeros, never flat noise only.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from functools import lru_cache

import torch

from .model import LoraStateDict

LAYOUT_DIR = os.path.join(os.path.dirname(__file__), "layouts")


def layout_names() -> list[str]:
    return sorted(f[: -len(".json.gz")] for f in os.listdir(LAYOUT_DIR) if f.endswith(".json.gz"))


@lru_cache(maxsize=None)
def load_layout(name: str) -> dict:
    path = os.path.join(LAYOUT_DIR, name + ".json.gz")
    if not os.path.exists(path):
        raise ValueError(f"unknown layout {name!r}; choose one of {', '.join(layout_names())}")
    with gzip.open(path, "rt") as f:
        return json.load(f)


def spectrum_factors(out_f: int, in_f: int, rank: int, gen: torch.Generator, eff_rank: float,
                     decay: float, magnitude: float, noise: float = 0.02):
    """(up [out,r], down [r,in]) in float32 with ΔW = up@down having a decaying spectrum."""
    r = min(rank, out_f, in_f)
    bound = 1.0 / math.sqrt(in_f)
    down = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
    i = torch.arange(r, dtype=torch.float32)
    s = torch.exp(-i / max(eff_rank, 0.5)) * (1 + i) ** -decay
    u, _ = torch.linalg.qr(torch.randn(out_f, r, generator=gen))
    # down[:r]^T = Q R  ->  up = U diag(s) R^-T makes up @ down[:r] = U diag(s) Q^T
    q, rr = torch.linalg.qr(down[:r].T)
    up_r = torch.linalg.solve_triangular(rr, (u * s).T, upper=True).T
    up = torch.zeros(out_f, rank)
    up[:, :r] = up_r
    up = up + noise * s[0] * torch.randn(out_f, rank, generator=gen) * up_r.abs().mean() / max(s[0].item(), 1e-12)
    scale = magnitude / (up.pow(2).mean().sqrt().item() + 1e-12)
    return up * scale, down


def make_lora(layout: str = "sdxl_kohya", rank: int = 32, alpha: float | None = None,
              dtype: torch.dtype = torch.float16, seed: int = 0, eff_rank_median: float | None = None,
              dead_frac: float = 0.0, max_modules: int | None = None, metadata: bool = True,
              name_filter=None) -> LoraStateDict:
    """A LoRA state dict in the layout's exact key names, shapes and order."""
    lay = load_layout(layout)
    gen = torch.Generator().manual_seed(seed)
    peft = lay["format"] == "peft"
    alpha = (rank if peft else (alpha if alpha is not None else rank / 2))
    eff_median = eff_rank_median or max(rank / 4, 1.0)
    state = LoraStateDict()
    mods = lay["modules"]
    if name_filter is not None:
        mods = [m for m in mods if name_filter(m[0])]
    if max_modules is not None:
        mods = mods[:max_modules]
    for entry in mods:
        name, comp, out_f, in_f = entry[:4]
        kernel = tuple(entry[4:6]) if len(entry) > 4 else ()
        fan_in = in_f * (math.prod(kernel) if kernel else 1)
        eff = eff_median * math.exp(0.5 * torch.randn(1, generator=gen).item())
        decay = 0.3 + 0.4 * torch.rand(1, generator=gen).item()
        mag = (0.002 if comp.startswith("te") else 0.004) * math.exp(0.4 * torch.randn(1, generator=gen).item())
        up, down = spectrum_factors(out_f, fan_in, rank, gen, eff, decay, mag)
        if dead_frac and torch.rand(1, generator=gen).item() < dead_frac:
            up.zero_()
        if kernel:
            down = down.reshape(rank, in_f, *kernel)
            up = up.reshape(out_f, rank, 1, 1)
        for suf in lay["key_suffixes"]:
            if suf == ".alpha":
                state[name + suf] = torch.tensor(float(alpha)).to(dtype)
            elif suf in (".lora_down.weight", ".lora_A.weight"):
                state[name + suf] = down.to(dtype)
            else:
                state[name + suf] = up.to(dtype)
    if metadata:
        meta = {k: v for k, v in lay["metadata_template"].items() if not str(v).startswith("<computed")}
        if "ss_network_dim" in meta:
            meta["ss_network_dim"] = str(rank)
            meta["ss_network_alpha"] = str(float(alpha))
        state.metadata = meta
    return state
