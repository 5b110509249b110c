"""QA on LoRA files for newer DiTs and less common key conventions, through every `lora-lens` command.

Key names follow the trainers and ComfyUI's loader (comfy/lora.py `model_lora_keys_unet`, weight_adapter/lora.py):
musubi-tuner writes `lora_unet_` + the module path with dots as underscores (Wan `blocks_N_self_attn_q`,
Qwen-Image `transformer_blocks_N_img_mlp_net_0_proj`, HunyuanVideo `double_blocks_N_img_attn_qkv`); ComfyUI's own
format is `diffusion_model.<path>.lora_A/lora_B.weight` with `.diff`/`.diff_b` for full and bias changes (lightx2v
Wan LoRAs carry 1-D norm diffs and a [1, 6, dim] modulation diff); diffusers/PEFT writes `transformer.<path>`
(SD3, Qwen-Image with `.lora_B.default.weight`), flash-SD3 `base_model.model.`, OneTrainer `lora_transformer_`,
kohya SD3 `lora_unet_joint_blocks_…` and `lora_te3_` (T5), SimpleTuner `lycoris_` and `transformer.` (HiDream),
Mochi-style bare `.lora_A`/`.lora_B` (Lumina 2), `.lora.up.weight` and `.lora_linear_layer.up.weight`.
Shapes are the models' real ones; factors have decaying spectra (lens_ops.synth.spectrum_factors), never zeros.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_ops import LoRAModel
from lens_ops.cli import main
from lens_ops.synth import spectrum_factors


def _blocks(fmt, blocks, parts):
    return [(fmt.format(b) + "." + p, o, i) for b in blocks for p, o, i in parts]


# (module path in the base model's state dict, out, in)
WAN = _blocks("blocks.{}", (0, 29), [("self_attn.q", 1536, 1536), ("self_attn.o", 1536, 1536),
                                     ("cross_attn.k", 1536, 1536), ("ffn.0", 8960, 1536), ("ffn.2", 1536, 8960)])
QWEN = _blocks("transformer_blocks.{}", (0, 59), [("attn.to_q", 3072, 3072), ("attn.add_q_proj", 3072, 3072),
                                                  ("attn.to_add_out", 3072, 3072), ("img_mlp.net.0.proj", 12288, 3072),
                                                  ("txt_mlp.net.2", 3072, 12288)])
HUNYUAN = _blocks("double_blocks.{}", (0, 19), [("img_attn_qkv", 9216, 3072), ("img_mlp.fc1", 12288, 3072),
                                                ("txt_attn_proj", 3072, 3072)]) + \
    _blocks("single_blocks.{}", (0, 39), [("linear1", 21504, 3072), ("linear2", 3072, 15360)])
SD3 = _blocks("transformer_blocks.{}", (0, 23), [("attn.to_q", 1536, 1536), ("attn.add_k_proj", 1536, 1536),
                                                 ("attn.to_add_out", 1536, 1536), ("ff.net.0.proj", 6144, 1536),
                                                 ("ff_context.net.2", 1536, 6144)])
SD3_MMDIT = _blocks("joint_blocks.{}", (0, 23), [("x_block.attn.qkv", 4608, 1536), ("x_block.mlp.fc1", 6144, 1536),
                                                 ("context_block.attn.proj", 1536, 1536)])
T5 = _blocks("encoder.block.{}", (0, 23), [("layer.0.SelfAttention.q", 4096, 4096),
                                           ("layer.1.DenseReluDense.wo", 4096, 10240)])
CHROMA = _blocks("double_blocks.{}", (0, 18), [("img_attn.qkv", 9216, 3072), ("txt_mlp.2", 3072, 12288)]) + \
    _blocks("single_blocks.{}", (0, 37), [("linear1", 21504, 3072), ("linear2", 3072, 15360)])
LTXV = _blocks("transformer_blocks.{}", (0, 27), [("attn1.to_q", 2048, 2048), ("attn2.to_k", 2048, 2048),
                                                  ("attn2.to_out.0", 2048, 2048), ("ff.net.0.proj", 8192, 2048)])
HIDREAM = _blocks("double_stream_blocks.{}.block", (0, 15), [("attn1.to_q", 2560, 2560),
                                                              ("ff_i.shared_experts.w1", 6912, 2560)]) + \
    _blocks("single_stream_blocks.{}.block", (0, 31), [("attn1.to_q", 2560, 2560)])
LUMINA2 = _blocks("layers.{}", (0, 25), [("attention.qkv", 6912, 2304), ("feed_forward.w1", 6144, 2304)]) + \
    [("noise_refiner.0.attention.qkv", 6912, 2304)]
CLIP_L = _blocks("text_model.encoder.layers.{}", (0, 11), [("self_attn.q_proj", 768, 768), ("mlp.fc1", 3072, 768)])

STYLES = {"kohya": (".lora_up.weight", ".lora_down.weight"), "peft": (".lora_B.weight", ".lora_A.weight"),
          "peft_default": (".lora_B.default.weight", ".lora_A.default.weight"),
          "dotlora": (".lora.up.weight", ".lora.down.weight"),
          "linear_layer": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
          "mochi": (".lora_B", ".lora_A")}


def wan_extras(sd, names, g, dtype):
    """lightx2v-style extras next to the LoRA pairs: a bias diff on a LoRA layer, 1-D norm diffs, the [1, 6, dim]
    modulation diff, a head diff with its bias, a 5-D patch-embedding diff."""
    def small(*shape):
        return (torch.randn(*shape, generator=g) * 1e-3).to(dtype)
    for b in (0, 29):
        sd[f"diffusion_model.blocks.{b}.self_attn.q.diff_b"] = small(1536)
        sd[f"diffusion_model.blocks.{b}.self_attn.norm_q.diff"] = small(1536)
        sd[f"diffusion_model.blocks.{b}.norm3.diff"] = small(1536)
        sd[f"diffusion_model.blocks.{b}.norm3.diff_b"] = small(1536)
        sd[f"diffusion_model.blocks.{b}.modulation.diff"] = small(1, 6, 1536)
    sd["diffusion_model.head.head.diff"] = small(64, 1536)
    sd["diffusion_model.head.head.diff_b"] = small(64)
    sd["diffusion_model.patch_embedding.diff"] = small(1536, 16, 1, 2, 2)


def peft_dora(sd, names, g, dtype):
    for n in names[:3]:
        sd[n + ".lora_magnitude_vector"] = (torch.rand(sd[n + ".lora_B.weight"].shape[0], generator=g) + 0.5).to(dtype)


def kohya_dora(sd, names, g, dtype):
    for n in names[:3]:
        sd[n + ".dora_scale"] = (torch.rand(sd[n + ".lora_up.weight"].shape[0], 1, generator=g) + 0.5).to(dtype)


def norm_extras(sd, names, g, dtype):
    """LyCORIS norm changes (weight and bias of a LayerNorm) next to the LoRA pairs."""
    sd["diffusion_model.final_layer.norm_final.w_norm"] = (torch.randn(3072, generator=g) * 1e-3).to(dtype)
    sd["diffusion_model.final_layer.norm_final.b_norm"] = (torch.randn(3072, generator=g) * 1e-3).to(dtype)


# name: (modules, prefix, style, flat names, alpha, dtype, extras, expected architecture id or None = any/unknown)
CASES = {
    "wan_comfy_lightx2v": (WAN, "diffusion_model.", "peft", False, None, torch.bfloat16, wan_extras, "wan"),
    "wan_musubi": (WAN, "lora_unet_", "kohya", True, 2, torch.bfloat16, None, "wan"),
    "qwen_peft_bare": (QWEN, "", "peft", False, None, torch.bfloat16, None, "qwen_image"),
    "qwen_peft_default": (QWEN, "transformer.", "peft_default", False, None, torch.bfloat16, None, "qwen_image"),
    "qwen_musubi": (QWEN, "lora_unet_", "kohya", True, 1, torch.float32, None, "qwen_image"),
    "qwen_lycoris_simpletuner": (QWEN, "lycoris_", "kohya", True, 2, torch.bfloat16, None, "qwen_image"),
    "hunyuan_musubi": (HUNYUAN, "lora_unet_", "kohya", True, 4, torch.bfloat16, None, "hunyuan_video"),
    "hunyuan_diffusion_pipe": (HUNYUAN, "transformer.", "peft", False, None, torch.bfloat16, None, "hunyuan_video"),
    "sd3_diffusers": (SD3, "transformer.", "peft", False, None, torch.float16, None, "sd3"),
    "sd3_base_model_dora": (SD3, "base_model.model.", "peft", False, None, torch.float16, peft_dora, "sd3"),
    "sd3_onetrainer": (SD3, "lora_transformer_", "kohya", True, 1, torch.float32, None, "sd3"),
    "sd3_kohya_dora": (SD3_MMDIT, "lora_unet_", "kohya", True, 2, torch.float16, kohya_dora, "sd3"),
    "t5_kohya_te3": (T5, "lora_te3_", "kohya", True, 2, torch.float16, None, None),
    "chroma_comfy_norm": (CHROMA, "diffusion_model.", "peft", False, None, torch.bfloat16, norm_extras, "flux1"),
    "ltxv_comfy": (LTXV, "diffusion_model.", "peft", False, None, torch.bfloat16, None, "ltxv"),
    "ltxv_dotlora": (LTXV, "transformer.", "dotlora", False, 4, torch.float16, None, "ltxv"),
    "hidream_simpletuner": (HIDREAM, "transformer.", "peft", False, None, torch.bfloat16, None, "hidream"),
    "hidream_lycoris": (HIDREAM, "lycoris_", "kohya", True, 4, torch.bfloat16, None, "hidream"),
    "lumina2_bare": (LUMINA2, "diffusion_model.", "mochi", False, None, torch.bfloat16, None, "lumina2"),
    "clip_linear_layer": (CLIP_L, "text_encoder.", "linear_layer", False, None, torch.float16, None, "sd1"),
}


def build(case: str, seed: int = 0, rank: int = 4, max_modules: int | None = None) -> dict:
    return dict(_build(case, seed, rank, max_modules))


@functools.lru_cache(maxsize=None)
def _build(case: str, seed: int, rank: int, max_modules: int | None) -> dict:
    mods, prefix, style, flat, alpha, dtype, extras, _ = CASES[case]
    mods = mods[:max_modules]
    g = torch.Generator().manual_seed(seed)
    up_s, down_s = STYLES[style]
    sd, names = {}, []
    for path, o, i in mods:
        name = prefix + (path.replace(".", "_") if flat else path)
        up, down = spectrum_factors(o, i, rank, g, eff_rank=2.0, decay=0.5, magnitude=0.004)
        sd[name + down_s], sd[name + up_s] = down.to(dtype), up.to(dtype)
        if alpha is not None:
            sd[name + ".alpha"] = torch.tensor(float(alpha)).to(dtype)
        names.append(name)
    if extras:
        extras(sd, names, g, dtype)
    return sd


def write(tmp_path, case, seed=0, name=None, rank=4, max_modules=None) -> str:
    path = str(tmp_path / (name or f"{case}_{seed}.safetensors"))
    save_file(build(case, seed, rank, max_modules), path, metadata={"qa": case})
    return path


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ reading: kinds, components, architecture
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_tensor_is_understood_and_architecture_is_right_or_unknown(case):
    sd = build(case)
    model = LoRAModel.from_state_dict(dict(sd))
    assert sorted(k for m in model for k in m.keys.values()) == sorted(sd)
    assert not [m.name for m in model if m.kind.name == "unknown"]
    want = CASES[case][-1]
    if want is not None:
        assert model.architecture.id == want, model.architecture
    else:
        assert model.architecture.id in ("unknown", "sd3", "flux1"), model.architecture  # never a UNet guess
    alpha = CASES[case][4]
    for m in model:
        if m.kind.name == "lora":   # ComfyUI's scale: alpha / rank, 1 without alpha
            b, a, s = m.lowrank(torch.float64)
            assert s == (alpha / 4 if alpha is not None else 1.0)
            assert torch.equal(b, m.tensors["up"].double().flatten(1)) and torch.equal(a, m.tensors["down"].double())


def _arch(paths, prefix="transformer.", style="peft"):
    up_s, down_s = STYLES[style]
    sd = {}
    for path, o, i in paths:
        sd[prefix + path + up_s] = torch.randn(o, 2)
        sd[prefix + path + down_s] = torch.randn(2, i)
    return LoRAModel.from_state_dict(sd).architecture


@pytest.mark.parametrize("width,want", [(1536, "sd3"), (2432, "sd3"), (3072, "flux1")])
def test_attention_only_mmdit_lora_past_block_9_is_not_sdxl(width, want):
    """diffusers' older SD3/FLUX scripts targeted to_q/to_k/to_v/to_out.0 only: no add_* projection names, so the
    `transformer_blocks_9` SDXL rule claimed every such LoRA trained past block 9."""
    parts = [("attn.to_q", width, width), ("attn.to_k", width, width), ("attn.to_out.0", width, width)]
    arch = _arch(_blocks("transformer_blocks.{}", (0, 9, 18), parts))
    assert arch.id == want, arch


def test_attn1_attn2_dits_are_never_a_unet():
    """LTX-Video's cross-attention reads 2048-wide text features like SDXL's; PixArt and diffusers-named Wan use
    attn1/attn2 too. Without UNet block names none of them is an SD UNet."""
    ltx = [("attn1.to_q", 2048, 2048), ("attn2.to_k", 2048, 2048), ("ff.net.0.proj", 8192, 2048)]
    assert _arch(_blocks("transformer_blocks.{}", (0, 9, 27), ltx)).id == "ltxv"
    pixart = [("attn1.to_q", 1152, 1152), ("attn2.to_k", 1152, 1152)]
    assert _arch(_blocks("transformer_blocks.{}", (0, 9, 27), pixart)).id == "unknown"
    wan_diffusers = [("attn1.to_q", 1536, 1536), ("attn2.to_k", 1536, 1536), ("ffn.net.0.proj", 8960, 1536)]
    assert _arch(_blocks("blocks.{}", (0, 9, 29), wan_diffusers)).id in ("wan", "unknown")
# ------------------------------------------------------------------ bugs found
def test_analyze_with_dense_diffs_of_equal_norm_does_not_crash(tmp_path):
    """lightx2v-style Wan LoRA: two [1, 6, dim] modulation diffs whose norms agree to 4 digits fell into one
    duplicate bucket and the exact check took the dense diff's missing A factor (None) for a matrix."""
    sd = build("wan_comfy_lightx2v")
    mod = torch.randn(1, 6, 1536, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16) * 1e-3
    sd["diffusion_model.blocks.0.modulation.diff"] = mod
    sd["diffusion_model.blocks.29.modulation.diff"] = mod.clone()           # an exact duplicate
    sd["diffusion_model.blocks.0.norm3.diff"] = mod[0, 0].clone()
    sd["diffusion_model.blocks.29.norm3.diff"] = (mod[0, 0].float() * 1.000001).to(torch.bfloat16).flip(0)
    path = str(tmp_path / "wan.safetensors")
    save_file(sd, path)
    rc, out, err = run("analyze", "--json", path)
    assert rc == 0, err
    rep = json.loads(out)
    dups = [sorted(p) for p in rep["duplicates"]]
    assert sorted(["diffusion_model.blocks.0.modulation", "diffusion_model.blocks.29.modulation"]) in dups
    assert not any("norm3" in n for p in dups for n in p)   # equal norms, different vectors



