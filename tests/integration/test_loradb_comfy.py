"""PackLoRADB / ExtractLoRADB in a real ComfyUI: pack three LoRAs through /prompt, extract one, apply it
with core's own load_lora + calculate_weight and compare with the original."""
import hashlib
import os

import torch
from safetensors.torch import load_file

from lens_ops.st_io import save_file
from lens_ops.synth import make_lora
from integration.conftest import errors_of


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_pack_extract_apply(comfy_server, comfy_inproc):
    names = []
    for i in range(3):
        sd = make_lora("sdxl_kohya", rank=4, seed=40 + i, max_modules=8)
        name = f"lens_db_{i}.safetensors"
        save_file(sd, os.path.join(comfy_server.loras, name), sd.metadata)
        names.append(name)
    info = comfy_server.object_info("PackLoRADB")["PackLoRADB"]
    assert names[0] in info["input"]["optional"]["lora_file_1"][0]
    # one LoRA from the graph (LoadLoRAFile → list input), two picked from the loras folder
    prompt = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": names[0]}},
              "2": {"class_type": "PackLoRADB",
                    "inputs": {"name": "itest", "creator": "ci", "description": "three LoRAs", "tags": "a, b",
                               "optimisation": "none (lossless)", "recipe": "energy=0.9997", "shared_basis": "off",
                               "snr_db": 35.0, "overwrite": True, "loras": ["1", 0], "lora_names": "graph_lora",
                               "lora_file_1": names[1], "lora_file_2": names[2]}}}
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    report = entry["outputs"]["2"]["text"][0]
    assert "3 entries" in report
    db = os.path.join(comfy_server.base, "loradb", "itest.loradb")   # the yaml's `loradb: loradb` folder
    assert os.path.exists(db)
    choices = comfy_server.object_info("ExtractLoRADB")["ExtractLoRADB"]["input"]["required"]["loradb"][0]
    assert "itest.loradb" in choices
    # extract one entry, save it through SaveLoRAFile, and write it to the loras folder
    prompt = {"1": {"class_type": "ExtractLoRADB", "inputs": {"loradb": "itest.loradb", "entries": "lens_db_1",
                                                              "write_to_loras": False}},
              "2": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["1", 0], "filename_prefix": "dbx/out",
                                                              "copy_to_loras": False}}}
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    shown = entry["outputs"]["1"]["text"][0]
    assert "graph_lora" in shown and "lens_db_2" in shown and "Collection: itest by ci" in shown
    files = os.listdir(os.path.join(comfy_server.output, "dbx"))
    assert len(files) == 1
    got = load_file(os.path.join(comfy_server.output, "dbx", files[0]))
    orig = load_file(os.path.join(comfy_server.loras, names[1]))
    assert set(got) == set(orig) and all(torch.equal(got[k], orig[k]) for k in orig)
    # apply the extracted LoRA with ComfyUI's own code and compare with the original applied the same way
    mod = next(k[: -len(".lora_up.weight")] for k in orig if k.endswith(".lora_up.weight"))
    up = orig[mod + ".lora_up.weight"]
    base = 1e-3 * torch.randn(up.shape[0], orig[mod + ".lora_down.weight"].shape[1])
    a = comfy_inproc(got, {mod: "w"}, {"w": base})["w"]
    b = comfy_inproc(orig, {mod: "w"}, {"w": base})["w"]
    assert not torch.equal(a, base) and torch.equal(a, b)
    # the extracted bytes (CLI route, same engine) equal the original file
    from lens_ops.loradb import open_collection
    with open_collection(db) as c:
        res = c.extract_to(os.path.join(comfy_server.base, "x"), ["lens_db_1"])
    assert _sha(res["written"][0]["path"]) == _sha(os.path.join(comfy_server.loras, names[1]))


