"""AnalyzeLoRA in a real ComfyUI: through /prompt, its ui report equals the engine's report of the same
file, the heatmap feeds PreviewImage, bad input is a sentence, and the web view is served."""
import json
import os
import urllib.request

import torch
from safetensors.torch import save_file

from integration.conftest import errors_of
from lens_ops import LoRAModel
from lens_ops.analysis import analyze
from lens_ops.synth import make_lora


def _strip(rep):
    rep = dict(rep)
    rep.pop("seconds")
    rep["summary"] = {k: v for k, v in rep["summary"].items() if k not in ("file", "file_bytes")}
    return rep


def test_analyze_through_prompt(comfy_server):
    sd = make_lora("sdxl_kohya", rank=8, seed=7, max_modules=40)
    path = os.path.join(comfy_server.loras, "lens_analyze.safetensors")
    save_file(dict(sd), path, metadata=sd.metadata)
    info = comfy_server.object_info("AnalyzeLoRA")["AnalyzeLoRA"]
    assert info["output"] == ["STRING", "STRING", "IMAGE", "STRING"] and info["output_node"]
    prompt = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "lens_analyze.safetensors"}},
              "2": {"class_type": "AnalyzeLoRA", "inputs": {"lora": ["1", 0], "block_share": 0.9}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}}}
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    got = json.loads(entry["outputs"]["2"]["lens_analysis"][0])
    ref = analyze(LoRAModel.load(path))
    assert _strip(got) == json.loads(json.dumps(_strip(ref)))
    for name, e in got["modules"].items():
        assert e["rank"] == 8 and len(e["singular_values"]) == 8 and "effective_rank_999" in e
    assert entry["outputs"]["3"]["images"], "the heatmap reached PreviewImage"


def test_bad_input_reads_as_sentence(comfy_server):
    save_file({"foo.bar": torch.randn(3, 3), "baz": torch.randn(2)},
              os.path.join(comfy_server.loras, "lens_unknown.safetensors"))
    entry = comfy_server.run({"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "lens_unknown.safetensors"}},
                              "2": {"class_type": "AnalyzeLoRA", "inputs": {"lora": ["1", 0]}}})
    assert entry["status"]["status_str"] == "error"
    assert "unknown kind" in errors_of(entry)


def test_web_extension_is_served(comfy_server):
    exts = comfy_server.get("/extensions")
    ours = [e for e in exts if e.endswith("/lens_views.js")]
    assert ours, exts
    with urllib.request.urlopen(comfy_server.url + ours[0], timeout=30) as r:
        src = r.read().decode()
    assert "registerExtension" in src and "lens_analysis" in src
