"""QA of QuantizeInt8 / ApplyLoRA / BlendLoRAs through a real ComfyUI server's /prompt, on inputs the feature tests
use least: PEFT-named text-encoder-only SD 1.5 LoRAs, an int8 file fed back into QuantizeInt8, layers of different
shapes under one name, NaN alphas. Bad inputs must fail the prompt with one sentence and save nothing."""
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from integration.conftest import errors_of
from integration.sampling import sample_prompt, saved_image
from lens_ops.synth import make_lora
from lora_factory import mismatched_shape_pair


def _peft_te(seed=3, rank=4):
    """SD 1.5 text-encoder-only LoRA in diffusers/PEFT naming (text_encoder.…, lora_A/lora_B, no alpha)."""
    sd = make_lora("sd15_kohya", rank=rank, seed=seed, name_filter=lambda n: n.startswith("lora_te_"))
    out = {}
    for k, v in sd.items():
        stem, _, suffix = k.partition(".")
        if suffix == "alpha":
            continue
        rest = stem[len("lora_te_text_model_encoder_layers_"):]
        layer, _, tail = rest.partition("_")
        part = tail.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
        name = f"text_encoder.text_model.encoder.layers.{layer}.{part}"
        out[name + (".lora_A.weight" if suffix == "lora_down.weight" else ".lora_B.weight")] = v * 4
    return out


def _files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def _ckpt(server):
    from integration.tiny_checkpoint import cached_sd15_checkpoint
    dest = os.path.join(server.base, "checkpoints", "tiny_sd15.safetensors")
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(cached_sd15_checkpoint(python=os.environ.get("COMFYUI_PYTHON", sys.executable)), dest)
    return "tiny_sd15.safetensors"


def test_apply_lora_on_peft_te_only_int8_and_blend_equals_core_loraloader(comfy_server):
    """A PEFT-named, text-encoder-only SD 1.5 LoRA: quantized in the graph and applied with ApplyLoRA gives the
    image core LoraLoader gives on the saved int8 file; and its blend with a kohya UNet+TE LoRA at (0.7, -0.4)
    applied with ApplyLoRA gives the image of both files stacked with two LoraLoaders at those strengths."""
    ckpt = _ckpt(comfy_server)
    save_file(_peft_te(), os.path.join(comfy_server.loras, "qa_peft_te.safetensors"))
    kohya = make_lora("sd15_kohya", rank=4, seed=9,
                      name_filter=lambda n: n.startswith("lora_te_") or "input_blocks_1_1" in n or "down_blocks_0" in n)
    save_file(dict(kohya), os.path.join(comfy_server.loras, "qa_kohya.safetensors"))
    quant = {"10": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "qa_peft_te.safetensors"}},
             "11": {"class_type": "QuantizeInt8", "inputs": {"lora": ["10", 0], "format": "int8",
                                                             "method": "rebalance+rotate", "min_snr_db": 40.0,
                                                             "keep_fp16_below": False}},
             "12": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["11", 0], "filename_prefix": "qa_te_int8",
                                                             "copy_to_loras": False}}}
    e = comfy_server.run(quant)
    assert e["status"]["status_str"] == "success", errors_of(e)
    saved = [f for f in os.listdir(comfy_server.output) if f.startswith("qa_te_int8")]
    assert len(saved) == 1
    assert any(v.dtype == torch.int8 for v in load_file(os.path.join(comfy_server.output, saved[0])).values())
    shutil.copy(os.path.join(comfy_server.output, saved[0]), os.path.join(comfy_server.loras, "qa_te_int8.safetensors"))

    base = saved_image(comfy_server, comfy_server.run(sample_prompt(ckpt, {}, ["1", 0], ["1", 1], seed=5, prefix="qa/base")))
    nodes = {k: v for k, v in quant.items() if k != "12"}
    nodes["13"] = {"class_type": "ApplyLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": ["11", 0],
                                                         "strength_model": 6.0, "strength_clip": 6.0}}
    e1 = comfy_server.run(sample_prompt(ckpt, nodes, ["13", 0], ["13", 1], seed=5, prefix="qa/apply_q"))
    assert e1["status"]["status_str"] == "success", errors_of(e1)
    assert "No module matched" not in str(e1["outputs"].get("13", ""))
    core = {"14": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": "qa_te_int8.safetensors",
                                                          "strength_model": 6.0, "strength_clip": 6.0}}}
    e2 = comfy_server.run(sample_prompt(ckpt, core, ["14", 0], ["14", 1], seed=5, prefix="qa/core_q"))
    assert e2["status"]["status_str"] == "success", errors_of(e2)
    a, b = saved_image(comfy_server, e1), saved_image(comfy_server, e2)
    assert abs(a - base).max() > 0, "the text-encoder-only LoRA changed nothing"
    assert abs(a - b).max() <= 1

    blend = {"20": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "qa_kohya.safetensors"}},
             "21": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "qa_peft_te.safetensors"}},
             "22": {"class_type": "BlendLoRAs", "inputs": {"lora_a": ["20", 0], "lora_b": ["21", 0], "weight_a": 2.8,
                                                           "weight_b": -1.6, "rank": 0, "method": "concat"}},
             "23": {"class_type": "ApplyLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": ["22", 0],
                                                          "strength_model": 1.0, "strength_clip": 1.0}}}
    e3 = comfy_server.run(sample_prompt(ckpt, blend, ["23", 0], ["23", 1], seed=5, prefix="qa/blend"))
    assert e3["status"]["status_str"] == "success", errors_of(e3)
    stacked = {"30": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                             "lora_name": "qa_kohya.safetensors",
                                                             "strength_model": 2.8, "strength_clip": 2.8}},
               "31": {"class_type": "LoraLoader", "inputs": {"model": ["30", 0], "clip": ["30", 1],
                                                             "lora_name": "qa_peft_te.safetensors",
                                                             "strength_model": -1.6, "strength_clip": -1.6}}}
    e4 = comfy_server.run(sample_prompt(ckpt, stacked, ["31", 0], ["31", 1], seed=5, prefix="qa/stacked"))
    assert e4["status"]["status_str"] == "success", errors_of(e4)
    c, d = saved_image(comfy_server, e3), saved_image(comfy_server, e4)
    assert abs(c - base).max() > 0
    assert abs(c - d).max() <= 1, "blend applied once differs from both LoRAs stacked"


