"""Lossy layers of a .loradb: PruneRank recipe, int8 (alpha folded, QuantizeInt8) and shared-basis coding.

Shared basis (per module name, over every entry that has that module with the same shape): with each
LoRA's exact factored SVD ΔWᵢ = Uᵢ Sᵢ Vᵢᵀ (lens_ops.lowrank), the group's column basis U is the top-k left
singular space of [U₁S₁ … U_NS_N] and the row basis V likewise from [V₁S₁ …]; each LoRA keeps a small core
Cᵢ = U⁺ ΔWᵢ V⁺ᵀ (k×k, rank ≤ rᵢ), stored as two fp16 factors Lᵢ (k×r′) and Rᵢ (r′×k). Extraction computes
upᵢ = U·Lᵢ and downᵢ = Rᵢ·Vᵀ (float64, rounded to the entry's dtype): a standard LoRA again. U and V are
stored once (fp16, or int8 with one scale per column when int8 is asked for). k is the smallest value at
which every LoRA of the group keeps its module ΔW SNR ≥ the budget *after* all rounding (measured
exactly from the factors); `auto` uses the shared basis only where it needs fewer bytes than the
LoRAs' own factors, `on` wherever the budget can be met with a k below the group's total rank.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile

import numpy as np
import torch

from ..errors import LensError
from ..lowrank import factored_svd, frobenius_inner
from ..model import LoRAModel
from ..st_io import save_file
from .codec import encode_stream
from .entry import mm_product, operand, store_tensors

ELIGIBLE_ROLES = ({"up", "down"}, {"up", "down", "alpha"})
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INT8_MARGIN_DB = 4.0   # int8 modules keep ≥ budget + 4 dB on their own (room for pruning's error)
LOSSLESS_GUESS = {1: 0.95, 2: 0.82, 4: 0.9}   # measured lossless ratios of factor bytes per element size


def module_snr(orig, new, device="cpu") -> tuple[float, float]:
    """(‖ΔW‖², ‖ΔW − ΔW′‖²) of one module, exactly (factored when both are products, else dense)."""
    fa, fb = orig.lowrank(torch.float64, device), new.lowrank(torch.float64, device)
    if fa is not None and fb is not None:
        b1, a1, s1 = fa
        b2, a2, s2 = fb
        b1, b2 = b1 * s1, b2 * s2
        x = frobenius_inner(b1, a1, b1, a1)
        y = frobenius_inner(b2, a2, b2, a2)
        xy = frobenius_inner(b1, a1, b2, a2)
        return float(x), float(max(x + y - 2 * xy, 0.0))
    da, db = orig.delta(torch.float64, device), new.delta(torch.float64, device)
    if da is None or db is None:
        same = all(torch.equal(orig.tensors[r], new.tensors.get(r, torch.empty(0))) for r in orig.tensors)
        return 1.0, 0.0 if same else 1.0
    if da.shape != db.shape:
        db = db.reshape(da.shape)
    return float(da.pow(2).sum()), float((da - db).pow(2).sum())


def error_of(orig: LoRAModel, new: LoRAModel, device="cpu") -> dict:
    sig = err = 0.0
    worst, worst_name = math.inf, None
    for m in orig.modules:
        if m.kind.name == "unknown":
            continue
        n = new.get(m.name)
        if n is None:   # a module the lossy layers dropped entirely: all its energy is error
            s, _ = module_snr(m, m, device)
            e = s
        else:
            s, e = module_snr(m, n, device)
        sig, err = sig + s, err + e
        if s > 0:
            snr = math.inf if e == 0 else 10 * math.log10(s / e)
            if snr < worst:
                worst, worst_name = snr, m.name
    rel = math.sqrt(err / sig) if sig > 0 else 0.0
    snr = math.inf if err == 0 else 10 * math.log10(sig / err)
    fin = lambda x: None if not math.isfinite(x) else round(x, 3)  # noqa: E731
    return {"snr_db": fin(snr), "rel_error": rel, "worst_module_snr_db": fin(worst), "worst_module": worst_name,
            "measured": "exact ΔW Frobenius error against the original, all modules, at pack time"}


# ------------------------------------------------------------------ shared basis
def _eligible(m) -> bool:
    if set(m.tensors) not in ELIGIBLE_ROLES or m.kind.name != "lora" or m.is_dora:
        return False
    up, down = m.tensors["up"], m.tensors["down"]
    return up.dtype in FLOATS and down.dtype in FLOATS and (up.ndim == 2 or (up.ndim == 4 and up.shape[2:] == (1, 1)))


def _basis(mats: list[torch.Tensor], k: int) -> torch.Tensor:
    """Top-k left singular vectors of the column-stack of mats (via the small Gram matrix)."""
    x = torch.cat(mats, dim=1)
    g = x.T @ x
    lam, w = torch.linalg.eigh(g)
    idx = torch.argsort(lam, descending=True)[:k]
    lam, w = lam[idx].clamp_min(1e-300), w[:, idx]
    u = (x @ w) / lam.sqrt()
    q, _ = torch.linalg.qr(u)
    return q


def _quant_cols(u: torch.Tensor, int8: bool):
    """(stored tensor, scale or None) for a basis: fp16, or int8 codes with one fp32 scale per column."""
    if not int8:
        return u.to(torch.float16), None
    scale = (u.abs().amax(dim=0) / 127.0).clamp_min(1e-30).to(torch.float32)
    codes = torch.round(u / scale.double()[None, :]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def _lstsq_left(x: torch.Tensor) -> torch.Tensor:
    """(XᵀX)⁻¹Xᵀ for a tall, well-conditioned X (a near-orthonormal rounded basis)."""
    return torch.linalg.solve(x.T @ x, x.T)


def _try_k(ms, lowr, U_all, V_all, k, int8, budget_ratio, refs=None):
    """Build the shared coding of one module at basis size k; None if some LoRA misses the budget."""
    Uq, Us = _quant_cols(U_all[:, :k], int8)
    Vq, Vs = _quant_cols(V_all[:, :k], int8)
    Ud, Vd = operand(Uq, Us, False), operand(Vq, Vs, False)
    pu, pv = _lstsq_left(Ud), _lstsq_left(Vd)
    outs = []
    for j, (m, (b, a, sc)) in enumerate(zip(ms, lowr)):
        r = b.shape[1]
        bs = b * sc
        rb, ra = refs[j] if refs else (bs, a)   # the error is measured against the original module
        core = (pu @ bs) @ (a @ pv.T)          # k×k, rank ≤ r
        cu, cs, cvh = torch.linalg.svd(core)
        rr = min(r, k)
        scale_new = (m.alpha / rr) if m.alpha is not None else 1.0
        # cores stay fp16 (int8 cores cost more error than the bytes they save: measured)
        L = _quant_cols(cu[:, :rr] * cs[:rr].sqrt() / scale_new, False)
        R = _quant_cols(cs[:rr].sqrt()[:, None] * cvh[:rr], False)
        up = mm_product(Ud, operand(L[0], L[1], False), m.tensors["up"].dtype)
        down = mm_product(operand(R[0], R[1], False), Vd.T, m.tensors["down"].dtype)
        # exact error of the rounded result against the original module
        x = frobenius_inner(rb, ra, rb, ra)
        b2 = up.to(torch.float64) * scale_new
        a2 = down.to(torch.float64)
        e = x + frobenius_inner(b2, a2, b2, a2) - 2 * frobenius_inner(rb, ra, b2, a2)
        if x > 0 and float(e.clamp_min(0) / x) > budget_ratio:
            return None
        outs.append((L, R, up, down, rr))
    return {"k": k, "U": (Uq, Us), "V": (Vq, Vs), "outs": outs}


def _own_bytes(ms) -> float:
    """What the group's own factors would cost losslessly (identical tensors counted once: dedup)."""
    seen, total = set(), 0.0
    for m in ms:
        for r, t in m.tensors.items():
            if r == "alpha":
                continue
            key = (t.dtype, tuple(t.shape), hash(t.contiguous().view(torch.uint8).reshape(-1)[:4096].numpy().tobytes()),
                   float(t.float().sum()))
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size() * LOSSLESS_GUESS.get(t.element_size(), 1.0)
    return total