@pytest.mark.parametrize("method", ["concat", "svd"])
def test_blend_keeps_the_bias_diff_of_a_lora_layer(tmp_path, method):
    """A layer with a LoRA pair and a `.diff_b` (lightx2v Wan LoRAs, BFL control LoRAs after ComfyUI's conversion):
    ComfyUI applies both; the factored blend routes wrote the pair and silently dropped the bias change. With two
    modules per file, blocks.29's `self_attn.q.diff_b` is a bias-only module, which crashed the blend (no ΔW)."""
    a, b = (write(tmp_path, "wan_comfy_lightx2v", seed, max_modules=2) for seed in (1, 2))
    out = tmp_path / f"{method}.safetensors"
    rc, _, err = run("blend", f"{a}:0.7", f"{b}:0.3", "--method", method, "--rank", "8", "-o", out)
    assert rc == 0, err
    got, sa, sb = load_file(str(out)), load_file(a), load_file(b)
    bias_keys = [k for k in sa if k.endswith(".diff_b")]
    assert "diffusion_model.blocks.0.self_attn.q.diff_b" in bias_keys
    for k in bias_keys:
        assert k in got, k
        ref = 0.7 * sa[k].double() + 0.3 * sb[k].double()
        assert rel(got[k].double(), ref) < 1e-2, k          # stored in bf16 like the inputs
    ma, mb, mo = (LoRAModel.load(str(p)) for p in (a, b, out))
    for m in mo:
        if method == "svd" and ma.get(m.name).kind.name != "lora" or m.delta() is None:
            continue   # a full-rank diff truncated to rank 8 by request; a bias-only change (checked above)
        ref = 0.7 * ma.get(m.name).delta(torch.float64) + 0.3 * mb.get(m.name).delta(torch.float64)
        assert rel(m.delta(torch.float64).reshape(ref.shape), ref) < 1e-2, m.name


