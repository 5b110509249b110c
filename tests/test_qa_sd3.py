"""QA of SD3/SD3.5 cross-vocabulary matching in ConflictScan and BlendLoRAs, as a user meets it.

Fixtures are written here from ComfyUI's facts (comfy/utils.py `mmdit_to_diffusers`, MMDIT_MAP_BLOCK/BASIC;
comfy/lora.py `model_lora_keys_unet`), independently of lens_ops.conflict.crossnames: MMDiT names (kohya
`lora_unet_joint_blocks_N_…`, fused qkv) and the diffusers names ComfyUI reads with four prefixes (`transformer.`,
flash-sd3 `base_model.model.`, OneTrainer `lora_transformer_` and SimpleTuner `lycoris_`, the last two with dots as
underscores). Shapes are the real models' (SD3 medium 1536 wide/24 blocks, SD3.5 large 2432/38, SD3.5 medium
1536/24 with a second x_block attention `attn2` in blocks 0–12); the last block's context block is pre-only
(no proj/mlp, a 2h-row modulation whose shift/scale halves are swapped between the vocabularies). Factors have
decaying spectra (lens_ops.synth.spectrum_factors); references are dense float64.
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_ops import LoRAModel
from lens_ops.blend import blend
from lens_ops.cli import main
from lens_ops.conflict import scan
from lens_ops.conflict.matching import match_modules
from lens_ops.synth import spectrum_factors

# model: (hidden size h, number of blocks, blocks with x_block.attn2)
MODELS = {"sd3m": (1536, 24, ()), "sd35l": (2432, 38, ()), "sd35m": (1536, 24, tuple(range(13)))}

# diffusers part -> (MMDiT layer, first row, stop row) in units of h; None = the whole layer (comfy/utils.py)
PARTS = {"attn.to_q": ("x_block.attn.qkv", 0, 1), "attn.to_k": ("x_block.attn.qkv", 1, 2),
         "attn.to_v": ("x_block.attn.qkv", 2, 3),
         "attn.add_q_proj": ("context_block.attn.qkv", 0, 1), "attn.add_k_proj": ("context_block.attn.qkv", 1, 2),
         "attn.add_v_proj": ("context_block.attn.qkv", 2, 3),
         "attn2.to_q": ("x_block.attn2.qkv", 0, 1), "attn2.to_k": ("x_block.attn2.qkv", 1, 2),
         "attn2.to_v": ("x_block.attn2.qkv", 2, 3),
         "attn.to_out.0": ("x_block.attn.proj", None, None), "attn.to_add_out": ("context_block.attn.proj", None, None),
         "attn2.to_out.0": ("x_block.attn2.proj", None, None),
         "norm1.linear": ("x_block.adaLN_modulation.1", None, None),
         "norm1_context.linear": ("context_block.adaLN_modulation.1", None, None),
         "ff.net.0.proj": ("x_block.mlp.fc1", None, None), "ff.net.2": ("x_block.mlp.fc2", None, None),
         "ff_context.net.0.proj": ("context_block.mlp.fc1", None, None),
         "ff_context.net.2": ("context_block.mlp.fc2", None, None)}
BASIC = {"context_embedder": "context_embedder", "pos_embed.proj": "x_embedder.proj",
         "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
         "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
         "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
         "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
         "proj_out": "final_layer.linear"}
SWAPPED_BASIC = {"norm_out.linear": "final_layer.adaLN_modulation.1"}
PREFIXES = {"transformer": "transformer.", "flash": "base_model.model.", "onetrainer": "lora_transformer_",
            "simpletuner": "lycoris_"}


def block_layers(model: str, b: int) -> dict:
    """{MMDiT layer: weight shape} of joint block b."""
    h, n, attn2 = MODELS[model]
    last = b == n - 1
    out = {"x_block.attn.qkv": (3 * h, h), "x_block.attn.proj": (h, h), "x_block.mlp.fc1": (4 * h, h),
           "x_block.mlp.fc2": (h, 4 * h), "x_block.adaLN_modulation.1": ((9 if b in attn2 else 6) * h, h),
           "context_block.attn.qkv": (3 * h, h), "context_block.adaLN_modulation.1": ((2 if last else 6) * h, h)}
    if not last:
        out.update({"context_block.attn.proj": (h, h), "context_block.mlp.fc1": (4 * h, h),
                    "context_block.mlp.fc2": (h, 4 * h)})
    if b in attn2:
        out.update({"x_block.attn2.qkv": (3 * h, h), "x_block.attn2.proj": (h, h)})
    return out


def basic_layers(model: str) -> dict:
    h = MODELS[model][0]
    return {"context_embedder": (h, 4096), "x_embedder.proj": (h, 16, 2, 2), "t_embedder.mlp.0": (h, 256),
            "t_embedder.mlp.2": (h, h), "y_embedder.mlp.0": (h, 2048), "y_embedder.mlp.2": (h, h),
            "final_layer.linear": (64, h), "final_layer.adaLN_modulation.1": (2 * h, h)}


def mmdit_weights(model: str, blocks) -> dict:
    """{MMDiT weight path (no `.weight`): shape} over the given blocks and the layers outside them."""
    out = {f"joint_blocks.{b}.{k}": s for b in blocks for k, s in block_layers(model, b).items()}
    out.update(basic_layers(model))
    return out


def diffusers_modules(model: str, blocks) -> dict:
    """{diffusers path: (MMDiT path, rows or None, shape)} of every module a diffusers LoRA can hold."""
    h = MODELS[model][0]
    w = mmdit_weights(model, blocks)
    out = {}
    for b in blocks:
        for part, (layer, lo, hi) in PARTS.items():
            src = f"joint_blocks.{b}.{layer}"
            if src not in w:
                continue
            if lo is None:
                out[f"transformer_blocks.{b}.{part}"] = (src, None, w[src])
            else:
                out[f"transformer_blocks.{b}.{part}"] = (src, (lo * h, hi * h), (h, w[src][1]))
    for part, layer in {**BASIC, **SWAPPED_BASIC}.items():
        out[part] = (layer, None, w[layer])
    return out


def _factors(shape, rank, g):
    o, i = shape[0], int(torch.tensor(shape[1:]).prod())
    up, down = spectrum_factors(o, i, rank, g, eff_rank=1.5, decay=0.5, magnitude=0.01)
    return up, down.reshape(rank, *shape[1:])


def mmdit_lora(model="sd3m", blocks=(0,), layers=None, rank=2, seed=0, dtype=torch.float32, alpha=1.0,
               basic=False, te=False, kind="lora"):
    """A kohya MMDiT LoRA (`lora_unet_joint_blocks_N_…`, `.lora_up/.lora_down/.alpha`); `layers`: names to keep
    (MMDiT paths without the block prefix, or basic paths); kind 'lokr'/'dora' for those kinds."""
    g = torch.Generator().manual_seed(seed)
    w = mmdit_weights(model, blocks)
    sd = {}
    for path, shape in w.items():
        short = path.split(".", 2)[2] if path.startswith("joint_blocks.") else path
        if path.startswith("joint_blocks.") and int(path.split(".")[1]) not in blocks:
            continue
        if not path.startswith("joint_blocks.") and not basic:
            continue
        if layers is not None and short not in layers and path not in layers:
            continue
        name = "lora_unet_" + path.replace(".", "_")
        _module(sd, name, shape, rank, g, dtype, alpha, kind, dotted=False)
    if te:
        _te(sd, g, dtype, dotted=False)
    return sd


def diffusers_lora(model="sd3m", blocks=(0,), parts=None, convention="transformer", rank=2, seed=1,
                   dtype=torch.float32, alpha=1.0, basic=False, te=False, kind="lora"):
    """A diffusers-vocabulary SD3 LoRA in one of ComfyUI's four SD3 conventions (PREFIXES): PEFT `lora_A/lora_B`
    for the dotted ones, `lora_up/lora_down/alpha` with underscores for OneTrainer and SimpleTuner."""
    g = torch.Generator().manual_seed(seed)
    prefix = PREFIXES[convention]
    dotted = prefix.endswith(".")
    sd = {}
    for path, (_, _, shape) in diffusers_modules(model, blocks).items():
        inside = path.startswith("transformer_blocks.")
        if not inside and not basic:
            continue
        short = path.split(".", 2)[2] if inside else path
        if parts is not None and short not in parts and path not in parts:
            continue
        name = prefix + (path if dotted else path.replace(".", "_"))
        _module(sd, name, shape, rank, g, dtype, alpha, kind, dotted)
    if te:
        _te(sd, g, dtype, dotted)
    return sd


def _module(sd, name, shape, rank, g, dtype, alpha, kind, dotted):
    if kind == "lokr":
        o, i = shape[0], int(torch.tensor(shape[1:]).prod())
        f1 = 4
        w1 = torch.randn(f1, f1, generator=g) * 0.1
        a, b = spectrum_factors(o // f1, i // f1, rank, g, eff_rank=1.5, decay=0.5, magnitude=0.01)
        sd[name + ".lokr_w1"], sd[name + ".lokr_w2_a"], sd[name + ".lokr_w2_b"] = w1.to(dtype), a.to(dtype), b.to(dtype)
        sd[name + ".alpha"] = torch.tensor(float(rank)).to(dtype)
        return
    up, down = _factors(shape, rank, g)
    if dotted:
        sd[name + ".lora_B.weight"], sd[name + ".lora_A.weight"] = up.to(dtype), down.to(dtype)
    else:
        sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"] = up.to(dtype), down.to(dtype)
        sd[name + ".alpha"] = torch.tensor(alpha * rank).to(dtype)
    if kind == "dora":
        sd[name + ".dora_scale"] = (torch.rand(shape[0], 1, generator=g) + 0.5).to(dtype)


TE = {"te1": ("text_model.encoder.layers.0.self_attn.q_proj", (768, 768)),
      "te2": ("text_model.encoder.layers.0.mlp.fc1", (5120, 1280)),
      "te3": ("encoder.block.0.layer.0.SelfAttention.q", (4096, 4096))}
TE_DOTTED = {"te1": "text_encoder.", "te2": "text_encoder_2.", "te3": "text_encoder_3."}


def _te(sd, g, dtype, dotted):
    for te, (path, shape) in TE.items():
        name = (TE_DOTTED[te] + path) if dotted else (f"lora_{te}_" + path.replace(".", "_"))
        _module(sd, name, shape, 2, g, dtype, 1.0, "lora", dotted)


def model_of(sd) -> LoRAModel:
    return LoRAModel.from_state_dict(dict(sd))


def dense(sd) -> dict:
    out = {}
    for m in model_of(sd).modules:
        d = m.delta(torch.float64)
        out[m.name] = d.reshape(d.shape[0], -1)
    return out


def to_mmdit(sd, model, blocks) -> dict:
    """ΔW per MMDiT weight path (float64) of a LoRA in either vocabulary, assembled by hand from the tables above
    (swapped layers as ComfyUI swaps them): the ground truth of what the file changes."""
    w = mmdit_weights(model, blocks)
    dm = diffusers_modules(model, blocks)
    out = {}
    for name, d in dense(sd).items():
        if name.startswith("lora_te") or name.startswith("text_encoder"):
            continue
        flat = name
        for p in ("lora_unet_",) + tuple(PREFIXES.values()):
            if flat.startswith(p):
                flat = flat[len(p):]
                break
        flat = flat.replace(".", "_")
        hit = next(((k, v) for k, v in dm.items() if k.replace(".", "_") == flat), None)
        if hit is not None:
            src, rows, _ = hit[1]
            if src in ("final_layer.adaLN_modulation.1",) or (src.endswith("context_block.adaLN_modulation.1")
                                                                 and w[src][0] == 2 * w[src][1]):
                d = torch.cat([d[d.shape[0] // 2:], d[:d.shape[0] // 2]])     # swap_scale_shift
            full = out.setdefault(src, torch.zeros(w[src][0], d.shape[1], dtype=torch.float64))
            full[slice(None) if rows is None else slice(*rows)] += d
            continue
        src = next(k for k in w if k.replace(".", "_") == flat)
        out[src] = out.get(src, 0) + d
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


def run_cli(*argv):
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, buf.getvalue(), err.getvalue()


def blend_error(loras, w, model, blocks, **kw):
    """max over MMDiT weights of ‖blend − Σ w_i·ΔW_i‖/‖Σ w_i·ΔW_i‖ (dense float64, by hand-made tables), and the
    blend's report; every weight an input changes must be changed by the blend."""
    out, rep = blend([model_of(x) for x in loras], list(w), "concat", **kw)
    got = to_mmdit(out.state_dict(), model, blocks)
    refs = [to_mmdit(x, model, blocks) for x in loras]
    keys = set().union(*refs)
    assert set(got) == keys
    return max(rel(got[k], sum(wi * r[k] for wi, r in zip(w, refs) if k in r)) for k in keys), out, rep


