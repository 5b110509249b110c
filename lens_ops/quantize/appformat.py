"""Reading int8 files whose per-tensor scales sit in separate keys (the LoRA Lens desktop app's plain
mode): `<tensor>_scale`, `<tensor>.scale`, `<stem>.scale`, `<stem>_scale` or `<stem>.scale_weight`
where <stem> is the tensor name without `.weight`. No loader reads those keys (ComfyUI applies the raw
integers, about 2000× too strong), so on reading every such tensor becomes its exact dequantized value
(float32 = int8 · scale) and the scale keys disappear: everything in lens_ops then sees the true ΔW.
"""
from __future__ import annotations

import torch

from ..errors import LensError

INT_DTYPES = (torch.int8, torch.uint8)
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def scale_key_candidates(key: str) -> list[str]:
    stem = key[: -len(".weight")] if key.endswith(".weight") else key
    out = [key + "_scale", key + ".scale", stem + ".scale", stem + "_scale", stem + ".scale_weight",
           stem + ".weight_scale"]
    return list(dict.fromkeys(k for k in out if k != key))


def find_separate_scales(state: dict) -> dict[str, str]:
    """{quantized tensor key: its scale key} for int8/fp8 tensors that have a separate scale key."""
    found = {}
    for k, t in state.items():
        if isinstance(t, torch.Tensor) and (t.dtype in INT_DTYPES or t.dtype in FLOAT8) and t.ndim >= 1:
            for c in scale_key_candidates(k):
                s = state.get(c)
                if isinstance(s, torch.Tensor) and s.is_floating_point() and c not in found.values():
                    found[k] = c
                    break
    return found


def resolve_separate_scales(state: dict) -> tuple[dict, int]:
    """State with app-style int8 tensors dequantized (float32) and their scale keys removed, in the same
    key order; and how many tensors were converted. States without such tensors are returned as is."""
    if not any(isinstance(t, torch.Tensor) and (t.dtype in INT_DTYPES or t.dtype in FLOAT8)
               for t in state.values()):
        return state, 0
    pairs = find_separate_scales(state)
    if not pairs:
        return state, 0
    scale_keys = set(pairs.values())
    out = type(state)() if type(state) is not dict else {}
    if hasattr(state, "metadata"):
        out.metadata = dict(state.metadata)
    for k, t in state.items():
        if k in scale_keys:
            continue
        if k in pairs:
            s = state[pairs[k]].to(torch.float64)
            if not bool(torch.isfinite(s).all()):
                raise LensError(f"The scale {pairs[k]!r} of {k!r} is not a finite number; the file is damaged.")
            if s.numel() != 1:
                try:
                    torch.broadcast_shapes(s.shape, t.shape)
                except RuntimeError:
                    raise LensError(f"The scale {pairs[k]!r} (shape {tuple(s.shape)}) does not fit tensor {k!r} "
                                    f"(shape {tuple(t.shape)}).") from None
            t = (t.to(torch.float64) * s).to(torch.float32)
        out[k] = t
    return out, len(pairs)
