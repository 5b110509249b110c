"""Quantize one module and fold every per-tensor scale into its alpha, per module kind.

ComfyUI casts each LoRA tensor to float and multiplies the product by alpha/dim (dim = the kind's
rank; no alpha → 1). ΔW is linear in every factor (LoRA up/down/mid; LoHa's four factors and CP
cores, since (w1a w1b)⊙(w2a w2b) is linear in each; LoKr's kron(w1, w2) in each side's factors), so
per-tensor scales s_i multiply into one number: alpha_new = alpha_old·Π s_i, with alpha_old = dim
where the file had no alpha (its scale was 1) and a new `.alpha` key is added. alpha is stored as a
float32 0-dim tensor (fp16 would round the folded value).

LoKr with neither side decomposed is applied by ComfyUI with scale 1 whatever alpha says, so alpha
cannot carry a scale there: the smaller side is kept in float32 and carries the other side's scale
("carrier"). DoRA's dora_scale stays float: ComfyUI multiplies the LoRA product by alpha/rank before
the weight decomposition, so the folded alpha reaches it exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LensError
from ..kinds.base import as_float
from ..kinds.lora import fold_mid
from ..model import DTYPE_NAMES, LoRAModule
from . import transforms
from .codec import FORMATS, check_finite, decode, encode
from .metrics import (SMALL, Stats, dense_stats, error_from_blocks, level_grams, level_route_ok, lowrank_error,
                      residual_abs, residual_levels, residual_row_stats, row_sample_stats, tensor_stats)

FOLDABLE = ("lora", "loha", "lokr")
PREDICT_MARGIN_DB = 3.0


@dataclass
class ModuleResult:
    name: str
    kind: str
    module: LoRAModule           # the new module (or the original one when kept)
    method: str
    stored: str
    delta: Stats = field(default_factory=Stats)
    tensors: Stats = field(default_factory=Stats)
    quantized: bool = True
    note: str = ""
    alpha: float | None = None
    kept_snr: float | None = None   # ΔW SNR the module would have had, when kept for being under threshold

    def record(self) -> dict:
        return {"name": self.name, "kind": self.kind, "method": self.method, "stored": self.stored,
                "quantized": self.quantized, "alpha": self.alpha, "note": self.note,
                "delta": self.delta.as_dict(), "tensors": self.tensors.as_dict()}


def _dense_dtype(m: LoRAModule) -> torch.dtype:
    shape = m.weight_shape()
    n = 1
    for d in shape or ():
        n *= int(d)
    return torch.float64 if n <= (1 << 22) else torch.float32


def _amax_norm(x: torch.Tensor) -> tuple[float, float]:
    vn = torch.linalg.vector_norm
    return float(vn(x, math.inf)), float(vn(x))


def predicted_noise(b: torch.Tensor, a: torch.Tensor, qmax: float = 127.0, stats=None) -> float:
    """Expected ‖b@a − b̂@â‖² for independent uniform rounding errors (step Δ = max|x|/qmax):
    n·Δ_b²/12·‖a‖² + m·Δ_a²/12·‖b‖². Used only to skip candidates that cannot win."""
    (mb, nb), (ma, na) = stats or (_amax_norm(b), _amax_norm(a))
    db, da = mb / qmax, ma / qmax
    return (b.shape[0] * db * db * na * na + a.shape[1] * da * da * nb * nb) / 12.0


def _candidates(method: str) -> list[str]:
    return list(transforms.METHODS) if method == "auto" else [method]


def _alpha_tensor(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def _method_label(method: str, r: int) -> str:
    return method + (f" ({transforms.rotation_name(r)})" if "rotate" in method else "")


def _encode(x: torch.Tensor, fmt: str, where: str):
    """(stored tensor, scale, dequantized x̂ in x's dtype, x − x̂). Same maths as codec.encode (round(x/s),
    s = max|x|/qmax), in as few passes as possible: this runs on every factor of a file."""
    if not x.numel():
        q, s = encode(x, fmt, where)
        return q, s, x.clone(), x.clone()
    s = _step(x, fmt, where)
    if s is None:
        q, s = encode(x, fmt, where, amax=0.0)
        return q, s, torch.zeros_like(x), x.clone()
    dtype, qmax = FORMATS[fmt]
    y = x / s
    if fmt == "int8":
        y.round_().clamp_(-qmax, qmax)
        q = y.to(dtype)
        xq = y.mul_(s)  # y holds the integers exactly, so this equals decode(q, s)
    else:
        q = y.clamp_(-qmax, qmax).to(dtype)
        xq = decode(q, s, x.dtype)
    return q, s, xq, x - xq


def _pair_metrics(b, a, bq, aq, eb, ea, scale: float, mode: str) -> Stats:
    """ΔW stats of one quantized pair: SNR/MSE/relative error exact from the factors; MAE/max error on a row
    sample ('sampled') or not at all ('none'; 'exact' modules get a dense pass afterwards)."""
    err, signal = lowrank_error(b, a, bq, aq, scale, with_signal=True, eb=eb, ea=ea)
    return _delta_stats(signal, err, b, a, bq, aq, eb, ea, scale, mode)


def _delta_stats(signal, err, b, a, bq, aq, eb, ea, scale: float, mode: str) -> Stats:
    """ΔW Stats from the exact signal/error, with MAE and max error from a row sample when mode is 'sampled'."""
    st = Stats(signal, err, None, None, b.shape[0] * a.shape[1])
    if mode == "sampled":
        _take_rows(st, row_sample_stats(b, a, bq, aq, scale, eb=eb, ea=ea))
    return st


def _take_rows(st: Stats, rs: Stats) -> None:
    st.abs_sum, st.max_abs, st.abs_count, st.sampled = rs.abs_sum, rs.max_abs, rs.abs_count, rs.sampled


@dataclass
class _Candidate:
    """One transform of a LoRA pair, quantized and measured."""
    err: float
    delta: Stats
    tensors: Stats
    qb: torch.Tensor
    sb: float
    qa: torch.Tensor
    sa: float


def _step(x: torch.Tensor, fmt: str, where: str) -> float | None:
    """The per-tensor step s = max|x|/qmax of a non-empty x (None when x is all zero); NaN/Inf refused here, where
    max|x| sees them for free."""
    lo, hi = torch.aminmax(x)
    amax = max(-float(lo), float(hi))
    if not math.isfinite(amax):
        check_finite(x, where)
    return amax / FORMATS[fmt][1] if amax != 0.0 else None


def _residual_code(x: torch.Tensor, where: str):
    """(rounded codes as floats, scale, residual d = x/s − q) for int8, or None for an empty or all-zero x. The same
    codes as codec.encode: round(x/s) with s = max|x|/127 (|x/s| ≤ 127 up to float rounding, so no clamp)."""
    s = _step(x, "int8", where) if x.numel() else None
    if s is None:
        return None
    y = x / s
    q = torch.round(y)
    return q, s, y.sub_(q)


def _int8_candidate(bt, at, scale: float, mode: str, name: str) -> _Candidate | None:
    """The int8 route in as few passes over the factors as possible: the encoder's residual d = x/s − q gives the
    sampled ΔW rows, the stored-tensor MAE / max error and the two finer int8 levels of the rounding error that the
    exact ΔW error needs (metrics.level_grams, whose block traces are also Σx² and Σe² of the stored tensors), with
    no dequantized copy and no separate error tensor. None when it does not apply (small modules: float64 metrics;
    a zero factor; a step too small for float32)."""
    if bt.numel() + at.numel() <= SMALL or bt.dtype != torch.float32:
        return None
    cb = _residual_code(bt, f"Module {name} (up)")
    ca = _residual_code(at, f"Module {name} (down)") if cb is not None else None
    if ca is None:
        return None
    (fb, sb, db), (fa, sa, da) = cb, ca
    r = bt.shape[1]
    if not level_route_ok(bt.shape[0], at.shape[1], sb, sa):
        return None
    (abs_b, max_b), (abs_a, max_a) = residual_abs(db, sb), residual_abs(da, sa)
    rows = residual_row_stats(fb, db, sb, at, da, sa, scale) if mode == "sampled" else None
    lb, la = residual_levels(fb, db, sb, 1), residual_levels(fa, da, sa, 0)
    blocks = level_grams(lb, la, sb, sa)
    if blocks is None:
        return None
    qb, qa = lb[0][:, :r].contiguous(), la[0][:r].clone()     # the stored codes: level 0
    err, signal = error_from_blocks(blocks, scale)
    g_ee, g_eq, g_qq, h_aa, h_ee, _ = blocks
    tr = lambda x: float(x.diagonal().sum())
    b_sq = tr(g_qq) + 2 * tr(g_eq) + tr(g_ee)                  # ‖b‖² = ‖b̂ + E_b‖²
    tstats = Stats().add(Stats(b_sq, tr(g_ee), abs_b, max_b, bt.numel()))
    tstats.add(Stats(tr(h_aa), tr(h_ee), abs_a, max_a, at.numel()))
    delta = Stats(signal, err, None, None, bt.shape[0] * at.shape[1])
    if rows is not None:
        _take_rows(delta, rows)
    return _Candidate(err, delta, tstats, qb, sb, qa, sa)


def _candidate(bt, at, fmt: str, scale: float, mode: str, name: str) -> _Candidate:
    """Quantize one transformed pair and measure it (the fast int8 route where it applies)."""
    if fmt == "int8":
        fast = _int8_candidate(bt, at, scale, mode, name)
        if fast is not None:
            return fast
    qb, sb, bq, eb = _encode(bt, fmt, f"Module {name} (up)")
    qa, sa, aq, ea = _encode(at, fmt, f"Module {name} (down)")
    err, sig = lowrank_error(bt, at, bq, aq, scale, with_signal=True, eb=eb, ea=ea, qb=qb, sb=sb, qa=qa, sa=sa)
    delta = _delta_stats(sig, err, bt, at, bq, aq, eb, ea, scale, mode)
    tstats = Stats().add(tensor_stats(bt, bq, eb)).add(tensor_stats(at, aq, ea))
    return _Candidate(err, delta, tstats, qb, sb, qa, sa)


def _lora(m: LoRAModule, fmt: str, method: str, mode: str, device) -> ModuleResult:
    t = m.tensors
    up, down, mid = t["up"], t["down"], t.get("mid")
    r = int(down.shape[0])
    scale = m.scale()
    alpha_old = m.alpha if m.alpha is not None else float(r)
    b = as_float(up, torch.float32, device).reshape(up.shape[0], -1)
    a = as_float(down, torch.float32, device)
    new = dict(t)
    tstats = Stats()
    if mid is not None:  # Tucker: three per-tensor scales, no rank-space transform (mid couples both sides)
        mf = as_float(mid, torch.float32, device)
        qb, sb, bq, eb = _encode(b, fmt, f"Module {m.name} (up)")
        qa, sa, aq, ea = _encode(a, fmt, f"Module {m.name} (down)")
        qm, sm, mq, em = _encode(mf, fmt, f"Module {m.name} (mid)")
        af, aqf = fold_mid(a, mf), fold_mid(aq, mq)
        delta = _pair_metrics(b, af, bq, aqf, eb, None, scale, mode)
        for x, xq, e in ((b, bq, eb), (a, aq, ea), (mf, mq, em)):
            tstats.add(tensor_stats(x, xq, e))
        new.update(up=qb.reshape(up.shape).cpu(), down=qa.reshape(down.shape).cpu(), mid=qm.cpu())
        s_total, chosen = sb * sa * sm, "naive (Tucker)"
    else:
        a = a.reshape(r, -1)
        cands = _candidates(method)
        if len(cands) > 1:
            prepared = {c: transforms.apply(c, b, a) for c in cands}
            stats = {c: (_amax_norm(prepared[c][0]), _amax_norm(prepared[c][1])) for c in cands}
            for c in cands:
                if not all(math.isfinite(v) for pair in stats[c] for v in pair):
                    check_finite(b, f"Module {m.name} (up)")
                    check_finite(a, f"Module {m.name} (down)")
            if fmt == "int8":
                preds = {c: predicted_noise(*prepared[c], stats=stats[c]) for c in cands}
                best_pred = min(preds.values())
                cands = [c for c in cands if preds[c] <= best_pred * 10 ** (PREDICT_MARGIN_DB / 10)]
        else:
            prepared = {cands[0]: transforms.apply(cands[0], b, a)}
        best, chosen = None, None
        try:
            for c in cands:
                got = _candidate(*prepared[c], fmt, scale, mode, m.name)
                if best is None or got.err < best.err:
                    best, chosen = got, c
        except LensError:   # NaN/Inf seen after the rank-space transform (which spreads it): count it where it is
            check_finite(b, f"Module {m.name} (up)")
            check_finite(a, f"Module {m.name} (down)")
            raise
        prepared = None
        delta, tstats = best.delta, best.tensors
        new.update(up=best.qb.reshape(up.shape).cpu(), down=best.qa.reshape(down.shape).cpu())
        s_total, chosen = best.sb * best.sa, _method_label(chosen, r)
    alpha_new = alpha_old * s_total
    new["alpha"] = _alpha_tensor(alpha_new)
    mod = m.with_tensors(new)
    if mode == "exact":
        delta = _exact_abs(m, mod, delta, device)
    return ModuleResult(m.name, m.kind.name, mod, chosen, fmt, delta, tstats, alpha=float(new["alpha"]))


def _exact_abs(m: LoRAModule, mod: LoRAModule, delta: Stats, device) -> Stats:
    """`delta` with MAE and max error from the dense ΔW of both modules (float64 where it is small enough)."""
    w = _dense_dtype(m)
    dense = dense_stats(m.delta(w, device), mod.delta(w, device))
    if w == torch.float64:
        return dense
    # float32 dot products over millions of entries drift (~0.1 %): keep the exact energies
    return Stats(delta.signal, delta.error, dense.abs_sum, dense.max_abs, delta.count)


FP16_MAX = 65504.0


def keep_in_fp16(m: LoRAModule, mode: str, device="cpu") -> tuple[LoRAModule, Stats | None, str]:
    """The keep-fp16 choice for a module int8 would hurt: (module with its factor tensors in fp16, the exact ΔW
    stats of that rounding against the original (None when nothing changed), where it went). A module already in
    fp16 is kept as it is; one with values beyond fp16's range keeps its own dtype (fp16 would make them inf)."""
    roles = [r for r, t in m.tensors.items() if r not in ("alpha", "dora_scale") and t.is_floating_point()]
    if all(m.tensors[r].dtype == torch.float16 for r in roles):
        return m, None, "kept in fp16"
    if any(t.numel() and float(t.abs().max()) > FP16_MAX for t in (m.tensors[r] for r in roles)):
        own = "+".join(sorted({DTYPE_NAMES.get(m.tensors[r].dtype, str(m.tensors[r].dtype)) for r in roles}))
        return m, None, f"kept in {own} (values beyond fp16's range)"
    mod = m.with_tensors({**m.tensors, **{r: m.tensors[r].to(torch.float16) for r in roles}})
    if m.kind.name == "lora":
        b, a, s = m.lowrank(torch.float32, device)
        bq, aq, _ = mod.lowrank(torch.float32, device)
        st = _pair_metrics(b, a, bq, aq, None, None, s, "sampled" if mode == "sampled" else "none")
        if mode == "exact":
            st = _exact_abs(m, mod, st, device)
    else:
        w = _dense_dtype(m)
        st = dense_stats(m.delta(w, device), mod.delta(w, device))
    return mod, st, "kept in fp16"