# ---------------------------------------------------------------- every convention, both orders (already right)

@pytest.mark.parametrize("model,blocks", [("sd3m", (0, 23)), ("sd35l", (0, 37)), ("sd35m", (0, 12, 23))])
@pytest.mark.parametrize("convention", list(PREFIXES))
def test_every_convention_pairs_with_mmdit_names_in_both_orders(model, blocks, convention):
    """Fused qkv ↔ split q/k/v, whole layers and embedders pair; the last block's pre-only context modulation and
    the final modulation (halves swapped) stay unpaired; architecture SD3 on both sides; no warning."""
    k = model_of(mmdit_lora(model, blocks, basic=True))
    d = model_of(diffusers_lora(model, blocks, convention=convention, basic=True))
    assert k.architecture.id == d.architecture.id == "sd3"
    last = MODELS[model][1] - 1
    p = PREFIXES[convention]
    name = (lambda s: p + s) if p.endswith(".") else (lambda s: p + s.replace(".", "_"))
    swapped_k = {f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1",
                 "lora_unet_final_layer_adaLN_modulation_1"}
    swapped_d = {name(f"transformer_blocks.{last}.norm1_context.linear"), name("norm_out.linear")}
    for a, b in ((k, d), (d, k)):
        res = match_modules(a, b)
        assert not res.warnings
        only = {m.name for _, m in res.only_a} | {m.name for _, m in res.only_b}
        assert only == swapped_k | swapped_d
        pairs = {ma.name: mb for _, ma, mb in res.shared}
        if a is k:
            qkv = pairs[f"lora_unet_joint_blocks_0_x_block_attn_qkv"]
            assert set(qkv.source_names) == {name(f"transformer_blocks.0.attn.to_{x}") for x in "qkv"}
            assert pairs["lora_unet_x_embedder_proj"].name == name("pos_embed.proj")
            assert pairs["lora_unet_y_embedder_mlp_0"].name == name("time_text_embed.text_embedder.linear_1")
            assert pairs["lora_unet_final_layer_linear"].name == name("proj_out")
            assert pairs[f"lora_unet_joint_blocks_0_context_block_adaLN_modulation_1"].name == \
                name("transformer_blocks.0.norm1_context.linear")
            if 12 in blocks:
                assert pairs["lora_unet_joint_blocks_12_x_block_attn2_proj"].name == \
                    name("transformer_blocks.12.attn2.to_out.0")
        else:
            q = pairs[name("transformer_blocks.0.attn.add_q_proj")]
            assert q.source_names == ("lora_unet_joint_blocks_0_context_block_attn_qkv",) and q.rows == (0, MODELS[model][0])