def test_strength_scaling_scales_the_bias_diff_of_a_lora_layer():
    """`scaled` (blend carrying a layer only one input has at its weight) multiplied the pair but not its `.diff_b`."""
    model = LoRAModel.from_state_dict(build("wan_comfy_lightx2v"))
    m = model.get("diffusion_model.blocks.0.self_attn.q")
    assert m.kind.name == "lora" and "diff_b" in m.tensors
    s = m.with_tensors(m.kind.scaled(m, 0.25))
    assert rel(s.delta(torch.float64), 0.25 * m.delta(torch.float64)) < 1e-3
    assert rel(s.tensors["diff_b"].double(), 0.25 * m.tensors["diff_b"].double()) < 1e-2


def test_blend_carries_a_bias_diff_only_the_second_lora_has(tmp_path):
    """B has layers A lacks (renamed into A's convention): their `.diff_b` must come along, at B's weight."""
    sa = {k: v for k, v in build("wan_comfy_lightx2v", 1, max_modules=2).items() if "blocks.0." not in k}
    sb = build("wan_comfy_lightx2v", 2, max_modules=2)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(sa, a)
    save_file(sb, b)
    out = tmp_path / "o.safetensors"
    rc, _, err = run("blend", f"{a}:1", f"{b}:0.5", "--method", "concat", "-o", out)
    assert rc == 0, err
    got = load_file(str(out))
    k = "diffusion_model.blocks.0.self_attn.q.diff_b"
    assert k in got
    assert rel(got[k].double(), 0.5 * sb[k].double()) < 1e-2


