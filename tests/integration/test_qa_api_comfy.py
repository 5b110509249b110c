"""QA of every LoRA Lens node the way a user's script meets it: through a real ComfyUI server's HTTP API
(`POST /prompt`, `/history/<id>`, `/object_info`, `/view`), on LoRAs the other suites do not use, wired to and from
ComfyUI's own LORA_MODEL nodes (Train LoRA, Load LoRA Model, Save LoRA Weights, Extract and Save Lora).

Bad inputs must fail the prompt with one sentence naming the problem (no traceback text as the message), leave
the server running and write no file."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import urllib.request

import pytest
import torch
from safetensors.torch import load_file, save_file

from integration.conftest import errors_of
from lens_ops.synth import make_lora

OURS = ["LoadLoRAFile", "SaveLoRAFile", "AnalyzeLoRA", "PruneRank", "QuantizeInt8", "ApplyLoRA", "ConflictScan",
        "BlendLoRAs", "PackLoRADB", "ExtractLoRADB"]
QUANT = {"format": "int8", "method": "rebalance+rotate", "min_snr_db": 40.0, "keep_fp16_below": False}


def _ckpt(server) -> str:
    from integration.tiny_checkpoint import cached_sd15_checkpoint
    dest = os.path.join(server.base, "checkpoints", "tiny_sd15.safetensors")
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(cached_sd15_checkpoint(python=os.environ.get("COMFYUI_PYTHON", sys.executable)), dest)
    return "tiny_sd15.safetensors"


def _put(server, name: str, sd: dict, metadata: dict | None = None) -> str:
    save_file({k: v.contiguous() for k, v in dict(sd).items()}, os.path.join(server.loras, name), metadata=metadata)
    return name


def _load(nid: str, name: str) -> dict:
    return {nid: {"class_type": "LoadLoRAFile", "inputs": {"lora_name": name}}}


def _files(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def _error(entry: dict, node_type: str) -> str:
    """The one execution error of a failed prompt, checked to be a sentence from `node_type`, not a traceback."""
    assert entry["status"]["status_str"] == "error", "the prompt succeeded"
    msgs = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(msgs) == 1, msgs
    assert msgs[0]["node_type"] == node_type, msgs[0]
    text = msgs[0]["exception_message"].strip()
    assert msgs[0]["exception_type"].endswith("LensError"), (msgs[0]["exception_type"], text)
    assert "Traceback" not in text and "\n" not in text and 15 < len(text) < 600, text
    assert text[0].isupper() or text[0] in "'\"" or re.match(r"[\w.-]+\.(safetensors|loradb|pt|ckpt)\b", text), text
    return text


def _alive(server) -> None:
    assert "LoadLoRAFile" in server.object_info("LoadLoRAFile")


@pytest.fixture(scope="module")
def sd15(comfy_server):
    """Two fresh SD 1.5 kohya LoRAs (UNet + text encoder, ranks 4 and 6) in the loras folder."""
    a = make_lora("sd15_kohya", rank=4, seed=1101)
    b = make_lora("sd15_kohya", rank=6, seed=1102)
    return _put(comfy_server, "qaapi_a.safetensors", a, a.metadata), _put(comfy_server, "qaapi_b.safetensors", b, b.metadata)


# ---------------------------------------------------------------------------------------------------------------
# ApplyLoRA: a LoRA that cannot apply to the model must say so, not patch half the model silently

def _apply_prompt(ckpt: str, lora_nodes: dict, lora_ref) -> dict:
    p = {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
         "ap": {"class_type": "ApplyLoRA", "inputs": {"model": ["c", 0], "clip": ["c", 1], "lora": lora_ref,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
         "out": {"class_type": "PreviewAny", "inputs": {"source": ["ap", 0]}}}
    p.update(lora_nodes)
    return p


@pytest.mark.parametrize("layout,expect", [("sdxl_kohya", "SDXL"), ("flux_kohya", "FLUX.1")])
def test_apply_lora_for_another_architecture_is_refused(comfy_server, layout, expect):
    """An SDXL LoRA on SD 1.5 used to patch the 168 layers whose names exist in both (half of them with other
    shapes, which core then skips at sampling time with log errors) and report success; a FLUX LoRA patched
    nothing and also reported success."""
    ckpt = _ckpt(comfy_server)
    sd = make_lora(layout, rank=4, seed=1201, max_modules=None if layout == "sdxl_kohya" else 30)
    name = _put(comfy_server, f"qaapi_{layout}.safetensors", sd)
    e = comfy_server.run(_apply_prompt(ckpt, _load("1", name), ["1", 0]))
    msg = _error(e, "ApplyLoRA")
    assert expect in msg and "SD 1.5" in msg, msg
    _alive(comfy_server)


def test_apply_lora_with_nan_is_refused(comfy_server):
    """A NaN in one factor used to be applied silently (every image of the patched model turns black/NaN)."""
    ckpt = _ckpt(comfy_server)
    sd = make_lora("sd15_kohya", rank=4, seed=1202)
    key = sorted(k for k in sd if k.endswith("lora_up.weight"))[5]
    sd[key] = sd[key].clone()
    sd[key][1, 2] = float("nan")
    name = _put(comfy_server, "qaapi_nan.safetensors", sd)
    e = comfy_server.run(_apply_prompt(ckpt, _load("1", name), ["1", 0]))
    msg = _error(e, "ApplyLoRA")
    assert "NaN" in msg and key[: -len(".lora_up.weight")] in msg, msg
    _alive(comfy_server)


# ---------------------------------------------------------------------------------------------------------------
# Widget values a script can send that the browser cannot: NaN/Inf (Python's json writes them and ComfyUI's
# range check lets NaN through), empty or impossible names. One sentence, nothing written.

NAN = float("nan")


def _save(ref, prefix: str) -> dict:
    return {"s": {"class_type": "SaveLoRAFile", "inputs": {"lora": ref, "filename_prefix": prefix,
                                                           "copy_to_loras": False}}}


def _bad_widget_cases(a: str, b: str) -> dict:
    load2 = {**_load("1", a), **_load("2", b)}
    blend = {"lora_a": ["1", 0], "lora_b": ["2", 0], "weight_a": 1.0, "weight_b": 1.0, "rank": 0, "method": "concat"}
    return {
        "bake_strength_nan": ("LoadLoRAFile", "bake_strength",
                              {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": a, "bake_strength": NAN}},
                               **_save(["1", 0], "qaw_bake/x")}),
        "block_weights_nan": ("BlendLoRAs", "in=nan",
                              {**load2, "3": {"class_type": "BlendLoRAs", "inputs": {**blend, "block_weights": "in=nan:out=1"}},
                               **_save(["3", 0], "qaw_bw/x")}),
        "block_weights_inf": ("BlendLoRAs", "out=inf",
                              {**load2, "3": {"class_type": "BlendLoRAs", "inputs": {**blend, "block_weights": "out=inf"}},
                               **_save(["3", 0], "qaw_bw2/x")}),
        "problem_threshold_nan": ("ConflictScan", "problem_threshold",
                                  {**load2, "3": {"class_type": "ConflictScan", "inputs": {
                                      "lora_a": ["1", 0], "lora_b": ["2", 0], "problem_threshold": NAN}}}),
        "block_share_nan": ("AnalyzeLoRA", "block_share",
                            {**_load("1", a), "3": {"class_type": "AnalyzeLoRA", "inputs": {"lora": ["1", 0],
                                                                                            "block_share": NAN}}}),
        "apply_strength_nan": ("ApplyLoRA", "strength_model", None),
        "save_prefix_empty": ("SaveLoRAFile", "filename_prefix", {**_load("1", a), **_save(["1", 0], "")}),
        "save_prefix_nul": ("SaveLoRAFile", "filename_prefix", {**_load("1", a), **_save(["1", 0], "qaw_nul/a\u0000b")}),
        "save_prefix_too_long": ("SaveLoRAFile", "filename_prefix", {**_load("1", a), **_save(["1", 0], "qaw_long/" + "x" * 300)}),
        "pack_snr_nan": ("PackLoRADB", "snr", {"3": {"class_type": "PackLoRADB", "inputs": {
            "name": "qaw_snr_nan", "creator": "", "description": "", "tags": "", "optimisation": "int8", "recipe": "",
            "shared_basis": "off", "snr_db": NAN, "overwrite": False, "lora_file_1": a}}}),
    }


@pytest.mark.parametrize("case", list(_bad_widget_cases("a", "b")))
def test_bad_widget_values_fail_with_one_sentence_and_write_nothing(comfy_server, sd15, case):
    node, word, prompt = _bad_widget_cases(*sd15)[case]
    if prompt is None:
        prompt = _apply_prompt(_ckpt(comfy_server), _load("1", sd15[0]), ["1", 0])
        prompt["ap"]["inputs"]["strength_model"] = NAN
    out_before, db_before = _files(comfy_server.output), _files(os.path.join(comfy_server.base, "loradb"))
    e = comfy_server.run(prompt)
    msg = _error(e, node)
    assert word.lower() in msg.lower(), msg
    assert _files(comfy_server.output) == out_before
    assert _files(os.path.join(comfy_server.base, "loradb")) == db_before
    _alive(comfy_server)


def test_pack_int8_of_a_lora_with_nan_names_the_module(comfy_server):
    """PackLoRADB int8 on a LoRA with a NaN factor failed with torch's 'linalg.svd: The algorithm failed to
    converge because the input matrix contained non-finite values.'"""
    sd = make_lora("sd15_kohya", rank=4, seed=1301, max_modules=12)
    key = sorted(k for k in sd if k.endswith("lora_down.weight"))[2]
    sd[key] = sd[key].clone()
    sd[key][0, 3] = float("inf")
    name = _put(comfy_server, "qaapi_inf_pack.safetensors", sd)
    db = os.path.join(comfy_server.base, "loradb")
    before = _files(db)
    for opt in ("int8", "prune + int8"):
        e = comfy_server.run({"3": {"class_type": "PackLoRADB", "inputs": {
            "name": "qaw_inf", "creator": "", "description": "", "tags": "", "optimisation": opt,
            "recipe": "energy=0.99", "shared_basis": "off", "snr_db": 35.0, "overwrite": False, "lora_file_1": name}}})
        msg = _error(e, "PackLoRADB")
        assert "NaN" in msg and key[: -len(".lora_down.weight")] in msg, msg
        assert _files(db) == before


