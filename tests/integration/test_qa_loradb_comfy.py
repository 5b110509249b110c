"""QA of PackLoRADB / ExtractLoRADB in a real ComfyUI (/prompt), on inputs the other suites use least:
FLUX PEFT bf16, the real LyCORIS LoKr, an int8 file from `lora-lens quantize`, a fp32 LoCon; a hostile
.loradb and a LoRA Lens app v1.0 file dropped into the loradb folder. Extracted files are loaded with
ComfyUI's own comfy.utils.load_torch_file + comfy.lora.load_lora and applied like the originals."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
import zstandard
from safetensors.torch import save_file as st_save

from lens_ops.cli import main as cli_main
from lens_ops.loradb import open_collection
from lens_ops.loradb.container import _slot_bytes
from lens_ops.st_io import save_file
from lens_ops.synth import make_lora
from integration.conftest import errors_of

REAL_LOKR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
                         "shared", "real_loras", "lycoris_smart_falcon", "smart_falcon_4_lokr.safetensors")
SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight", ".alpha",
            ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lora_mid.weight")


def _loras_dirs(server) -> list[str]:
    """Where ExtractLoRADB's write_to_loras may write: ComfyUI's first loras folder (its own models/loras)
    or the test server's configured one."""
    return [os.path.join(os.environ["COMFYUI_DIR"], "models", "loras"), server.loras]


def _listing(server) -> set:
    return {os.path.join(d, f) for d in _loras_dirs(server) if os.path.isdir(d) for f in os.listdir(d)}


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _shapes(sd: dict) -> dict:
    """Raw module prefix → the weight shape ComfyUI would patch (from the factors themselves)."""
    mods = {}
    for k in sd:
        for s in SUFFIXES:
            if k.endswith(s):
                mods.setdefault(k[: -len(s)], {})[s] = sd[k]
                break
    out = {}
    for p, t in mods.items():
        up = t.get(".lora_up.weight", t.get(".lora_B.weight"))
        down = t.get(".lora_down.weight", t.get(".lora_A.weight"))
        if up is not None and down is not None:
            out[p] = (up.shape[0], *down.shape[1:]) if down.ndim == 4 else (up.shape[0], down.shape[1])
        elif ".lokr_w1" in t or ".lokr_w1_a" in t:
            w1 = t[".lokr_w1"] if ".lokr_w1" in t else t[".lokr_w1_a"].float() @ t[".lokr_w1_b"].float()
            if ".lokr_w2" in t:
                w2s = t[".lokr_w2"].shape
            else:
                a, b = t[".lokr_w2_a"], t[".lokr_w2_b"]
                w2s = (a.shape[0], *b.shape[1:])
            out[p] = (w1.shape[0] * w2s[0], w1.shape[1] * w2s[1], *w2s[2:])
    return out


def _applied(comfy, sd: dict, shapes: dict) -> dict:
    patches = comfy.lora.load_lora(sd, {p: p for p in shapes}, log_missing=False)
    g = torch.Generator().manual_seed(0)
    out = {}
    for p, shp in shapes.items():
        w = 1e-3 * torch.randn(shp, generator=g)
        out[p] = comfy.lora.calculate_weight([(1.0, patches[p], 1.0, None, None)], w.clone(), p) - w \
            if p in patches else None
    return out


def _snr_db(comfy, orig_path: str, new_path: str) -> float:
    """ΔW SNR of `new` against `orig`, both loaded and applied by ComfyUI itself (inf when identical)."""
    a_sd = comfy.utils.load_torch_file(orig_path)
    b_sd = comfy.utils.load_torch_file(new_path)
    shapes = _shapes(a_sd)
    assert shapes, f"no module of {orig_path} is known to this check"
    a, b = _applied(comfy, a_sd, shapes), _applied(comfy, b_sd, shapes)
    assert all(a[p] is not None for p in shapes), "ComfyUI did not load every module of the original"
    assert all(b[p] is not None for p in shapes), "ComfyUI did not load every module of the extracted file"
    sig = sum(float(a[p].double().pow(2).sum()) for p in shapes)
    err = sum(float((a[p].double() - b[p].double()).pow(2).sum()) for p in shapes)
    assert sig > 0
    return float("inf") if err == 0 else 10 * torch.log10(torch.tensor(sig / err)).item()