def test_attention_only_qwen_image_lora_is_not_flux():
    """Qwen-Image LoRAs on the attention projections only (to_q…, add_q_proj…, to_add_out) have FLUX's diffusers
    double-block names and widths; Qwen-Image has 60 blocks, FLUX 19."""
    parts = [("attn.to_q", 3072, 3072), ("attn.add_q_proj", 3072, 3072), ("attn.to_add_out", 3072, 3072)]
    assert _arch(_blocks("transformer_blocks.{}", (0, 30, 59), parts)).id == "qwen_image"
    assert _arch(_blocks("transformer_blocks.{}", (0, 9, 18), parts)).id == "flux1"


def _node(pack, node, **given):
    """Call a node with `given` inputs and every other input at its declared default."""
    cls = pack.NODE_CLASS_MAPPINGS[node]
    spec = cls.INPUT_TYPES()
    kw = {}
    for section in ("required", "optional"):
        for inp, (typ, opts) in spec.get(section, {}).items():
            if inp in given:
                kw[inp] = given[inp]
            elif "default" in opts:
                kw[inp] = opts["default"]
    out = getattr(cls(), cls.FUNCTION)(**kw)
    return out["result"] if isinstance(out, dict) else out


@pytest.mark.parametrize("case", ["wan_comfy_lightx2v", "qwen_peft_default", "ltxv_dotlora", "hidream_lycoris",
                                  "t5_kohya_te3", "lumina2_bare"])
