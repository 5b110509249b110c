"""Base-model weights and norms for the `*_ckpt` and `subspace` scores and rle_ckpt.

Two sources share one interface (`weight(module)`, `norms(module)`):
- `CheckpointBase(path)`: a checkpoint .safetensors read tensor by tensor (st_io), LoRA module names
  mapped to checkpoint keys the way ComfyUI's comfy/lora.py maps them (kohya `lora_unet_*` = the UNet /
  transformer key with dots as underscores; `lora_te1_`/`lora_te2_`/`lora_te_` = CLIP text model keys,
  OpenCLIP `in_proj_weight` split into q/k/v thirds).
- `DictBase(lookup, identity)`: weights already in memory (ComfyUI's MODEL/CLIP; the node builds the
  lookup with comfy.lora.model_lora_keys_unet/clip).
Frobenius and spectral norms of base layers are cached on disk (JSON, one file per base model, keyed by
the base model's identity: for a file, a hash of its size and header, so renames and copies hit).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Callable

import torch

from ..errors import LensError
from ..keys import flat
from ..st_io import load_file, read_header

CKPT_PREFIXES = [
    ("model.diffusion_model.", "diffusion"), ("diffusion_model.", "diffusion"),
    ("conditioner.embedders.0.transformer.", "te1"), ("conditioner.embedders.1.model.", "te2"),
    ("conditioner.embedders.0.model.", "te1"),
    ("cond_stage_model.transformer.", "te1"), ("cond_stage_model.model.", "te1"),
    ("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.clip_g.transformer.", "te2"),
    ("text_encoders.t5xxl.transformer.", "te3"), ("model.", "diffusion"), ("", "diffusion"),
]
_OPENCLIP = [(re.compile(r"^transformer_resblocks_(\d+)_attn_out_proj$"), "text_model_encoder_layers_{}_self_attn_out_proj"),
             (re.compile(r"^transformer_resblocks_(\d+)_mlp_c_fc$"), "text_model_encoder_layers_{}_mlp_fc1"),
             (re.compile(r"^transformer_resblocks_(\d+)_mlp_c_proj$"), "text_model_encoder_layers_{}_mlp_fc2")]
_INPROJ = re.compile(r"^transformer_resblocks_(\d+)_attn_in_proj$")
SKIP = ("first_stage_model.", "vae.", "model_ema.")


def norms_cache_dir() -> str:
    return os.environ.get("LORA_LENS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora-lens")


def spectral_norm(w: torch.Tensor, iters: int = 64) -> float:
    """σ_max of a (flattened) weight: exact SVD for small matrices, else power iteration from a fixed start."""
    w = w.reshape(w.shape[0], -1).float()
    if min(w.shape) <= 1024:
        return float(torch.linalg.matrix_norm(w, ord=2))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(w.shape[1], generator=g).to(w.device)
    v /= v.norm()
    s = 0.0
    for _ in range(iters):
        u = w @ v
        u /= u.norm().clamp_min(1e-30)
        v = w.transpose(0, 1) @ u
        s = float(v.norm())
        v /= max(s, 1e-30)
    return s


def _component_group(component: str) -> str:
    return component if component.startswith("te") else "diffusion"


class _BaseWeights:
    identity: str = ""

    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = cache_dir if cache_dir is not None else norms_cache_dir()
        self._norms: dict[str, list] | None = None
        self._dirty = False
        self._last = (None, None)

    # subclasses: _locate(module) -> hashable id or None; _load(id) -> tensor
    def _locate(self, module):
        raise NotImplementedError

    def _load(self, loc) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, module) -> torch.Tensor | None:
        loc = self._locate(module)
        if loc is None:
            return None
        if self._last[0] != loc:
            w = self._load(loc)
            ws = module.weight_shape()
            if ws is not None and w.numel() != torch.Size(ws).numel():
                return None
            self._last = (loc, w)
        return self._last[1]

    @property
    def _cache_path(self) -> str:
        return os.path.join(self.cache_dir, f"norms-{self.identity[:24]}.json")

    def _cache(self) -> dict:
        if self._norms is None:
            self._norms = {}
            try:
                with open(self._cache_path) as f:
                    data = json.load(f)
                if isinstance(data, dict) and data.get("identity") == self.identity:
                    self._norms = {k: v for k, v in data.get("norms", {}).items()
                                   if isinstance(v, list) and len(v) == 2}
            except (OSError, ValueError):
                pass
        return self._norms

    def norms(self, module) -> dict | None:
        """{'fro': ‖W‖_F, 'spn': σ_max(W)} of the module's base layer (cached), or None when unmapped."""
        loc = self._locate(module)
        if loc is None:
            return None
        key = str(loc)
        cache = self._cache()
        if key not in cache:
            w = self.weight(module)
            if w is None:
                return None
            w = w.float()
            cache[key] = [float(w.norm()), spectral_norm(w)]
            self._dirty = True
        fro, spn = cache[key]
        return {"fro": fro, "spn": spn}

    def save_cache(self) -> None:
        if not self._dirty or not self.identity:
            return
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".norms-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"identity": self.identity, "norms": self._norms}, f)
            os.replace(tmp, self._cache_path)
            self._dirty = False
        except OSError:
            pass  # a cache that cannot be written only costs time