# ---------------------------------------------------------------------------------------------------------------
# /object_info: what the issues promise, literally

PROMISED = {  # node: (required input names that must exist, output types, output names)
    "LoadLoRAFile": (["lora_name"], ["LORA_MODEL", "STRING"], ["lora", "info"]),
    "SaveLoRAFile": (["lora", "filename_prefix", "copy_to_loras"], ["STRING"], None),
    "AnalyzeLoRA": (["lora"], ["STRING", "STRING", "IMAGE", "STRING"], None),
    "PruneRank": (["lora"], ["LORA_MODEL", "STRING"], None),
    "QuantizeInt8": (["lora"], ["LORA_MODEL", "STRING"], None),
    "ApplyLoRA": (["model", "clip", "lora", "strength_model", "strength_clip"], ["MODEL", "CLIP"], None),
    "ConflictScan": (["lora_a", "lora_b"], ["STRING", "STRING", "IMAGE", "STRING", "FLOAT", "FLOAT"], None),
    "BlendLoRAs": (["lora_a", "lora_b", "weight_a", "weight_b", "rank", "method"], ["LORA_MODEL", "STRING"], None),
    "PackLoRADB": (["name", "creator", "description", "tags", "optimisation", "shared_basis"], None, None),
    "ExtractLoRADB": (["loradb", "entries", "write_to_loras"], ["LORA_MODEL", "STRING", "STRING"], None),
}