@pytest.mark.parametrize("model,blocks,convention,basic", [("sd3m", (23,), "transformer", True),
                                                           ("sd35l", (37,), "flash", False),
                                                           ("sd35m", (12,), "onetrainer", False),
                                                           ("sd3m", (23,), "simpletuner", False)])
@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_concat_blend_is_the_stacked_sum_on_every_weight(model, blocks, convention, basic, first):
    k = mmdit_lora(model, blocks, basic=basic, seed=3)
    d = diffusers_lora(model, blocks, convention=convention, basic=basic, seed=4)
    loras = [k, d] if first == "mmdit" else [d, k]
    err, out, rep = blend_error(loras, (0.7, -0.4), model, blocks)
    assert err < 1e-6 and not rep["warnings"]


# ---------------------------------------------------------------- bug: swapped layers carried under a name ComfyUI does not read

@pytest.mark.parametrize("convention", list(PREFIXES))
@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_carried_swapped_final_modulation_keeps_its_own_name(convention, first):
    """norm_out.linear ↔ final_layer.adaLN_modulation.1 cannot be translated (halves swapped): carried from the
    second file it must keep its own name. It was renamed into the first file's prefix (`lora_unet_norm_out_linear`,
    `lora_transformer_final_layer_adaLN_modulation_1`, `lycoris_final_layer_…`), names ComfyUI's SD3 key map does
    not hold, so ComfyUI silently dropped that change."""
    k = mmdit_lora("sd3m", (0,), layers={"x_block.attn.proj", "final_layer.adaLN_modulation.1"}, basic=True)
    d = diffusers_lora("sd3m", (0,), parts={"attn.to_out.0", "norm_out.linear"}, convention=convention, basic=True)
    p = PREFIXES[convention]
    norm_out = p + ("norm_out.linear" if p.endswith(".") else "norm_out_linear")
    loras = [k, d] if first == "mmdit" else [d, k]
    out, _ = blend([model_of(x) for x in loras], [1.0, 1.0], "concat")
    names = {m.name for m in out.modules}
    assert {"lora_unet_final_layer_adaLN_modulation_1", norm_out} <= names