class CheckpointBase(_BaseWeights):
    """Base weights from a checkpoint .safetensors file (never unpickled; read one tensor at a time)."""

    def __init__(self, path: str, cache_dir: str | None = None):
        super().__init__(cache_dir)
        self.path = path
        entries, _, start = read_header(path)
        with open(path, "rb") as f:
            head = f.read(start)
        self.identity = hashlib.sha256(head + str(os.path.getsize(path)).encode()).hexdigest()
        self.map: dict[tuple[str, str], tuple[str, int, int]] = {}
        for key, e in entries.items():
            if key.startswith(SKIP) or len(e["shape"]) < 2:
                continue
            if not (key.endswith(".weight") or key.endswith("in_proj_weight")):
                continue
            for prefix, comp in CKPT_PREFIXES:
                if key.startswith(prefix):
                    rest = key[len(prefix):]
                    break
            rest = rest[: -len(".weight")] if rest.endswith(".weight") else rest[: -len("_weight")]
            f = rest.replace(".", "_")
            if comp == "te2" and f.startswith("transformer_resblocks_"):
                m = _INPROJ.match(f)
                if m:
                    for i, part in enumerate(("q", "k", "v")):
                        self.map[(comp, f"text_model_encoder_layers_{m.group(1)}_self_attn_{part}_proj")] = (key, i, 3)
                    continue
                for rx, tmpl in _OPENCLIP:
                    m = rx.match(f)
                    if m:
                        f = tmpl.format(m.group(1))
                        break
            self.map.setdefault((comp, f), (key, 0, 1))
        if not self.map:
            raise LensError(f"{os.path.basename(path)} has no model weights LoRA Lens can map LoRA modules to; "
                            "give the base checkpoint the LoRA was trained on.")

    def _locate(self, module):
        return self.map.get((_component_group(module.component), flat(module.name)))

    def _load(self, loc) -> torch.Tensor:
        key, i, n = loc
        w = load_file(self.path, keys=[key])[0][key]
        if n > 1:
            rows = w.shape[0] // n
            w = w[i * rows:(i + 1) * rows]
        return w


class DictBase(_BaseWeights):
    """Base weights already in memory: `lookup(module_name) -> tensor | None` (e.g. ComfyUI's model)."""

    def __init__(self, lookup: Callable[[str], torch.Tensor | None], identity: str, cache_dir: str | None = None):
        super().__init__(cache_dir)
        self.lookup = lookup
        self.identity = identity

    def _locate(self, module):
        return module.name if self.lookup(module.name) is not None else None

    def _load(self, loc) -> torch.Tensor:
        return self.lookup(loc)


def fingerprint(named_tensors) -> str:
    """Identity of weights in memory: shapes, dtypes and a few values of every tensor."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat_t = t.detach().reshape(-1)
        if flat_t.numel():
            h.update(flat_t[:: max(1, flat_t.numel() // 16)][:16].float().cpu().numpy().tobytes())
    return h.hexdigest()