def test_object_info_keeps_every_promise(comfy_server):
    info = comfy_server.object_info()
    for node, (inputs, types, names) in PROMISED.items():
        spec = info[node]
        assert spec["category"] == "LoRA Lens", node
        assert len(spec["description"]) > 40 and spec["display_name"] and "LoRA" in spec["display_name"], node
        required = spec["input"]["required"]
        assert set(inputs) <= set(required), (node, set(inputs) - set(required))
        for section in ("required", "optional"):
            for name, s in spec["input"].get(section, {}).items():
                assert len(s) > 1 and len(s[1].get("tooltip", "")) > 10, f"{node}.{name} has no tooltip"
        if types is not None:
            assert spec["output"] == types, node
        if names is not None:
            assert spec["output_name"] == names, node
        assert len(spec.get("output_tooltips") or []) == len(spec["output"]), node
    # the LORA_MODEL socket is core's: core's producer and consumers use the same type name
    assert info["TrainLoraNode"]["output"][1] == "LORA_MODEL"
    assert info["LoraModelLoader"]["input"]["required"]["lora"][0] == "LORA_MODEL"
    assert info["SaveLoRANode"]["input"]["required"]["lora"][0] == "LORA_MODEL"
    assert info["ExtractLoRADB"]["output_is_list"][0] is True
    assert "BlendLoRAs" in info and info["BlendLoRAs"]["input"]["required"]["weight_a"][0] == "FLOAT"
    assert info["BlendLoRAs"]["input"]["optional"]["exclude"][0] == "STRING"


# ---------------------------------------------------------------------------------------------------------------
# Core's own LORA_MODEL producer: Train LoRA (one step on the tiny SD 1.5) into every node of ours

def _train(ckpt: str, algorithm: str = "LoRA") -> dict:
    return {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "t1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["c", 1]}},
            "t2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "tr": {"class_type": "TrainLoraNode", "inputs": {
                "model": ["c", 0], "latents": ["t2", 0], "positive": ["t1", 0], "batch_size": 1,
                "grad_accumulation_steps": 1, "steps": 1, "learning_rate": 0.001, "rank": 4, "optimizer": "AdamW",
                "loss_function": "MSE", "seed": 3, "training_dtype": "fp32", "lora_dtype": "bf16",
                "algorithm": algorithm, "gradient_checkpointing": False, "existing_lora": "[None]"}}}


def _only_file(folder: str) -> str:
    files = os.listdir(folder)
    assert len(files) == 1, files
    return os.path.join(folder, files[0])


