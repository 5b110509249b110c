"""BlendLoRAs engine: w₁·ΔW₁ + w₂·ΔW₂ (+ …) module by module, output in the first LoRA's convention and dtype.

"Same as stacked": at strengths w_i the blend's ΔW is exactly Σ w_i·ΔW_i per module (concat; svd/pca up to the
requested truncation), i.e. loading the blend at strength 1 equals loading every input at its strength.
Kohya-style separate up/down merging ((Σ w_i·up_i)@(Σ w_i·down_i)) is not equivalent and is not used.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import LensError
from ..kinds import BY_NAME, UNKNOWN
from ..model import LoRAModel, LoRAModule, ensure_model, exact_factors
from ..conflict.crossnames import OutputSlot, RowSlice, RowStack
from ..conflict.matching import (check_architectures, common_architecture, cross_scheme_warning, layer_units,
                                  scheme_of)
from ..conflict.metrics import small_maths
from .methods import (concat_factors, dare_merge, dare_seeds, dense_to_factors, randomized_blend, svd_blend,
                      ties_merge)
from .rowwise import Rows, dare_rows, ties_rows
from .output import OutputStyle, StreamedModules, merged_metadata
from .weights import LayerFilter, parse_block_weights

METHODS = ("concat", "svd", "pca", "randomized", "ties", "dare")


def _label(m: LoRAModel, i: int) -> str:
    import os
    return os.path.basename(m.source) if m.source else f"LoRA {chr(65 + i)}"


def _linear(m) -> bool:
    return m.kind is not UNKNOWN and not m.kind.needs_base_weight and m.kind.name != "set"


def _carry(m, coef: float, style: OutputStyle, first: bool, renamed_counter: list):
    """A module only one input has, scaled by its strength; renamed into the first LoRA's convention if possible."""
    _require_finite(m, [t for t in m.tensors.values() if t.is_floating_point()])
    if coef != 1.0:
        if m.is_dora:
            raise LensError(f"Module {m.name} is DoRA: its change is not linear in strength, so it cannot be "
                            f"carried at strength {coef:g}; exclude it or use strength 1.")
        if not _linear(m):
            raise LensError(f"Module {m.name} ({m.kind.label}) changes weights relative to the base model and "
                            f"cannot be scaled to strength {coef:g}; exclude it.")
        m = m.with_tensors(m.kind.scaled(m, coef))
    if first:
        return m
    name, ok = style.name_for(m)
    if m.kind.name == "lora" and "mid" not in m.tensors and not m.is_dora and ok:
        b, a, s = m.lowrank(torch.float32)
        if "alpha" in m.tensors and style.has_alpha:
            keep = {"up": b, "down": a}
            out = style.lora_module(name, m.component, keep["up"], keep["down"], m.weight_shape(), want_alpha=False)
            out.tensors["alpha"] = m.tensors["alpha"].clone()
            out.keys["alpha"] = name + ".alpha"
        else:
            out = style.lora_module(name, m.component, b * s, a, m.weight_shape(), want_alpha=False)
        if "diff_b" in m.tensors:   # the layer's bias change travels with its pair
            out.tensors["diff_b"], out.keys["diff_b"] = style.cast(m.tensors["diff_b"]), name + ".diff_b"
        renamed_counter[0] += int(name != m.name or out.keys["up"] != m.keys["up"])
        return out
    # keep its own names (and roles), only the dtype follows the first LoRA
    tensors = {r: (style.cast(t) if (t.is_floating_point() and r != "alpha") else t) for r, t in m.tensors.items()}
    renamed_counter[1] += 1
    return type(m)(m.name, dict(m.keys), tensors, m.kind, m.component)


