"""Acceptance audit of issues 5 and 7 through a real ComfyUI server (/prompt, /history, /object_info, /view), as a
user's graph drives the nodes, on inputs the other suites do not use: a bf16 file of every foldable kind (LoCon
3×3, Tucker mid, DoRA, LoHa, LoHa CP, LoKr ×3) plus a text-encoder module with odd metadata; three LoRAs made in
the graph packed through PackLoRADB's graph sockets; an SD 1.5 LoCon fp32 extracted and applied with ApplyLoRA
against core's LoraLoader on the original file; a LoRA Lens app v1.0 file (bf16 base, every record kind) and a
truncated copy in the loradb folder; a lossy pack of a text-encoder-only LoRA, an SDXL LoCon and the real LyCORIS
LoKr, checked by ComfyUI's own loader against the error recorded in the collection."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
import torch
from safetensors import safe_open

from integration.conftest import errors_of
from integration.sampling import sample_prompt, saved_image
from lens_ops import LoRAModel
from lens_ops.st_io import save_file
from lens_ops.synth import make_lora
from test_qa_audit57 import _app_file, _app_loras, _kinds_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REAL_LOKR = os.path.join(os.path.dirname(ROOT), "shared", "real_loras", "lycoris_smart_falcon",
                         "smart_falcon_4_lokr.safetensors")


def _cli(*argv) -> subprocess.CompletedProcess:
    """`lora-lens ...` as a user runs it (this Python, the checkout's engine)."""
    return subprocess.run([sys.executable, "-m", "lens_ops", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def _sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _saved(server, prefix_dir: str) -> list[str]:
    folder = os.path.join(server.output, prefix_dir)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)) if os.path.isdir(folder) else []


def _ckpt(server) -> str:
    from integration.tiny_checkpoint import cached_sd15_checkpoint
    dest = os.path.join(server.base, "checkpoints", "tiny_sd15.safetensors")
    if not os.path.exists(dest):
        os.symlink(cached_sd15_checkpoint(python=os.environ.get("COMFYUI_PYTHON", sys.executable)), dest)
    return "tiny_sd15.safetensors"


def _patch(comfy_inproc, sd: dict, name: str, shape, seed=5) -> torch.Tensor:
    base = 1e-2 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return comfy_inproc(sd, {name: "w"}, {"w": base})["w"].double() - base.double()


def _load(path):
    import comfy.utils
    return comfy.utils.load_torch_file(path, safe_load=True)   # the reader LoraLoader uses


# ------------------------------------------------------------------------------------------ issue 5
def _apply_vs_core(server, ckpt, graph: dict, lora_socket: list, lora_file: str, prefix: str):
    """Three images from one seed: ApplyLoRA on `lora_socket` (a LORA_MODEL output in `graph`), core's LoraLoader
    on `lora_file` in the loras folder, and no LoRA; returns (apply entry, apply, core, none) images."""
    apply_nodes = dict(graph, **{"90": {"class_type": "ApplyLoRA", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora": lora_socket, "strength_model": 6.0, "strength_clip": 6.0}}})
    e1 = server.run(sample_prompt(ckpt, apply_nodes, ["90", 0], ["90", 1], prefix=f"{prefix}/apply"))
    assert e1["status"]["status_str"] == "success", errors_of(e1)
    core = {"91": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_file,
                                                          "strength_model": 6.0, "strength_clip": 6.0}}}
    e2 = server.run(sample_prompt(ckpt, core, ["91", 0], ["91", 1], prefix=f"{prefix}/core"))
    assert e2["status"]["status_str"] == "success", errors_of(e2)
    e0 = server.run(sample_prompt(ckpt, {}, ["1", 0], ["1", 1], prefix=f"{prefix}/none"))
    return e1, saved_image(server, e1), saved_image(server, e2), saved_image(server, e0)


def test_quantize_node_every_kind_int8_keep_fp16_and_fp8_load_exactly_in_core(comfy_server, comfy_inproc):
    src = os.path.join(comfy_server.loras, "audit57_kinds.safetensors")
    sd = _kinds_file(src, torch.bfloat16)
    orig = LoRAModel.load(src)
    runs = {"int8": ("int8", True, 42.0), "fp8": ("fp8 (e4m3fn)", False, 40.0)}
    for tag, (fmt, keep, thr) in runs.items():
        prompt = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "audit57_kinds.safetensors"}},
                  "2": {"class_type": "QuantizeInt8", "inputs": {"lora": ["1", 0], "format": fmt,
                                                                 "method": "rebalance+rotate", "min_snr_db": thr,
                                                                 "keep_fp16_below": keep}},
                  "3": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["2", 0], "filename_prefix": f"a57q/{tag}",
                                                                 "copy_to_loras": False}}}
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "success", errors_of(entry)
        report = entry["outputs"]["2"]["text"][0]                 # the report is shown in the node
        for word in ("ΔW", "SNR", "MSE", "MAE", "max error", "relative Frobenius error", "Stored tensors"):
            assert word in report, word
        path = next(p for p in _saved(comfy_server, "a57q") if os.path.basename(p).startswith(tag))
        loaded = _load(path)
        mine = LoRAModel.from_state_dict(loaded)
        code = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[tag]
        kept = 0
        for m0 in orig.modules:
            if m0.is_dora:   # core re-normalises DoRA with the weight: compared through core on both sides below
                continue
            shape = m0.weight_shape()
            got = _patch(comfy_inproc, loaded, m0.name, shape)
            mq = mine.get(m0.name)
            stored = {mq.key_for(r): loaded[mq.key_for(r)].dtype for r in mq.tensors if r != "alpha"}
            if any(d == code for d in stored.values()):   # (a full LoKr's scale rides on a float32 w1: no alpha)
                deq = mq.delta(torch.float64)     # ΔW from the file's own numbers (codes × folded alpha)
                assert float((got - deq.reshape(shape)).norm() / deq.norm()) < 1e-5, (tag, m0.name)
            else:                                 # a module kept in fp16 instead of int8/fp8 (mixed file)
                kept += 1
                assert keep and all(loaded[k].dtype == torch.float16 for k in stored), (tag, m0.name, stored)
                deq = mq.delta(torch.float64)     # the bf16 factors rounded to fp16, as core applies them
                assert float((got - deq.reshape(shape)).norm() / deq.norm()) < 1e-5, (tag, m0.name)
        assert (kept > 0) == keep, (tag, kept)
        if keep:
            assert "kept in fp16" in report and "Kept unquantized" in report


