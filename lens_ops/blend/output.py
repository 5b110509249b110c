"""Writing blended modules the way the first LoRA is written: its key convention, its dtype, its alpha habit.

Modules of the first LoRA keep their exact tensor names. A module that only the other LoRAs have is renamed into
the first LoRA's convention when that is known to load the same layer in ComfyUI (same block vocabulary, known
prefix); otherwise it keeps its own names (ComfyUI reads each module by its own name, so the blend still applies
it) and the report says how many kept theirs.
"""
from __future__ import annotations

import json
import os

import torch

from ..conflict.crossnames import basic_scheme
from ..conflict.matching import canonical_path, family, scheme_of
from ..keys import strip_prefix
from ..kinds import BY_NAME, UNKNOWN
from ..model import LoRAModule
from ..training_meta import trigger_words

QUANTIZED = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
KOHYA_DEFAULTS = {"te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}
DOTTED_DEFAULTS = {"te1": "text_encoder.", "te2": "text_encoder_2.", "te3": "text_encoder_3."}


BALANCE_RATIO = 256.0   # rank components whose up/down RMS differ more than this get rebalanced


def balance_components(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale rank components whose two factors have very different magnitudes: up_j·t_j, down_j/t_j with t_j the
    power of two nearest √(rms(down_j)/rms(up_j)), so ΔW = up@down is unchanged to the bit (before the final cast).

    A scale folded into one factor can be tiny (int8 LoRAs fold their quantisation scales into alpha, e.g. 1e-7):
    pushed into `up` it lands in fp16's subnormal range and loses most of its digits. Balanced, both factors sit
    in the middle of the range. Components within BALANCE_RATIO of each other are left exactly as they are."""
    if up.shape[1] == 0 or not up.is_floating_point():
        return up, down
    ru = up.double().pow(2).mean(0).sqrt()
    rd = down.double().pow(2).mean(1).sqrt()
    ok = (ru > 0) & (rd > 0) & torch.isfinite(ru) & torch.isfinite(rd)
    ratio = torch.where(ok, rd / ru.clamp_min(1e-300), torch.ones_like(ru))
    fix = ok & ((ratio > BALANCE_RATIO) | (ratio < 1 / BALANCE_RATIO))
    if not bool(fix.any()):
        return up, down
    t = torch.where(fix, torch.exp2(torch.round(torch.log2(ratio) / 2)), torch.ones_like(ru))
    return up * t.to(up.dtype), down / t.to(down.dtype)[:, None]


class OutputStyle:
    """The first LoRA's naming, suffixes, alpha habit and dtype."""

    def __init__(self, first, device="cpu"):
        self.model = first
        counts: dict = {}
        self.suffix = None
        self.has_alpha = False
        self.alpha_dtype = torch.float32
        self.prefix, self.dotted = {}, {}
        self.schemes = set()
        for m in first.modules:
            if m.kind is UNKNOWN:
                continue
            for r, t in m.tensors.items():
                if r != "alpha" and (t.is_floating_point() or t.dtype in QUANTIZED):
                    counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
            if m.kind.name == "lora" and self.suffix is None and "mid" not in m.tensors:
                self.suffix = {r: m.keys[r][len(m.name):] for r in ("up", "down")}
            if "alpha" in m.tensors and m.kind.name == "lora":
                self.has_alpha = True
                self.alpha_dtype = m.tensors["alpha"].dtype
            fam = family(m.component)
            if fam not in self.prefix:
                p, rest = strip_prefix(m.name)
                self.prefix[fam] = p
                self.dotted[fam] = "." in rest
            s = scheme_of(m)
            if s:
                self.schemes.add(s)
        self.source_dtype = max(counts, key=counts.get) if counts else torch.float16
        self.dtype = torch.float16 if self.source_dtype in QUANTIZED else self.source_dtype
        self.underscore = not any(self.dotted.values()) if self.dotted else True
        if self.suffix is None:
            self.suffix = ({"up": ".lora_up.weight", "down": ".lora_down.weight"} if self.underscore
                           else {"up": ".lora_B.weight", "down": ".lora_A.weight"})
        if not any(m.kind.name == "lora" for m in first.modules) and self.underscore:
            self.has_alpha = True
        arch = first.architecture.id
        self.defaults = dict(KOHYA_DEFAULTS if self.underscore else DOTTED_DEFAULTS)
        if self.underscore and arch in ("sd1", "sd2"):
            self.defaults["te1"] = "lora_te_"

    def name_for(self, module) -> tuple[str, bool]:
        """(name in the first LoRA's convention, True) or (module's own name, False) when no safe renaming
        is known. The name may equal the module's own when it already follows the convention."""
        fam = family(module.component)
        if fam == "diffusion":
            # a DiT layer outside the blocks named in one vocabulary only (FLUX/SD3 norm_out ↔ final_layer) counts too
            s = scheme_of(module) or basic_scheme(canonical_path(module.name), self.model.architecture.id)
            if s is not None and self.schemes and s not in self.schemes:
                return module.name, False
        prefix = self.prefix.get(fam)
        dotted = self.dotted.get(fam, not self.underscore)
        if prefix is None:
            if fam == "diffusion":
                return module.name, False
            prefix = self.defaults.get(fam)
            if prefix is None:
                return module.name, False
        _, rest = strip_prefix(module.name)
        if dotted:
            if "." not in rest:
                return module.name, False
            return prefix + rest, True
        return prefix + canonical_path(module.name), True

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device="cpu", dtype=self.dtype)

    def lora_module(self, name: str, component: str, up: torch.Tensor, down: torch.Tensor, weight_shape,
                    keys: dict | None = None, alpha_dtype=None, want_alpha: bool | None = None) -> LoRAModule:
        """A plain LoRA module with ΔW = up@down exactly (alpha written as rank when the convention has alpha)."""
        k = up.shape[1]
        want_alpha = self.has_alpha if want_alpha is None else want_alpha
        tensors = {}
        if want_alpha:
            a_t = torch.tensor(float(k)).to(alpha_dtype or self.alpha_dtype)
            a_read = float(a_t.float().item())
            if a_read <= 0:
                a_t, a_read = torch.tensor(float(k), dtype=torch.float32), float(k)
            corr = k / a_read            # ComfyUI's scale is a_read / k; fold its reciprocal into up
            if corr != 1.0:
                up = up * corr
        up, down = balance_components(up, down)
        ws = tuple(weight_shape)
        if len(ws) > 2:
            up_t = up.reshape(up.shape[0], k, *([1] * (len(ws) - 2)))
            down_t = down.reshape(k, *ws[1:])
        else:
            up_t, down_t = up, down
        tensors["up"] = self.cast(up_t)
        tensors["down"] = self.cast(down_t)
        if want_alpha:
            tensors["alpha"] = a_t
        keys = dict(keys or {})
        names = {"up": keys.get("up", name + self.suffix["up"]), "down": keys.get("down", name + self.suffix["down"])}
        if want_alpha:
            names["alpha"] = keys.get("alpha", name + ".alpha")
        order = [r for r in keys if r in tensors] + [r for r in ("down", "up", "alpha") if r in tensors and r not in keys]
        m = LoRAModule(name, {r: names[r] for r in order}, {r: tensors[r] for r in order}, BY_NAME["lora"],
                       component)
        m.kind.validate(m)
        return m

    def diff_module(self, name: str, component: str, delta: torch.Tensor, bias: torch.Tensor | None = None,
                    norm: bool = False) -> LoRAModule:
        """The exact ΔW as a `diff` (or `w_norm` for 1-D norm changes) module."""
        if norm:
            tensors = {"w_norm": self.cast(delta)}
            keys = {"w_norm": name + ".w_norm"}
            if bias is not None:
                tensors["b_norm"], keys["b_norm"] = self.cast(bias), name + ".b_norm"
            return LoRAModule(name, keys, tensors, BY_NAME["norm"], component)
        tensors, keys = {"diff": self.cast(delta)}, {"diff": name + ".diff"}
        if bias is not None:
            tensors["diff_b"], keys["diff_b"] = self.cast(bias), name + ".diff_b"
        return LoRAModule(name, keys, tensors, BY_NAME["diff"], component)


def shape_only(m: LoRAModule) -> LoRAModule:
    """The module with its factor tensors replaced by shape-only (meta) tensors: names, kind, rank and sizes stay
    readable for the report while the data is gone (alpha, a 0-dim number, is kept)."""
    tensors = {r: (t if r == "alpha" or t.ndim == 0 else torch.empty(t.shape, dtype=t.dtype, device="meta"))
               for r, t in m.tensors.items()}
    return LoRAModule(m.name, dict(m.keys), tensors, m.kind, m.component)


class StreamedModules(list):
    """The blend's output list when it is streamed: each module goes to `write` as it is appended and only its
    shape-only copy stays, so the working memory holds one module's tensors at a time."""

    def __init__(self, write):
        super().__init__()
        self.write = write

    def append(self, m):
        self.write(m)
        super().append(shape_only(m))

    def extend(self, ms):
        for m in ms:
            self.append(m)


def source_record(model, weight: float) -> dict:
    meta = model.metadata
    rec = {"file": os.path.basename(model.source) if model.source else None, "weight": weight,
           "architecture": model.architecture.label, "format": model.convention}
    for k, name in (("modelspec.title", "title"), ("ss_output_name", "output_name"),
                    ("sshs_model_hash", "hash"), ("modelspec.hash_sha256", "sha256")):
        if meta.get(k):
            rec[name] = meta[k]
    return rec


def merged_metadata(models, weights, settings: dict, out_model, ranks: set) -> dict:
    """The first LoRA's metadata + keys only the others have, both sources recorded, trigger words united."""
    meta = {}
    for m in models:
        for k, v in m.metadata.items():
            if k not in meta and k != "lora_lens.provenance":
                meta[k] = v
    if models[0].metadata.get("lora_lens.provenance"):
        meta["lora_lens.provenance"] = models[0].metadata["lora_lens.provenance"]
    words = []
    for m in models:
        for w in trigger_words(m.metadata, limit=1000):
            if w not in words:
                words.append(w)
    if words:
        meta["modelspec.trigger_phrase"] = ", ".join(words)
        meta["lora_lens.trigger_words"] = json.dumps(words)
    sources = [source_record(m, w) for m, w in zip(models, weights)]
    meta["lora_lens.blend_sources"] = json.dumps(sources)
    titles = [s.get("title") or s.get("output_name") or s.get("file") for s in sources]
    if "ss_network_dim" in meta:
        if len(ranks) == 1:
            meta["ss_network_dim"] = str(next(iter(ranks)))
            meta["ss_network_alpha"] = str(float(next(iter(ranks))))
        else:
            meta.pop("ss_network_dim", None)
            meta.pop("ss_network_alpha", None)
    if any(titles):
        meta["modelspec.title"] = " + ".join(str(t) for t in titles if t)
    out_model.metadata = meta
    return out_model.with_provenance("blend", {**settings, "sources": sources})
