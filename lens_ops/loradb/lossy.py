"""Lossy layers of a .loradb: the PruneRank recipe alone (`prepare_pruned`), or quantised-coefficient
coding with optional shared bases for related LoRAs (`prepare_coded`, maths in qcoef.py).

Both write each lossy entry as a standard safetensors file first, measure its exact ΔW error against the
original (`error_of`) and hand it to the entry encoder; coded entries also carry the recipes that rebuild
their tensors from integer codes (segment kind "qlr", docs/loradb.md).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile

import numpy as np
import torch

from ..errors import LensError
from ..heap import trim_heap
from ..lowrank import frobenius_inner
from ..model import LoRAModel
from ..st_io import save_file
from .codec import encode_stream
from .spec import CODE_LEVEL


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
    if da is None and db is None and orig.kind.name == "diff" and "diff_b" in orig.tensors \
            and "diff_b" in new.tensors:   # a bias-only change: its energy is the bias's, not a unit
        ba, bb = orig.tensors["diff_b"].to(device, torch.float64), new.tensors["diff_b"].to(device, torch.float64)
        return float(ba.pow(2).sum()), float((ba - bb.reshape(ba.shape)).pow(2).sum())
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


def _prune_model_fn():
    try:
        from ..prune import prune_model
    except ImportError:
        raise LensError("Pruning is not available in this installation (lens_ops.prune is missing).") from None
    return prune_model


def prepare_pruned(srcs, recipe: str | None, snr_db=35.0, device="cpu", fold_int8: bool = False) -> LossyPack:
    """Each LoRA optimised as a file, then stored losslessly: the PruneRank recipe (when given) and, with
    `fold_int8`, QuantizeInt8's int8 with its scales folded into alpha (so the entry extracts as exactly that int8
    file, which stock ComfyUI loads). Its exact ΔW error against the original is measured and recorded."""
    prune_model = _prune_model_fn() if recipe else None
    out = LossyPack()
    try:
        settings = {"recipe": recipe} if recipe else {}
        if fold_int8:
            from ..quantize import DEFAULT_METHOD
            settings["int8"] = f"QuantizeInt8 ({DEFAULT_METHOD}, scales folded into alpha)"
        for i, src in enumerate(srcs):
            orig = src.model()
            final, layers = orig, []
            if recipe:
                final, _rep = prune_model(orig, recipe, device, None)
                layers.append("prune")
            if fold_int8:
                final, layers = _fold_int8(final, layers, device)
            meta = final.with_provenance("loradb_pack", {**settings, "source": src.file_name})
            path = os.path.join(out.tmpdir, f"{i}.safetensors")
            save_file(final.state_dict(), path, meta)
            err = error_of(orig, LoRAModel.load(path), device)
            out.outputs[i] = {"path": path, "layers": layers, "error": err, "settings": settings,
                              "computed": {}, "shared_modules": 0, "extra_bytes": 0}
        out.summary = {"settings": settings, "shared_basis_modules": 0, "shared_basis_bytes": 0,
                       "snr_budget_db": snr_db}
        return out
    except BaseException:
        out.cleanup()
        raise


def _fold_int8(model: LoRAModel, layers: list, device):
    """QuantizeInt8 on one entry; a LoRA it cannot quantize (no alpha to carry the scales, nothing foldable) is
    stored as it is, and its layers say why."""
    from ..quantize import quantize_model
    try:
        q, _rep = quantize_model(model, device=device)
    except LensError as e:
        why = str(e).split(";")[0].replace(", so nothing is written", "").rstrip(".")
        return model, layers + [f"int8 skipped ({why})"]
    return q, layers + ["int8 (folded alpha)"]


# ------------------------------------------------------------------ quantised-coefficient coding (qcoef.py)
NARROW_CLASS = 4   # class key floor(2·log2 rms) up to which codes are zstd-coded at CODE_LEVEL


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
        """Write every class's stream. The narrow int8 classes (rms below 2^2.5, a few bits per code) get zstd's
        optimal parsing (CODE_LEVEL): 7–19 % smaller there, about 4 % on a whole collection; the wider classes
        gain nothing from it (measured) and stay at `level`."""
        descs = {}
        for key, arrs in sorted(self.items.items()):
            e = key[0]
            data = np.concatenate(arrs).astype(np.int8 if e == 1 else np.dtype("<i2")).view(np.uint8)
            arrs.clear()
            narrow = e == 1 and key[1] <= NARROW_CLASS
            descs[key] = encode_stream(writer, data, e, max(level, CODE_LEVEL) if narrow else level)
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
        for src, orig in zip(srcs, originals):   # a NaN/Inf would reach the SVDs and fail there unnamed
            for om in orig.modules:
                if om.kind.name != "unknown" and om.nonfinite():
                    raise LensError(f"{src.file_name}: module {om.name} contains NaN/Inf values, so it cannot be "
                                    "stored lossily (fix or drop that module, or pack this LoRA lossless).")
        settings = {"coder": "qcoef", "snr_db": snr_db}
        if recipe:
            prune_model = _prune_model_fn()
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
        for i, b in enumerate(budget):
            if b <= 0 and fixed[i] > 0:  # the recipe alone already loses more than the whole budget
                got = 10 * math.log10(energy[i] / fixed[i]) if energy[i] > 0 else 0.0
                raise LensError(
                    f"The recipe {recipe!r} alone leaves {srcs[i].file_name} at {got:.1f} dB ΔW SNR, under the "
                    f"{snr_db:g} dB budget of the lossy layers; choose a gentler recipe (energy=0.9999 keeps "
                    f"about 40 dB) or a lower budget (--snr / snr_db {math.floor(got - 1):g} or less).")
        # candidate groups: same module name, same shapes, in ≥ 2 LoRAs (the largest set of one shape; the
        # dtype does not matter: the basis is coded once and each entry is rebuilt in its own dtype)
        by_name: dict[str, list[int]] = {}
        for i in range(N):
            for name in mods[i]:
                by_name.setdefault(name, []).append(i)
        cand = {}
        if shared_basis != "off":
            for name, idx in by_name.items():
                by_shape: dict[tuple, list[int]] = {}
                for i in idx:
                    t = mods[i][name].tensors
                    by_shape.setdefault((tuple(t["up"].shape[:1]), tuple(t["down"].shape[1:])), []).append(i)
                largest = max(by_shape.values(), key=len) if by_shape else []
                if len(largest) >= 2:
                    cand[name] = largest
        coded_names = [set(mods[i]) if int8 else {n for n in mods[i] if n in cand} for i in range(N)]
        svd = []
        for i in range(N):   # exact SVDs, factors parked on disk (a collection's factors need not fit in RAM)
            svd.append({n: qcoef.Mod(mods[i][n], originals[i].get(n), spill) for n in coded_names[i]})
            originals[i].release()   # their pages are re-read from the page cache if needed
            models[i].release()
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
            # the shared basis is quantised once for the whole group, so its own rounding can leave a member
            # just under the budget whatever its step (an error floor): that member is then coded on its own
            # directions instead (second pass), like a module outside any group
            for use_groups in (True, False):
                coder = qcoef.LoraCoder(i, max(budget[i], 0.0))
                items = {}
                for n in coded_names[i]:
                    md = svd[i][n]
                    if use_groups and n in groups and i in groups[n].members:
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
                if best is not None or not any(n in groups and i in groups[n].members for n in coded_names[i]):
                    break
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
            used_shared = use_groups and any(n in groups and i in groups[n].members for n in parts_of)
            layers = (["prune"] if recipe else []) + (["quantized"] if parts_of or dropped else []) + \
                (["shared-basis"] if used_shared else [])
            n_shared = sum(1 for n in parts_of if n in groups) if use_groups else 0
            del coder, items, best, new_mods, parts_of
            orig.release()
            model.release()
            spill.release()
            trim_heap()   # millions of small code arrays were freed: give their pages back
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