def test_flux_carried_final_modulation_keeps_its_own_name():
    """The same for FLUX (BFL `final_layer.adaLN_modulation.1` ↔ diffusers `norm_out.linear`, swapped)."""
    g = torch.Generator().manual_seed(5)
    k, d = {}, {}
    _module(k, "lora_unet_double_blocks_0_img_attn_proj", (3072, 3072), 2, g, torch.float32, 1.0, "lora", False)
    _module(k, "lora_unet_final_layer_adaLN_modulation_1", (6144, 3072), 2, g, torch.float32, 1.0, "lora", False)
    _module(d, "transformer.transformer_blocks.0.attn.to_out.0", (3072, 3072), 2, g, torch.float32, 1.0, "lora", True)
    _module(d, "transformer.norm_out.linear", (6144, 3072), 2, g, torch.float32, 1.0, "lora", True)
    out, _ = blend([model_of(k), model_of(d)], [1.0, 1.0], "concat")
    assert "transformer.norm_out.linear" in {m.name for m in out.modules}


# ---------------------------------------------------------------- bug: SD3.5 medium's attn2 made diffusers blocks 'block N'

@pytest.mark.parametrize("item", ["joint0=0.5", "double0-0=0.5"])
@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_sd35_medium_block_weights_reach_diffusers_modules(item, first):
    """SD3.5 medium's diffusers blocks hold `attn` and `attn2` (dual attention): they were taken for LTX-Video/
    PixArt self/cross attention and labelled 'block N', so joint0=/double0= missed every module only the diffusers
    file has (and all of them when it came first)."""
    blocks = (0, 1)
    d = diffusers_lora("sd35m", blocks, seed=6, parts={"attn.to_q", "attn2.to_k", "attn.add_v_proj", "attn2.to_out.0",
                                                       "ff_context.net.2"})
    assert {m.block for m in model_of(d).modules} == {"double 0", "double 1"}
    k = mmdit_lora("sd35m", blocks, layers={"x_block.attn.qkv", "x_block.attn2.qkv", "x_block.attn.proj"}, seed=5)
    loras = [k, d] if first == "mmdit" else [d, k]
    out, _ = blend([model_of(x) for x in loras], [1.0, 1.0], "concat", block_weights=item)
    got = to_mmdit(out.state_dict(), "sd35m", blocks)
    refs = [to_mmdit(x, "sd35m", blocks) for x in loras]
    for key in set().union(*refs):
        m = 0.5 if key.startswith("joint_blocks.0.") else 1.0
        assert rel(got[key], m * sum(r[key] for r in refs if key in r)) < 1e-6, key