def test_extract_all_to_loras_folder(comfy_server):
    sd = make_lora("sd15_kohya", rank=2, seed=7, max_modules=4)
    save_file(sd, os.path.join(comfy_server.loras, "solo_src.safetensors"), sd.metadata)
    entry = comfy_server.run({"1": {"class_type": "PackLoRADB",
                                    "inputs": {"name": "solo", "creator": "", "description": "", "tags": "",
                                               "optimisation": "none (lossless)", "recipe": "", "shared_basis": "off",
                                               "snr_db": 35.0, "overwrite": True, "lora_file_1": "solo_src.safetensors"}}})
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    os.rename(os.path.join(comfy_server.loras, "solo_src.safetensors"), os.path.join(comfy_server.base, "moved.st"))
    # the first loras folder may be ComfyUI's own models/loras: remove what we write there afterwards
    candidates = [os.path.join(comfy_server.loras, "solo_src.safetensors")]
    if os.environ.get("COMFYUI_DIR"):
        candidates.append(os.path.join(os.environ["COMFYUI_DIR"], "models", "loras", "solo_src.safetensors"))
    try:
        entry = comfy_server.run({"1": {"class_type": "ExtractLoRADB",
                                        "inputs": {"loradb": "solo.loradb", "entries": "all", "write_to_loras": True}}})
        assert entry["status"]["status_str"] == "success", errors_of(entry)
        text = entry["outputs"]["1"]["text"][0]
        assert "Wrote solo_src.safetensors to the loras folder" in text
        choices = comfy_server.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
        assert "solo_src.safetensors" in choices
        written = [c for c in candidates if os.path.exists(c)]
        assert written and _sha(written[0]) == _sha(os.path.join(comfy_server.base, "moved.st"))
    finally:
        for c in candidates:
            if os.path.exists(c):
                os.unlink(c)


def test_lossy_pack_extract_apply(comfy_server, comfy_inproc):
    """Quantised-coefficient coding + shared basis through /prompt: the extracted LoRA, applied by ComfyUI's
    own code, stays within the 35 dB ΔW budget of the original (whole LoRA), and the report says so."""
    base = make_lora("sdxl_kohya", rank=8, seed=77, max_modules=6, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    names = []
    for i in range(3):   # checkpoints of one run: up factors drift inside their span
        sd = {k: ((v @ (torch.eye(v.shape[1]) + 0.1 * torch.randn(v.shape[1], v.shape[1], generator=g)))
                  if k.endswith("lora_up.weight") and v.ndim == 2 else v).half() for k, v in base.items()}
        name = f"lens_dbq_{i}.safetensors"
        save_file(sd, os.path.join(comfy_server.loras, name), base.metadata)
        names.append(name)
    entry = comfy_server.run({"1": {"class_type": "PackLoRADB",
                                    "inputs": {"name": "itestq", "creator": "ci", "description": "", "tags": "",
                                               "optimisation": "int8", "recipe": "", "shared_basis": "auto",
                                               "snr_db": 35.0, "overwrite": True, "lora_file_1": names[0],
                                               "lora_file_2": names[1], "lora_file_3": names[2]}}})
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    report = entry["outputs"]["1"]["text"][0]
    assert "3 entries" in report and "SNR" in report
    entry = comfy_server.run({"1": {"class_type": "ExtractLoRADB", "inputs": {"loradb": "itestq.loradb",
                                                                              "entries": "lens_dbq_1",
                                                                              "write_to_loras": False}},
                              "2": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["1", 0],
                                                                             "filename_prefix": "dbq/out",
                                                                             "copy_to_loras": False}}})
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    files = os.listdir(os.path.join(comfy_server.output, "dbq"))
    got = load_file(os.path.join(comfy_server.output, "dbq", files[0]))
    orig = load_file(os.path.join(comfy_server.loras, names[1]))
    sig = err = 0.0
    mods = [k[: -len(".lora_up.weight")] for k in orig if k.endswith(".lora_up.weight")]
    for mod in mods:
        down = orig[mod + ".lora_down.weight"]
        w = 1e-3 * torch.randn(orig[mod + ".lora_up.weight"].shape[0], *down.shape[1:])
        b = comfy_inproc(orig, {mod: "w"}, {"w": w})["w"].double()
        a = comfy_inproc(got, {mod: "w"}, {"w": w})["w"].double() if mod + ".lora_up.weight" in got else w.double()
        sig += float((b - w.double()).pow(2).sum())
        err += float((a - b).pow(2).sum())
    assert sig > 0 and 10 * torch.log10(torch.tensor(sig / err)).item() >= 35.0 - 0.05