def test_core_trained_lora_into_every_node(comfy_server):
    """Train LoRA's output (bf16 nn.Parameters, 0-d alphas, `.diff`/`.diff_b` for norms and biases whose
    entries all equal ±lr after one step) into Analyze/Prune/Quantize/ConflictScan/Blend/Save/Apply/Pack, and
    our outputs back into core's Load LoRA Model and Save LoRA Weights. AnalyzeLoRA used to fail on it with
    "'NoneType' object has no attribute 'shape'" (equal `.diff` modules in the duplicate check)."""
    from lens_ops import LoRAModel
    ckpt = _ckpt(comfy_server)
    p = _train(ckpt)
    p.update({
        "core_save": {"class_type": "SaveLoRANode", "inputs": {"lora": ["tr", 1], "prefix": "qat_core/trained"}},
        "an": {"class_type": "AnalyzeLoRA", "inputs": {"lora": ["tr", 1]}},
        "an_img": {"class_type": "PreviewImage", "inputs": {"images": ["an", 2]}},
        "pr": {"class_type": "PruneRank", "inputs": {"lora": ["tr", 1], "method": "energy", "value": 0.99, "recipe": ""}},
        "q": {"class_type": "QuantizeInt8", "inputs": {"lora": ["pr", 0], **QUANT}},
        "cs": {"class_type": "ConflictScan", "inputs": {"lora_a": ["tr", 1], "lora_b": ["q", 0]}},
        "bl": {"class_type": "BlendLoRAs", "inputs": {"lora_a": ["tr", 1], "lora_b": ["q", 0], "weight_a": ["cs", 4],
                                                     "weight_b": ["cs", 5], "rank": 0, "method": "concat",
                                                     "exclude": ["cs", 3]}},
        "save_ours": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["tr", 1], "filename_prefix": "qat_ours/trained",
                                                              "copy_to_loras": False}},
        "save_q_core": {"class_type": "SaveLoRANode", "inputs": {"lora": ["q", 0], "prefix": "qat_q_core/q"}},
        "save_q_ours": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["q", 0], "filename_prefix": "qat_q_ours/q",
                                                                "copy_to_loras": False}},
        "save_bl": {"class_type": "SaveLoRANode", "inputs": {"lora": ["bl", 0], "prefix": "qat_bl/b"}},
        "ap": {"class_type": "ApplyLoRA", "inputs": {"model": ["c", 0], "clip": ["c", 1], "lora": ["tr", 1],
                                                    "strength_model": 1.0, "strength_clip": 1.0}},
        "core_ld": {"class_type": "LoraModelLoader", "inputs": {"model": ["c", 0], "lora": ["bl", 0],
                                                               "strength_model": 1.0}},
        "cs_rep": {"class_type": "PreviewAny", "inputs": {"source": ["cs", 0]}},
        "cs_ra": {"class_type": "PreviewAny", "inputs": {"source": ["cs", 4]}},
        "cs_rb": {"class_type": "PreviewAny", "inputs": {"source": ["cs", 5]}},
        "cs_pl": {"class_type": "PreviewAny", "inputs": {"source": ["cs", 3]}},
        "show1": {"class_type": "PreviewAny", "inputs": {"source": ["ap", 0]}},
        "show2": {"class_type": "PreviewAny", "inputs": {"source": ["core_ld", 0]}},
        "pack": {"class_type": "PackLoRADB", "inputs": {
            "name": "qat_trained", "creator": "", "description": "", "tags": "", "optimisation": "none (lossless)",
            "recipe": "", "shared_basis": "off", "snr_db": 35.0, "overwrite": True, "loras": ["tr", 1],
            "lora_names": "trained"}},
    })
    e = comfy_server.run(p, timeout=1200)
    assert e["status"]["status_str"] == "success", errors_of(e)
    out = e["outputs"]
    rep = json.loads(out["an"]["lens_analysis"][0])
    assert rep["summary"]["architecture"] == "SD 1.5" and len(rep["modules"]) > 300
    assert any(m.get("kind") == "diff" or "diff" in json.dumps(m)[:400] for m in rep["modules"].values())
    assert "Applied" in out["ap"]["text"][0]
    # the trained LoRA as core saved it equals what SaveLoRAFile saved, tensor for tensor
    core = load_file(_only_file(os.path.join(comfy_server.output, "qat_core")))
    ours = load_file(_only_file(os.path.join(comfy_server.output, "qat_ours")))
    assert set(core) == set(ours)
    assert all(core[k].dtype == ours[k].dtype and torch.equal(core[k], ours[k]) for k in core)
    # our int8 output through core's Save LoRA Weights: the same tensors as our own writer (int8 codes kept)
    qc = load_file(_only_file(os.path.join(comfy_server.output, "qat_q_core")))
    qo = load_file(_only_file(os.path.join(comfy_server.output, "qat_q_ours")))
    assert set(qc) == set(qo) and any(v.dtype == torch.int8 for v in qc.values())
    assert all(torch.equal(qc[k], qo[k]) for k in qc)
    # the blend saved by core is what ConflictScan's ratios asked for: w1·ΔW_trained + w2·ΔW_int8, exactly
    report = json.loads(out["cs_rep"]["text"][0])
    ratio_a, ratio_b = float(out["cs_ra"]["text"][0]), float(out["cs_rb"]["text"][0])
    assert (ratio_a, ratio_b) == (report["recommended_ratio"]["a"], report["recommended_ratio"]["b"])
    problems = [x for x in out["cs_pl"]["text"][0].splitlines() if x.strip() and not x.startswith("#")]
    assert problems == [m["name"] if isinstance(m, dict) else m for m in report["problem_modules"]] or not problems
    some = next(iter(report["modules"].values()))
    assert {"cosine", "norm_ratio", "subspace_overlap", "interference"} <= set(some)
    blend = LoRAModel.from_state_dict(load_file(_only_file(os.path.join(comfy_server.output, "qat_bl"))))
    m1, m2 = LoRAModel.from_state_dict(core), LoRAModel.from_state_dict(qo)
    checked = 0
    for m in m1.modules:
        b, q = blend.get(m.name), m2.get(m.name)
        d1 = m.delta(torch.float64)
        if b is None or q is None or d1 is None or m.name in problems or d1.norm() == 0:
            continue
        ref = ratio_a * d1 + ratio_b * q.delta(torch.float64)
        got = b.delta(torch.float64)
        assert (got - ref).norm() / ref.norm() < 2e-2, m.name   # bf16 output of A's dtype
        checked += 1
    assert checked > 200
    packed = os.path.join(comfy_server.base, "loradb", "qat_trained.loradb")
    assert os.path.isfile(packed)
    _alive(comfy_server)


# ---------------------------------------------------------------------------------------------------------------
# A core-format LoRA file (what core's "Extract and Save Lora" writes: diffusion_model.* / text_encoders.* keys,
# lora_up/lora_down without alpha, conv factors as 4-D, .diff for 1-D weights and .diff_b for biases), made with
# core's own extract_lora on small SD 1.5 layer diffs (running the node on the whole tiny checkpoint takes a full
# SVD of the 49408×768 token embedding: ~10 GB)

CORE_LAYERS = {  # model key (without .weight) → shape in the SD 1.5 checkpoint
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": (320, 320),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k": (320, 768),
    "diffusion_model.input_blocks.1.1.proj_in": (320, 320, 1, 1),
    "diffusion_model.input_blocks.1.0.in_layers.2": (320, 320, 3, 3),
    "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2": (1280, 5120),
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
    "text_encoders.clip_l.transformer.text_model.encoder.layers.3.mlp.fc1": (3072, 768),
}


def _core_format_lora(comfy_inproc) -> dict:
    from comfy_extras.nodes_lora_extract import extract_lora
    g = torch.Generator().manual_seed(77)
    sd = {}
    for i, (name, shape) in enumerate(CORE_LAYERS.items()):
        out_f, in_f = shape[0], math.prod(shape[1:])
        s = torch.exp(-torch.arange(min(out_f, in_f), dtype=torch.float32) / 6.0) * 200.0 / math.sqrt(in_f)
        u, _ = torch.linalg.qr(torch.randn(out_f, s.numel(), generator=g))
        v, _ = torch.linalg.qr(torch.randn(in_f, s.numel(), generator=g))
        diff = ((u * s) @ v.T).reshape(shape)
        up, down = extract_lora(diff, 8)
        sd[f"{name}.lora_up.weight"] = up.contiguous().half()
        sd[f"{name}.lora_down.weight"] = down.contiguous().half()
        sd[f"{name}.diff_b"] = (0.01 * torch.randn(out_f, generator=g)).half()
    sd["diffusion_model.input_blocks.1.1.norm.diff"] = (0.02 * torch.randn(320, generator=g)).half()
    return sd