@pytest.fixture(scope="module")
def sources(comfy_server, tmp_path_factory):
    """Four unusual LoRAs in the server's loras folder: FLUX PEFT bf16, SD1.5 LoCon fp32, the real LoKr,
    and an int8 file written by `lora-lens quantize`."""
    d = tmp_path_factory.mktemp("qa_src")
    names = []
    for lay, dt, fn in (("flux_diffusers_peft", torch.bfloat16, "flux peft ☃ bf16.safetensors"),
                        ("sd15_kohya_locon", torch.float32, "locon_fp32.safetensors")):
        sd = make_lora(lay, rank=4, seed=7, max_modules=6, dtype=dt)
        save_file(sd, os.path.join(comfy_server.loras, fn), sd.metadata)
        names.append(fn)
    if os.path.exists(REAL_LOKR):
        shutil.copy(REAL_LOKR, os.path.join(comfy_server.loras, "smart_falcon_4_lokr.safetensors"))
        names.append("smart_falcon_4_lokr.safetensors")
    src = make_lora("sdxl_kohya", rank=8, seed=3, max_modules=6, dtype=torch.float16)
    save_file(src, str(d / "q.safetensors"), src.metadata)
    assert cli_main(["quantize", str(d / "q.safetensors"), "-o", os.path.join(comfy_server.loras, "q_int8.safetensors")]) == 0
    names.append("q_int8.safetensors")
    return names


def _pack_prompt(name, files, optimisation="none (lossless)", overwrite=True, recipe="energy=0.9999", sb="off"):
    inputs = {"name": name, "creator": "QA ✓", "description": "line 1\nline 2", "tags": "qa, ünï",
              "optimisation": optimisation, "recipe": recipe, "shared_basis": sb, "snr_db": 35.0,
              "overwrite": overwrite, "more_files": "\n".join(files[4:])}
    for i, f in enumerate(files[:4]):
        inputs[f"lora_file_{i + 1}"] = f
    return {"1": {"class_type": "PackLoRADB", "inputs": inputs}}


def test_lossless_pack_extract_write_to_loras_bit_exact(comfy_server, comfy_inproc, sources):
    entry = comfy_server.run(_pack_prompt("qa ☃ lossless", sources))
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    db = os.path.join(comfy_server.base, "loradb", "qa ☃ lossless.loradb")
    assert os.path.exists(db)
    with open_collection(db) as c:
        assert c.collection["creator"] == "QA ✓" and c.collection["tags"] == ["qa", "ünï"]
        assert [e["file_name"] for e in c.entries] == sources
    out = os.path.join(comfy_server.loras, "qa_out")
    os.makedirs(out)
    # ExtractLoRADB: every entry back; the files it writes go to the first loras folder
    prompt = {"1": {"class_type": "ExtractLoRADB", "inputs": {"loradb": "qa ☃ lossless.loradb", "entries": "all",
                                                              "write_to_loras": False}},
              "2": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["1", 0], "filename_prefix": "qa/x",
                                                              "copy_to_loras": False}}}
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    assert cli_main(["extract", db, "-o", out]) == 0
    for f in sources:
        assert _sha(os.path.join(out, f)) == _sha(os.path.join(comfy_server.loras, f)), f
        assert _snr_db(comfy_inproc.comfy, os.path.join(comfy_server.loras, f), os.path.join(out, f)) == float("inf")


def test_int8_pack_applies_within_the_recorded_error(comfy_server, comfy_inproc, sources):
    files = [f for f in sources if "lokr" not in f]      # keep the coded pack small
    entry = comfy_server.run(_pack_prompt("qa int8", files, optimisation="int8", sb="auto"))
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    db = os.path.join(comfy_server.base, "loradb", "qa int8.loradb")
    out = os.path.join(comfy_server.base, "qa_int8_out")
    assert cli_main(["extract", db, "-o", out]) == 0
    with open_collection(db) as c:
        for e in c.entries:
            got = _snr_db(comfy_inproc.comfy, os.path.join(comfy_server.loras, e["file_name"]),
                          os.path.join(out, e["file_name"]))
            rec = (e.get("error") or {}).get("snr_db")
            if rec is None:
                assert got == float("inf"), e["name"]
            else:
                assert rec >= 35.0 - 1e-6 and abs(got - rec) < 0.3, (e["name"], got, rec)


def _with_header(data: bytes, header: dict) -> bytes:
    raw = json.dumps(header).encode()
    stored = zstandard.ZstdCompressor().compress(raw)
    slot = _slot_bytes(99, len(data), len(stored), len(raw), 1, hashlib.sha256(stored).digest())
    b = bytearray(data) + stored
    b[16:80] = slot
    return bytes(b)