def blend(loras: list, weights: list[float], method: str = "concat", rank: int = 0, device="cpu",
          include: str | None = None, exclude: str | None = None, excluded_keep: str = "none",
          block_weights: str | None = None, density: float = 0.5, seed: int = 0,
          compute_dtype: torch.dtype = torch.float32, allow_disjoint: bool = False,
          progress: Callable[[int, int], None] | None = None, sink: Callable | None = None):
    """Blend LoRAs (LoRAModel or LORA_MODEL dicts) at strengths `weights`. Returns (LoRAModel, report dict).

    method: concat | svd | pca (= randomized) | ties | dare; rank: target rank (0 = exact / keep everything);
    include/exclude: module names or regexes, one per line (the ConflictScan problem list works as is);
    excluded_keep: 'none' drops excluded modules, 'first' keeps the first LoRA's module at its strength;
    block_weights: SD.Next-style string (te=…, unet=…, in=…, mid=…, out=…, double0-9=…, single=…);
    density: kept fraction for TIES/DARE; seed: DARE's random seed (reproducible);
    sink: called with each output module as soon as it is made (e.g. to write it to a file); the returned model
    then holds shape-only (meta) tensors, so the result is never all in memory (see `blend_to_file`)."""
    method = method.lower()
    if method not in METHODS:
        raise LensError(f"Unknown blend method {method!r}; use one of {', '.join(METHODS)}.")
    if len(loras) < 2:
        raise LensError("Blending needs at least two LoRAs.")
    if len(weights) != len(loras):
        raise LensError(f"{len(loras)} LoRAs but {len(weights)} weights; give one weight per LoRA.")
    weights = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise LensError("Blend weights must be finite numbers.")
    if method in ("ties", "dare") and not 0 < density <= 1:
        raise LensError(f"density must be in (0, 1] for {method}; got {density}.")
    if rank < 0:
        raise LensError("The target rank must be 0 (exact) or a positive number.")
    if excluded_keep not in ("none", "first"):
        raise LensError("excluded_keep must be 'none' or 'first'.")
    models = [ensure_model(x) for x in loras]
    for i in range(1, len(models)):
        check_architectures(models[0], models[i])
    bw = parse_block_weights(block_weights)
    style = OutputStyle(models[0])

    # ---- pair modules across inputs by the layer they change (any vocabulary, fused ↔ split), in the first
    # LoRA's order, then the others'
    unknown_first = [mod for mod in models[0].modules if mod.kind is UNKNOWN]
    labels = [_label(m, i) for i, m in enumerate(models)]
    units = layer_units(models, labels, for_output=True)
    groups: dict[str, list] = {}
    stubs: dict[str, OutputSlot] = {}
    for u in units:
        key = u.key
        while key in groups:
            key += "'"
        groups[key] = u.members
        if u.stub is not None:
            stubs[key] = OutputSlot(*u.stub, style)
    shared = [k for k, g in groups.items() if sum(x is not None for x in g) > 1]
    schemes = [{s for mod in m.modules if (s := scheme_of(mod))} for m in models]
    arch = common_architecture(models)
    warnings = []
    for i in range(1, len(models)):
        w = cross_scheme_warning(labels[0], schemes[0], labels[i], schemes[i], arch,
                                 "their diffusion-model modules are not paired but carried side by side (ComfyUI "
                                 "applies both, so the result is still the stacked sum).")
        if w:
            warnings.append(w)
    if not shared and not allow_disjoint:
        raise LensError("The LoRAs change no layer in common, so there is nothing to blend"
                        + (f": {warnings[0]}" if warnings else ".")
                        + " Turn on allow_disjoint (command line: --allow-disjoint) to combine them anyway.")
    known = {k for k in groups} | {n for g in groups.values() for mod in g if mod is not None
                                   for n in (mod.name, *getattr(mod, 'source_names', ()))}
    filt = LayerFilter(include, exclude, known)

    out_modules = StreamedModules(sink) if sink is not None else []
    stats = {"blended": 0, "carried": 0, "excluded": 0, "kept_first_excluded": 0, "zero_weight": 0,
             "dense_modules": 0, "renamed": 0, "kept_own_names": 0}
    errors = {}
    ranks = set()
    renamed_counter = [0, 0]
    total = len(groups)
    with torch.no_grad(), small_maths(device, busy_only=True):
        for step, (key, group) in enumerate(groups.items()):
            present = [(i, mod) for i, mod in enumerate(group) if mod is not None]
            names = [key] + [n for _, mod in present for n in (mod.name, *getattr(mod, 'source_names', ()))]
            ref = present[0][1]
            mult = bw.multiplier(ref) if bw else 1.0
            if filt and not filt.keep(names):
                stats["excluded"] += 1
                if excluded_keep == "first" and group[0] is not None:
                    out_modules.append(_carry(group[0], weights[0] * mult, style, True, renamed_counter))
                    stats["kept_first_excluded"] += 1
                _tick(progress, step, total)
                continue
            _require_same_shape(present, labels)
            contrib = [(i, mod, weights[i] * mult) for i, mod in present if weights[i] * mult != 0.0]
            if not contrib:
                stats["zero_weight"] += 1
                _tick(progress, step, total)
                continue
            if group[0] is None and key not in stubs and any(isinstance(m, (RowSlice, RowStack)) for _, m in present):
                raise LensError(f"{present[0][1].name} has to be split or fused to meet the other LoRAs, but the first "
                                "LoRA gives no naming to follow; put a LoRA that changes the diffusion model first.")
            if len(contrib) == 1:
                i, mod, c = contrib[0]
                view = isinstance(mod, (RowSlice, RowStack))
                if key in stubs and i != 0 and (view or (mod.kind.name == "lora" and not mod.is_dora)):
                    # written under its name in the first LoRA's vocabulary (exactly, from its factors)
                    out_modules.append(_blend_module(key, stubs[key], [(mod, c)], "concat", 0, device,
                                                     compute_dtype, style, density, seed, errors, stats))
                elif i == 0 or (group[0] is None and not view):
                    out_modules.append(_carry(mod, c, style, i == 0, renamed_counter))
                else:  # the first LoRA has the layer at weight 0: write the other's module under the first's name
                    out_modules.append(_blend_module(key, group[0], [(mod, c)], method, rank, device, compute_dtype,
                                                     style, density, seed, errors, stats))
                stats["carried"] += 1
                r = out_modules[-1].rank()
                if r:
                    ranks.add(r)
                _tick(progress, step, total)
                continue
            target = group[0] if group[0] is not None else stubs.get(key, contrib[0][1])
            out = _blend_module(key, target, [(mod, c) for _, mod, c in contrib], method, rank, device,
                                compute_dtype, style, density, seed, errors, stats)
            out_modules.append(out)
            stats["blended"] += 1
            r = out.rank()
            if r:
                ranks.add(r)
            _tick(progress, step, total)
    out_modules.extend(unknown_first)
    if not any(m.kind is not UNKNOWN for m in out_modules):
        raise LensError("Every module was excluded or had weight 0; the blend would be empty.")
    stats["renamed"], stats["kept_own_names"] = renamed_counter
    result = LoRAModel(out_modules, {}, None)
    settings = {"method": method, "rank": rank, "weights": weights, "block_weights": bw.text or None,
                "include": include or None, "exclude": (exclude or None) and f"{len(exclude.splitlines())} line(s)",
                "density": density if method in ("ties", "dare") else None,
                "seed": seed if method in ("dare", "pca", "randomized") else None}
    settings = {k: v for k, v in settings.items() if v is not None}
    metadata = merged_metadata(models, weights, settings, result, ranks)
    result.metadata = metadata
    notes = []
    if method == "concat" and rank:
        notes.append("concat is exact (rank r1+r2); the target rank was not applied — use svd to truncate.")
    if style.source_dtype != style.dtype:
        notes.append(f"The first LoRA is quantised ({style.source_dtype}); blended factors are written as "
                     f"{style.dtype} because a blend is not representable on the quantised grid.")
    growth = _growth_warning(models, result, method, rank)
    if growth:
        warnings.append(growth)
    if stats["kept_own_names"]:
        notes.append(f"{stats['kept_own_names']} module(s) only the other LoRA(s) have keep their own key names "
                     "(no safe renaming into the first LoRA's convention); ComfyUI applies them all the same.")
    err_vals = list(errors.values())
    report = {
        "method": method, "target_rank": rank, "weights": weights,
        "inputs": [{"file": _label(m, i), "architecture": m.architecture.label, "format": m.convention,
                    "modules": len(m.modules), "weight": weights[i]} for i, m in enumerate(models)],
        "output": {"modules": len(out_modules), "format": result.convention, "dtype": str(style.dtype).replace("torch.", ""),
                   "ranks": sorted(ranks), "tensor_bytes": result.nbytes},
        "modules": stats,
        "shared_modules": len(shared),
        "relative_error": {"max": max(err_vals) if err_vals else 0.0,
                           "mean": sum(err_vals) / len(err_vals) if err_vals else 0.0,
                           "worst": sorted(errors, key=errors.get, reverse=True)[:5]},
        "block_weights": bw.text or None,
        "warnings": warnings,
        "notes": notes,
    }
    return result, report