def test_ltx_style_attn1_attn2_blocks_stay_single_stream():
    g = torch.Generator().manual_seed(7)
    sd = {}
    for part in ("attn1.to_q", "attn2.to_k", "ff.net.0.proj"):
        _module(sd, f"transformer.transformer_blocks.3.{part}", (2048, 2048), 2, g, torch.float32, 1.0, "lora", True)
    assert {m.block for m in model_of(sd).modules} == {"block 3"}


# ---------------------------------------------------------------- bug: LoKr on a fused/split SD3 layer crashed

@pytest.mark.parametrize("side", ["mmdit", "diffusers"])
@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_lokr_on_a_fused_or_split_layer_scans_and_blends_exactly(side, first):
    """A LoKr module inside a row slice (fused qkv against split q/k) or a row stack (split parts against a fused
    qkv) raised KeyError 'lokr_w1_b' in both ConflictScan and BlendLoRAs."""
    model, blocks, h = "sd3m", (0,), 1536
    k = mmdit_lora(model, blocks, layers={"x_block.attn.qkv", "x_block.attn.proj"}, seed=41,
                   kind="lokr" if side == "mmdit" else "lora")
    d = diffusers_lora(model, blocks, parts={"attn.to_q", "attn.to_k", "attn.to_out.0"}, seed=42,
                       kind="lokr" if side == "diffusers" else "lora")
    a, b = (k, d) if first == "mmdit" else (d, k)
    rep = scan(a, b)
    ra, rb = to_mmdit(a, model, blocks), to_mmdit(b, model, blocks)
    qkv = "joint_blocks.0.x_block.attn.qkv"
    if first == "mmdit":   # the fused qkv against the split parts (v rows absent in the other: zero)
        x, y = ra[qkv], rb[qkv]
        refs = {"lora_unet_joint_blocks_0_x_block_attn_qkv": float((x * y).sum() / (x.norm() * y.norm()))}
    else:                  # each split part against the fused module's rows
        refs = {}
        for part, rows in (("to_q", (0, h)), ("to_k", (h, 2 * h))):
            x, y = ra[qkv][rows[0]:rows[1]], rb[qkv][rows[0]:rows[1]]
            refs[f"transformer.transformer_blocks.0.attn.{part}"] = float((x * y).sum() / (x.norm() * y.norm()))
    for name, ref in refs.items():
        assert abs(rep["modules"][name]["cosine"] - ref) < 1e-4 * max(1.0, abs(ref) * 1e3), (name, ref)
    err, _, _ = blend_error([a, b], (0.7, 0.5), model, blocks)
    assert err < 1e-6


# ---------------------------------------------------------------- bug: FLUX/Qwen text-stream-only files read as SD3

def _diffusers_file(parts, width, blocks, seed=9):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in blocks:
        for part in parts:
            _module(sd, f"transformer.transformer_blocks.{b}.{part}", (width, width), 2, g, torch.float32, 1.0, "lora",
                    True)
    return sd


@pytest.mark.parametrize("parts", [["attn.add_q_proj"], ["attn.add_k_proj", "attn.to_add_out"], ["attn.to_out.0"],
                                   ["attn.to_add_out"], ["attn.to_k", "attn.to_v"]])