def test_hostile_collection_in_the_loradb_folder(comfy_server, sources):
    entry = comfy_server.run(_pack_prompt("qa seed", sources[:2]))
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    seed = os.path.join(comfy_server.base, "loradb", "qa seed.loradb")
    data = open(seed, "rb").read()
    with open_collection(seed) as c:
        header = json.loads(json.dumps(c.header))
    header["collection"]["description"] = "x\x1b[2J\x1b]0;pwned\x07"
    for e in header["entries"]:
        e["file_name"] = "../" + "字" * 120 + "\u202egpj.safetensors"   # both: same, escaping, too long
    header["entries"][0]["trigger_words"] = 5
    with open(os.path.join(comfy_server.base, "loradb", "qa hostile.loradb"), "wb") as f:
        f.write(_with_header(data, header))
    before = _listing(comfy_server)
    prompt = {"1": {"class_type": "ExtractLoRADB", "inputs": {"loradb": "qa hostile.loradb", "entries": "all",
                                                              "write_to_loras": True}}}
    try:
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "success", errors_of(entry)
        text = entry["outputs"]["1"]["text"][0]
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
        new = _listing(comfy_server) - before
        assert len(new) == 2 and all(len(os.path.basename(n).encode()) <= 255 and n.endswith(".safetensors")
                                     and os.path.dirname(n) in _loras_dirs(comfy_server) for n in new), new
        assert {_sha(n) for n in new} == {_sha(os.path.join(comfy_server.loras, f)) for f in sources[:2]}
    finally:
        for n in _listing(comfy_server) - before:
            os.unlink(n)


def test_app_v1_file_with_clashing_names(comfy_server, comfy_inproc):
    g = torch.Generator().manual_seed(1)
    loras = []
    for _ in range(3):
        d = {}
        for m in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"):
            d[m + ".lora_down.weight"] = (0.1 * torch.randn(4, 64, generator=g)).half()
            d[m + ".lora_up.weight"] = (0.02 * torch.randn(80, 4, generator=g)).half()
            d[m + ".alpha"] = torch.tensor(4.0).half()
        loras.append(d)
    t = {"base_" + k: v for k, v in loras[0].items()}
    for i in (1, 2):
        for k, v in loras[i].items():
            if not k.endswith("alpha"):
                t[f"lora{i}_diff_{k}"] = (v.float() - loras[0][k].float()).half()
    names = ["hero.safetensors", "old/hero.safetensors", "D:\\loras\\hero.safetensors"]
    st_save(t, os.path.join(comfy_server.base, "loradb", "qa app.loradb"),
            {"loradb_version": "1.0", "lora_names": json.dumps(names), "base_index": "0", "base_name": names[0],
             "lora_count": "3", "description": "app", "edition": "pro"})
    prompt = {"1": {"class_type": "ExtractLoRADB", "inputs": {"loradb": "qa app.loradb", "entries": "all",
                                                              "write_to_loras": True}}}
    before = _listing(comfy_server)
    try:
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "success", errors_of(entry)
        text = entry["outputs"]["1"]["text"][0]
        assert "lossy source" in text and "Not written" not in text, text
        new = {os.path.basename(n): n for n in _listing(comfy_server) - before}
        assert sorted(new) == ["hero (2).safetensors", "hero (3).safetensors", "hero.safetensors"], new
        comfy = comfy_inproc.comfy
        for fn, want in zip(["hero.safetensors", "hero (2).safetensors", "hero (3).safetensors"], loras):
            got = comfy.utils.load_torch_file(new[fn])
            shapes = _shapes(want)
            a, b = _applied(comfy, want, shapes), _applied(comfy, got, shapes)
            for m in shapes:   # the app's deltas are fp16: equal to the original within fp16 rounding
                assert torch.allclose(a[m], b[m], rtol=0, atol=1e-3 * float(a[m].abs().max())), (fn, m)
    finally:
        for n in _listing(comfy_server) - before:
            os.unlink(n)


def test_pack_overwrite_that_fails_keeps_the_old_collection(comfy_server, sources):
    entry = comfy_server.run(_pack_prompt("qa keep", sources[:1]))
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    db = os.path.join(comfy_server.base, "loradb", "qa keep.loradb")
    before = _sha(db)
    entry = comfy_server.run(_pack_prompt("qa keep", sources[:1], optimisation="prune recipe",
                                          recipe="not_a_recipe=3"))
    assert entry["status"]["status_str"] == "error" and "recipe" in errors_of(entry)
    assert _sha(db) == before