def test_core_format_lora_through_our_nodes_applies_like_core(comfy_server, comfy_inproc):
    from integration.sampling import sample_prompt, saved_image
    from lens_ops import LoRAModel
    ckpt = _ckpt(comfy_server)
    name = _put(comfy_server, "qaapi_core_format.safetensors", _core_format_lora(comfy_inproc))
    graph = {**_load("10", name),
             "11": {"class_type": "AnalyzeLoRA", "inputs": {"lora": ["10", 0]}},
             "12": {"class_type": "PruneRank", "inputs": {"lora": ["10", 0], "method": "rank", "value": 4, "recipe": ""}},
             "13": {"class_type": "QuantizeInt8", "inputs": {"lora": ["10", 0], **QUANT}},
             "14": {"class_type": "ConflictScan", "inputs": {"lora_a": ["10", 0], "lora_b": ["12", 0]}},
             "15": {"class_type": "BlendLoRAs", "inputs": {"lora_a": ["13", 0], "lora_b": ["12", 0], "weight_a": 0.5,
                                                          "weight_b": 0.5, "rank": 0, "method": "svd"}},
             "16": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["15", 0], "filename_prefix": "qacf/blend",
                                                            "copy_to_loras": False}},
             "17": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["13", 0], "filename_prefix": "qacf/q",
                                                            "copy_to_loras": False}},
             "18": {"class_type": "ApplyLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": ["10", 0],
                                                         "strength_model": 1.0, "strength_clip": 1.0}}}
    e1 = comfy_server.run(sample_prompt(ckpt, graph, ["18", 0], ["18", 1], seed=3, prefix="qacf/apply"))
    assert e1["status"]["status_str"] == "success", errors_of(e1)
    out = e1["outputs"]
    # every layer, bias and norm diff of the file became a patch (7 weights + 7 biases + 1 norm)
    assert f"Applied {2 * len(CORE_LAYERS) + 1} weight patch(es) from {len(CORE_LAYERS) + 1} LoRA module(s)" \
        in out["18"]["text"][0], out["18"]["text"][0]
    rep = json.loads(out["11"]["lens_analysis"][0])
    assert rep["summary"]["architecture"] == "SD 1.5", rep["summary"]
    assert "SD 1.5" in out["14"]["text"][0]
    core = {"20": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                          "strength_model": 1.0, "strength_clip": 1.0}}}
    e2 = comfy_server.run(sample_prompt(ckpt, core, ["20", 0], ["20", 1], seed=3, prefix="qacf/core"))
    assert e2["status"]["status_str"] == "success", errors_of(e2)
    e0 = comfy_server.run(sample_prompt(ckpt, {}, ["1", 0], ["1", 1], seed=3, prefix="qacf/base"))
    a, b, base = saved_image(comfy_server, e1), saved_image(comfy_server, e2), saved_image(comfy_server, e0)
    # (these few layers barely move the tiny random model's 64×64 image; the ΔW checks below are exact)
    assert abs(a - b).max() <= abs(a - base).max() + 1, "ApplyLoRA differs from core LoraLoader"
    # /view serves the image the history names
    img = e1["outputs"]["7"]["images"][0]
    with urllib.request.urlopen(f"{comfy_server.url}/view?filename={img['filename']}&subfolder={img['subfolder']}"
                                f"&type={img['type']}", timeout=30) as r:
        assert r.headers["Content-Type"] == "image/png" and r.read(8) == b"\x89PNG\r\n\x1a\n"
    # core applies our outputs of it as we say: the int8 file and the svd blend, ΔW within rounding
    src = LoRAModel.load(os.path.join(comfy_server.loras, name))
    q = load_file(_only_file_like(os.path.join(comfy_server.output, "qacf"), "q_"))
    bl = load_file(_only_file_like(os.path.join(comfy_server.output, "qacf"), "blend_"))
    to_load = {k: k + ".weight" for k in CORE_LAYERS}
    weights = {k + ".weight": torch.zeros(shape) for k, shape in CORE_LAYERS.items()}
    got_q, got_b = comfy_inproc(q, to_load, weights), comfy_inproc(bl, to_load, weights)
    qm = LoRAModel.from_state_dict(q)
    for k, shape in CORE_LAYERS.items():
        ref = src.get(k).delta(torch.float64).reshape(shape)
        assert (got_q[k + ".weight"].double() - ref).norm() / ref.norm() < 0.02, k
        # blend = 0.5·ΔW_int8 + 0.5·(best rank-4 approximation of ΔW), as applied by core
        u, sv, vh = torch.linalg.svd(ref.reshape(shape[0], -1))
        rank4 = ((u[:, :4] * sv[:4]) @ vh[:4]).reshape(shape)
        want = 0.5 * qm.get(k).delta(torch.float64).reshape(shape) + 0.5 * rank4
        assert (got_b[k + ".weight"].double() - want).norm() / want.norm() < 2e-3, k


def _only_file_like(folder: str, start: str) -> str:
    files = [f for f in os.listdir(folder) if f.startswith(start) and f.endswith(".safetensors")]
    assert len(files) == 1, files
    return os.path.join(folder, files[0])


# ---------------------------------------------------------------------------------------------------------------
# ExtractLoRADB's list output fans out over every LORA_MODEL consumer, ours and core's