def test_apply_lora_on_an_extracted_entry_equals_core_loraloader_on_the_original(comfy_server):
    """Issue 7's done-means graph as a user builds it: pack three LoRAs made in the graph (PackLoRADB's graph
    sockets: one plain file, one pruned... here one quantized) through /prompt, extract one, apply it with
    ApplyLoRA, compare the image with core's LoraLoader on the original file; the image is fetched by /view."""
    ckpt = _ckpt(comfy_server)
    files = {"a57_locon.safetensors": make_lora("sd15_kohya_locon", rank=4, seed=57, dtype=torch.float32),
             "a57_plain.safetensors": make_lora("sd15_kohya", rank=4, seed=58, dtype=torch.bfloat16),
             "a57_third.safetensors": make_lora("sd15_kohya", rank=2, seed=59, dtype=torch.float16)}
    for name, sd in files.items():
        save_file(sd, os.path.join(comfy_server.loras, name), sd.metadata)
    info = comfy_server.object_info("PackLoRADB")["PackLoRADB"]["input"]["optional"]
    assert all(info[f"loras_{i}"][0] == "LORA_MODEL" for i in (2, 3, 4))
    pack = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "a57_locon.safetensors"}},
            "2": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "a57_plain.safetensors"}},
            "3": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "a57_third.safetensors"}},
            "4": {"class_type": "QuantizeInt8", "inputs": {"lora": ["3", 0], "format": "int8",
                                                           "method": "rebalance+rotate", "min_snr_db": 40.0,
                                                           "keep_fp16_below": False}},
            "5": {"class_type": "PackLoRADB",
                  "inputs": {"name": "audit57", "creator": "QA ✓", "description": "three\nfrom the graph",
                             "tags": "sd15, qa", "optimisation": "none (lossless)", "recipe": "energy=0.9997",
                             "shared_basis": "off", "snr_db": 35.0, "overwrite": True, "loras": ["1", 0],
                             "loras_2": ["2", 0], "loras_3": ["4", 0], "lora_names": "locon, plain, quant"}}}
    entry = comfy_server.run(pack)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    assert "3 entries" in entry["outputs"]["5"]["text"][0]
    db = os.path.join(comfy_server.base, "loradb", "audit57.loradb")
    listing = _cli("list", db, "--json")
    assert listing.returncode == 0, listing.stderr
    head = json.loads(listing.stdout)
    assert (head["collection"]["creator"], head["collection"]["description"], head["collection"]["tags"]) == \
        ("QA ✓", "three\nfrom the graph", ["sd15", "qa"])
    assert [e["name"] for e in head["entries"]] == ["locon", "plain", "quant"]
    assert head["entries"][2]["dtype"] == "int8"
    # the CLI gives the graph LoRAs back bit-exact to the files LoadLoRAFile read (lossless pack of a dict)
    out = os.path.join(comfy_server.base, "a57_cli")
    res = _cli("extract", db, "locon", "plain", "-o", out)
    assert res.returncode == 0, res.stderr
    for entry_name, f in (("locon", "a57_locon.safetensors"), ("plain", "a57_plain.safetensors")):
        got = os.path.join(out, f"{entry_name}.safetensors")
        with safe_open(got, "pt") as a, safe_open(os.path.join(comfy_server.loras, f), "pt") as b:
            assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k))
                                                          for k in b.keys())
    # extract one in the graph and apply it (ApplyLoRA) vs core LoraLoader on the original file
    extract = {"20": {"class_type": "ExtractLoRADB", "inputs": {"loradb": "audit57.loradb", "entries": "locon",
                                                                "write_to_loras": False}}}
    e1, a, b, base = _apply_vs_core(comfy_server, ckpt, extract, ["20", 0], "a57_locon.safetensors", "a57img")
    assert abs(a - base).max() > 0, "the extracted LoRA changed nothing"
    assert abs(a - b).max() <= 1, "ApplyLoRA on the extracted entry and LoraLoader on the original differ"
    img = e1["outputs"]["7"]["images"][0]
    q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img["subfolder"], "type": img["type"]})
    with urllib.request.urlopen(f"{comfy_server.url}/view?{q}", timeout=30) as r:
        assert r.read() == open(os.path.join(comfy_server.output, img["subfolder"], img["filename"]), "rb").read()


