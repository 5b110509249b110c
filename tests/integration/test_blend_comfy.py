"""BlendLoRAs and ConflictScan against a real ComfyUI.

In process: ComfyUI's own load_lora + calculate_weight applied to the blend equals applying both inputs stacked at
w1, w2 (patched weights within float rounding), across key conventions and mismatched ranks.
Server: LoadLoRAFile ×2 → ConflictScan → BlendLoRAs (ratios and problem list wired in) → SaveLoRAFile through
/prompt; the saved file equals ratio_a·ΔW_A + ratio_b·ΔW_B on every module not in the problem list."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from blend_fixtures import SD15_LAYERS, kohya, make_pair, peft
from integration.conftest import errors_of
from lens_ops import LoRAModel
from lens_ops.blend import blend
from lens_ops.synth import make_lora

W = [(0.7, 0.3), (1.0, -0.55)]


def _stacked(comfy, loras, strengths, to_load, base):
    patches = [comfy.lora.load_lora(dict(sd), to_load, log_missing=False) for sd in loras]
    out = {}
    for key, w in base.items():
        plist = [(s, p[key], 1.0, None, None) for s, p in zip(strengths, patches) if key in p]
        out[key] = comfy.lora.calculate_weight(plist, w.clone().float(), key)
    return out


def _base(layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": 1e-3 * torch.randn(o, n, generator=g) for i, (_, _, o, n) in enumerate(layers)}


@pytest.mark.parametrize("w1,w2", W)
@pytest.mark.parametrize("method", ["concat", "svd"])
def test_blend_applies_like_stacking(comfy_inproc, method, w1, w2):
    comfy = comfy_inproc.comfy
    f1, f2 = make_pair(r1=6, r2=3, seed=3)
    sa, sb = kohya(SD15_LAYERS, f1, alpha_frac=0.5), peft(SD15_LAYERS, f2)
    to_load = {}
    for i, (kn, pn, _, _) in enumerate(SD15_LAYERS):
        to_load[kn] = to_load[pn] = f"w{i}"
    base = _base(SD15_LAYERS)
    stacked = _stacked(comfy, [sa, sb], [w1, w2], to_load, base)
    model, _ = blend([LoRAModel.from_state_dict(sa), LoRAModel.from_state_dict(sb)], [w1, w2], method, 0)
    applied = comfy_inproc(model.state_dict(), to_load, base, 1.0)
    for key in base:
        d_stack, d_blend = stacked[key] - base[key], applied[key] - base[key]
        assert float((d_blend - d_stack).norm() / d_stack.norm()) < 1e-5, key


def test_sdxl_fp16_blend_applies_like_stacking(comfy_inproc):
    """A realistic SDXL layout in fp16 (the first LoRA's dtype): equal within fp16 rounding of the factors."""
    comfy = comfy_inproc.comfy
    pick = lambda n: "input_blocks_4_1_transformer_blocks_0" in n or "te2_text_model_encoder_layers_0_" in n
    sa = make_lora("sdxl_kohya", rank=8, seed=1, name_filter=pick)
    sb = make_lora("sdxl_kohya", rank=4, seed=2, alpha=1.0, name_filter=pick)
    a, b = LoRAModel.from_state_dict(sa), LoRAModel.from_state_dict(sb)
    to_load = {m.name: f"k{i}" for i, m in enumerate(a.modules)}
    g = torch.Generator().manual_seed(0)
    base = {f"k{i}": 1e-3 * torch.randn(m.weight_shape(), generator=g) for i, m in enumerate(a.modules)}
    stacked = _stacked(comfy, [sa, sb], [0.8, 0.45], to_load, base)
    model, _ = blend([a, b], [0.8, 0.45], "concat")
    applied = comfy_inproc(model.state_dict(), to_load, base, 1.0)
    for key in base:
        d_stack, d_blend = stacked[key] - base[key], applied[key] - base[key]
        assert float((d_blend - d_stack).norm() / d_stack.norm()) < 2e-3, key


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_int8_blend_applies_like_stacking_the_int8_loras(comfy_inproc, method):
    """Two QuantizeInt8 LoRAs (int8 factors, tiny folded alphas), one layer only in the first: ComfyUI applying
    the fp16 blend equals ComfyUI applying both int8 files stacked, within fp16 rounding of the factors."""
    from lens_ops.quantize import quantize_model
    comfy = comfy_inproc.comfy
    f1, f2 = make_pair(r1=6, r2=4, seed=9)
    qa, _ = quantize_model(LoRAModel.from_state_dict(kohya(SD15_LAYERS, f1, dtype=torch.float16)))
    qb, _ = quantize_model(LoRAModel.from_state_dict(kohya(SD15_LAYERS[:-1], f2[:-1], dtype=torch.float16)))
    sa, sb = dict(qa.state_dict()), dict(qb.state_dict())
    assert any(v.dtype == torch.int8 for v in sa.values()) and min(m.alpha for m in qa.modules) < 1e-3
    to_load = {kn: f"w{i}" for i, (kn, _, _, _) in enumerate(SD15_LAYERS)}
    base = _base(SD15_LAYERS, seed=2)
    stacked = _stacked(comfy, [sa, sb], [0.7, -0.4], to_load, base)
    model, _ = blend([qa, qb], [0.7, -0.4], method, 0)
    applied = comfy_inproc(model.state_dict(), to_load, base, 1.0)
    for key in base:
        d_stack, d_blend = stacked[key] - base[key], applied[key] - base[key]
        assert float((d_blend - d_stack).norm() / d_stack.norm()) < 2e-3, key


def test_conflict_scan_feeds_blend_through_prompt(comfy_server):
    f1, f2 = make_pair(r1=6, r2=4, seed=8)
    f2[0] = (-f1[0][0], f1[0][1])          # layer 0 opposed: a problem layer
    save_file(kohya(SD15_LAYERS, f1, dtype=torch.float16), os.path.join(comfy_server.loras, "blend_a.safetensors"),
              metadata={"modelspec.trigger_phrase": "aaa"})
    save_file(peft(SD15_LAYERS, f2, dtype=torch.float16), os.path.join(comfy_server.loras, "blend_b.safetensors"),
              metadata={"modelspec.trigger_phrase": "bbb"})
    info = comfy_server.object_info("BlendLoRAs")["BlendLoRAs"]
    assert "equals loading both LoRAs at those strengths" in info["input"]["required"]["weight_a"][1]["tooltip"]
    assert comfy_server.object_info("ConflictScan")["ConflictScan"]["output_name"] == \
        ["report", "summary", "conflict_map", "problem_layers", "ratio_a", "ratio_b"]
    prompt = {
        "1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "blend_a.safetensors"}},
        "2": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "blend_b.safetensors"}},
        "3": {"class_type": "ConflictScan", "inputs": {"lora_a": ["1", 0], "lora_b": ["2", 0]}},
        "4": {"class_type": "BlendLoRAs", "inputs": {"lora_a": ["1", 0], "lora_b": ["2", 0], "weight_a": ["3", 4],
                                                      "weight_b": ["3", 5], "rank": 0, "method": "concat",
                                                      "exclude": ["3", 3]}},
        "5": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["4", 0], "filename_prefix": "blend/out",
                                                        "copy_to_loras": False}},
    }
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    view = entry["outputs"]["3"]["lens_conflict"][0]
    assert view["blocks"] and view["problems"] >= 1 and len(view["values"][0]) == len(view["metrics"])
    summary = entry["outputs"]["3"]["text"][0]
    assert "Conflict score" in summary and "Recommended strengths" in summary
    files = os.listdir(os.path.join(comfy_server.output, "blend"))
    out = LoRAModel.load(os.path.join(comfy_server.output, "blend", files[0]))
    a = LoRAModel.load(os.path.join(comfy_server.loras, "blend_a.safetensors"))
    b = LoRAModel.load(os.path.join(comfy_server.loras, "blend_b.safetensors"))
    from lens_ops.conflict import scan
    rep = scan(a, b)
    ra, rb = rep["recommended_ratio"]["a"], rep["recommended_ratio"]["b"]
    assert SD15_LAYERS[0][0] in rep["problem_modules"] and out.get(SD15_LAYERS[0][0]) is None
    for kn, pn, _, _ in SD15_LAYERS[1:]:
        if kn in rep["problem_modules"]:
            continue
        ref = ra * a.get(kn).delta(torch.float64) + rb * b.get(pn).delta(torch.float64)
        got = out.get(kn).delta(torch.float64)
        assert float((got - ref).norm() / ref.norm()) < 2e-3
    assert set(json.loads(out.metadata["lora_lens.trigger_words"])) == {"aaa", "bbb"}
