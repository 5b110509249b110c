"""One layer, two block vocabularies: translate module names between the SGM/ldm and diffusers UNet names of
SD 1.x/2.x/SDXL, between BFL and diffusers names of FLUX.1, and between MMDiT and diffusers names of SD3/SD3.5,
including fused ↔ split layers.

Every diffusion-model module is reduced to a `Piece`: the layer it changes, named in one canonical vocabulary
(SGM names for UNets, BFL names for FLUX), and which output rows of that layer it covers (`rows=None`: all of
them). A diffusers FLUX `to_q` is rows [0, h) of BFL `img_attn.qkv` (h = hidden size, 3072), `to_k` [h, 2h),
`to_v` [2h, 3h); in single blocks `to_q/to_k/to_v/proj_mlp` are rows [0,h), [h,2h), [2h,3h), [3h,7h) of
`linear1`. Since ΔW = s·B·A, the rows [r0, r1) of a fused module's change are exactly s·B[r0:r1]·A, so every
comparison and every blend stays on factors:

- `RowSlice(module, rows)`: the part of a fused module that one split module covers (B's rows sliced);
- `RowStack(parts, total)`: split modules assembled into the fused layer, B = block-diagonal by rows of the
  parts' s_p·B_p (zero rows where a part is absent), A = [A_p; …], so B·A is the fused ΔW exactly.

The UNet tables are generated from the block layout (res blocks per level, which levels hold attention and how
deep their transformers are), derived from the detected architecture: SD 1.x/2.x: 4 levels × 2 res blocks,
attention depth 1 on levels 0–2, middle depth 1; SDXL: 3 levels × 2 res blocks, attention depth 0/2/10,
middle depth 10. Facts checked against ComfyUI's `comfy/utils.py` (`unet_to_diffusers`, `flux_to_diffusers`, `mmdit_to_diffusers`)
and `comfy/supported_models.py`; the code here is our own.

Not mapped (and said so by the callers): other DiTs (HunyuanVideo, …), UNets of unknown layout, and the
adaLN layers whose shift/scale halves are swapped between the vocabularies (FLUX's and SD3's final
`norm_out.linear`, SD3's last `norm1_context.linear`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch

from ..keys import strip_prefix

# ---------------------------------------------------------------- UNet (SGM ↔ diffusers)

UNET_LAYOUTS = {
    # levels, res blocks per level, transformer depth per level, middle depth
    "sd1": (4, 2, (1, 1, 1, 0), 1),
    "sd2": (4, 2, (1, 1, 1, 0), 1),
    "sdxl": (3, 2, (0, 2, 10), 10),
}
RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
          ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
SPATIAL = ("norm", "proj_in", "proj_out")
TBLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
          "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
UNET_BASIC = (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
              ("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2"),
              ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"))
UNET_ALIASES = (("label_emb.0.0", "class_embedding.linear_1"), ("label_emb.0.2", "class_embedding.linear_2"))


def _attention(sgm: str, dif: str, depth: int):
    out = [(f"{sgm}.{s}", f"{dif}.{s}") for s in SPATIAL]
    for t in range(depth):
        out += [(f"{sgm}.transformer_blocks.{t}.{b}", f"{dif}.transformer_blocks.{t}.{b}") for b in TBLOCK]
    return out


@lru_cache(maxsize=None)
def unet_pairs(arch: str) -> tuple:
    """((sgm dotted path, diffusers dotted path), …) for every LoRA-targetable UNet layer of `arch`."""
    levels, res, depth, mid = UNET_LAYOUTS[arch]
    pairs = list(UNET_BASIC)
    n = 1
    for x in range(levels):
        for i in range(res):
            pairs += [(f"input_blocks.{n}.0.{s}", f"down_blocks.{x}.resnets.{i}.{d}") for s, d in RESNET]
            if depth[x]:
                pairs += _attention(f"input_blocks.{n}.1", f"down_blocks.{x}.attentions.{i}", depth[x])
            n += 1
        if x < levels - 1:
            pairs.append((f"input_blocks.{n}.0.op", f"down_blocks.{x}.downsamplers.0.conv"))
            n += 1
    pairs += [(f"middle_block.0.{s}", f"mid_block.resnets.0.{d}") for s, d in RESNET]
    pairs += _attention("middle_block.1", "mid_block.attentions.0", mid)
    pairs += [(f"middle_block.2.{s}", f"mid_block.resnets.1.{d}") for s, d in RESNET]
    n = 0
    for x in range(levels):
        level = levels - 1 - x
        for i in range(res + 1):
            pairs += [(f"output_blocks.{n}.0.{s}", f"up_blocks.{x}.resnets.{i}.{d}") for s, d in RESNET]
            c = 1
            if depth[level]:
                pairs += _attention(f"output_blocks.{n}.1", f"up_blocks.{x}.attentions.{i}", depth[level])
                c = 2
            if i == res and x < levels - 1:
                pairs.append((f"output_blocks.{n}.{c}.conv", f"up_blocks.{x}.upsamplers.0.conv"))
            n += 1
    return tuple(pairs)


def _flat(p: str) -> str:
    return p.replace(".", "_")


@lru_cache(maxsize=None)
def _unet_tables(arch: str):
    pairs = unet_pairs(arch)
    to_sgm = {_flat(d): s for s, d in pairs + UNET_ALIASES}
    sgm = {_flat(s): (s, d) for s, d in pairs}
    return to_sgm, sgm


# ---------------------------------------------------------------- FLUX (BFL ↔ diffusers)

# diffusers part -> (BFL layer, first row, last row) in units of the hidden size h (None: the whole layer)
FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 1), "attn.to_k": ("img_attn.qkv", 1, 2), "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 1), "attn.add_k_proj": ("txt_attn.qkv", 1, 2),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", None, None), "attn.to_add_out": ("txt_attn.proj", None, None),
    "norm1.linear": ("img_mod.lin", None, None), "norm1_context.linear": ("txt_mod.lin", None, None),
    "ff.net.0.proj": ("img_mlp.0", None, None), "ff.net.2": ("img_mlp.2", None, None),
    "ff_context.net.0.proj": ("txt_mlp.0", None, None), "ff_context.net.2": ("txt_mlp.2", None, None),
}
FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0, 1), "attn.to_k": ("linear1", 1, 2), "attn.to_v": ("linear1", 2, 3),
    "proj_mlp": ("linear1", 3, 7), "proj_out": ("linear2", None, None), "norm.linear": ("modulation.lin", None, None),
}
FLUX_BASIC = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
FLUX_FUSED = {"img_attn.qkv": 3, "txt_attn.qkv": 3, "linear1": 7}

# ---------------------------------------------------------------- SD3 / SD3.5 (MMDiT ↔ diffusers)
# Facts from ComfyUI's comfy/utils.py (`mmdit_to_diffusers`, MMDIT_MAP_BLOCK/BASIC): q/k/v are row thirds of the
# fused qkv (h = hidden size = 64·depth); SD3.5's second attention (attn2) likewise. The last block's context
# adaLN_modulation (pre-only: 2h rows) and the final layer's have their shift/scale halves swapped between the
# vocabularies: not mapped (see `_swapped`).
SD3_JOINT = {
    "attn.to_q": ("x_block.attn.qkv", 0, 1), "attn.to_k": ("x_block.attn.qkv", 1, 2),
    "attn.to_v": ("x_block.attn.qkv", 2, 3),
    "attn.add_q_proj": ("context_block.attn.qkv", 0, 1), "attn.add_k_proj": ("context_block.attn.qkv", 1, 2),
    "attn.add_v_proj": ("context_block.attn.qkv", 2, 3),
    "attn2.to_q": ("x_block.attn2.qkv", 0, 1), "attn2.to_k": ("x_block.attn2.qkv", 1, 2),
    "attn2.to_v": ("x_block.attn2.qkv", 2, 3),
    "attn.to_out.0": ("x_block.attn.proj", None, None), "attn.to_add_out": ("context_block.attn.proj", None, None),
    "attn2.to_out.0": ("x_block.attn2.proj", None, None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None, None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None, None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None, None), "ff.net.2": ("x_block.mlp.fc2", None, None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None, None),
    "ff_context.net.2": ("context_block.mlp.fc2", None, None),
}
SD3_BASIC = {
    "context_embedder": "context_embedder", "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
}
SD3_FUSED = {"x_block.attn.qkv": 3, "context_block.attn.qkv": 3, "x_block.attn2.qkv": 3}


@dataclass(frozen=True)
class DitVocab:
    """One DiT's two vocabularies: per block kind (diffusers block word, canonical block word, {diffusers part:
    (canonical layer, first row, last row) in units of the hidden size}), whole layers outside the blocks, and
    the fused canonical layers with their height in hidden sizes."""
    blocks: tuple
    basic: dict
    fused: dict


DIT = {
    "flux1": DitVocab((("transformer_blocks", "double_blocks", FLUX_DOUBLE),
                       ("single_transformer_blocks", "single_blocks", FLUX_SINGLE)), FLUX_BASIC, FLUX_FUSED),
    "sd3": DitVocab((("transformer_blocks", "joint_blocks", SD3_JOINT),), SD3_BASIC, SD3_FUSED),
}


# layers outside the blocks named differently in the two vocabularies whose rows do not correspond (ComfyUI's
# swap_scale_shift): never paired, and a module keeps its own name, as no name in the other vocabulary is read for it
SWAPPED_BASIC = {"norm_out.linear": "final_layer.adaLN_modulation.1"}
CANONICAL_SCHEME = {"flux1": "bfl", "sd3": "mmdit"}


def basic_scheme(path: str, arch: str) -> str | None:
    """The vocabulary ('bfl'/'mmdit' or 'diffusers-dit') a DiT layer outside the blocks is named in, by its flat path,
    when its name differs between the vocabularies (`context_embedder` does not), else None (also for other models:
    Qwen-Image's own `img_in`/`proj_out` are no FLUX names)."""
    if arch not in DIT:
        return None
    diffusers_names, canonical_names = _basic_names(arch)
    if path in diffusers_names:
        return "diffusers-dit"
    if path in canonical_names:
        return CANONICAL_SCHEME[arch]
    return None


@lru_cache(maxsize=None)
def _basic_names(arch: str) -> tuple[frozenset, frozenset]:
    """(diffusers flat paths, canonical flat paths) of the layers outside the blocks whose names differ."""
    pairs = [(d, c) for d, c in list(DIT[arch].basic.items()) + list(SWAPPED_BASIC.items()) if d != c]
    return frozenset(_flat(d) for d, _ in pairs), frozenset(_flat(c) for _, c in pairs)


def _block_rx(words) -> re.Pattern:
    return re.compile(r"^(" + "|".join(sorted(words, key=len, reverse=True)) + r")_(\d+)_(.+)$")


class DitTables(NamedTuple):
    """One DiT's lookup tables, all keyed by flat paths."""
    dif: dict          # diffusers block word -> {diffusers part: (canonical layer, first row, stop row)}
    canon: dict        # canonical block word -> {canonical layer: (dotted layer, [(lo, hi, diffusers part)])}
    basic: dict        # diffusers path -> canonical path (whole layers outside the blocks)
    basic_rev: dict    # canonical path -> (canonical dotted, diffusers dotted)
    dif_rx: re.Pattern     # `<diffusers block word>_<N>_<part>`
    canon_rx: re.Pattern   # `<canonical block word>_<N>_<layer>`
    to_dif: dict       # canonical block word -> diffusers block word


@lru_cache(maxsize=None)
def _dit_tables(arch: str) -> DitTables:
    v = DIT[arch]
    dif, canon, to_dif = {}, {}, {}
    for dword, cword, table in v.blocks:
        dif[dword] = {_flat(k): val for k, val in table.items()}
        to_dif[cword] = dword
        layers = canon.setdefault(cword, {})
        for part, (layer, lo, hi) in table.items():
            layers.setdefault(_flat(layer), (layer, []))[1].append((lo, hi, part))
    basic = {_flat(k): val for k, val in v.basic.items()}
    basic_rev = {_flat(val): (val, k) for k, val in v.basic.items()}
    return DitTables(dif, canon, basic, basic_rev, _block_rx(dif), _block_rx(canon), to_dif)


def _swapped(arch: str, part: str, shape) -> bool:
    """SD3's last context block (pre-only) has a 2h-row adaLN_modulation whose shift/scale halves are swapped
    between the vocabularies: its rows do not correspond, so it is left unmapped."""
    return (arch == "sd3" and part == _flat("norm1_context.linear") and shape is not None and len(shape) >= 2
            and int(shape[0]) == 2 * int(shape[1]))


# ---------------------------------------------------------------- pieces

CROSS_ARCHS = {"sd1", "sd2", "sdxl", "flux1", "sd3"}
FUSED_VOCAB = {"sgm": False, "diffusers-unet": False, "bfl": True, "mmdit": True, "diffusers-dit": False}


@dataclass(frozen=True)
class Piece:
    """The layer a module changes (canonical vocabulary) and the rows of it that the module covers."""
    layer: str                       # '<part>:<flat path>'
    rows: tuple | None = None        # (first, stop) output rows of the layer; None = the whole layer
    total: int | None = None         # the layer's output rows (set for parts of fused layers)


def piece_of(family: str, path: str, arch: str, shape) -> Piece:
    """`path`: the module's canonical flat path (see matching.canonical_path); `shape`: its weight shape."""
    if family != "diffusion" or arch not in CROSS_ARCHS:
        return Piece(f"{family}:{path}")
    if arch in UNET_LAYOUTS:
        to_sgm, _ = _unet_tables(arch)
        sgm = to_sgm.get(path)
        return Piece(f"diffusion:{_flat(sgm)}" if sgm else f"diffusion:{path}")
    t = _dit_tables(arch)
    dif, basic = t.dif, t.basic
    m = t.dif_rx.match(path)
    if m:
        entry = dif[m.group(1)].get(m.group(3))
        if entry is None or _swapped(arch, m.group(3), shape):
            return Piece(f"diffusion:{path}")
        layer, lo, hi = entry
        dst = next(c for d, c, _ in DIT[arch].blocks if d == m.group(1))
        flat_layer = f"{dst}_{m.group(2)}_{_flat(layer)}"
        if lo is None:
            return Piece(f"diffusion:{flat_layer}")
        h = int(shape[1]) if shape is not None and len(shape) >= 2 else None
        if h is None:
            return Piece(f"diffusion:{path}")
        return Piece(f"diffusion:{flat_layer}", (lo * h, hi * h), DIT[arch].fused[layer] * h)
    if path in basic:
        return Piece(f"diffusion:{_flat(basic[path])}")
    return Piece(f"diffusion:{path}")


def _canonical_layer(path: str, arch: str | None):
    """(arch, block word, block number, (layer, [(lo, hi, diffusers part)])) of a canonical DiT block layer, or
    None; every DiT vocabulary is tried when arch is not given (their block words differ)."""
    for a in ([arch] if arch else list(DIT)):
        if a not in DIT:
            continue
        t = _dit_tables(a)
        m = t.canon_rx.match(path)
        if m and m.group(3) in t.canon[m.group(1)]:
            return a, m.group(1), m.group(2), t.canon[m.group(1)][m.group(3)]
    return None


def segments(layer: str, total: int, arch: str | None = None) -> list[tuple[tuple, str]] | None:
    """[((first, stop), diffusers dotted path)] of a fused DiT layer ('diffusion:<canonical flat path>': FLUX's
    BFL qkv/linear1, SD3's MMDiT qkv), or None."""
    hit = _canonical_layer(layer.split(":", 1)[1], arch)
    if hit is None:
        return None
    a, word, num, (name, parts) = hit
    units = DIT[a].fused.get(name)
    if units is None:
        return None
    h = total // units
    src = _dit_tables(a).to_dif[word]
    return sorted(((lo * h, hi * h), f"{src}.{num}.{part}") for lo, hi, part in parts)


def dotted_name(layer: str, arch: str, fused_vocab: bool, shape=None) -> str | None:
    """The dotted path of a whole canonical layer in one vocabulary (SGM/BFL/MMDiT when fused_vocab, else
    diffusers); None when there is no safe translation (`shape`: the layer's weight shape, if known)."""
    path = layer.split(":", 1)[1]
    if arch in UNET_LAYOUTS:
        hit = _unet_tables(arch)[1].get(path)
        return None if hit is None else (hit[0] if fused_vocab else hit[1])
    if arch not in DIT:
        return None
    basic_rev = _dit_tables(arch).basic_rev
    if path in basic_rev:
        return basic_rev[path][0] if fused_vocab else basic_rev[path][1]
    hit = _canonical_layer(path, arch)
    if hit is None:
        return None
    _, word, num, (name, parts) = hit
    if _swapped(arch, _flat(parts[0][2]), shape) or (shape is None and arch == "sd3"
                                                     and parts[0][2] == "norm1_context.linear"):
        return None
    if fused_vocab:
        return f"{word}.{num}.{name}"
    if name in DIT[arch].fused:
        return None  # split in diffusers: see segments()
    return f"{_dit_tables(arch).to_dif[word]}.{num}.{parts[0][2]}"


def name_like(example: str, dotted: str) -> str:
    """`dotted` spelled the way module name `example` is (its prefix, dots or underscores)."""
    prefix, rest = strip_prefix(example)
    return prefix + (dotted if "." in rest else _flat(dotted))


# ---------------------------------------------------------------- views on factors


class RowSlice:
    """Rows [r0, r1) of a (fused) module's ΔW, from its factors: s·B[r0:r1]·A (dense kinds: ΔW[r0:r1])."""

    def __init__(self, module, rows: tuple):
        self.module, self.rows = module, tuple(rows)
        self.name = f"{module.name}[{rows[0]}:{rows[1]}]"
        self.source_names = (module.name,)
        self.kind, self.component = module.kind, module.component

    block = property(lambda self: self.module.block)
    is_dora = property(lambda self: self.module.is_dora)
    alpha = property(lambda self: self.module.alpha)

    @property
    def tensors(self) -> dict:
        b = self.module.tensors.get("diff_b")
        return {} if b is None else {"diff_b": b[self.rows[0]:self.rows[1]]}

    def rank(self):
        return self.module.rank()

    def weight_shape(self):
        s = self.module.weight_shape()
        return None if s is None else (self.rows[1] - self.rows[0], *tuple(s)[1:])

    def lowrank(self, dtype=torch.float32, device="cpu"):
        return self._rows(self.module.lowrank(dtype, device))

    def exact_factors(self, dtype=torch.float32, device="cpu"):
        """The rows of the module's exact two-factor form (LoKr/LoHa too; see model.exact_factors)."""
        from ..model import exact_factors
        return self._rows(exact_factors(self.module, dtype, device))

    def _rows(self, f):
        if f is None:
            return None
        b, a, s = f
        return b[self.rows[0]:self.rows[1]], a, s

    def delta(self, dtype=torch.float32, device="cpu"):
        d = self.module.delta(dtype, device)
        return None if d is None else d[self.rows[0]:self.rows[1]]


class RowStack:
    """Split modules assembled into their fused layer: B = block-diagonal by rows of s_p·B_p, A = [A_p; …]."""

    def __init__(self, parts: list, total: int):
        self.parts = sorted(parts, key=lambda p: p[0])      # [((r0, r1), module)]
        self.total = int(total)
        mods = [m for _, m in self.parts]
        self.name = " + ".join(m.name for m in mods)
        self.source_names = tuple(m.name for m in mods)
        odd = [m for m in mods if m.kind.needs_base_weight or m.kind.name == "set"]
        self.kind = (odd or mods)[0].kind
        self.component = mods[0].component
        self.alpha = None

    block = property(lambda self: self.parts[0][1].block)
    is_dora = property(lambda self: any(m.is_dora for _, m in self.parts))

    @property
    def tensors(self) -> dict:
        bs = [(rows, m.tensors.get("diff_b")) for rows, m in self.parts]
        if all(b is None for _, b in bs):
            return {}
        ref = next(b for _, b in bs if b is not None)
        out = ref.new_zeros(self.total)
        for (r0, r1), b in bs:
            if b is not None:
                out[r0:r1] = b
        return {"diff_b": out}

    def rank(self):
        rs = [m.rank() for _, m in self.parts]
        return None if any(r is None for r in rs) else sum(rs)

    def weight_shape(self):
        s = self.parts[0][1].weight_shape()
        return None if s is None else (self.total, *tuple(s)[1:])

    def lowrank(self, dtype=torch.float32, device="cpu"):
        return self._stack([m.lowrank(dtype, device) for _, m in self.parts])

    def exact_factors(self, dtype=torch.float32, device="cpu"):
        """The parts' exact two-factor forms (LoKr/LoHa too; see model.exact_factors) assembled by rows."""
        from ..model import exact_factors
        return self._stack([exact_factors(m, dtype, device) for _, m in self.parts])

    def _stack(self, fs):
        if any(f is None for f in fs):
            return None
        r = sum(f[0].shape[1] for f in fs)
        b = fs[0][0].new_zeros(self.total, r)
        off = 0
        for ((r0, r1), _), (bp, _, s) in zip(self.parts, fs):
            b[r0:r1, off:off + bp.shape[1]] = bp * s
            off += bp.shape[1]
        return b, torch.cat([f[1] for f in fs], 0), 1.0

    def delta(self, dtype=torch.float32, device="cpu"):
        ds = [m.delta(dtype, device) for _, m in self.parts]
        if any(d is None for d in ds):
            return None
        out = ds[0].new_zeros(self.total, *ds[0].shape[1:])
        for ((r0, r1), _), d in zip(self.parts, ds):
            out[r0:r1] = d
        return out


class OutputSlot:
    """Where a blended module goes when the first LoRA has no module there: a name in its vocabulary, the
    layer's shape, and the first LoRA's alpha habit (what the blend engine reads from a target module)."""

    def __init__(self, name: str, component: str, shape, style=None):
        from ..kinds import BY_NAME
        self.name, self.component, self.shape = name, component, None if shape is None else tuple(shape)
        self.kind = BY_NAME["lora"]
        self.keys: dict = {}
        self.tensors: dict = {}
        if style is not None and style.has_alpha:
            self.tensors["alpha"] = torch.tensor(1.0, dtype=style.alpha_dtype)

    def weight_shape(self):
        return self.shape