@pytest.mark.parametrize("width,top,arch", [(3072, 18, "flux1"), (3072, 59, "qwen_image"), (2432, 37, "sd3"),
                                            (1536, 23, "sd3")])
def test_attention_only_diffusers_files_are_told_apart_by_width(parts, width, top, arch):
    """A diffusers two-stream file with only context-stream projections (add_*_proj) was SD3 whatever its width, so
    a FLUX or Qwen-Image LoRA trained on the text stream was refused against its own model's other LoRAs; one with
    only the output projections was 'unknown'. Every projection reads the width."""
    assert model_of(_diffusers_file(parts, width, (0, top))).architecture.id == arch


def test_flux_text_stream_lora_pairs_with_a_bfl_file():
    """…so a FLUX diffusers add_q/k/v file now meets a kohya BFL file's txt_attn.qkv (it was refused as SD3)."""
    g = torch.Generator().manual_seed(10)
    k = {}
    _module(k, "lora_unet_double_blocks_0_txt_attn_qkv", (9216, 3072), 2, g, torch.float32, 1.0, "lora", False)
    d = _diffusers_file(["attn.add_q_proj", "attn.add_k_proj"], 3072, (0,))
    res = match_modules(model_of(k), model_of(d))
    assert [ma.name for _, ma, _ in res.shared] == ["lora_unet_double_blocks_0_txt_attn_qkv"]


# ---------------------------------------------------------------- the command lines

@pytest.fixture
def files(tmp_path):
    """A kohya SD3.5 large file (two blocks, embedders, three text encoders) and a OneTrainer diffusers file
    covering only to_q plus the text encoders, whose block-0 to_q is the exact negative of the kohya qkv's q rows."""
    h = 2432
    k = mmdit_lora("sd35l", (0, 37), basic=True, te=True, seed=21, dtype=torch.float16,
                   layers={"x_block.attn.qkv", "context_block.attn.qkv", "x_block.attn.proj", "x_embedder.proj",
                           "context_block.adaLN_modulation.1", "t_embedder.mlp.0"})
    d = diffusers_lora("sd35l", (0, 37), parts={"attn.to_q", "pos_embed.proj"}, convention="onetrainer", basic=True,
                       te=True, seed=22, dtype=torch.float16)
    b_, a_, s = model_of(k).get("lora_unet_joint_blocks_0_x_block_attn_qkv").lowrank(torch.float32)
    q = "lora_transformer_transformer_blocks_0_attn_to_q"
    d[q + ".lora_up.weight"], d[q + ".lora_down.weight"] = (-b_[:h] * s).half(), a_.half()
    d[q + ".alpha"] = torch.tensor(2.0).half()
    save_file(k, str(tmp_path / "k.safetensors"))
    save_file(d, str(tmp_path / "d.safetensors"))
    return tmp_path


