"""Component and block weights in SD.Next's style, plus layer filters.

Block weights: `key=value` items separated by `:`, `,`, spaces or new lines, e.g.
`te=0.5:unet=1.5`, `in=0:mid=1:out=0.5`, `double=1:single=0.5`, `double0-9=0.8:single20-37=0`.

- component keys: `te` (all text encoders), `te1`, `te2`, `te3`; `unet` = `transformer` = `dit` = `model`
  (the diffusion model, UNet or DiT: SD.Next says `unet` for every model);
- block keys for UNets: `in` (input_blocks / down_blocks), `mid` (middle_block / mid_block), `out`
  (output_blocks / up_blocks); for DiTs: `double`, `single`, `joint`, `block`, `layer` (`joint` and `double` name
  the same two-stream blocks: SD3's MMDiT `joint_blocks.N` are diffusers' `transformer_blocks.N`, labelled double);
- any block key may carry an index or index range: `in4`, `out0-2`, `double0-9`, `single20-37`. Indices are the
  block numbers of the module's own name (input_blocks 0–11 in SGM names, down_blocks 0–3 in diffusers names).

A module's multiplier is (component weight) × (block weight); the most specific matching block item wins (an
indexed item beats a plain one; of equal ones the later wins). Unlisted parts keep 1.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import LensError

COMPONENT_KEYS = {"te", "te1", "te2", "te3", "unet", "transformer", "dit", "model"}
BLOCK_KEYS = {"in": ("input", "down"), "mid": ("middle", "mid"), "out": ("output", "up"),
              "double": ("double", "joint"), "single": ("single",), "joint": ("joint", "double"), "block": ("block",),
              "layer": ("layer",)}
ALIASES = {"input": "in", "down": "in", "middle": "mid", "output": "out", "up": "out", "text_encoder": "te",
           "text": "te"}
ITEM = re.compile(r"^([a-z_]+?)(\d+)?(?:-(\d+))?$")


@dataclass
class BlockWeights:
    components: dict = field(default_factory=dict)
    blocks: list = field(default_factory=list)   # (key, lo, hi, value) in given order
    text: str = ""

    def __bool__(self):
        return bool(self.components or self.blocks)

    def multiplier(self, module) -> float:
        comp = module.component
        w = 1.0
        if comp.startswith("te"):
            w = self.components.get(comp, self.components.get("te", 1.0))
            return w
        w = self.components.get("model", 1.0)
        label = module.block  # 'input 4', 'double 7', 'middle', 'other', ...
        parts = label.split(" ")
        head, idx = parts[0], (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None)
        best, best_spec = None, -1
        for key, lo, hi, value in self.blocks:
            if head not in BLOCK_KEYS[key]:
                continue
            if lo is None:
                spec = 0
            elif idx is not None and lo <= idx <= hi:
                spec = 1
            else:
                continue
            if spec >= best_spec:
                best, best_spec = value, spec
        return w * (best if best is not None else 1.0)


def parse_block_weights(text: str | None) -> BlockWeights:
    """Parse an SD.Next-style weight string (see the module docstring); '' means all weights 1."""
    bw = BlockWeights(text=(text or "").strip())
    if not bw.text:
        return bw
    for raw in re.split(r"[:,;\s]+", bw.text.lower()):
        if not raw:
            continue
        if "=" not in raw:
            raise LensError(f"Block weight item {raw!r} has no '=': write items like te=0.5, in=0, out4-8=0.7 "
                            "or double0-9=0.8.")
        key, val = raw.split("=", 1)
        try:
            value = float(val)
        except ValueError:
            raise LensError(f"Block weight {raw!r}: {val!r} is not a number.") from None
        if not math.isfinite(value):
            raise LensError(f"Block weight {raw!r}: {val!r} is not a finite number.")
        key = ALIASES.get(key, key)
        if key in COMPONENT_KEYS:
            bw.components["model" if key in ("unet", "transformer", "dit") else key] = value
            continue
        m = ITEM.match(key)
        name = ALIASES.get(m.group(1), m.group(1)) if m else None
        if not m or name not in BLOCK_KEYS:
            raise LensError(f"Unknown block weight key {key!r}; use te, te1–te3, unet, transformer, in, mid, out, "
                            "double, single, joint, block or layer (optionally with an index range like in4-8).")
        lo = int(m.group(2)) if m.group(2) is not None else None
        hi = int(m.group(3)) if m.group(3) is not None else lo
        if lo is not None and hi < lo:
            raise LensError(f"Block weight range {key!r} runs backwards; write low-high.")
        bw.blocks.append((name, lo, hi, value))
    return bw


class LayerFilter:
    """Include/exclude by exact module name (any LoRA's spelling or the canonical key) or by regular expression.

    A pattern list is text: one item per line (or comma separated); lines starting with '#' are comments, so the
    problem list from ConflictScan can be passed as is. An item equal to a module name matches that module;
    any other item is a regular expression searched in every name of the module (`known` holds every module name
    of the inputs, so that a name is never also used as a pattern).
    """

    def __init__(self, include: str | None = None, exclude: str | None = None, known: set | None = None):
        self.known = known or set()
        self.include = self._items(include, "include")
        self.exclude = self._items(exclude, "exclude")

    def _items(self, text, what):
        if not text:
            return None
        lines = []
        for line in re.split(r"[\n,]+", text):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            lines.append(line)
        if not lines:
            return None
        exact = set(lines)
        rx = []
        for line in lines:
            if line in self.known:  # a module name: exact match only
                continue
            try:
                rx.append(re.compile(line))
            except re.error as e:
                if not re.fullmatch(r"[\w.:\-]+", line):
                    raise LensError(f"The {what} item {line!r} is neither a module name nor a valid regular "
                                    f"expression ({e}).") from None
        return exact, rx

    @staticmethod
    def _hit(spec, names):
        exact, rx = spec
        if any(n in exact for n in names):
            return True
        return any(r.search(n) for r in rx for n in names)

    def keep(self, names: list[str]) -> bool:
        if self.include is not None and not self._hit(self.include, names):
            return False
        if self.exclude is not None and self._hit(self.exclude, names):
            return False
        return True

    def __bool__(self):
        return self.include is not None or self.exclude is not None