# ------------------------------------------------------------------------------------------ issue 7: app v1.0
def test_app_v1_file_and_a_truncated_copy_through_extract_node(comfy_server):
    folder = os.path.join(comfy_server.base, "loradb")
    want = _app_file(os.path.join(folder, "a57_app.loradb"), _app_loras(),
                     ["dir/a.safetensors", "b.safetensors", "c.safetensors"], 1, torch.bfloat16)
    data = open(os.path.join(folder, "a57_app.loradb"), "rb").read()
    with open(os.path.join(folder, "a57_app_cut.loradb"), "wb") as f:
        f.write(data[: len(data) - 1000])
    choices = comfy_server.object_info("ExtractLoRADB")["ExtractLoRADB"]["input"]["required"]["loradb"][0]
    assert {"a57_app.loradb", "a57_app_cut.loradb"} <= set(choices)
    for db, prefix in (("a57_app.loradb", "a57app/full"), ("a57_app_cut.loradb", "a57app/cut")):
        entry = comfy_server.run({
            "1": {"class_type": "ExtractLoRADB", "inputs": {"loradb": db, "entries": "a", "write_to_loras": False}},
            "2": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["1", 0], "filename_prefix": prefix,
                                                           "copy_to_loras": False}}})
        assert entry["status"]["status_str"] == "success", errors_of(entry)
        text = entry["outputs"]["1"]["text"][0]
        assert "lossy source" in text
        path = next(p for p in _saved(comfy_server, "a57app") if os.path.basename(p).startswith(prefix.split("/")[1]))
        with safe_open(path, "pt") as f:
            assert set(f.keys()) == set(want[0]) and all(torch.equal(f.get_tensor(k), want[0][k]) for k in want[0])
    entry = comfy_server.run({"1": {"class_type": "ExtractLoRADB",
                                    "inputs": {"loradb": "a57_app_cut.loradb", "entries": "all",
                                               "write_to_loras": False}}})
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    text = entry["outputs"]["1"]["text"][0]
    assert "Extracted 2 entries" in text and "'c'" in text and "truncated" in text
    entry = comfy_server.run({"1": {"class_type": "ExtractLoRADB", "inputs": {"loradb": "a57_app_cut.loradb",
                                                                              "entries": "c", "write_to_loras": False}}})
    assert entry["status"]["status_str"] == "error" and "'c'" in errors_of(entry)


