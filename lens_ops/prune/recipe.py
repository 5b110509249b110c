"""Prune recipes: one string per output, terms joined by commas, several recipes joined by ':'.

Per-module rank rules (each gives a rank per module; several combine by taking the smallest):
  energy=E        keep the fewest dimensions holding at least fraction E of the module's ΔW energy (Σσ²)
  rank=N          at most N dimensions (also the cap for every other rule, as kohya's --new_rank)
  sv_ratio=T      kohya: keep σ_i > σ_max / T
  sv_fro=T        kohya: keep the fewest dimensions whose √(Σσ²) reaches fraction T of the total
  sv_cumulative=T kohya: keep the fewest dimensions whose Σσ reaches fraction T of the total
resize_lora scoring (log10 score per dimension = log10(σ_i·rescale) − Σ w·log10(reference)):
  spn_lora, fro_lora, spn_ckpt, fro_ckpt, subspace, params [=weight, default 1; weights are normalised]
  thr=X           keep dimensions whose score is > X          (exactly one of thr / size with scores)
  size=MiB        target size of the whole output file; the threshold is found greedily over all scores
  rescale=F       multiply every σ_i (and so the LoRA's ΔW) by F before scoring; baked into the output
Global:
  budget=MiB      whole-file size budget: keeps the dimensions with the most ΔW energy per byte
  lyco=keep|convert  LoHa/LoKr modules: left as they are (default) or converted to LoRA from their ΔW
  dtype=keep|fp16|bf16|fp32  output precision of the new factors (default: the input's)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LensError

RULES = ("energy", "rank", "sv_ratio", "sv_fro", "sv_cumulative")
SCORES = ("spn_lora", "fro_lora", "spn_ckpt", "fro_ckpt", "subspace", "params")
CKPT_SCORES = ("spn_ckpt", "fro_ckpt", "subspace")
OTHER = ("thr", "size", "rescale", "budget", "lyco", "dtype")
DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

ALLOWED = ("energy=E (0<E≤1), rank=N, sv_ratio=T (e.g. 10), sv_fro=T (e.g. 0.99), sv_cumulative=T (e.g. 0.9), "
           "or resize_lora scores spn_lora, fro_lora, spn_ckpt, fro_ckpt, subspace, params (each =weight) "
           "with thr=LOG10 or size=MiB and optional rescale=F; also budget=MiB, lyco=keep|convert, "
           "dtype=keep|fp16|bf16|fp32; terms joined by ',' and several recipes by ':' "
           "(e.g. 'energy=0.99', 'rank=16', 'spn_lora=1,thr=-1', 'fro_ckpt=0.8,params=0.2,size=50')")


@dataclass
class Recipe:
    text: str
    rules: dict = field(default_factory=dict)      # rule name -> value
    weights: dict = field(default_factory=dict)    # normalised score weights (only non-zero)
    threshold: float | None = None
    size_mib: float | None = None
    rescale: float = 1.0
    budget_mib: float | None = None
    lyco: str = "keep"
    dtype: torch.dtype | None = None

    @property
    def uses_scores(self) -> bool:
        return bool(self.weights)

    @property
    def needs_base(self) -> bool:
        return any(k in self.weights for k in CKPT_SCORES)

    def settings(self) -> dict:
        """JSON-able description (for provenance and reports)."""
        d = {"recipe": self.text}
        d.update(self.rules)
        if self.weights:
            d["weights"] = dict(self.weights)
        for k in ("threshold", "size_mib", "budget_mib"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.rescale != 1.0:
            d["rescale"] = self.rescale
        if self.lyco != "keep":
            d["lyco"] = self.lyco
        if self.dtype is not None:
            d["dtype"] = str(self.dtype).replace("torch.", "")
        return d

    def short_name(self) -> str:
        """A file-name-safe tag for this recipe (used for outputs of several recipes)."""
        out = []
        for part in self.text.split(","):
            k, _, v = part.strip().partition("=")
            k = k.strip().replace("_", "")
            out.append(k + (v.strip().rstrip("0").rstrip(".") if "." in v else v.strip()))
        return "_".join(out).replace("/", "-").replace(" ", "")


def _bad(text: str, why: str) -> LensError:
    return LensError(f"Bad prune recipe {text!r}: {why}. Allowed: {ALLOWED}.")


def _number(text: str, key: str, value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise _bad(text, f"{key}={value!r} is not a number") from None
    if not math.isfinite(v):
        raise _bad(text, f"{key}={value!r} is not a finite number")
    return v


def parse_recipe(text: str) -> Recipe:
    """Parse ONE recipe (no ':'); raise LensError naming the problem and listing what is allowed."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(str(text), "it is empty")
    text = text.strip()
    if ":" in text:
        raise _bad(text, "':' separates several recipes; use parse_recipes for those")
    r = Recipe(text)
    raw_weights = {}
    seen = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise _bad(text, "it has an empty term (two commas in a row or a trailing comma)")
        key, eq, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key in seen:
            raise _bad(text, f"{key} is given twice")
        seen.add(key)
        if key in SCORES:
            w = 1.0 if not eq else _number(text, key, value)
            if w < 0:
                raise _bad(text, f"score weight {key}={value} is negative")
            raw_weights[key] = w
            continue
        if key not in RULES + OTHER:
            raise _bad(text, f"unknown term {key!r}")
        if not eq or value == "":
            raise _bad(text, f"{key} needs a value ({key}=...)")
        if key == "lyco":
            if value not in ("keep", "convert"):
                raise _bad(text, f"lyco={value} (use keep or convert)")
            r.lyco = value
            continue
        if key == "dtype":
            if value.lower() not in DTYPES:
                raise _bad(text, f"dtype={value} (use keep, fp16, bf16 or fp32)")
            r.dtype = DTYPES[value.lower()]
            continue
        v = _number(text, key, value)
        if key == "energy":
            if not 0 < v <= 1:
                raise _bad(text, f"energy={value} must be in (0, 1]")
            r.rules[key] = v
        elif key == "rank":
            if v != int(v) or v < 1:
                raise _bad(text, f"rank={value} must be a whole number ≥ 1")
            r.rules[key] = int(v)
        elif key in ("sv_ratio", "sv_fro", "sv_cumulative"):
            if v <= 0:  # kohya accepts any positive target (ratio < 1 gives rank 1, fractions ≥ 1 full rank)
                raise _bad(text, f"{key}={value} must be positive")
            r.rules[key] = v
        elif key == "thr":
            r.threshold = v
        elif key == "size":
            if v <= 0:
                raise _bad(text, f"size={value} must be a positive number of MiB")
            r.size_mib = v
        elif key == "budget":
            if v <= 0:
                raise _bad(text, f"budget={value} must be a positive number of MiB")
            r.budget_mib = v
        elif key == "rescale":
            if v <= 0:
                raise _bad(text, f"rescale={value} must be positive")
            r.rescale = v
    if raw_weights:
        total = sum(raw_weights.values())
        if total <= 0:
            raise _bad(text, "all score weights are zero")
        r.weights = {k: w / total for k, w in raw_weights.items() if w > 0}
        if (r.threshold is None) == (r.size_mib is None):
            raise _bad(text, "scores need exactly one of thr=LOG10 or size=MiB")
    else:
        if r.threshold is not None or r.size_mib is not None:
            raise _bad(text, "thr= and size= select by a score; add one (e.g. spn_lora=1)")
        if not r.rules and r.budget_mib is None and r.rescale == 1.0 and r.lyco == "keep":
            raise _bad(text, "it has no selection rule")
    return r


def parse_recipes(text: str) -> list[Recipe]:
    """Several recipes joined by ':' (one output each, all from one decomposition)."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(str(text), "it is empty")
    parts = text.split(":")
    if any(not p.strip() for p in parts):
        raise _bad(text, "an empty recipe between ':' separators")
    return [parse_recipe(p) for p in parts]
