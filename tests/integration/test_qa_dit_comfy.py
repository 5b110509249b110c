"""DiT LoRAs in their trainers' conventions through every `lora-lens` command, checked with ComfyUI's own loader.

For each file: a stand-in model of ComfyUI's class for that architecture (comfy.model_base.WAN21, QwenImage,
HunyuanVideo, SD3, Chroma, LTXV, Lumina2, HiDream) gives `model_lora_keys_unet` the model's weight names, so the
key map is ComfyUI's real one (SD3's diffusers names become row offsets into the fused qkv weights). Every tensor of
the input and of every output must be loaded by `comfy.lora.load_lora`; `calculate_weight` on zero weights then
gives the ΔW ComfyUI applies, compared with what each command promises: blends = the weighted sum of the inputs'
ΔW, prune = Eckart–Young (error energy = the dropped σ²), quantize/dequantize/ultra within their rounding.
"""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from lens_ops import LoRAModel
from comfy_stand_in import stand_in_model
from test_qa_dit import CASES, build, run

FLUX_CONFIG = {"depth": 19, "depth_single_blocks": 38, "hidden_size": 3072}
SD3_CONFIG = {"depth": 24}
HUNYUAN = {"img_attn_qkv": "img_attn.qkv", "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj",
           "txt_attn_proj": "txt_attn.proj", "img_mlp.fc1": "img_mlp.0", "img_mlp.fc2": "img_mlp.2",
           "txt_mlp.fc1": "txt_mlp.0", "txt_mlp.fc2": "txt_mlp.2"}
SD3_FUSED = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
             "attn.to_v": ("x_block.attn.qkv", 2), "attn.add_q_proj": ("context_block.attn.qkv", 0),
             "attn.add_k_proj": ("context_block.attn.qkv", 1), "attn.add_v_proj": ("context_block.attn.qkv", 2),
             "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
             "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
             "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None)}
# case: (comfy.model_base class, unet_config); cases left out: DoRA (not linear in strength), text encoders
COMFY_CASES = {"wan_comfy_lightx2v": ("WAN21", {}), "wan_musubi": ("WAN21", {}),
               "qwen_peft_bare": ("QwenImage", {}), "qwen_peft_default": ("QwenImage", {}),
               "qwen_musubi": ("QwenImage", {}), "qwen_lycoris_simpletuner": ("QwenImage", {}),
               "hunyuan_diffusion_pipe": ("HunyuanVideo", {}), "sd3_diffusers": ("SD3", SD3_CONFIG),
               "sd3_onetrainer": ("SD3", SD3_CONFIG), "chroma_comfy_norm": ("Chroma", FLUX_CONFIG),
               "ltxv_comfy": ("LTXV", {}), "lumina2_bare": ("Lumina2", {}), "hidream_simpletuner": ("HiDream", {}),
               "hidream_lycoris": ("HiDream", {})}
MAX_MODULES = 2


def _model_weights(case: str) -> dict:
    """The base model's weight names (as ComfyUI's model holds them) and shapes, for the modules the fixture has."""
    mods = CASES[case][0][:MAX_MODULES]
    shapes = {}
    for path, o, i in mods:
        if case.startswith("sd3"):
            block, rest = path.split(".", 2)[1], path.split(".", 2)[2]
            target, part = SD3_FUSED[rest]
            rows = 3 * 1536 if part is not None else o
            shapes[f"diffusion_model.joint_blocks.{block}.{target}.weight"] = (rows, i)
            continue
        if case.startswith("hunyuan"):
            for a, b in HUNYUAN.items():
                path = path.replace("." + a, "." + b)
        shapes[f"diffusion_model.{path}.weight"] = (o, i)
    sd = build(case, max_modules=MAX_MODULES)
    model = LoRAModel.from_state_dict(dict(sd))
    for m in model:   # the extras' targets (diffs, norms, biases) by their own names
        if m.kind.name in ("diff", "norm"):
            base = m.name
            shape = m.weight_shape()
            if "diff" in m.tensors or "w_norm" in m.tensors:
                key = base if base.endswith("modulation") else base + ".weight"
                shapes.setdefault(key, shape)
        for role in ("diff_b", "b_norm"):
            if role in m.tensors:
                shapes.setdefault(m.name + ".weight", (m.tensors[role].shape[0], 1))
                shapes[m.name + ".bias"] = tuple(m.tensors[role].shape)
    return {k: torch.zeros(s) for k, s in shapes.items()}


def _key_map(comfy, case, weights):
    cls, config = COMFY_CASES[case]
    return comfy.lora.model_lora_keys_unet(stand_in_model(getattr(comfy.model_base, cls), weights, config), {})


