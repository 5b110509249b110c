"""Pruning of one module: new balanced factors from a decomposition and a kept set, with alpha chosen
so that ComfyUI's scale (alpha / down.shape[0]) reproduces exactly the kept part of ΔW."""
from __future__ import annotations

import math

import torch

from ..kinds import BY_NAME
from ..model import LoRAModule

KOHYA_SUFFIX = {"up": ".lora_up.weight", "down": ".lora_down.weight", "alpha": ".alpha"}
PEFT_SUFFIX = {"up": ".lora_B.weight", "down": ".lora_A.weight"}


def new_alpha(module, k: int):
    """(alpha tensor or None, effective scale). Keeps the module's alpha/rank ratio, stored in the alpha
    tensor's own dtype and shape; the effective scale is what ComfyUI will compute from the stored value."""
    t = module.tensors.get("alpha")
    if t is None:
        return None, 1.0
    ratio = module.scale()
    value = torch.full_like(t, ratio * k)
    actual = float(value.float().item()) if value.numel() == 1 else float(value.reshape(-1)[0].float())
    if actual == 0.0 or not math.isfinite(actual):
        value = torch.full(t.shape, float(k), dtype=torch.float32)  # degenerate stored dtype: scale 1
        actual = float(k)
    return value, actual / k


def factor_shapes(module, k: int):
    """Shapes of (up, down) at rank k, in the module's own layout (LoCon/Tucker keep 4-D conv shapes)."""
    ws = tuple(module.weight_shape())
    up_nd = module.tensors["up"].ndim if "up" in module.tensors else len(ws)
    up_shape = (ws[0], k) + (1,) * (max(up_nd, 2) - 2) if len(ws) > 2 else (ws[0], k)
    down_shape = (k,) + ws[1:]
    return up_shape, down_shape


def build_factors(dec, idx: torch.Tensor, rescale: float, scale: float, device="cpu"):
    """float32 (up, down) flat with scale·up@down = rescale · U[:, idx]·S[idx]·Vh[idx]."""
    s = dec.S[idx].double() * rescale
    root = (s / abs(scale)).sqrt()
    sign = -1.0 if scale < 0 else 1.0
    if dec.route == "factored":
        dt = dec.P.dtype
        if dec.B is not None:
            b, a = dec.B, dec.A
        else:
            b, a = dec.module.kind.lowrank(dec.module, dt, device)
        p = dec.P.to(device)[:, idx] * (root * sign).to(device, dt)
        q = dec.Qt.to(device)[idx] * root.to(device, dt).unsqueeze(1)
        return b @ p, q @ a
    dt = dec.U.dtype
    u, vh = dec.U.to(device)[:, idx], dec.Vh.to(device)[idx]
    return u * (root * sign).to(device, dt), vh * root.to(device, dt).unsqueeze(1)


def pruned_tensors(dec, idx: torch.Tensor, rescale: float, dtype=None, device="cpu") -> dict:
    """The module's new tensors (roles → tensors) at the kept set `idx`, in the original role order."""
    m = dec.module
    k = int(idx.numel())
    alpha, scale = new_alpha(m, k)
    up, down = build_factors(dec, idx, rescale, scale, device)
    out_dtype = dtype or m.tensors["up"].dtype
    up_shape, down_shape = factor_shapes(m, k)
    new = {"up": up.reshape(up_shape).to("cpu", out_dtype).contiguous(),
           "down": down.reshape(down_shape).to("cpu", out_dtype).contiguous()}
    if alpha is not None:
        new["alpha"] = alpha
    out = {}
    for role in m.keys:
        if role == "mid":
            continue  # Tucker core folded into down: the result is a plain conv LoRA
        out[role] = new.get(role, m.tensors[role])
    return out


def converted_module(dec, idx: torch.Tensor, rescale: float, dtype, peft: bool) -> LoRAModule:
    """A LoHa/LoKr module as a plain LoRA at the kept set (names in the file's convention)."""
    m = dec.module
    k = int(idx.numel())
    up, down = build_factors(dec, idx, rescale, 1.0)
    ws = tuple(m.weight_shape())
    src_dtype = next(t.dtype for r, t in m.tensors.items() if r != "alpha" and t.is_floating_point())
    out_dtype = dtype or src_dtype
    up_shape = (ws[0], k) + (1,) * (len(ws) - 2)
    tensors = {"down": down.reshape((k,) + ws[1:]).to("cpu", out_dtype).contiguous(),
               "up": up.reshape(up_shape).to("cpu", out_dtype).contiguous()}
    suffix = PEFT_SUFFIX if peft else KOHYA_SUFFIX
    keys = {"down": m.name + suffix["down"], "up": m.name + suffix["up"]}
    if not peft:
        tensors["alpha"] = torch.tensor(float(k), dtype=out_dtype)
        keys["alpha"] = m.name + ".alpha"
    new = LoRAModule(m.name, keys, tensors, BY_NAME["lora"], m.component)
    new.kind.validate(new)
    return new


def dora_axis_output(module) -> bool:
    """ComfyUI normalises DoRA over the output axis when dora_scale's first dim equals the weight's rows;
    there the norm is that of the base weight alone, so the magnitude does not depend on ΔW."""
    d = module.tensors.get("dora_scale", module.tensors.get("magnitude"))
    return d is not None and d.shape[0] == module.weight_shape()[0]


def recomputed_dora(module, new_module, base_w: torch.Tensor, rescale: float, device="cpu") -> torch.Tensor:
    """Input-axis DoRA: m' = m·(‖W+ΔW'‖+eps)/(‖W+rescale·ΔW‖+eps) per input column (ComfyUI's formula), so
    the applied weight m'·(W+ΔW')/‖W+ΔW'‖ equals m·(W+ΔW')/‖W+rescale·ΔW‖: only the dropped part changes."""
    role = "dora_scale" if "dora_scale" in module.tensors else "magnitude"
    mag = module.tensors[role]
    w = base_w.to(device, torch.float32)
    old = module.delta(torch.float32, device).reshape(w.shape) * rescale
    new = new_module.delta(torch.float32, device).reshape(w.shape)
    eps = torch.finfo(base_w.dtype if base_w.is_floating_point() else torch.float32).eps

    def col_norm(x):
        return x.transpose(0, 1).reshape(x.shape[1], -1).norm(dim=1)
    ratio = (col_norm(w + new) + eps) / (col_norm(w + old) + eps)
    shape = [1] * mag.ndim
    shape[1 if mag.ndim > 1 else 0] = -1
    return (mag.float() * ratio.reshape(shape).to(mag.device)).to(mag.dtype)