def test_cli_conflict_pairs_the_partial_file_both_ways(files):
    """`lora-lens conflict A B --json`: the OneTrainer to_q meets the q rows of the kohya qkv (cosine −1 there),
    pos_embed.proj meets x_embedder.proj, the text encoders meet; nothing else of the kohya file pairs."""
    code, out, err = run_cli("conflict", files / "d.safetensors", files / "k.safetensors", "--json",
                             "--problems", files / "p.txt")
    assert code == 0, err
    rep = json.loads(out)
    mods = rep["modules"]
    q = mods["lora_transformer_transformer_blocks_0_attn_to_q"]
    assert q["name_b"] == "lora_unet_joint_blocks_0_x_block_attn_qkv[0:2432]" and q["cosine"] < -0.999
    assert mods["lora_transformer_pos_embed_proj"]["name_b"] == "lora_unet_x_embedder_proj"
    assert set(mods) == {"lora_transformer_transformer_blocks_0_attn_to_q",
                         "lora_transformer_transformer_blocks_37_attn_to_q", "lora_transformer_pos_embed_proj",
                         "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                         "lora_te2_text_model_encoder_layers_0_mlp_fc1",
                         "lora_te3_encoder_block_0_layer_0_SelfAttention_q"}
    assert "lora_transformer_transformer_blocks_0_attn_to_q" in rep["problem_modules"]
    assert "lora_transformer_transformer_blocks_0_attn_to_q" in (files / "p.txt").read_text()
    code, out, err = run_cli("conflict", files / "k.safetensors", files / "d.safetensors", "--json")
    rep = json.loads(out)
    qkv = rep["modules"]["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    assert qkv["name_b"] == "lora_transformer_transformer_blocks_0_attn_to_q"
    assert len(rep["modules"]) == 6 and not rep.get("warnings")
    assert "lora_unet_joint_blocks_37_context_block_adaLN_modulation_1" in rep["only_in_a"]


@pytest.mark.parametrize("order,method", [("kd", "concat"), ("dk", "svd")])
def test_cli_blend_with_the_problem_list_and_block_weights(files, order, method):
    """`lora-lens blend … --exclude @problems.txt --block-weights joint0-5=0.5`: the problem list (diffusers names)
    excludes that layer in either order (the whole fused qkv when the kohya file comes first), the block weight
    halves block 0 in both vocabularies, everything else is the stacked sum (svd at full rank: exact)."""
    run_cli("conflict", files / "d.safetensors", files / "k.safetensors", "--problems", files / "p.txt")
    first, second = (("k", "d") if order == "kd" else ("d", "k"))
    w = {"k": 0.9, "d": 0.6}
    out = files / f"out_{order}_{method}.safetensors"
    code, txt, err = run_cli("blend", f"{files / first}.safetensors:{w[first]}", f"{files / second}.safetensors:{w[second]}",
                             "--method", method, "-o", out, "--exclude", f"@{files / 'p.txt'}",
                             "--block-weights", "joint0-5=0.5", "--json")
    assert code == 0, err
    rep = json.loads(txt)
    assert rep["modules"]["excluded"] == 1
    sd = {k: v for k, v in load_file(str(out)).items()}
    blocks = (0, 37)
    got = to_mmdit(sd, "sd35l", blocks)
    refs = {x: to_mmdit(load_file(str(files / f"{x}.safetensors")), "sd35l", blocks) for x in "kd"}
    qkv = "joint_blocks.0.x_block.attn.qkv"
    for key in set(refs["k"]) | set(refs["d"]):
        m = 0.5 if key.startswith("joint_blocks.0.") else 1.0
        ref = m * sum(w[x] * refs[x][key] for x in "kd" if key in refs[x])
        if key == qkv:
            if order == "kd":
                assert key not in got                               # the fused layer is the excluded module
            else:                                                   # only the to_q piece is excluded
                ref = m * w["k"] * refs["k"][key]
                assert float(got[key][:2432].norm()) == 0
                assert rel(got[key][2432:], ref[2432:]) < 1e-2      # fp16 output
            continue
        assert rel(got[key], ref) < 1e-2, key
    te = dense(sd)
    te_ref = {x: dense(load_file(str(files / f"{x}.safetensors"))) for x in "kd"}
    n = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    assert rel(te[n], w["k"] * te_ref["k"][n] + w["d"] * te_ref["d"][n]) < 1e-2


# ---------------------------------------------------------------- bug: one SD3 block reported under two labels

@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_conflict_blocks_name_one_sd3_block_once(first):
    """MMDiT modules are labelled 'joint N', diffusers ones 'double N'. The conflict report's blocks put the shared
    modules under A's label but B's unpaired ones under B's, so block 0 appeared twice ('double 0' with the shared
    change, 'joint 0' with the rest) and each row's only_in_one_energy_share was wrong."""
    k = mmdit_lora("sd3m", (0,), layers={"x_block.attn.qkv", "x_block.attn.proj", "context_block.mlp.fc2"}, seed=51)
    d = diffusers_lora("sd3m", (0,), parts={"attn.to_q", "ff.net.2"}, seed=52)
    a, b = (k, d) if first == "mmdit" else (d, k)
    rep = scan(a, b)
    label = "joint 0" if first == "mmdit" else "double 0"
    assert set(rep["blocks"]) == {label}
    row = rep["blocks"][label]
    # reference share: energy of the unpaired modules (whole modules, both files) over the block's total
    ra, rb = to_mmdit(a, "sd3m", (0,)), to_mmdit(b, "sd3m", (0,))
    qkv = "joint_blocks.0.x_block.attn.qkv"
    e = lambda t: float(t.pow(2).sum())
    only = sum(e(v) for key, v in ra.items() if key not in rb) + sum(e(v) for key, v in rb.items() if key not in ra)
    if first == "diffusers":   # A's to_q meets the kohya qkv's q rows; its k/v rows are in B only
        only += e(rb[qkv][1536:])
        shared = e(ra[qkv]) + e(rb[qkv][:1536])
    else:
        shared = e(ra[qkv]) + e(rb[qkv])
    tot = only + shared
    assert abs(row["only_in_one_energy_share"] - only / tot) < 1e-4


# ---------------------------------------------------------------- bug: a DoRA fused layer named by its row slices

@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_dora_on_a_fused_layer_is_named_once_and_excluding_that_name_blends(first):
    """A kohya DoRA qkv against split to_q/to_k: the refusal named the row slice ('…qkv[0:1536]'), and excluding
    that name only led to the next slice's refusal (three rounds for one module). It names the DoRA module, whose
    name then excludes every piece of it; the rest blends as stacked."""
    from lens_ops.errors import LensError
    k = mmdit_lora("sd3m", (0,), layers={"x_block.attn.qkv", "context_block.attn.qkv"}, seed=43, kind="dora")
    k.update(mmdit_lora("sd3m", (0,), layers={"x_block.attn.proj"}, seed=44))
    d = diffusers_lora("sd3m", (0,), parts={"attn.to_q", "attn.to_k", "attn.to_out.0"}, seed=45)
    loras = [k, d] if first == "mmdit" else [d, k]
    with pytest.raises(LensError) as e:
        blend([model_of(x) for x in loras], [1.0, 1.0], "concat")
    assert "Module lora_unet_joint_blocks_0_x_block_attn_qkv is DoRA" in str(e.value)
    out, rep = blend([model_of(x) for x in loras], [1.0, 1.0], "concat",
                     exclude="lora_unet_joint_blocks_0_x_block_attn_qkv")
    got = to_mmdit(out.state_dict(), "sd3m", (0,))
    assert "joint_blocks.0.x_block.attn.qkv" not in got
    # the DoRA context qkv only the kohya file has is carried whole under its own name (it was cut into add_q/k/v
    # row pieces for a diffusers-first blend, which a DoRA module cannot be: the blend was refused)
    ctx = out.get("lora_unet_joint_blocks_0_context_block_attn_qkv")
    assert ctx is not None and ctx.is_dora
    ref = sum(to_mmdit(x, "sd3m", (0,))["joint_blocks.0.x_block.attn.proj"] for x in loras)
    assert rel(got["joint_blocks.0.x_block.attn.proj"], ref) < 1e-6


# ---------------------------------------------------------------- bug: SD3.5 large against SD3 medium crashed in blend

@pytest.mark.parametrize("order", ["dk", "kd"])
def test_sd35_large_against_sd3_medium_is_refused_in_one_sentence(tmp_path, order):
    """Both read as SD3, but a 2432-wide SD3.5 large to_q cannot meet the q rows of a 1536-wide SD3 medium qkv:
    ConflictScan said so, BlendLoRAs crashed with a torch size error (row views escaped the shape check)."""
    d = diffusers_lora("sd35l", (0,), parts={"attn.to_q", "attn.to_k"})
    k = mmdit_lora("sd3m", (0,), layers={"x_block.attn.qkv"})
    save_file(d, str(tmp_path / "d.safetensors"))
    save_file(k, str(tmp_path / "k.safetensors"))
    a, b = (tmp_path / f"{order[0]}.safetensors", tmp_path / f"{order[1]}.safetensors")
    for argv in (("conflict", a, b), ("blend", a, b, "-o", tmp_path / "out.safetensors")):
        code, out, err = run_cli(*argv)
        assert code == 2 and "trained for different base models" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_onetrainer_file_with_text_encoders_is_named_onetrainer():
    """OneTrainer writes `lora_transformer_…` for the transformer and `lora_te1_/lora_te2_/lora_te3_` for the text
    encoders; with text encoders the file was reported as 'kohya sd-scripts'."""
    assert model_of(diffusers_lora("sd3m", (0,), parts={"attn.to_q"}, convention="onetrainer",
                                   te=True)).convention == "OneTrainer"


@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
@pytest.mark.parametrize("how", ["include_other_vocab", "exclude_regex_other_vocab"])
def test_filters_take_names_from_either_vocabulary(first, how):
    """--include with the other file's name of a layer keeps that layer (whole fused qkv or its pieces), and an
    exclude regex written in the other vocabulary drops the layer in both files."""
    k = mmdit_lora("sd3m", (0,), layers={"x_block.attn.qkv", "context_block.attn.qkv", "x_block.attn.proj"}, seed=71)
    d = diffusers_lora("sd3m", (0,), parts={"attn.to_q", "attn.add_q_proj", "attn.to_out.0"}, convention="flash",
                       seed=72)
    loras = [k, d] if first == "mmdit" else [d, k]
    if how == "include_other_vocab":
        item = ("base_model.model.transformer_blocks.0.attn.to_q" if first == "mmdit"
                else "lora_unet_joint_blocks_0_x_block_attn_qkv")
        out, rep = blend([model_of(x) for x in loras], [1.0, 1.0], "concat", include=item)
        kept = {"joint_blocks.0.x_block.attn.qkv"}
    else:
        item = r"attn\.add_q_proj" if first == "mmdit" else r"context_block_attn_qkv"
        out, rep = blend([model_of(x) for x in loras], [1.0, 1.0], "concat", exclude=item)
        kept = {"joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn.proj"}
    got = to_mmdit(out.state_dict(), "sd3m", (0,))
    refs = [to_mmdit(x, "sd3m", (0,)) for x in loras]
    assert set(got) == kept
    for key in kept:
        assert rel(got[key], sum(r[key] for r in refs if key in r)) < 1e-6