def test_extract_list_output_into_every_consumer(comfy_server, sd15):
    from lens_ops import LoRAModel
    from lens_ops.loradb import open_collection
    a, b = sd15
    c = make_lora("sd15_kohya_locon", rank=4, seed=1401, max_modules=40)
    third = _put(comfy_server, "qaapi_locon.safetensors", c, c.metadata)
    files = [a, b, third]
    pack = {"1": {"class_type": "PackLoRADB", "inputs": {
        "name": "qaapi_three", "creator": "qa", "description": "three", "tags": "qa", "optimisation": "none (lossless)",
        "recipe": "", "shared_basis": "off", "snr_db": 35.0, "overwrite": True,
        **{f"lora_file_{i + 1}": f for i, f in enumerate(files)}}}}
    e = comfy_server.run(pack)
    assert e["status"]["status_str"] == "success", errors_of(e)
    ckpt = _ckpt(comfy_server)
    p = {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
         "x": {"class_type": "ExtractLoRADB", "inputs": {"loradb": "qaapi_three.loradb", "entries": "all",
                                                         "write_to_loras": False}},
         "s1": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["x", 0], "filename_prefix": "qax_ours/e",
                                                         "copy_to_loras": False}},
         "s2": {"class_type": "SaveLoRANode", "inputs": {"lora": ["x", 0], "prefix": "qax_core/e"}},
         "ap": {"class_type": "ApplyLoRA", "inputs": {"model": ["c", 0], "clip": ["c", 1], "lora": ["x", 0],
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
         "ml": {"class_type": "LoraModelLoader", "inputs": {"model": ["c", 0], "lora": ["x", 0], "strength_model": 0.5}},
         "v1": {"class_type": "PreviewAny", "inputs": {"source": ["ap", 1]}},
         "v2": {"class_type": "PreviewAny", "inputs": {"source": ["ml", 0]}},
         **_load("la", a),
         "bl": {"class_type": "BlendLoRAs", "inputs": {"lora_a": ["la", 0], "lora_b": ["x", 0], "weight_a": 1.0,
                                                      "weight_b": -1.0, "rank": 0, "method": "concat",
                                                      "allow_disjoint": True}},
         "s3": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["bl", 0], "filename_prefix": "qax_blend/b",
                                                         "copy_to_loras": False}},
         "rp": {"class_type": "PackLoRADB", "inputs": {
             "name": "qaapi_repack", "creator": "", "description": "", "tags": "", "optimisation": "none (lossless)",
             "recipe": "", "shared_basis": "off", "snr_db": 35.0, "overwrite": True, "loras": ["x", 0],
             "lora_names": ["x", 1]}}}
    e = comfy_server.run(p)
    assert e["status"]["status_str"] == "success", errors_of(e)
    out = e["outputs"]
    assert len(out["ap"]["text"]) == 3 and all("Applied" in t for t in out["ap"]["text"])
    assert "qaapi_a" in out["x"]["text"][0] and "Extracted 3 entries" in out["x"]["text"][0]
    ours = sorted(os.listdir(os.path.join(comfy_server.output, "qax_ours")))
    core = sorted(os.listdir(os.path.join(comfy_server.output, "qax_core")))
    assert len(ours) == 3 and len(core) == 3
    want = [load_file(os.path.join(comfy_server.loras, f)) for f in files]
    for o, k in zip(ours, core):
        got_o = load_file(os.path.join(comfy_server.output, "qax_ours", o))
        got_k = load_file(os.path.join(comfy_server.output, "qax_core", k))
        match = [w for w in want if set(w) == set(got_o) and all(torch.equal(w[t], got_o[t]) for t in w)]
        assert len(match) == 1 and all(torch.equal(match[0][t], got_o[t]) and torch.equal(got_o[t], got_k[t])
                                       for t in got_o)
    # A − (A, B, LoCon): the blend with A itself is exactly zero in every shared module
    blends = sorted(os.listdir(os.path.join(comfy_server.output, "qax_blend")))
    assert len(blends) == 3
    zero = [LoRAModel.load(os.path.join(comfy_server.output, "qax_blend", f)) for f in blends]
    norms = [max(float(m.delta(torch.float64).norm()) for m in z.modules) for z in zero]
    assert sorted(norms)[0] < 1e-6 < sorted(norms)[1], norms
    with open_collection(os.path.join(comfy_server.base, "loradb", "qaapi_repack.loradb")) as col:
        assert sorted(e["name"] for e in col.entries) == ["qaapi_a", "qaapi_b", "qaapi_locon"]


# ---------------------------------------------------------------------------------------------------------------
# What each node returns to the browser (`ui`) and as outputs holds the fields the issues name

def test_reports_hold_the_promised_fields(comfy_server, sd15):
    a, b = sd15
    p = {**_load("1", a), **_load("2", b),
         "an": {"class_type": "AnalyzeLoRA", "inputs": {"lora": ["1", 0]}},
         "an_j": {"class_type": "PreviewAny", "inputs": {"source": ["an", 0]}},
         "an_llm": {"class_type": "PreviewAny", "inputs": {"source": ["an", 3]}},
         "an_img": {"class_type": "PreviewImage", "inputs": {"images": ["an", 2]}},
         "pr": {"class_type": "PruneRank", "inputs": {"lora": ["1", 0], "method": "sv_fro", "value": 0.9, "recipe": ""}},
         "q": {"class_type": "QuantizeInt8", "inputs": {"lora": ["pr", 0], **QUANT}},
         "q_r": {"class_type": "PreviewAny", "inputs": {"source": ["q", 1]}},
         "cs": {"class_type": "ConflictScan", "inputs": {"lora_a": ["1", 0], "lora_b": ["2", 0]}},
         "cs_j": {"class_type": "PreviewAny", "inputs": {"source": ["cs", 0]}},
         "cs_img": {"class_type": "PreviewImage", "inputs": {"images": ["cs", 2]}},
         "pk": {"class_type": "PackLoRADB", "inputs": {
             "name": "qaapi_fields", "creator": "qa", "description": "", "tags": "a, b", "optimisation": "int8",
             "recipe": "", "shared_basis": "off", "snr_db": 35.0, "overwrite": True, "loras": ["q", 0],
             "lora_file_1": b}}}
    e = comfy_server.run(p)
    assert e["status"]["status_str"] == "success", errors_of(e)
    out = e["outputs"]
    rep = json.loads(out["an"]["lens_analysis"][0])
    assert rep == json.loads(out["an_j"]["text"][0])   # the view reads exactly the report_json output
    first = next(iter(rep["modules"].values()))
    assert {"rank", "alpha", "effective_rank_90", "effective_rank_99", "effective_rank_999",
            "singular_values"} <= set(first)
    assert rep["scores"] and "efficiency" in json.dumps(rep["scores"]) and "health" in json.dumps(rep["scores"])
    assert len(out["an_llm"]["text"][0]) > 200
    qtext = out["q"]["text"][0]
    assert qtext == out["q_r"]["text"][0]
    for word in ("SNR", "MSE", "MAE", "max error", "relative Frobenius error"):
        assert word in qtext, word
    report = json.loads(out["cs_j"]["text"][0])
    for key in ("recommended_ratio", "stability", "problem_modules", "overall", "blocks", "modules"):
        assert key in report, key
    assert "conflict_score" in report["overall"] and report["recommended_ratio"]["text"]
    assert out["cs"]["lens_conflict"][0]["ratio"] == report["recommended_ratio"]["text"]
    for node in ("an_img", "cs_img"):
        img = out[node]["images"][0]
        with urllib.request.urlopen(f"{comfy_server.url}/view?filename={img['filename']}&subfolder="
                                    f"{img['subfolder']}&type={img['type']}", timeout=30) as r:
            data = r.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 500, node
    ptext = out["pk"]["text"][0]
    assert "original" in ptext and "stored" in ptext and "ratio" in ptext and "2 entries" in ptext, ptext