# ------------------------------------------------------------------------------------------ issue 7: lossy pack
def test_lossy_pack_node_of_fresh_kinds_meets_its_recorded_error_in_core(comfy_server, comfy_inproc):
    if not os.path.exists(REAL_LOKR):
        pytest.skip("../shared/real_loras is not present on this machine")
    te = make_lora("sd15_kohya", rank=8, seed=61, dtype=torch.float32, name_filter=lambda n: n.startswith("lora_te"))
    save_file(te, os.path.join(comfy_server.loras, "a57_te_only.safetensors"), {"modelspec.trigger_phrase": "zq7"})
    lc = make_lora("sdxl_kohya_locon", rank=16, seed=62, dtype=torch.float16, max_modules=30,
                   name_filter=lambda n: "lora_unet" in n)
    save_file(lc, os.path.join(comfy_server.loras, "a57_xl_locon.safetensors"), lc.metadata)
    shutil.copy(REAL_LOKR, os.path.join(comfy_server.loras, "a57_lokr.safetensors"))
    names = ["a57_te_only.safetensors", "a57_xl_locon.safetensors", "a57_lokr.safetensors"]
    entry = comfy_server.run({"1": {"class_type": "PackLoRADB", "inputs": {
        "name": "audit57_lossy", "creator": "", "description": "", "tags": "", "optimisation": "prune + int8",
        "recipe": "energy=0.9999", "shared_basis": "auto", "snr_db": 35.0, "overwrite": True,
        "lora_file_1": names[0], "lora_file_2": names[1], "more_files": names[2]}}})
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    assert "SNR" in entry["outputs"]["1"]["text"][0]
    db = os.path.join(comfy_server.base, "loradb", "audit57_lossy.loradb")
    head = json.loads(_cli("list", db, "--json").stdout)
    out = os.path.join(comfy_server.base, "a57_lossy")
    res = _cli("extract", db, "-o", out)
    assert res.returncode == 0, res.stderr
    assert head["entries"][0]["trigger_words"] == ["zq7"]
    for e, src in zip(head["entries"], names):
        got = os.path.join(out, e["file_name"])
        assert _sha(got) == e["output_sha256"]
        if e["lossless"]:
            assert _sha(got) == _sha(os.path.join(comfy_server.loras, src))
            continue
        a_sd, b_sd = _load(os.path.join(comfy_server.loras, src)), _load(got)
        sig = err = 0.0
        for m in LoRAModel.load(os.path.join(comfy_server.loras, src)).modules:
            shape = m.weight_shape()
            x = _patch(comfy_inproc, a_sd, m.name, shape)
            y = _patch(comfy_inproc, b_sd, m.name, shape) if any(k.startswith(m.name + ".") for k in b_sd) \
                else torch.zeros_like(x)
            sig, err = sig + float(x.pow(2).sum()), err + float((x - y).pow(2).sum())
        snr = 10 * math.log10(sig / err) if err else math.inf
        assert snr >= 34.95, (src, snr)
        recorded = (e.get("error") or {}).get("snr_db")
        if recorded is not None:
            assert abs(snr - recorded) < 0.1, (src, snr, recorded)


def test_apply_lora_takes_an_fp8_quantized_lora_from_the_graph(comfy_server):
    """QuantizeInt8 (fp8) → ApplyLoRA: the same image as core's LoraLoader on the saved fp8 file. ApplyLoRA's NaN
    check stopped on fp8 tensors ("isfinite" not implemented for 'Float8_e4m3fn')."""
    ckpt = _ckpt(comfy_server)
    sd = make_lora("sd15_kohya_locon", rank=4, seed=63, dtype=torch.float16)
    save_file(sd, os.path.join(comfy_server.loras, "a57_f8src.safetensors"), sd.metadata)
    quant = {"10": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "a57_f8src.safetensors"}},
             "11": {"class_type": "QuantizeInt8", "inputs": {"lora": ["10", 0], "format": "fp8 (e4m3fn)",
                                                             "method": "rebalance+rotate", "min_snr_db": 40.0,
                                                             "keep_fp16_below": False}}}
    save = dict(quant, **{"12": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["11", 0],
                                                                         "filename_prefix": "a57f8/q",
                                                                         "copy_to_loras": False}}})
    entry = comfy_server.run(save)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    path = _saved(comfy_server, "a57f8")[0]
    with safe_open(path, "pt") as f:
        assert any(f.get_slice(k).get_dtype() == "F8_E4M3" for k in f.keys())
    shutil.copy(path, os.path.join(comfy_server.loras, "a57_f8.safetensors"))
    _, a, b, base = _apply_vs_core(comfy_server, ckpt, quant, ["11", 0], "a57_f8.safetensors", "a57f8img")
    assert abs(a - base).max() > 0 and abs(a - b).max() <= 1