GROWTH_WARN = 8.0   # an output this many times its inputs' tensor bytes is worth a sentence


def _growth_warning(models, result, method: str, rank: int) -> str | None:
    """Say so when an exact blend is far bigger than its inputs. LoKr/LoHa changes are Kronecker/Hadamard
    products: written as LoRA factors their exact rank is the product of their factors' ranks (a rank-8 LoKr
    pair becomes rank 64), so an exact blend of two small LyCORIS files can be hundreds of MB. The maths is
    right; the user should still hear that `svd` with a target rank gives a compact file with a stated error."""
    size_in = sum(m.nbytes for m in models)
    size_out = result.nbytes
    if not size_in or size_out <= GROWTH_WARN * size_in:
        return None
    kinds = sorted({mod.kind.label for m in models for mod in m.modules if mod.kind.name in ("lokr", "loha")})
    why = (f" ({' and '.join(kinds)} changes are products of factors: as LoRA factors their exact rank is the "
           "product of their factors' ranks)") if kinds else ""
    hint = ("use method svd with a target rank (e.g. 64) for a compact file; the report gives its error"
            if method == "concat" or rank == 0 else "a lower target rank gives a smaller file")
    return (f"The blend is {size_out / 2**20:.1f} MiB, {size_out / size_in:.0f}× its inputs' "
            f"{size_in / 2**20:.1f} MiB{why}; {hint}.")