# ---------------------------------------------------------------------------------------------------------------
# Bad files: a corrupt LoRA picked into PackLoRADB, LoRAs of two architectures into ConflictScan, hostile
# collections in the loradb folder. One sentence, nothing written, the server keeps answering.

def test_pack_with_a_truncated_lora_writes_no_collection(comfy_server, sd15):
    data = open(os.path.join(comfy_server.loras, sd15[0]), "rb").read()
    with open(os.path.join(comfy_server.loras, "qaapi_trunc.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])
    db = os.path.join(comfy_server.base, "loradb")
    before = _files(db)
    for opt in ("none (lossless)", "int8"):
        e = comfy_server.run({"1": {"class_type": "PackLoRADB", "inputs": {
            "name": "qaapi_trunc", "creator": "", "description": "", "tags": "", "optimisation": opt, "recipe": "",
            "shared_basis": "auto", "snr_db": 35.0, "overwrite": False, "lora_file_1": sd15[0],
            "lora_file_2": "qaapi_trunc.safetensors"}}})
        msg = _error(e, "PackLoRADB")
        assert "qaapi_trunc.safetensors" in msg and ("truncated" in msg or "corrupt" in msg), msg
        assert _files(db) == before
    _alive(comfy_server)


@pytest.mark.parametrize("other", ["flux_kohya", "sdxl_kohya"])
def test_conflict_scan_of_two_architectures_is_refused(comfy_server, sd15, other):
    sd = make_lora(other, rank=4, seed=1501, max_modules=40 if other == "flux_kohya" else None)
    name = _put(comfy_server, f"qaapi_cs_{other}.safetensors", sd)
    e = comfy_server.run({**_load("1", sd15[0]), **_load("2", name),
                          "3": {"class_type": "ConflictScan", "inputs": {"lora_a": ["1", 0], "lora_b": ["2", 0]}}})
    msg = _error(e, "ConflictScan")
    assert "different base models" in msg and "SD 1.5" in msg, msg
    _alive(comfy_server)


def test_hostile_collections_in_the_loradb_folder(comfy_server, sd15):
    db = os.path.join(comfy_server.base, "loradb")
    e = comfy_server.run({"1": {"class_type": "PackLoRADB", "inputs": {
        "name": "qaapi_seed", "creator": "", "description": "", "tags": "", "optimisation": "none (lossless)",
        "recipe": "", "shared_basis": "off", "snr_db": 35.0, "overwrite": True, "lora_file_1": sd15[0],
        "lora_file_2": sd15[1]}}})
    assert e["status"]["status_str"] == "success", errors_of(e)
    src = open(os.path.join(db, "qaapi_seed.loradb"), "rb").read()
    flip = bytearray(src)
    flip[len(flip) // 2] ^= 0x55
    hostile = {"qaapi_h_trunc.loradb": src[: len(src) * 2 // 3], "qaapi_h_empty.loradb": b"",
               "qaapi_h_random.loradb": os.urandom(4096), "qaapi_h_flip.loradb": bytes(flip),
               "qaapi_h_lora.loradb": open(os.path.join(comfy_server.loras, sd15[0]), "rb").read()}
    v1 = {"base_lora_unet_x.lora_up.weight": torch.randn(4, 2).half(),
          "base_lora_unet_x.lora_down.weight": torch.randn(2, 4).half()}
    save_file(v1, os.path.join(db, "qaapi_h_v1.loradb"),
              metadata={"loradb_version": "1.0", "lora_names": json.dumps(["a", "b"]), "base_index": "7",
                        "lora_count": "999999999"})
    for n, data in hostile.items():
        with open(os.path.join(db, n), "wb") as f:
            f.write(data)
    choices = comfy_server.object_info("ExtractLoRADB")["ExtractLoRADB"]["input"]["required"]["loradb"][0]
    loras_before = _files(comfy_server.loras)
    sources = {hashlib.sha256(open(os.path.join(comfy_server.loras, f), "rb").read()).hexdigest() for f in sd15}
    for n in list(hostile) + ["qaapi_h_v1.loradb"]:
        assert n in choices
        e = comfy_server.run({"1": {"class_type": "ExtractLoRADB", "inputs": {"loradb": n, "entries": "all",
                                                                              "write_to_loras": True}},
                              "2": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["1", 0],
                                                                             "filename_prefix": "qah/" + n,
                                                                             "copy_to_loras": False}}})
        if n in ("qaapi_h_trunc.loradb", "qaapi_h_flip.loradb") and e["status"]["status_str"] == "success":
            # issue 7: the damaged entry is named and the undamaged ones come out, byte for byte
            # (into the loras folder, where the sources already sit under those names, nothing new needs writing)
            assert "Not extracted (damaged)" in e["outputs"]["1"]["text"][0]
            for f in sorted(set(_files(comfy_server.loras)) - set(loras_before)):
                path = os.path.join(comfy_server.loras, f)
                assert hashlib.sha256(open(path, "rb").read()).hexdigest() in sources, f
                os.unlink(path)
            shutil.rmtree(os.path.join(comfy_server.output, "qah"))   # SaveLoRAFile saved the undamaged entries
            continue
        msg = _error(e, "ExtractLoRADB")
        assert n in msg, msg
        assert _files(comfy_server.loras) == loras_before
        assert not os.path.exists(os.path.join(comfy_server.output, "qah"))
    _alive(comfy_server)


def test_pack_requeued_after_a_picked_file_changed_packs_again(comfy_server):
    """PackLoRADB had no IS_CHANGED: re-queuing the same prompt after a picked LoRA file was replaced on disk
    returned ComfyUI's cached result and left the collection holding the old LoRA."""
    from lens_ops.loradb import open_collection
    path = os.path.join(comfy_server.loras, "qaapi_changing.safetensors")
    save_file(dict(make_lora("sd15_kohya", rank=4, seed=1601, max_modules=8)), path)
    prompt = {"1": {"class_type": "PackLoRADB", "inputs": {
        "name": "qaapi_changing", "creator": "", "description": "", "tags": "", "optimisation": "none (lossless)",
        "recipe": "", "shared_basis": "off", "snr_db": 35.0, "overwrite": True,
        "lora_file_1": "qaapi_changing.safetensors"}}}
    db = os.path.join(comfy_server.base, "loradb", "qaapi_changing.loradb")

    def packed_sha():
        with open_collection(db) as c:
            return c.entries[0]["original_sha256"]
    e = comfy_server.run(prompt)
    assert e["status"]["status_str"] == "success", errors_of(e)
    first = packed_sha()
    save_file(dict(make_lora("sd15_kohya", rank=4, seed=1602, max_modules=8)), path)
    os.utime(path, (os.path.getatime(path), os.path.getmtime(path) + 5))
    e = comfy_server.run(prompt)
    assert e["status"]["status_str"] == "success", errors_of(e)
    assert packed_sha() != first, "the re-queued pack kept the old LoRA (cached result)"


def test_pickle_and_whole_checkpoint_in_the_loras_folder_are_refused(comfy_server):
    """A .pt pickle (never unpickled) and a whole SD 1.5 checkpoint dropped into the loras folder: LoadLoRAFile
    names the problem in one sentence; nothing is written."""
    import pickle
    ckpt_src = os.path.join(comfy_server.base, "checkpoints", _ckpt(comfy_server))
    os.symlink(os.path.realpath(ckpt_src), os.path.join(comfy_server.loras, "qaapi_whole_ckpt.safetensors"))
    with open(os.path.join(comfy_server.loras, "qaapi_pickle.pt"), "wb") as f:
        pickle.dump({"lora_unet_x.lora_up.weight": [1.0]}, f)
    choices = comfy_server.object_info("LoadLoRAFile")["LoadLoRAFile"]["input"]["required"]["lora_name"][0]
    before = _files(comfy_server.output)
    for name, word in (("qaapi_pickle.pt", "pickle"), ("qaapi_whole_ckpt.safetensors", "checkpoint")):
        assert name in choices
        e = comfy_server.run({**_load("1", name), **_save(["1", 0], "qaw_refused/x")})
        msg = _error(e, "LoadLoRAFile")
        assert word in msg.lower(), msg
    assert _files(comfy_server.output) == before
    _alive(comfy_server)


@pytest.mark.parametrize("recipe", ["fro_ckpt=1,thr=-3.5", "spn_ckpt=0.8,params=0.2,size=2", "subspace=1,thr=-2"])
def test_prune_with_the_base_model_from_the_graph(comfy_server, sd15, recipe):
    """PruneRank's ckpt scores read the base weights from the MODEL/CLIP in the graph (the tiny SD 1.5), every
    module mapped the way comfy/lora.py maps it, and the pruned LoRA still applies."""
    ckpt = _ckpt(comfy_server)
    p = {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
         **_load("1", sd15[1]),
         "pr": {"class_type": "PruneRank", "inputs": {"lora": ["1", 0], "method": "recipe", "value": 0,
                                                     "recipe": recipe, "model": ["c", 0], "clip": ["c", 1]}},
         "ap": {"class_type": "ApplyLoRA", "inputs": {"model": ["c", 0], "clip": ["c", 1], "lora": ["pr", 0],
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
         "v": {"class_type": "PreviewAny", "inputs": {"source": ["ap", 0]}}}
    e = comfy_server.run(p)
    assert e["status"]["status_str"] == "success", errors_of(e)
    view = json.loads(e["outputs"]["pr"]["lens_prune"][0])
    mods = view["modules"]
    assert len(mods) == 264 and view["total"]["modules"] == 264
    text = e["outputs"]["pr"]["text"][0]
    assert "rle_ckpt" in text
    # every module found its base weight: a rle_ckpt number on every row the report lists
    rows = [ln for ln in text.splitlines() if "→" in ln and "lora_" in ln]
    assert rows and all(ln.split()[3] != "–" for ln in rows), rows[:3]
    assert "Applied" in e["outputs"]["ap"]["text"][0]


def test_prune_node_whose_recipe_removes_every_module_is_refused(comfy_server, sd15):
    """A ckpt recipe whose threshold drops every module (this LoRA is tiny next to the base weights) used to
    return an empty LORA_MODEL with success; the next node then failed ('The lora input is empty')."""
    ckpt = _ckpt(comfy_server)
    p = {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
         **_load("1", sd15[1]),
         "pr": {"class_type": "PruneRank", "inputs": {"lora": ["1", 0], "method": "recipe", "value": 0,
                                                     "recipe": "fro_ckpt=1,thr=-1.5", "model": ["c", 0],
                                                     "clip": ["c", 1]}},
         "an": {"class_type": "AnalyzeLoRA", "inputs": {"lora": ["pr", 0]}}}
    msg = _error(comfy_server.run(p), "PruneRank")
    assert "removes every module" in msg, msg