def test_every_node_on_dit_conventions(comfy_env, case):
    """Load → Analyze / Prune / QuantizeInt8 / Blend / ConflictScan → Save, Pack → Extract with default settings, on
    files of newer DiTs (an unknown architecture included): all run, keep the input's key names, and the saved
    blend applies A + B exactly."""
    pack, dirs = comfy_env
    for seed in (1, 2):
        save_file(build(case, seed, max_modules=3), str(dirs["loras"] / f"{case}_{seed}.safetensors"))
    a, info = _node(pack, "LoadLoRAFile", lora_name=f"{case}_1.safetensors")
    b, _ = _node(pack, "LoadLoRAFile", lora_name=f"{case}_2.safetensors")
    assert set(a) == set(build(case, 1, max_modules=3))
    from lens_ops.arch import LABELS
    if case.startswith(("wan", "ltxv", "lumina2", "hidream")):   # (3 block-0 Qwen modules could be FLUX's)
        assert "Architecture: " + LABELS[CASES[case][-1] or "unknown"] in info, info
    report = _node(pack, "AnalyzeLoRA", lora=a)
    assert report[0]
    pruned, _ = _node(pack, "PruneRank", lora=a, method="rank", value=2)
    assert set(pruned) <= set(a) and pruned
    q, _ = _node(pack, "QuantizeInt8", lora=a)
    assert {k for k in q if not k.endswith(".alpha")} == {k for k in a if not k.endswith(".alpha")}
    blend, _ = _node(pack, "BlendLoRAs", lora_a=a, lora_b=b)
    assert set(blend) == set(a)
    ma, mb, mo = (LoRAModel.from_state_dict(dict(x)) for x in (a, b, blend))
    for m in mo:
        if m.delta() is not None:
            ref = ma.get(m.name).delta(torch.float64) + mb.get(m.name).delta(torch.float64)
            assert rel(m.delta(torch.float64).reshape(ref.shape), ref) < 1e-2, m.name
    scan = _node(pack, "ConflictScan", lora_a=a, lora_b=b)
    assert scan[0]
    path = _node(pack, "SaveLoRAFile", lora=blend, filename_prefix=f"qa/{case}")[0]
    assert set(load_file(path)) == set(a)
    db = _node(pack, "PackLoRADB", name=case, lora_file_1=f"{case}_1.safetensors", lora_file_2=f"{case}_2.safetensors")
    assert db[0]