def _tick(progress, step, total):
    if progress is not None:
        progress(step + 1, total)


def _require_same_shape(present, labels) -> None:
    """Members of one layer must change weights of one shape (as matrices: ComfyUI reshapes ΔW to the weight),
    else the LoRAs were made for different base models (as ConflictScan says) and no blend is meaningful."""
    # row views too: an SD3.5 large (2432 wide) to_q meets the q rows of an SD3 medium (1536) qkv by name alone
    known = [(i, mod, _matrix_shape(mod)) for i, mod in present]
    known = [(i, mod, s) for i, mod, s in known if s is not None]
    for i, mod, s in known[1:]:
        j, ref, s0 = known[0]
        if s != s0:
            raise LensError(f"Module {ref.name} changes a {tuple(ref.weight_shape())} weight in {labels[j]} but "
                            f"{mod.name} changes a {tuple(mod.weight_shape())} weight in {labels[i]}: the LoRAs were "
                            "trained for different base models.")


def _matrix_shape(mod):
    try:
        shape = mod.weight_shape()
    except Exception:
        return None
    if not shape:
        return None
    return (int(shape[0]), math.prod(int(d) for d in shape[1:]))


def _require_finite(mod, tensors) -> None:
    """A NaN/Inf in an input would spread into the blend's output: refuse it, naming the module."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise LensError(f"Module {mod.name} contains NaN/Inf values, so the blend would carry them into the output; "
                        "fix that LoRA or exclude the module (its name works as an exclude item).")


def _dense_tau(mod, c: float, dtype, device) -> torch.Tensor:
    """c·ΔW of a module, dense (as a matrix of rows when it is not 1-D), refusing NaN/Inf."""
    d = mod.delta(dtype, device)
    _require_finite(mod, (d,))
    return d.reshape(d.shape[0], -1) * c if d.ndim > 1 else d * c


def _factors(mod, dtype, device):
    """(B, A, scale) of a module; LoKr/LoHa by their exact factors: a dense `.diff` of their flattened ΔW does
    not match a conv weight's shape and ComfyUI drops it, while it reshapes LoRA factors to the weight."""
    return exact_factors(mod, dtype, device)


def _bias(contrib, dtype) -> torch.Tensor | None:
    """Σ c·(bias change) over the inputs that have one (`diff_b`, LyCORIS `b_norm`), or None."""
    biases = [(mod.tensors.get("diff_b", mod.tensors.get("b_norm")), c) for mod, c in contrib]
    if not any(b is not None for b, _ in biases):
        return None
    return sum(b.to(dtype) * c for b, c in biases if b is not None)


def _with_bias(out, bias, style, target):
    """A factored output module plus the blended bias change its inputs carried next to their LoRA pair (ComfyUI
    applies a layer's `.diff_b` whatever adapter changes its weight)."""
    if bias is None:
        return out
    out.tensors["diff_b"] = style.cast(bias)
    out.keys["diff_b"] = target.keys.get("diff_b", target.name + ".diff_b")
    return out


def _own_name(mod) -> str:
    """The stored module a user can exclude: a row view names the (DoRA / non-linear) module it is cut from or
    assembled of, not the view (excluding a slice's name left the fused module's other slices)."""
    if isinstance(mod, RowSlice):
        return mod.module.name
    if isinstance(mod, RowStack):
        odd = [m for _, m in mod.parts if m.is_dora or not _linear(m)]
        return (odd or [mod.parts[0][1]])[0].name
    return mod.name