# LoHa / LoKr: (b_role, a_role) pairs that may be rebalanced/rotated, given the tensors present.
def _pairs(m: LoRAModule) -> list[tuple[str, str]]:
    t = m.tensors
    if m.kind.name == "loha":
        return [] if "hada_t1" in t else [("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")]
    pairs = []
    if "lokr_w1_a" in t:
        pairs.append(("lokr_w1_a", "lokr_w1_b"))
    if "lokr_w2_a" in t and "lokr_t2" not in t:
        pairs.append(("lokr_w2_a", "lokr_w2_b"))
    return pairs


def _factor_roles(m: LoRAModule) -> list[str]:
    prefix = "hada_" if m.kind.name == "loha" else "lokr_"
    return [r for r in m.tensors if r.startswith(prefix)]


def _product_kind(m: LoRAModule, fmt: str, method: str, device) -> ModuleResult:
    """LoHa and LoKr: every factor gets its own scale; scales fold into alpha (or into a float carrier)."""
    roles = _factor_roles(m)
    w = _dense_dtype(m)
    ref = m.delta(w, device)
    signal = float(ref.double().pow(2).sum())
    pairs = _pairs(m)
    rank = m.rank()
    carrier = None
    if m.kind.name == "lokr" and rank is None:  # ComfyUI ignores alpha here: fold into a float32 side
        carrier = min(("lokr_w1", "lokr_w2"), key=lambda k: m.tensors[k].numel())
        check_finite(m.tensors[carrier], f"Module {m.name} ({carrier})")  # the codec never sees it
    cands = _candidates(method) if pairs else ["naive"]
    if method == "auto" and pairs:
        cands = ["naive", "rebalance+rotate"]
    best = None
    for c in cands:
        work = {k: as_float(v, torch.float32, device) for k, v in m.tensors.items() if k in roles}
        for rb, ra in pairs:
            b, a = work[rb], work[ra]
            bt, at = transforms.apply(c, b.flatten(start_dim=1), a.flatten(start_dim=1))
            work[rb], work[ra] = bt.reshape(b.shape), at.reshape(a.shape)
        q, s_total, tstats = {}, 1.0, Stats()
        for role in roles:
            if role == carrier:
                continue
            qt, st = encode(work[role], fmt, f"Module {m.name} ({role})")
            tstats.add(tensor_stats(work[role], decode(qt, st)))
            q[role], s_total = qt, s_total * st
        new = dict(m.tensors)
        new.update({k: v.cpu() for k, v in q.items()})
        if carrier is not None:
            new[carrier] = (work[carrier] * s_total).to(torch.float32).cpu()
        else:
            alpha_old = m.alpha if m.alpha is not None else float(rank)
            new["alpha"] = _alpha_tensor(alpha_old * s_total)
        mod = m.with_tensors(new)
        got = mod.delta(w, device)
        st = dense_stats(ref, got)
        st.signal = signal
        if best is None or st.error < best[0].error:
            best = (st, c, mod, tstats)
    st, c, mod, tstats = best
    r = rank or 0
    label = _method_label(c, r) if pairs else "naive"
    note = ""
    if carrier is not None:
        label += f", scales carried by {carrier} (float32)"
        note = "LoKr without a decomposed side: ComfyUI ignores alpha here, so the scale rides on the smaller side."
    alpha = float(mod.tensors["alpha"]) if "alpha" in mod.tensors else None
    return ModuleResult(m.name, m.kind.name, mod, label, fmt, st, tstats, note=note, alpha=alpha)