@pytest.mark.parametrize("case,label", [("flux_aitoolkit_peft", "double"), ("sd3_diffusers", None),
                                        ("qwen_peft_bare", None), ("ltxv_comfy", None)])
def test_one_transformer_block_has_one_block_label(case, label):
    """Every module of diffusers' `transformer_blocks.N` sits in one block: FLUX's are its double blocks (kohya's
    `double_blocks_N`), so `double0=0` block weights must reach to_q/to_k/to_v/to_out as well as ff/add_*; before,
    attention projections were 'block N' and the rest 'double N' (SD3, Qwen-Image, LTX-Video alike)."""
    import re
    from lens_ops.synth import make_lora
    sd = make_lora(case, rank=2, seed=3, max_modules=40) if case.startswith("flux") else build(case)
    model = LoRAModel.from_state_dict(dict(sd))
    labels = {}
    for m in model:
        n = re.search(r"(?<!single_)transformer_blocks[._](\d+)", m.name)
        if n:
            labels.setdefault(n.group(1), set()).add(m.block)
    assert labels and all(len(v) == 1 for v in labels.values()), labels
    if label:
        assert all(next(iter(v)) == f"{label} {k}" for k, v in labels.items()), labels


def test_flux_diffusers_block_weights_reach_the_whole_double_block(tmp_path):
    from lens_ops.synth import make_lora
    from lens_ops.blend import blend
    a, b = (LoRAModel.from_state_dict(dict(make_lora("flux_aitoolkit_peft", rank=2, seed=s, max_modules=28)))
            for s in (3, 4))
    out, _ = blend([a, b], [1.0, 1.0], "concat", block_weights="double0=0")
    left = [m.name for m in out.modules if "transformer_blocks.0." in m.name and m.delta().abs().max() > 0]
    assert not left, left
    assert sum("transformer_blocks.1." in m.name for m in out.modules) == 14


def test_hidream_double_and_single_stream_blocks_are_told_apart():
    model = LoRAModel.from_state_dict(build("hidream_lycoris"))
    labels = {m.block for m in model}
    assert {"double 0", "double 15", "single 0", "single 31"} <= labels, labels


def test_wan_fun_double_underscore_names_meet_musubi_names(tmp_path):
    """Wan Fun LoRAs are musubi files spelled `lora_unet__blocks_0_…` (ComfyUI's lora_convert.convert_lora_wan_fun
    drops the extra `_`): the same layers as `lora_unet_blocks_0_…`, not 'no layer in common'."""
    sa = build("wan_musubi", 1, max_modules=3)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(sa, a)
    save_file({k.replace("lora_unet_", "lora_unet__"): v for k, v in sa.items()}, b)
    rc, out, err = run("conflict", "--json", a, b)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["shared_modules"] == 3 and all(abs(m["cosine"] - 1) < 1e-6 for m in rep["modules"].values())