def _apply(comfy, sd, key_map, weights, caplog, strength=1.0):
    """ComfyUI's load_lora + calculate_weight on the zero weights: {model key: ΔW}; every tensor must load."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(dict(sd), key_map, log_missing=True)
    missed = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    assert not missed, missed[:5]
    queued = {k: [] for k in weights}
    for pk, v in patches.items():
        key, offset, fn = (pk, None, None) if isinstance(pk, str) else (pk[0], pk[1], pk[2] if len(pk) > 2 else None)
        queued[key].append((strength, v, 1.0, offset, fn))
    return {k: comfy.lora.calculate_weight(q, weights[k].clone(), k).double() for k, q in queued.items() if q}


def _svals(m) -> torch.Tensor:
    """σ of ΔW = s·up@down in float64 from the two thin QR factors (σ(B·A) = σ(R_B·R_Aᵀ)), no dense SVD."""
    up = m.tensors["up"].double().flatten(1)
    down = m.tensors["down"].double().flatten(1)
    s = m.alpha / down.shape[0] if m.alpha is not None else 1.0
    rb, ra = torch.linalg.qr(up)[1], torch.linalg.qr(down.transpose(0, 1))[1]
    return torch.linalg.svdvals(s * rb @ ra.transpose(0, 1))


def _rel(a: dict, b: dict, keys=None) -> float:
    keys = sorted(b) if keys is None else keys
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in keys)
    den = sum(float(b[k].pow(2).sum()) for k in keys)
    return (num / den) ** 0.5


@pytest.mark.parametrize("case", sorted(COMFY_CASES))
def test_every_command_output_loads_and_applies_as_promised(comfy_inproc, caplog, tmp_path, case):
    comfy = comfy_inproc.comfy
    weights = _model_weights(case)
    key_map = _key_map(comfy, case, weights)
    paths = {}
    for seed, name in ((1, "a"), (2, "b")):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file(build(case, seed, max_modules=MAX_MODULES), paths[name], metadata={"qa": case})
    a, b = paths["a"], paths["b"]
    src = LoRAModel.load(a)
    to_load = {m.name: key_map[m.name] for m in src}        # KeyError = ComfyUI does not know the name
    w_a = _apply(comfy, src.state_dict(), to_load, weights, caplog)
    w_b = _apply(comfy, LoRAModel.load(b).state_dict(), to_load, weights, caplog)
    assert set(w_a) == set(w_b) and w_a

    def out(name, *argv):
        p = str(tmp_path / f"{name}.safetensors")
        rc, _, err = run(*argv, "-o", p)
        assert rc == 0, (name, err)
        model = LoRAModel.load(p)
        assert all(m.name in to_load for m in model), name   # names kept in the input's convention
        keys_in = {k for m in src for k in m.keys.values() if not k.endswith(".alpha")}
        keys_out = {k for m in model for k in m.keys.values() if not k.endswith(".alpha")}
        return model, keys_in, keys_out

    # blends: 0.7·A + 0.3·B exactly (concat) and at rank 8 = r_A + r_B (svd: exact for the LoRA layers)
    bc, kin, kout = out("bc", "blend", f"{a}:0.7", f"{b}:0.3", "--method", "concat")
    assert kout == kin
    want = {k: 0.7 * w_a[k] + 0.3 * w_b[k] for k in w_a}
    assert _rel(_apply(comfy, bc.state_dict(), to_load, weights, caplog), want) < 1e-2
    lora_keys = sorted({to_load[m.name] if isinstance(to_load[m.name], str) else to_load[m.name][0]
                        for m in src if m.kind.name == "lora"})
    bs, _, _ = out("bs", "blend", f"{a}:0.7", f"{b}:0.3", "--method", "svd", "--rank", "8")
    assert _rel(_apply(comfy, bs.state_dict(), to_load, weights, caplog), want, lora_keys) < 1e-2

    # prune rank=2 (error energy = dropped σ², per fused slice too) and energy=0.9
    dropped = sum(float(_svals(m)[2:].pow(2).sum()) for m in src if m.kind.name == "lora")
    energy = sum(float(w.pow(2).sum()) for k, w in w_a.items() if k in lora_keys)
    p2, _, _ = out("p2", "prune", a, "-r", "rank=2", "-q")
    assert {m.rank() for m in p2 if m.kind.name == "lora"} == {2}
    w_p = _apply(comfy, p2.state_dict(), to_load, weights, caplog)
    err2 = sum(float((w_p[k] - w_a[k]).pow(2).sum()) for k in lora_keys)
    assert abs(err2 - dropped) <= 2e-2 * dropped + 1e-6 * energy
    pe, _, _ = out("pe", "prune", a, "-r", "energy=0.9", "-q")
    w_pe = _apply(comfy, pe.state_dict(), to_load, weights, caplog)
    assert _rel(w_pe, w_a, lora_keys) < 0.5

    # quantize (int8, fp8), dequantize, ultra
    q, _, _ = out("q", "quantize", a)
    w_q = _apply(comfy, q.state_dict(), to_load, weights, caplog)
    assert _rel(w_q, w_a) < 2e-2
    q8, _, _ = out("q8", "quantize", a, "--fp8")
    w_q8 = _apply(comfy, q8.state_dict(), to_load, weights, caplog)
    assert _rel(w_q8, w_a) < 8e-2
    for src_q, w_src, dt in (("q", w_q, "fp16"), ("q8", w_q8, "bf16")):
        dq, _, _ = out("d" + src_q, "quantize", str(tmp_path / f"{src_q}.safetensors"), "--dequantize", dt)
        assert _rel(_apply(comfy, dq.state_dict(), to_load, weights, caplog), w_src) < 1e-2
    u, _, _ = out("u", "ultra", a, "-r", "rank=2")
    assert _rel(_apply(comfy, u.state_dict(), to_load, weights, caplog), w_p, lora_keys) < 3e-2