MAE_MODES = ("exact", "sampled", "none")


def quantize_module(m: LoRAModule, fmt: str = "int8", method: str = "auto", dense: bool = False,
                    device="cpu", mae_max: str | None = None) -> ModuleResult:
    """Quantize one module; non-foldable kinds come back unchanged with quantized=False.

    ΔW SNR, MSE and relative error are always exact. `mae_max` says how ΔW MAE and max error are obtained:
    "exact" (dense ΔW), "sampled" (exactly, on a deterministic sample of rows) or "none"; default from the
    older `dense` flag (True: exact, False: none). LoHa/LoKr are always measured densely (exact)."""
    if method not in ("auto",) + transforms.METHODS:
        raise LensError(f"Unknown method {method!r}; use auto, {', '.join(transforms.METHODS)}.")
    mode = mae_max or ("exact" if dense else "none")
    if mode not in MAE_MODES:
        raise LensError(f"Unknown MAE/max-error mode {mode!r}; use {', '.join(MAE_MODES)}.")
    kind = m.kind.name
    if kind in FOLDABLE and _already_stored_as(m, fmt):
        # its factors are already codes of this format (e.g. a QuantizeInt8 output): re-rounding them, after a
        # rank-space transform, would only lose precision for no size gain, so the module is kept exactly
        return ModuleResult(m.name, kind, m, "kept", _dtype_label(m), quantized=False,
                            note=f"already {fmt}: kept as is (re-rounding would only lose precision)", alpha=m.alpha)
    if kind == "lora":
        return _lora(m, fmt, method, mode, device)
    if kind in ("loha", "lokr"):
        return _product_kind(m, fmt, method, device)
    why = {"diff": "full diff: ComfyUI applies it without alpha", "norm": "norm diff: applied without alpha",
           "set": "set_weight replaces the weight", "unknown": "not a LoRA module this tool understands"}
    reason = why.get(kind, "its change depends on the base weight")
    stored = _dtype_label(m)
    return ModuleResult(m.name, kind, m, "kept", stored, quantized=False, note=f"kept as is ({reason})",
                        alpha=m.alpha)


def _already_stored_as(m: LoRAModule, fmt: str) -> bool:
    """True when every factor tensor (all but alpha / dora_scale) is already stored in `fmt`'s dtype."""
    dtype = FORMATS[fmt][0]
    roles = [r for r in m.tensors if r not in ("alpha", "dora_scale")]
    return bool(roles) and all(m.tensors[r].dtype == dtype for r in roles)


def _dtype_label(m: LoRAModule) -> str:
    names = sorted({DTYPE_NAMES.get(t.dtype, str(t.dtype)) for r, t in m.tensors.items() if r != "alpha"})
    return "+".join(names) or "none"