def test_quantize_node_keeps_an_int8_input_exactly(comfy_server):
    """QuantizeInt8 on a QuantizeInt8 output (LoadLoRAFile of the saved int8 file): the saved result has the same
    int8 codes and alphas, i.e. no second, lossy rounding."""
    from lens_ops import LoRAModel
    from lens_ops.quantize import quantize_model
    sd = make_lora("flux_aitoolkit_peft", rank=8, seed=4, max_modules=6)
    q, _ = quantize_model(LoRAModel.from_state_dict(dict(sd)))
    path = q.save(os.path.join(comfy_server.loras, "qa_already_int8.safetensors"))
    prompt = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "qa_already_int8.safetensors"}},
              "2": {"class_type": "QuantizeInt8", "inputs": {"lora": ["1", 0], "format": "int8",
                                                             "method": "rebalance+rotate", "min_snr_db": 40.0,
                                                             "keep_fp16_below": False}},
              "3": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["2", 0], "filename_prefix": "qa_requant/x",
                                                             "copy_to_loras": False}}}
    e = comfy_server.run(prompt)
    assert e["status"]["status_str"] == "success", errors_of(e)
    folder = os.path.join(comfy_server.output, "qa_requant")
    out = load_file(os.path.join(folder, os.listdir(folder)[0]))
    src = load_file(path)
    assert set(out) == set(src)
    for k, v in src.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    assert "already int8" in e["outputs"]["2"]["text"][0]


def _mismatched(server):
    a, b = mismatched_shape_pair()
    save_file(a, os.path.join(server.loras, "qa_shape_a.safetensors"))
    save_file(b, os.path.join(server.loras, "qa_shape_b.safetensors"))
    return "qa_shape_a.safetensors", "qa_shape_b.safetensors"


def _nan_alpha(server):
    sd = make_lora("sd15_kohya", rank=4, seed=3, max_modules=4)
    bad = [k for k in sd if k.endswith(".alpha")][0]
    sd[bad] = torch.tensor(float("nan")).half()
    save_file(dict(sd), os.path.join(server.loras, "qa_nan_alpha.safetensors"))
    other = make_lora("sd15_kohya", rank=4, seed=4, max_modules=4)
    save_file(dict(other), os.path.join(server.loras, "qa_nan_other.safetensors"))
    return "qa_nan_alpha.safetensors", "qa_nan_other.safetensors"


@pytest.mark.parametrize("case", ["shapes", "nan_alpha"])
@pytest.mark.parametrize("method", ["concat", "svd", "ties"])
def test_blend_node_bad_pairs_fail_with_one_sentence_and_save_nothing(comfy_server, case, method):
    a, b = (_mismatched if case == "shapes" else _nan_alpha)(comfy_server)
    prefix = f"qa_bad_{case}_{method}"
    prompt = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": a}},
              "2": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": b}},
              "3": {"class_type": "BlendLoRAs", "inputs": {"lora_a": ["1", 0], "lora_b": ["2", 0], "weight_a": 0.7,
                                                           "weight_b": 0.3, "rank": 2, "method": method}},
              "4": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["3", 0], "filename_prefix": prefix + "/x",
                                                             "copy_to_loras": False}}}
    e = comfy_server.run(prompt)
    assert e["status"]["status_str"] == "error"
    msg = errors_of(e)
    assert msg.startswith("BlendLoRAs: "), msg
    assert ("different base models" if case == "shapes" else "NaN") in msg, msg
    assert "Traceback" not in msg and "size of tensor" not in msg and "linalg" not in msg
    assert not os.path.exists(os.path.join(comfy_server.output, prefix))