@pytest.mark.parametrize("x,y", [("wan_musubi", "wan_comfy_lightx2v"), ("qwen_peft_bare", "qwen_musubi"),
                                 ("qwen_peft_default", "qwen_lycoris_simpletuner"),
                                 ("hunyuan_musubi", "hunyuan_diffusion_pipe"), ("sd3_diffusers", "sd3_onetrainer"),
                                 ("hidream_simpletuner", "hidream_lycoris"), ("ltxv_comfy", "ltxv_dotlora")])
def test_same_lora_in_another_convention_is_the_same_lora(tmp_path, x, y):
    """A's factors saved under B's names, suffixes and alpha convention: the scan pairs every layer with cosine 1 and
    `A − A'` blends to zero, named in A's convention."""
    sx = build(x, 1, max_modules=3)
    mx = [m for m in LoRAModel.from_state_dict(dict(sx)) if m.kind.name == "lora"]
    my = [m for m in LoRAModel.from_state_dict(build(y, 1, max_modules=3)) if m.kind.name == "lora"]
    sy = {}
    for m, n in zip(mx, my):
        dt = n.tensors["up"].dtype
        if "alpha" in n.tensors:   # y's scale alpha/rank = 1, so up carries A's scale
            sy[n.keys["alpha"]] = torch.tensor(float(n.rank())).to(n.tensors["alpha"].dtype)
        sy[n.keys["up"]] = (m.tensors["up"].double() * m.scale()).to(dt)
        sy[n.keys["down"]] = m.tensors["down"].to(dt)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(sx, a)
    save_file(sy, b)
    rc, out, err = run("conflict", "--json", a, b)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["shared_modules"] == len(mx) and not rep["only_in_a"] and not rep["only_in_b"]
    assert all(abs(v["cosine"] - 1) < 1e-3 for v in rep["modules"].values())
    o = tmp_path / "o.safetensors"
    rc, _, err = run("blend", a, f"{b}:-1", "--method", "concat", "-o", o)
    assert rc == 0, err
    res = LoRAModel.load(str(o))
    assert {m.name for m in res} == {m.name for m in mx}
    for m in res:
        ref = {n.name: n for n in mx}[m.name].delta(torch.float64)
        assert float(m.delta(torch.float64).norm()) < 1e-2 * float(ref.norm()), m.name


def test_lossy_pack_snr_counts_a_bias_only_module_by_its_energy(tmp_path):
    """A `.diff_b`-only module (no weight ΔW) counted as signal energy 1.0 in the per-LoRA SNR: on a Wan LoRA whose
    ΔW energy is ~0.3 the pack reported 35 dB while the extracted file was ~29 dB off the original."""
    paths = [write(tmp_path, "wan_comfy_lightx2v", s, max_modules=3) for s in (1, 2)]
    db = str(tmp_path / "x.loradb")
    rc, out, err = run("pack", *paths, "-o", db, "--int8", "--json")
    assert rc == 0, err
    rc, _, err = run("extract", db, "-o", tmp_path / "ex")
    assert rc == 0, err
    for p in paths:
        src, got = LoRAModel.load(p), LoRAModel.load(str(tmp_path / "ex" / os.path.basename(p)))
        assert src.get("diffusion_model.blocks.29.self_attn.q").delta() is None   # the bias-only module
        sig = err2 = 0.0
        for m in src:
            n = got.get(m.name)
            for role in ("diff_b", "b_norm"):
                if role in m.tensors:
                    x = m.tensors[role].double()
                    sig, err2 = sig + float(x.pow(2).sum()), err2 + float((n.tensors[role].double() - x).pow(2).sum())
            d = m.delta(torch.float64)
            if d is not None:
                sig += float(d.pow(2).sum())
                err2 += float((n.delta(torch.float64).reshape(d.shape) - d).pow(2).sum())
        assert 10 * math.log10(sig / err2) >= 35.0 - 0.1, 10 * math.log10(sig / err2)
