"""prune_model / prune_many: one decomposition, any number of recipes, one output model per recipe."""
from __future__ import annotations

import json
import math
from typing import Callable

import torch

from ..errors import LensError
from ..model import LoRAModel, LoRAModule, ensure_model
from ..parallel import ordered
from ..st_io import StreamWriter
from ..kinds import UNKNOWN
from .decompose import Decomp, decompose
from .module import converted_module, dora_axis_output, pruned_tensors, recomputed_dora
from .recipe import Recipe, parse_recipe, parse_recipes
from .report import module_entry, totals
from .rules import budget_select, rule_rank, scores, threshold_for_size

RELEASE_EVERY = 48  # built modules whose input pages are given back together (one madvise per run of them)
STREAM_WINDOW = 96  # consecutive modules decomposed, pruned and written together in a streamed pass
STREAM_WINDOW_BYTES = 32 << 20  # ... and at most this many bytes of their float32 factors (big DiT modules)
ZERO_SV = 1e-6  # resize_lora: layers whose σ_max is below this are all zero and are left out


def _elem(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _refuse_non_finite(m) -> None:
    """Modules carried through unpruned (LoHa/LoKr without lyco=convert, diffs, filtered-out layers) are checked
    too: a prune must not hand back a file with NaN/Inf in it as if it were fine."""
    for role, t in m.tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise LensError(f"Module {m.name} contains NaN/Inf values (in {role}); it cannot be pruned or carried "
                            "through (fix or drop that module first).")


class PruneSession:
    """Holds one model's decomposition so several recipes cost one SVD pass."""

    def __init__(self, model: LoRAModel, device="cpu", progress: Callable[[int, int], None] | None = None,
                 base=None, convert_lyco: bool = False, n_recipes: int = 1, decompose_now: bool = True):
        self.model = model
        # a memory-mapped input (LoRAModel.load(mapped=True)) gives pages back once a module is read
        self._pages = model.release if getattr(model, "_mapping", None) is not None else None
        # progress over the whole run: the decomposition, then writing each module once per recipe
        n = max(1, len(model.modules))
        self._units = n * (1 + n_recipes)
        self._done = 0
        self._progress = progress

        def dec_progress(done, total):
            if progress is not None:
                progress(int(done * n / max(total, 1)), self._units)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.base = base
        self.decs: dict[str, Decomp] = {}
        if decompose_now:
            self.decs = decompose(model.modules, self.device, dec_progress, convert_lyco, release=self._pages,
                                  parallel=True)
            self._done = n
        self.peft = any(k.endswith((".lora_A.weight", ".lora_A", ".lora_A.default.weight"))
                        for m in model.modules for k in m.keys.values())
        self._base_done = False

    # ------------------------------------------------------------------ base model numbers
    def _attach_base(self, need_subspace: bool):
        if self.base is None:
            return
        if not self._base_done:
            for d in self.decs.values():
                nrm = self.base.norms(d.module)
                if nrm is not None:
                    d.base.update(nrm)
            self._base_done = True
        if need_subspace:
            for d in self.decs.values():
                if "subspace" in d.base or "fro" not in d.base:
                    continue
                w = self.base.weight(d.module)
                if w is None:
                    continue
                u, vh = d.basis(self.device)
                w = w.to(self.device, torch.float32).reshape(d.n, -1)
                d.base["subspace"] = ((vh @ w.transpose(0, 1)) * u.transpose(0, 1)).sum(1).double().cpu()

    # ------------------------------------------------------------------ one recipe
    def run(self, recipe: Recipe | str, release: bool = False, sink: StreamWriter | None = None
            ) -> tuple[LoRAModel, dict]:
        """Prune by one recipe. `release` frees each module's decomposition once its output is built
        (for the last recipe of a run: keeps peak memory at input + output).

        With a `sink` (an open StreamWriter) each module's output tensors go to disk as soon as they are
        built and the returned model holds only their shapes (meta tensors) and alphas; the sink is
        closed with the output metadata (or, when pruning saves nothing, replaced by the input itself),
        and report["output"] is the written path."""
        self._release = release
        self._sink = sink
        if isinstance(recipe, str):
            recipe = parse_recipe(recipe)
        try:
            elig, cand, notes, threshold = self._select(recipe, self.decs)
            return self._build(recipe, elig, cand, notes, threshold)
        except BaseException:
            if sink is not None:
                sink.abort()
            raise

    def run_streamed(self, recipe: Recipe, sink: StreamWriter | None, window: int | None = None
                     ) -> tuple[LoRAModel, dict]:
        """One pass for a recipe whose choices are per module (no size=/budget=, no base model): windows
        of consecutive modules are decomposed, pruned and written (to `sink`, or kept in memory without
        one) while their factors are still warm, then their input pages are released. Same output and
        report as `run` on a full decomposition.

        On the CPU two windows are worked on at once, each on its own thread with half of torch's threads
        (`lens_ops.parallel`); the outputs are still written in module order, by this thread."""
        if not streamable(recipe):
            raise LensError(f"Recipe {recipe.text!r} needs the whole file decomposed first; use run().")
        self._release = True
        self._sink = sink
        window = window or STREAM_WINDOW
        try:
            state = self._begin()
            mods = self.model.modules
            n = max(1, len(mods))
            parts = _windows(mods, window, STREAM_WINDOW_BYTES)
            windows = ordered(parts, lambda part: self._window(part, recipe), self.device)
            done = 0
            try:
                for part, (built, entries) in zip(parts, windows):
                    for module in built:
                        state["emit"](module)
                    state["entries"].extend(entries)
                    done += len(part)
                    if self._progress is not None:
                        self._progress(min(done, n), n)  # an interrupt point in ComfyUI
            finally:
                windows.close()  # on an interrupt too: the workers stop, torch's threads are given back
            return self._finish(recipe, state, None)
        except BaseException:
            if sink is not None:
                sink.abort()
            raise

    def _window(self, part: list, recipe: Recipe) -> tuple[list, list]:
        """Decompose, select and build one window of modules: (output modules, report entries), in order."""
        decs = decompose(part, self.device, None, False, keep_factors=True)
        self.decs.update(decs)
        elig, cand, notes, _ = self._select(recipe, decs)
        built, entries = [], []
        self._build_modules(part, recipe, elig, cand, notes, {"emit": built.append, "entries": entries})
        return built, entries

    def _select(self, recipe: Recipe, decs: dict):
        """Which dimensions each eligible module keeps: (elig, cand masks, notes, threshold)."""
        if recipe.lyco == "convert" and any(m.kind.name in ("loha", "lokr") and m.name not in self.decs
                                            and not m.is_dora for m in self.model.modules):
            raise LensError("This prune session was decomposed without LoHa/LoKr conversion; "
                            "start it with convert_lyco=True for lyco=convert.")
        need_sub = "subspace" in recipe.weights
        self._attach_base(need_sub)
        notes: dict[str, str] = {}
        elig: dict[str, Decomp] = {}
        for name, d in decs.items():
            m = d.module
            if d.route == "dense" and recipe.lyco != "convert":
                continue
            if m.is_dora and not dora_axis_output(m) and (self.base is None or self.base.weight(m) is None):
                notes[name] = ("DoRA (input-axis magnitude): left as it is; its dora_scale must be recomputed "
                               "against the base weights, so connect/give the base model to prune it")
                continue
            if recipe.needs_base and ("fro" not in d.base or (need_sub and "subspace" not in d.base)):
                notes[name] = "no base-model weight for this module: left as it is (ckpt scores need one)"
                continue
            elig[name] = d
        out_elem = {name: _elem(recipe.dtype or d.module.tensors.get("up", d.module.tensors.get(
            next(r for r, t in d.module.tensors.items() if r != "alpha" and t.is_floating_point()))).dtype)
            for name, d in elig.items()}

        # candidate dimensions: per-module rule caps, then scores
        cand: dict[str, torch.Tensor] = {}
        for name, d in elig.items():
            k = rule_rank(d.S, recipe.rules, d.scale) if recipe.rules else int((d.S > 0).sum())
            if d.route == "zero":
                k = 0
            mask = torch.zeros(d.dims, dtype=torch.bool)
            mask[:k] = True
            cand[name] = mask
        threshold = None
        if recipe.uses_scores:
            sc = {}
            for name, d in elig.items():
                if float(d.S[0]) < ZERO_SV:
                    s = torch.full((d.dims,), -math.inf, dtype=torch.float64)
                else:
                    s = scores(d, recipe.weights, recipe.rescale)
                s = torch.where(cand[name], s, torch.full_like(s, -math.inf))
                sc[name] = s
            if recipe.threshold is not None:
                threshold = recipe.threshold
            else:
                fixed = self._fixed_bytes(elig, recipe)
                budget = recipe.size_mib * 2 ** 20 - fixed
                if budget < 0:
                    raise LensError(f"size={recipe.size_mib:g} MiB is smaller than the "
                                    f"{fixed / 2 ** 20:.2f} MiB of this file that pruning cannot shrink "
                                    f"(other modules, alphas, header); ask for at least that.")
                flat_s, flat_c = [], []
                for name, d in elig.items():
                    fin = torch.isfinite(sc[name])
                    flat_s.append(sc[name][fin])
                    flat_c.append(torch.full((int(fin.sum()),), d.dim_cost(out_elem[name]), dtype=torch.float64))
                threshold = threshold_for_size(torch.cat(flat_s) if flat_s else torch.zeros(0),
                                               torch.cat(flat_c) if flat_c else torch.zeros(0), budget)
            for name in elig:
                cand[name] = cand[name] & (sc[name] > threshold)
        if recipe.budget_mib is not None:
            fixed = self._fixed_bytes(elig, recipe)
            budget = recipe.budget_mib * 2 ** 20 - fixed
            if budget < 0:
                raise LensError(f"budget={recipe.budget_mib:g} MiB is smaller than the {fixed / 2 ** 20:.2f} MiB "
                                "of this file that pruning cannot shrink (other modules, alphas, header).")
            items = [(name, elig[name].S[cand[name]] * recipe.rescale, elig[name].dim_cost(out_elem[name]))
                     for name in elig]
            counts = budget_select(items, budget)
            for name in elig:
                idx = torch.nonzero(cand[name]).flatten()
                mask = torch.zeros_like(cand[name])
                mask[idx[:counts[name]]] = True
                cand[name] = mask
        return elig, cand, notes, threshold

    def _fixed_bytes(self, elig, recipe) -> int:
        """Bytes of the output that do not depend on which dimensions are kept."""
        n = self.model.header_estimate() + 1024
        for m in self.model.modules:
            if m.name in elig:
                n += sum(t.numel() * t.element_size() for r, t in m.tensors.items()
                         if r not in ("up", "down", "mid") and not m.kind.name in ("loha", "lokr"))
                if m.kind.name in ("loha", "lokr"):
                    n += 8
            else:
                n += m.nbytes
        return n

    def _emitter(self, new_modules: list):
        """append(module) for the output: kept in memory, or written to the sink and kept as shapes only."""
        sink = self._sink
        inputs = {id(m) for m in self.model.modules}
        self._identical = 0

        def emit(module):
            self._identical += id(module) in inputs
            if sink is None:
                new_modules.append(module)
                return
            for role, key in module.keys.items():
                sink.add(key, module.tensors[role])
            light = {r: (t if r == "alpha" or t.numel() <= 16 else torch.empty_like(t, device="meta"))
                     for r, t in module.tensors.items()}
            new_modules.append(LoRAModule(module.name, dict(module.keys), light, module.kind, module.component))
        return emit

    def _build(self, recipe: Recipe, elig, cand, notes, threshold):
        state = self._begin()
        self._build_modules(self.model.modules, recipe, elig, cand, notes, state, progress=True)
        self._done += len(self.model.modules)
        return self._finish(recipe, state, threshold)

    def _begin(self) -> dict:
        new_modules: list = []
        return {"modules": new_modules, "entries": [], "emit": self._emitter(new_modules)}

    def _build_modules(self, modules, recipe: Recipe, elig, cand, notes, state, progress: bool = False):
        """Output module(s) and report entry of each of `modules` (in order) into `state`."""
        emit, entries = state["emit"], state["entries"]
        pages = self._pages
        rescale = recipe.rescale
        built = []
        for i, m in enumerate(modules):
            if progress and self._progress is not None and (i % 16 == 0 or i == len(modules) - 1):
                self._progress(min(self._done + i + 1, self._units), self._units)  # an interrupt point in ComfyUI
            self._build_one(m, recipe, elig, cand, notes, emit, entries, rescale)
            d = elig.get(m.name)
            if d is not None and self._release:
                d.P = d.Qt = d.U = d.Vh = d.B = d.A = None  # built: free its decomposition
            built.append(m)
            if pages is not None and (len(built) == RELEASE_EVERY or i == len(modules) - 1):
                pages(built)  # their outputs are built (and written, with a sink)
                built = []

    def _build_one(self, m, recipe, elig, cand, notes, emit, entries, rescale):
        """One module's output (emitted) and its report entry."""
        d = elig.get(m.name)
        if d is None:
            _refuse_non_finite(m)
            kept = m
            note = notes.get(m.name)
            if rescale != 1.0 and m.kind is not UNKNOWN and m.kind.name not in ("set",):
                try:
                    kept = m.with_tensors(m.kind.scaled(m, rescale))
                    note = (note + "; " if note else "") + f"rescaled by {rescale:g}"
                except LensError as e:
                    note = (note + "; " if note else "") + str(e)
            if note is None:
                note = {"unknown": "not understood: carried through byte for byte",
                        "loha": "LoHa: left as it is (lyco=convert turns it into a LoRA)",
                        "lokr": "LoKr: left as it is (lyco=convert turns it into a LoRA)",
                        }.get(m.kind.name, f"{m.kind.describe(m)}: carried through")
            emit(kept)
            entries.append(module_entry(m, kept, None, None, rescale, note, self.base is not None))
            return
        mask = cand[m.name]
        idx = torch.nonzero(mask).flatten()
        k = int(idx.numel())
        if m.is_dora and k == 0:
            idx, k = torch.arange(1), 1  # DoRA changes the weight even at ΔW = 0: keep one dimension
        all_kept = k == d.dims and (d.rank is None or k == d.rank)
        if k == 0:
            why = "all-zero ΔW" if d.route == "zero" else "every dimension dropped by the recipe"
            entries.append(module_entry(m, None, d, idx, rescale, f"removed ({why})", self.base is not None))
            return
        if d.route == "dense":
            new = converted_module(d, idx, rescale, recipe.dtype, self.peft)
            if new.nbytes >= m.nbytes and rescale == 1.0:
                emit(m)
                entries.append(module_entry(m, m, None, None, rescale, f"{m.kind.label}: kept, as a LoRA it "
                                            "would not be smaller", self.base is not None))
                return
            emit(new)
            entries.append(module_entry(m, new, d, idx, rescale, f"{m.kind.label} converted to LoRA",
                                        self.base is not None))
            return
        new_bytes = k * d.dim_cost(_elem(recipe.dtype or m.tensors["up"].dtype))
        old_fact = sum(t.numel() * t.element_size() for r, t in m.tensors.items() if r in ("up", "down", "mid"))
        if all_kept or new_bytes >= old_fact:
            if rescale == 1.0:
                emit(m)
                why = "nothing to drop" if all_kept else "a smaller rank would not make it smaller"
                entries.append(module_entry(m, m, d, torch.arange(d.dims), rescale,
                                            f"kept bit-identical ({why})", self.base is not None))
            else:
                new = m.with_tensors(m.kind.scaled(m, rescale))
                emit(new)
                entries.append(module_entry(m, new, d, torch.arange(d.dims), rescale,
                                            f"all dimensions kept, rescaled by {rescale:g}", self.base is not None))
            return
        tensors = pruned_tensors(d, idx, rescale, recipe.dtype, self.device)
        new = m.with_tensors(tensors)
        note = "pruned" + (" (Tucker core folded: plain conv LoRA)" if "mid" in m.tensors else "")
        if m.is_dora and not dora_axis_output(m):
            role = "dora_scale" if "dora_scale" in m.tensors else "magnitude"
            tensors[role] = recomputed_dora(m, new, self.base.weight(m), rescale, self.device)
            new = m.with_tensors(tensors)
            note += "; DoRA magnitude recomputed against the base weights"
        elif m.is_dora:
            note += "; DoRA (output-axis magnitude, normalised by the base weight: unchanged)"
        emit(new)
        entries.append(module_entry(m, new, d, idx, rescale, note, self.base is not None))

    def _finish(self, recipe: Recipe, state: dict, threshold):
        new_modules, entries = state["modules"], state["entries"]
        if not new_modules and self.model.modules and self._sink is not None:
            raise _removes_everything(recipe)  # a file with no tensors loads nowhere: write nothing
        out = LoRAModel(new_modules, self.model.metadata, self.model.source)
        if threshold is not None and not math.isfinite(threshold):
            threshold = None  # size= larger than the whole file: every direction stays
        report = {"recipe": recipe.text, "settings": recipe.settings(), "threshold": threshold,
                  "modules": entries}
        report["total"] = totals(entries, self.model, out)
        meta = _metadata(self.model, out, recipe, report)
        growth = len(json.dumps(meta)) - len(json.dumps(self.model.metadata)) + 64
        unchanged = len(new_modules) == len(self.model.modules) == self._identical
        if unchanged or (report["total"]["bytes_saved"] < growth and recipe.rescale == 1.0):
            # nothing (worth) changing: the output is the input itself, so it is never larger
            out = LoRAModel(list(self.model.modules), self.model.metadata, self.model.source)
            entries = [module_entry(m, m, self.decs.get(m.name),
                                    torch.arange(self.decs[m.name].dims) if m.name in self.decs else None,
                                    1.0, "kept bit-identical (no saving for this file)" if not unchanged else e["note"],
                                    self.base is not None)
                       for m, e in zip(self.model.modules, entries)] if not unchanged else entries
            report["modules"] = entries
            report["total"] = totals(entries, self.model, out)
            report["unchanged"] = True
            if self._sink is not None:
                self._sink.abort()  # the input itself is the output: write it unchanged
                report["output"] = out.save(self._sink.target)
            return out, report
        out.metadata = meta
        report["unchanged"] = False
        if self._sink is not None:
            # padding of the reserved header space must not eat the saving (the output is never larger)
            report["output"] = self._sink.close(meta, max_padding=max(0, report["total"]["bytes_saved"] - growth))
        return out, report


def _windows(mods: list, max_modules: int, max_bytes: int) -> list[list]:
    """Consecutive runs of modules: at most `max_modules`, and at most `max_bytes` of float32 factors
    (a window's factors are held while it is built; two windows are in flight)."""
    parts, cur, size = [], [], 0
    for m in mods:
        nbytes = 4 * sum(t.numel() for t in m.tensors.values())
        if cur and (len(cur) >= max_modules or size + nbytes > max_bytes):
            parts.append(cur)
            cur, size = [], 0
        cur.append(m)
        size += nbytes
    if cur:
        parts.append(cur)
    return parts


def _metadata(src: LoRAModel, out: LoRAModel, recipe: Recipe, report: dict) -> dict:
    t = report["total"]
    settings = dict(recipe.settings())
    settings.update({"bytes_in": t["bytes_in"], "bytes_out": t["bytes_out"], "rel_error": t["rel_error"]})
    if report.get("threshold") is not None and math.isfinite(report["threshold"]):
        settings["threshold"] = report["threshold"]
    meta = src.with_provenance("prune", settings)
    ranks = {m.rank() for m in out.modules if m.kind.name == "lora"}
    alphas = {m.alpha for m in out.modules if m.kind.name == "lora" and m.alpha is not None}
    if "lora_rank" in meta and len(ranks) == 1:  # XLabs FLUX files record their rank here
        meta["lora_rank"] = str(next(iter(ranks)))
    if "ss_network_dim" in meta:
        meta["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    if "ss_network_alpha" in meta:
        meta["ss_network_alpha"] = str(float(alphas.pop())) if len(alphas) == 1 and len(ranks) <= 1 else "Dynamic"
    return meta


QUANTIZED = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)


def float_factors(model: LoRAModel) -> LoRAModel:
    """int8/fp8 modules (QuantizeInt8 output, scales folded into alpha) as exact float32 factors, so the
    pruner decomposes the true ΔW; every other module is left untouched (bit-identical)."""
    quant = [m for m in model.modules if any(r != "alpha" and t.dtype in QUANTIZED for r, t in m.tensors.items())]
    if not quant:
        return model
    from ..quantize import dequantize_model  # lazy: quantize builds on the engine core
    floats, _ = dequantize_model(LoRAModel(quant, model.metadata, model.source), "fp32")
    return model.replace_modules({m.name: m for m in floats.modules})


def prune_many(model: LoRAModel, recipes, device="cpu", progress=None, base=None, outputs=None):
    """Several recipes from ONE decomposition: [(LoRAModel, report), ...] in recipe order.

    `outputs` (one path per recipe) streams each result to its file module by module (atomic; the
    input is never overwritten): the returned models then hold shapes only, report["output"] the path.
    With `LoRAModel.load(path, mapped=True)` this keeps the peak memory near one module's worth.

    int8/fp8 input is accepted: those modules are decomposed from their exact dequantized values and
    written as float (fp32 unless the recipe's dtype= says otherwise); re-quantize to shrink them again."""
    model = float_factors(ensure_model(model) if not isinstance(model, LoRAModel) else model)
    if isinstance(recipes, str):
        recipes = parse_recipes(recipes)
    recipes = [parse_recipe(r) if isinstance(r, str) else r for r in recipes]
    _check_base(recipes, base)
    if outputs is not None and len(outputs) != len(recipes):
        raise LensError(f"{len(recipes)} recipes need {len(recipes)} output paths, got {len(outputs)}.")
    if len(recipes) == 1 and base is None and streamable(recipes[0]):
        # one output, per-module choices: a single windowed pass (decompose, prune, write or keep, release);
        # in memory and to a file alike, so both give the same bits
        session = PruneSession(model, device, progress, None, False, 1, decompose_now=False)
        sink = _output_sink(model, outputs[0]) if outputs is not None else None
        return [session.run_streamed(recipes[0], sink)]
    session = PruneSession(model, device, progress, base, any(r.lyco == "convert" for r in recipes), len(recipes))
    if outputs is not None and len(recipes) > 1:
        for r in recipes:  # a recipe that cannot be met (size=/budget= too small) fails before any file is written
            elig, cand, _, _ = session._select(r, session.decs)
            if len(elig) == len(model.modules) and not any(bool(c.any()) or elig[n].module.is_dora
                                                          for n, c in cand.items()):
                raise _removes_everything(r)
    results = []
    for i, r in enumerate(recipes):
        sink = None
        if outputs is not None:
            sink = _output_sink(model, outputs[i])
        results.append(session.run(r, release=(i == len(recipes) - 1), sink=sink))
    return results


def _removes_everything(recipe: Recipe) -> LensError:
    return LensError(f"Recipe {recipe.text!r} removes every module of this LoRA (its ΔW is all zero, or every "
                     "dimension falls below the threshold): nothing is written; ask for a milder recipe.")


def _output_sink(model: LoRAModel, path: str) -> StreamWriter:
    """A streamed output next to `path` that never replaces the input; header space reserved for the
    input's keys plus room for the new metadata (the payload is moved up instead if it does not fit)."""
    return StreamWriter(path, forbid=(model.source,) if model.source else (),
                        header_reserve=model.header_estimate() + 16384)


def streamable(recipe: Recipe) -> bool:
    """True when every choice of the recipe is made per module (one windowed pass can do it)."""
    return (recipe.size_mib is None and recipe.budget_mib is None and not recipe.needs_base
            and recipe.lyco != "convert")


def _check_base(recipes, base):
    for r in recipes:
        if r.needs_base and base is None:
            raise LensError(f"Recipe {r.text!r} uses a ckpt score (spn_ckpt, fro_ckpt or subspace), which "
                            "needs the base model: connect MODEL/CLIP in ComfyUI or give --base CHECKPOINT.")


def prune_model(model: LoRAModel, recipe: str, device="cpu", progress=None, base=None) -> tuple[LoRAModel, dict]:
    """Prune every module of `model` by one recipe (see lens_ops.prune.recipe); returns (model, report)."""
    r = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    return prune_many(model, [r], device, progress, base)[0]