def plan_shared(models: list[LoRAModel], mode: str, int8: bool, snr_db: float, device="cpu", progress=None,
                originals: list[LoRAModel] | None = None) -> dict:
    """Per module name: the shared coding, when mode allows it (see module doc)."""
    by_name: dict[str, list[int]] = {}
    for i, model in enumerate(models):
        for m in model.modules:
            if _eligible(m):
                by_name.setdefault(m.name, []).append(i)
    budget_ratio = 10 ** (-(snr_db + 0.1) / 10)
    plans = {}
    names = [n for n, idx in by_name.items() if len(idx) >= 2]
    for j, name in enumerate(names):
        if progress:
            progress(j, len(names))
        idx = by_name[name]
        ms = [models[i].get(name) for i in idx]
        shapes = {(tuple(m.tensors["up"].shape[:1]), tuple(m.tensors["down"].shape[1:])) for m in ms}
        if len(shapes) != 1:
            continue
        lowr = [m.lowrank(torch.float64, device) for m in ms]
        refs = None
        if originals is not None:
            refs = []
            for i in idx:
                om = originals[i].get(name)
                f = om.lowrank(torch.float64, device) if om is not None else None
                refs.append((f[0] * f[2], f[1]) if f is not None else None)
            if any(r is None for r in refs):
                continue
        facs = [factored_svd(b, a, sc) for b, a, sc in lowr]
        total_r = sum(f[1].numel() for f in facs)
        n, mdim = facs[0][0].shape[0], facs[0][2].shape[1]
        kmax = min(total_r, n, mdim)
        own = _own_bytes(ms) * (0.95 / 1.64 if int8 else 1.0)   # int8 factors: 1 byte, not 2 × 0.82
        per = 1 if int8 else 2
        # the most k could be and still save bytes (auto); on: anything below the total rank
        k_cap = kmax if mode == "on" else min(kmax, int(0.9 * own / ((n + mdim) * per * (0.95 if int8 else 0.85)
                                                                     + 4 * sum(f[1].numel() for f in facs) / len(facs))))
        if k_cap < 1:
            continue
        U_all = _basis([u * s for u, s, _ in facs], kmax)
        V_all = _basis([vh.T * s for _, s, vh in facs], kmax)
        # exact projection error for every k at once: C_i = U_allᵀ ΔW_i V_all, energy of its k×k corner
        sig, corner = [], []
        for b, a, sc in lowr:
            c = (U_all.T @ (b * sc)) @ (a @ V_all)
            sig.append(float(frobenius_inner(b * sc, a, b * sc, a)))
            corner.append(c.pow(2).cumsum(0).cumsum(1).diagonal())
        k0 = None
        for k in range(1, k_cap + 1):
            if all(sg <= 0 or (sg - float(cn[k - 1])) / sg <= 0.5 * budget_ratio for sg, cn in zip(sig, corner)):
                k0 = k
                break
        if k0 is None:
            continue
        plan, k = None, k0
        while k <= k_cap:
            plan = _try_k(ms, lowr, U_all, V_all, k, int8, budget_ratio, refs)
            if plan is not None or k == k_cap:
                break
            k = min(k_cap, k + max(1, k // 8))
        if plan is None:
            continue
        shared_bytes = (n + mdim) * plan["k"] * per * (0.95 if int8 else 0.85) \
            + sum(2 * 2 * plan["k"] * o[4] for o in plan["outs"])
        use = (mode == "on" and plan["k"] < total_r) or (mode == "auto" and shared_bytes < 0.9 * own)
        if use:
            plan.update(entries=idx, est_bytes=shared_bytes, own_bytes=own)
            plans[name] = plan
    if progress:
        progress(len(names), len(names))
    return plans


# ------------------------------------------------------------------ preparing lossy entries
class LossyPack:
    def __init__(self):
        self.outputs: dict[int, dict] = {}
        self.summary: dict = {}
        self.tmpdir = tempfile.mkdtemp(prefix=".lens-lossy-")
        self.shared_refs: dict = {}
        self.spill = None

    def cleanup(self):
        if self.spill is not None:
            self.spill.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def prepare_lossy(srcs, writer, recipe=None, int8=False, shared_basis="off", snr_db=35.0, level=3,
                  device="cpu", progress=None) -> LossyPack:
    out = LossyPack()
    try:
        originals = [s.model() for s in srcs]
        models, settings = [], {}
        if recipe:
            try:
                from ..prune import prune_model
            except ImportError:
                raise LensError("Pruning is not available in this installation (lens_ops.prune is missing).") from None
            for m in originals:
                pm, _rep = prune_model(m, recipe, device, None)
                models.append(pm)
            settings["recipe"] = recipe
        else:
            models = list(originals)
        plans = {}
        if shared_basis != "off":
            plans = plan_shared(models, shared_basis, int8, snr_db, device, progress, originals)
            settings["shared_basis"] = shared_basis
        pre = list(models)
        if int8:
            try:
                from ..quantize import quantize_model
            except ImportError:
                raise LensError("int8 is not available in this installation (lens_ops.quantize is missing).") from None
            q = []
            for m in models:
                qm, _rep = quantize_model(m, "int8", min_snr=snr_db + INT8_MARGIN_DB, keep_below=True,
                                          dense_metrics="off", device=device)
                q.append(qm)
            models = q
            settings["int8"] = True
            settings["int8_min_snr_db"] = snr_db + INT8_MARGIN_DB
        # shared streams: every module's U and V once
        shared_tensors = {}
        for name, p in plans.items():
            shared_tensors[f"{name}|U"], shared_tensors[f"{name}|V"] = p["U"][0], p["V"][0]
            if p["U"][1] is not None:
                shared_tensors[f"{name}|Us"], shared_tensors[f"{name}|Vs"] = p["U"][1], p["V"][1]
        before = writer.written
        refs = store_tensors(writer, shared_tensors, level) if shared_tensors else {}
        shared_bytes = writer.written - before
        for i, (src, orig, model) in enumerate(zip(srcs, originals, models)):
            new_mods, computed, own = {}, {}, {}
            for name, p in plans.items():
                if i not in p["entries"]:
                    continue
                L, R, up, down, rr = p["outs"][p["entries"].index(i)]
                base = pre[i].get(name)
                tens = {"up": up.reshape(up.shape[0], rr, *base.tensors["up"].shape[2:]),
                        "down": down.reshape(rr, *base.tensors["down"].shape[1:])}
                if "alpha" in base.tensors:
                    tens["alpha"] = base.tensors["alpha"]
                nm = base.with_tensors(tens)
                new_mods[name] = nm
                own[f"{name}|L"], own[f"{name}|R"] = L[0], R[0]
                if L[1] is not None:
                    own[f"{name}|Ls"], own[f"{name}|Rs"] = L[1], R[1]
                computed[nm.keys["up"]] = {"x": {**refs[f"{name}|U"], "scale": refs.get(f"{name}|Us"), "T": False},
                                           "y": (name, "L", False)}
                computed[nm.keys["down"]] = {"x": (name, "R", False),
                                             "y": {**refs[f"{name}|V"], "scale": refs.get(f"{name}|Vs"), "T": True}}
            if not new_mods and not recipe and not int8:
                continue   # nothing lossy happened to this entry: it is stored losslessly
            final = model.replace_modules(new_mods) if new_mods else model
            w0 = writer.written
            own_refs = store_tensors(writer, own, level) if own else {}
            own_bytes = writer.written - w0
            for spec in computed.values():
                for side in ("x", "y"):
                    if isinstance(spec[side], tuple):
                        name, which, tr = spec[side]
                        spec[side] = {**own_refs[f"{name}|{which}"], "scale": own_refs.get(f"{name}|{which}s"),
                                      "T": tr}
            layers = (["prune"] if recipe else []) + (["int8"] if int8 else []) + \
                (["shared-basis"] if new_mods else [])
            meta = final.with_provenance("loradb_pack", {**settings, "source": src.file_name})
            path = os.path.join(out.tmpdir, f"{i}.safetensors")
            save_file(final.state_dict(), path, meta)
            err = error_of(orig, LoRAModel.load(path), device)
            out.outputs[i] = {"path": path, "layers": layers or ["lossy"], "error": err, "settings": settings,
                              "computed": computed, "shared_modules": len(new_mods),
                              "extra_bytes": own_bytes}
        out.summary = {"settings": settings, "shared_basis_modules": len(plans), "shared_basis_bytes": shared_bytes,
                       "snr_budget_db": snr_db}
        return out
    except BaseException:
        out.cleanup()
        raise


# ------------------------------------------------------------------ quantised-coefficient coding (qcoef.py)
def give_back_free_memory() -> None:
    """Return freed heap pages to the system (glibc's malloc_trim; a no-op elsewhere). Coding one LoRA makes
    millions of small code arrays; without this, their freed space stays counted against the process and
    grows from LoRA to LoRA."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ClassStreams:
    """Integer code vectors grouped by magnitude class (one byte-grouped zstd stream per class), so the
    entropy coder sees values of one distribution at a time."""

    def __init__(self):
        self.items: dict[tuple, list] = {}
        self.count: dict[tuple, int] = {}
        self.handles: list[dict] = []

    def add(self, codes) -> dict:
        c = np.asarray(codes).reshape(-1)
        mx = int(np.abs(c.astype(np.int64)).max(initial=0))
        e = 1 if mx <= 127 else 2
        rms = float(np.sqrt((c.astype(np.float64) ** 2).mean())) if c.size else 0.0
        key = (e, int(np.clip(np.floor(2 * np.log2(rms + 1e-9)), -8, 40)))
        self.items.setdefault(key, []).append(c.astype(np.int8 if e == 1 else np.int16))
        h = {"key": key, "start": self.count.get(key, 0)}
        self.count[key] = h["start"] + c.size
        self.handles.append(h)
        return h

    def flush(self, writer, level: int):
        descs = {}
        for key, arrs in sorted(self.items.items()):
            e = key[0]
            data = np.concatenate(arrs).astype(np.int8 if e == 1 else np.dtype("<i2")).view(np.uint8)
            arrs.clear()
            descs[key] = encode_stream(writer, data, e, level)
        for h in self.handles:
            h["desc"] = descs[h["key"]]


def _spec(parts, cs: ClassStreams, shared_handles: dict):
    out = []
    for p in parts:
        if p[0] == "v":
            ref = shared_handles[p[1]] if isinstance(p[1], tuple) else cs.add(p[1])
            out.append(["v", ref, p[2]])
        else:
            _, step, qrefs, w, cc, K = p
            out.append(["qc", step, [shared_handles[r] for r in qrefs], w, cs.add(cc.reshape(-1)), int(cc.shape[1])])
    return out


def prepare_coded(srcs, writer, recipe=None, int8=False, shared_basis="off", snr_db=35.0, level=3,
                  device="cpu", progress=None) -> LossyPack:
    """Quantised-coefficient coding (qcoef.py): int8 → every eligible module coded; shared basis → groups of
    related modules share a basis (auto: where the estimated bytes are lower). Per-LoRA budget snr_db."""
    from . import qcoef
    from .spill import Spill
    out = LossyPack()

    def report(frac: float):   # one bar over all phases, weighted by their measured share of the time
        if progress:
            progress(int(round(1000 * frac)), 1000)
    try:
        out.spill = spill = Spill(out.tmpdir)
        originals = [s.model(mapped=True) for s in srcs]
        settings = {"coder": "qcoef", "snr_db": snr_db}
        if recipe:
            try:
                from ..prune import prune_model
            except ImportError:
                raise LensError("Pruning is not available in this installation (lens_ops.prune is missing).") from None
            models = []
            for i, m in enumerate(originals):   # pruned LoRAs parked on disk too, read back memory-mapped
                pm = prune_model(m, recipe, device, None)[0]
                path = os.path.join(out.tmpdir, f"pruned_{i}.safetensors")
                save_file(pm.state_dict(), path, pm.metadata or None)
                del pm
                models.append(LoRAModel.load(path, mapped=True))
                report(0.1 * (i + 1) / len(originals))
            settings["recipe"] = recipe
        else:
            models = list(originals)
        if int8:
            settings["int8"] = "quantised coefficient codes (int8/int16, entropy coded)"
        if shared_basis != "off":
            settings["shared_basis"] = shared_basis
        N = len(models)
        energy, fixed = [0.0] * N, [0.0] * N
        mods: list[dict] = [{} for _ in range(N)]
        for i, (orig, model) in enumerate(zip(originals, models)):
            for om in orig.modules:
                if om.kind.name == "unknown":
                    continue
                nm = model.get(om.name)
                sig, err = module_snr(om, nm if nm is not None else om, device)
                if nm is None:
                    err = sig
                energy[i] += sig
                fixed[i] += err
                if nm is not None and qcoef.eligible(nm):
                    mods[i][om.name] = nm
        budget = [e * 10 ** (-(snr_db + 0.02) / 10) - f for e, f in zip(energy, fixed)]
        # candidate groups: same module name, same shapes, in ≥ 2 LoRAs
        by_name: dict[str, list[int]] = {}
        for i in range(N):
            for name in mods[i]:
                by_name.setdefault(name, []).append(i)
        cand = {}
        if shared_basis != "off":
            for name, idx in by_name.items():
                if len(idx) < 2:
                    continue
                shp = {(tuple(mods[i][name].tensors["up"].shape[:1]), tuple(mods[i][name].tensors["down"].shape[1:]),
                        mods[i][name].tensors["up"].dtype) for i in idx}
                if len(shp) == 1:
                    cand[name] = idx
        coded_names = [set(mods[i]) if int8 else {n for n in mods[i] if n in cand} for i in range(N)]
        svd = []
        for i in range(N):   # exact SVDs, factors parked on disk (a collection's factors need not fit in RAM)
            svd.append({n: qcoef.Mod(mods[i][n], originals[i].get(n), spill) for n in coded_names[i]})
            for mdl in (originals[i], models[i]):   # their pages are re-read from the page cache if needed
                for m in mdl.modules:
                    mdl.release(m)
            report(0.1 + 0.15 * (i + 1) / N)
        deltas = []
        for i in range(N):
            c = qcoef.LoraCoder(i, max(budget[i], 0.0))
            for n, md in svd[i].items():
                c.add(n, md.n, md.m, None, md.s, None)
            deltas.append(c.estimate_delta())
        groups: dict[str, qcoef.Group] = {}
        names = sorted(cand)
        for j, name in enumerate(names):
            report(0.25 + 0.35 * j / len(names))
            idx = [i for i in cand[name] if name in svd[i]]
            g = qcoef.Group(name, idx, [svd[i][name] for i in idx], [deltas[i] for i in idx], spill)
            if g.choose(shared_basis):
                g.quantise()
                groups[name] = g
        spill.release()
        gnames = list(groups)
        shared_codes = {}
        for gi, name in enumerate(gnames):
            g = groups[name]
            for j in range(g.K):
                shared_codes[("shared", gi, j)] = g.q_codes[:, j]
                shared_codes[("shared", gi, g.K + j)] = g.p_codes[:, j]
        # in shared-only mode only modules of a used group are coded
        if not int8:
            coded_names = [{n for n in coded_names[i] if n in groups and i in groups[n].members} for i in range(N)]
        # shared streams first (one copy for the collection)
        scs = ClassStreams()
        shared_handles = {k: scs.add(v) for k, v in shared_codes.items()}
        before = writer.written
        scs.flush(writer, level)
        shared_bytes = writer.written - before
        for i, (src, orig, model) in enumerate(zip(srcs, originals, models)):
            report(0.6 + 0.4 * i / N)
            if not coded_names[i] and not recipe:
                continue   # nothing lossy happened to this entry: it is stored losslessly
            coder = qcoef.LoraCoder(i, max(budget[i], 0.0))
            items = {}
            for n in coded_names[i]:
                md = svd[i][n]
                if n in groups and i in groups[n].members:
                    g = groups[n]
                    k = g.members.index(i)
                    res = g.residuals[k]
                    u, s_, vh = res.u32, res.s.numpy(), res.vh32
                    items[n] = (md, u, s_, vh, g, gnames.index(n), g.cores[k])
                    coder.add(n, md.n, md.m, u, s_, vh, g, g.cores[k])
                else:
                    u, s_, vh = md.u32, md.s.numpy(), md.vh32
                    items[n] = (md, u, s_, vh, None, None, None)
                    coder.add(n, md.n, md.m, u, s_, vh)
            coder.prepare()
            delta = coder.solve_delta() if items else 1.0
            best, lo_fail = None, None
            for attempt in range(8):
                path = os.path.join(out.tmpdir, f"{i}_{attempt}.safetensors")
                new_mods, dropped, parts_of = {}, set(), {}
                for n, (md, u, s_, vh, g, gi, core) in items.items():
                    res = qcoef.module_parts(md.n, md.m, u, s_, vh, delta, g, gi, core)
                    if res is None:
                        continue   # codes would overflow: the module stays as it was (exact)
                    R, up_parts, down_parts = res
                    if R == 0:
                        dropped.add(n)
                        continue
                    base = md.module
                    dt = base.tensors["up"].dtype
                    up = qcoef.build_local(md.n, R, 1, up_parts, shared_codes, dt)
                    down = qcoef.build_local(R, md.m, 0, down_parts, shared_codes, dt)
                    tens = {"up": up.reshape(md.n, R, *base.tensors["up"].shape[2:]),
                            "down": down.reshape(R, *base.tensors["down"].shape[1:])}
                    if "alpha" in base.tensors:
                        tens["alpha"] = torch.tensor(float(R), dtype=base.tensors["alpha"].dtype)
                    new_mods[n] = base.with_tensors(tens)
                    parts_of[n] = (up_parts, down_parts)
                final = model.replace_modules(new_mods)
                if dropped:
                    final = LoRAModel([m for m in final.modules if m.name not in dropped], final.metadata,
                                      final.source)
                meta = final.with_provenance("loradb_pack", {**settings, "source": src.file_name})
                save_file(final.state_dict(), path, meta)
                err = error_of(orig, LoRAModel.load(path), device)
                # unrounded (the stored snr_db is rounded to 3 decimals)
                snr = math.inf if err["rel_error"] <= 0 else -20 * math.log10(err["rel_error"])
                # the error grows about as Δ²: aim at the budget from both sides, keep the best passing build
                ratio = 10 ** ((snr - snr_db - 0.01) / 20)
                if snr >= snr_db:
                    if best is None or delta > best[0]:
                        best = (delta, path, err, new_mods, dropped, parts_of)
                    if snr - snr_db < 0.04 or not math.isfinite(snr):
                        break
                    nxt = delta * min(ratio, 2.0)
                    delta = nxt if lo_fail is None or nxt < lo_fail else math.sqrt(delta * lo_fail)
                else:
                    lo_fail = delta if lo_fail is None else min(lo_fail, delta)
                    nxt = delta * max(ratio, 0.5)
                    delta = nxt if best is None or nxt > best[0] else math.sqrt(delta * best[0])
            if best is None:
                raise LensError(f"Could not code {src.file_name} within the {snr_db} dB budget; "
                                "pack it without lossy options.")
            delta, path, err, new_mods, dropped, parts_of = best
            cs = ClassStreams()
            computed = {}
            for n, (up_parts, down_parts) in parts_of.items():
                nm = new_mods[n]
                computed[nm.keys["up"]] = {"qlr": {"axis": 1, "parts": _spec(up_parts, cs, shared_handles)}}
                computed[nm.keys["down"]] = {"qlr": {"axis": 0, "parts": _spec(down_parts, cs, shared_handles)}}
            w0 = writer.written
            cs.flush(writer, level)
            own_bytes = writer.written - w0
            used_shared = any(n in groups and i in groups[n].members for n in parts_of)
            layers = (["prune"] if recipe else []) + (["quantized"] if parts_of or dropped else []) + \
                (["shared-basis"] if used_shared else [])
            n_shared = sum(1 for n in parts_of if n in groups)
            del coder, items, best, new_mods, parts_of
            for mdl in (orig, model):
                for m in mdl.modules:
                    mdl.release(m)
            spill.release()
            give_back_free_memory()
            out.outputs[i] = {"path": path, "layers": layers or ["lossy"], "error": err,
                              "settings": {**settings, "step": delta}, "computed": computed,
                              "shared_modules": n_shared,
                              "extra_bytes": own_bytes}
        # the shared basis streams are attributed to the entries that use them (by modules used), so the
        # per-entry stored sizes add up to the payload
        used = sum(o["shared_modules"] for o in out.outputs.values())
        for o in out.outputs.values():
            if used and o["shared_modules"]:
                o["shared_bytes"] = int(round(shared_bytes * o["shared_modules"] / used))
                o["extra_bytes"] += o["shared_bytes"]
        out.summary = {"settings": settings, "shared_basis_modules": len(groups), "shared_basis_bytes": shared_bytes,
                       "snr_budget_db": snr_db}
        report(1.0)
        return out
    except BaseException:
        out.cleanup()
        raise