def _blend_module(key, target, contrib, method, rank, device, dtype, style, density, seed, errors, stats):
    """One output module from [(module, coefficient)]; named and typed like `target` (the first LoRA's)."""
    for mod, _ in contrib:
        if mod.is_dora:
            raise LensError(f"Module {_own_name(mod)} is DoRA: its change depends on the base weight's norm, so no "
                            "blend equals stacking; exclude it (its name works as an exclude item).")
        if not _linear(mod):
            raise LensError(f"Module {_own_name(mod)} ({mod.kind.label}) has no stand-alone ΔW, so it cannot be "
                            "blended; exclude it.")
    bias = _bias(contrib, dtype)
    weighted = [(mod, c) for mod, c in contrib if mod.kind.name != "diff" or "diff" in mod.tensors]
    if not weighted:   # bias changes only (`.diff_b` without a weight change): their weighted sum
        errors[target.name] = 0.0
        _require_finite(target, (bias,))
        return LoRAModule(target.name, {"diff_b": target.keys.get("diff_b", target.name + ".diff_b")},
                          {"diff_b": style.cast(bias)}, BY_NAME["diff"], target.component)
    contrib = weighted     # an input's bias-only module adds its bias (above) and nothing to the weight
    shape = tuple(target.weight_shape())
    # a LoKr/LoHa stores ΔW flattened over in·kh·kw; an input that knows the real (4-D) weight shape wins
    shape = max((tuple(mod.weight_shape()) for mod, _ in contrib), key=len, default=shape)
    keys = target.keys if target.kind.name == "lora" and "mid" not in target.tensors else None
    alpha_dtype = target.tensors["alpha"].dtype if "alpha" in target.tensors else None
    want_alpha = ("alpha" in target.tensors) if target.kind.name == "lora" else None
    factors = [_factors(mod, dtype, device) for mod, _ in contrib]
    for (mod, _), f in zip(contrib, factors):
        if f is not None:
            _require_finite(mod, f[:2] + (torch.tensor(float(f[2])),))
    coefs = [c for _, c in contrib]
    lowrank_ok = all(f is not None for f in factors) and len(shape) >= 2
    if lowrank_ok and method in ("concat", "svd", "pca", "randomized"):
        if method == "concat":
            up, down = concat_factors(factors, coefs)
            err = 0.0
        elif method == "svd":
            up, down, err = svd_blend(factors, coefs, rank)
        else:
            up, down, err = randomized_blend(factors, coefs, rank, seed, key)
        errors[target.name] = err
        if up.shape[1] == 0:
            up, down = up.new_zeros(up.shape[0], 1), down.new_zeros(1, down.shape[1])
        out = style.lora_module(target.name, target.component, up, down, shape, keys, alpha_dtype, want_alpha)
        return _with_bias(out, bias, style, target)
    # dense route: TIES/DARE, or kinds without factors (LoHa, LoKr, diffs)
    stats["dense_modules"] += 1
    if method in ("ties", "dare") and len(shape) >= 2:
        # row sources: a module with factors is recomputed block by block, never held as a dense τ (rowwise.py)
        srcs = [Rows.factors(f[0], f[1], c * float(f[2])) if f is not None and f[0].ndim == 2 and f[1].ndim == 2
                else Rows.dense(_dense_tau(mod, c, dtype, device)) for (mod, c), f in zip(contrib, factors)]
        if method == "dare":
            merged = dare_rows(srcs, density, dare_seeds(seed, key, len(srcs)))
        elif len(srcs) > 1:
            merged = ties_rows(srcs, density)
        else:
            merged = srcs[0].get(0, srcs[0].n).clone()
    else:
        taus = [_dense_tau(mod, c, dtype, device) for mod, c in contrib]
        if method == "ties" and len(taus) > 1:
            merged = ties_merge(taus, density)
        elif method == "dare":
            merged = dare_merge(taus, density, seed, key)
        else:
            merged = taus[0].clone()
            for t in taus[1:]:
                merged += t
    if merged.ndim == 1 or len(shape) < 2:
        errors[target.name] = 0.0
        return style.diff_module(target.name, target.component, merged.reshape(shape), bias,
                                 norm=all(mod.kind.name == "norm" for mod, _ in contrib))
    exact = method == "concat" or (rank == 0 and method not in ("ties", "dare"))
    if exact or bias is not None:
        errors[target.name] = 0.0
        return style.diff_module(target.name, target.component, merged.reshape(shape), bias)
    k = rank if rank > 0 else sum((mod.rank() or 0) for mod, _ in contrib) or min(merged.shape)
    up, down, err = dense_to_factors(merged, k)
    errors[target.name] = err
    if up.shape[1] == 0:
        up, down = up.new_zeros(up.shape[0], 1), down.new_zeros(1, down.shape[1])
    return style.lora_module(target.name, target.component, up, down, shape, keys, alpha_dtype, want_alpha)
