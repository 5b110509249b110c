"""Every example workflow on a real ComfyUI server, through its HTTP API.

For each example_workflows/api/*.json: the files it names are created first (LoRAs from lens_ops.synth in
SD 1.5 layouts, `.loradb` collections with `python -m lens_ops pack`, checkpoints as the random-weight SD 1.5
checkpoint of tiny_checkpoint.py), the prompt is checked against the server's real /object_info, posted to
/prompt, followed on /history, and its outputs are checked: success, every output node reported, images and
files exist, JSON reports parse, plus per-workflow checks against lens_ops called directly (EXTRA_CHECKS).

Also: the tiny checkpoint samples through core nodes (CheckpointLoaderSimple → CLIPTextEncode ×2 →
EmptyLatentImage 64×64 → KSampler → VAEDecode → PreviewImage), and a core LoraLoader applies a generated
SD 1.5 LoRA to it with no key left unloaded.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
import zlib

import pytest
import torch
from safetensors.torch import save_file

from integration.conftest import ROOT, errors_of
from integration.tiny_checkpoint import cached_sd15_checkpoint

# LENS_WORKFLOWS_DIR: run the suite on another folder of workflows (UI files + api/ twins) instead
WF_DIR = os.environ.get("LENS_WORKFLOWS_DIR") or os.path.join(ROOT, "example_workflows")
API_DIR = os.path.join(WF_DIR, "api")
API_FILES = sorted(glob.glob(os.path.join(API_DIR, "*.json")))
LORA_LAYOUT = "sd15_kohya"   # the tiny checkpoint is SD 1.5, so these LoRAs apply to it
LORA_RANK = 16
TIMINGS: dict[str, float] = {}
LORADB_MEMBERS: dict[str, list[str]] = {}   # .loradb made here -> the LoRA files packed into it (losslessly)


# ----------------------------------------------------------------------------------------- file placement
def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) & 0xFFFF


def make_lora_file(path: str, seed: int, rank: int = LORA_RANK, layout: str = LORA_LAYOUT) -> str:
    from lens_ops.synth import make_lora
    sd = make_lora(layout, rank=rank, seed=seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(dict(sd), path, metadata=dict(getattr(sd, "metadata", None) or {}))
    return path


def place_checkpoint(server, name: str) -> str:
    dest = os.path.join(server.base, "checkpoints", name)
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(cached_sd15_checkpoint(python=os.environ.get("COMFYUI_PYTHON", sys.executable)), dest)
    return dest


def make_loradb(server, name: str, members: list[str] | None = None) -> str:
    """A .loradb in the server's loradb folder, packed with the pack's CLI from generated SD 1.5 LoRAs (named
    `members` when the workflow names entries, else three)."""
    dest = os.path.join(server.base, "loradb", name)
    if os.path.exists(dest):
        return dest
    src = os.path.join(server.base, "loradb-src", os.path.splitext(name)[0])
    members = members or [f"member_{i}" for i in range(3)]
    files = [make_lora_file(os.path.join(src, m if m.endswith(".safetensors") else m + ".safetensors"),
                            _seed(name) + i, rank=8) for i, m in enumerate(members)]
    LORADB_MEMBERS[dest] = files
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "lens_ops", "pack", "-o", dest, *files], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"lora-lens pack failed:\n{r.stdout}\n{r.stderr}"
    return dest


def prepare(server, prompt: dict) -> dict:
    """Create every file the prompt names; returns {input value: path} of what was made."""
    made = {}
    entries = [e.strip() for n in prompt.values() for e in re.split(r"[,\n]", str(n["inputs"].get("entries", "")))
               if e.strip() and e.strip().lower() != "all" and not isinstance(n["inputs"].get("entries"), list)]
    for node in prompt.values():
        for inp, value in node["inputs"].items():
            if not isinstance(value, str) or value in made:
                continue
            if inp == "ckpt_name":
                made[value] = place_checkpoint(server, value)
            elif value.endswith(".loradb"):
                made[value] = make_loradb(server, value, entries or None)
            elif value.endswith(".safetensors"):
                path = os.path.join(server.loras, value)
                made[value] = path if os.path.exists(path) else make_lora_file(path, _seed(value))
    return made


def temp_dir(server) -> str:
    """Where PreviewImage writes: ComfyUI puts a 'temp' folder inside --temp-directory."""
    return os.path.join(server.base, "temp", "temp")


# The examples sample at 512×512 with 20 steps, which takes many minutes per image on a CPU with a full-size SD 1.5
# UNet; the suites shrink only these sampling sizes (LENS_FULL_SIZE=1 runs them as shipped).
FAST_OVERRIDES = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2}}


def fast(prompt: dict) -> dict:
    if os.environ.get("LENS_FULL_SIZE"):
        return prompt
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        for inp, value in FAST_OVERRIDES.get(node["class_type"], {}).items():
            if inp in node["inputs"] and not isinstance(node["inputs"][inp], list):
                node["inputs"][inp] = value
    return out


def fresh_outputs(server, prompt: dict):
    """Remove what an earlier run of this workflow wrote where it refuses to overwrite (PackLoRADB's
    <name>.loradb with overwrite off), so a workflow can be run again on the same server."""
    for node in prompt.values():
        if node["class_type"] == "PackLoRADB" and not node["inputs"].get("overwrite"):
            path = os.path.join(server.base, "loradb", f"{node['inputs'].get('name')}.loradb")
            if os.path.exists(path):
                os.unlink(path)
                LORADB_MEMBERS.pop(path, None)


def free_cache(server):
    """Drop ComfyUI's node cache so the next prompt really executes (and unload models)."""
    import urllib.request
    req = urllib.request.Request(server.url + "/free", data=json.dumps({"unload_models": True, "free_memory": True})
                                 .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:   # answers 200 with an empty body
        assert r.status == 200
    time.sleep(1.5)   # the worker applies the flag when it wakes; a prompt queued at once could run first


# ----------------------------------------------------------------------------------------- output checks
def _files_under(*dirs) -> set:
    out = set()
    for d in dirs:
        for root, _, fs in os.walk(d):
            out |= {os.path.join(root, f) for f in fs}
    return out


def _json_strings(value):
    """Strings in a ui value that claim to be JSON."""
    if isinstance(value, str):
        if value.lstrip()[:1] in ("{", "["):
            yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _json_strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _json_strings(v)


def check_outputs(server, prompt: dict, entry: dict, info: dict, new_files: set):
    outputs = entry.get("outputs", {})
    out_nodes = [nid for nid, n in prompt.items() if info[n["class_type"]].get("output_node")]
    assert out_nodes, "an example workflow must have an output node"
    for nid in out_nodes:
        assert nid in outputs, f"output node {nid} ({prompt[nid]['class_type']}) reported nothing"
    for nid, ui in outputs.items():
        for key, value in ui.items():
            for text in _json_strings(value):
                try:
                    json.loads(text)
                except json.JSONDecodeError as e:
                    raise AssertionError(f"node {nid} ui[{key!r}] looks like JSON but does not parse: {e}") from None
            if key == "images":
                for img in value:
                    root = server.output if img.get("type") == "output" else temp_dir(server)
                    path = os.path.join(root, img.get("subfolder", ""), img["filename"])
                    assert os.path.isfile(path) and os.path.getsize(path) > 0, f"image {path} missing"
                    import numpy as np
                    from PIL import Image
                    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
                    assert pixels.std() > 0, f"image {path} is one flat colour (NaN/inf upstream?)"
            if key == "lora_files":   # SaveLoRAFile: the file exists, the engine reads it, provenance recorded
                from lens_ops import LoRAModel
                for item in value:
                    path = os.path.join(server.output, item.get("subfolder", ""), item["filename"])
                    assert os.path.isfile(path), f"node {nid} reports {path}, which does not exist"
                    saved = LoRAModel.load(path)
                    assert len(saved.modules) > 0 and "lora_lens.provenance" in (saved.metadata or {}), path
    writers = [n["class_type"] for n in prompt.values() if n["class_type"].startswith(("Save", "Pack"))]
    if writers:
        assert new_files, f"{', '.join(writers)} ran but no file appeared in output/, loras/ or loradb/"


def run_workflow(server, prompt: dict, timeout: float = 900) -> tuple[dict, set, float]:
    dirs = (server.output, server.loras, os.path.join(server.base, "loradb"))
    before = _files_under(*dirs)
    t0 = time.time()
    entry = server.run(prompt, timeout=timeout)
    return entry, _files_under(*dirs) - before, time.time() - t0


# ----------------------------------------------------------------------------------------- per-workflow checks
def _check_load_inspect_save(server, prompt, entry, made, new_files):
    """The saved copy holds exactly the loaded LoRA's tensors (lens_ops reads both)."""
    from lens_ops import LoRAModel
    src = LoRAModel.load(made[prompt["1"]["inputs"]["lora_name"]])
    saved = [f for f in new_files if f.startswith(server.output) and f.endswith(".safetensors")]
    assert len(saved) == 1, saved
    out = LoRAModel.load(saved[0])
    assert {m.name for m in out.modules} == {m.name for m in src.modules}
    a = {m.name: m for m in src.modules}
    for m in out.modules:
        for role, t in m.tensors.items():
            assert torch.equal(t, a[m.name].tensors[role]), (m.name, role)


def _snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    err = (out - ref).norm().item()
    return float("inf") if err == 0 else 20 * __import__("math").log10(ref.norm().item() / err)


def _saved_files(server, new_files) -> list[str]:
    return sorted(f for f in new_files if f.startswith(server.output) and f.endswith(".safetensors"))


def _check_ultra_compress(server, prompt, entry, made, new_files):
    """prune (energy 0.99) → int8: every module's ΔW, computed by lens_ops in float64 from the source and from the
    saved file, agrees to ≥ 19.5 dB (keeping 99 % of the energy leaves ≤ 1 % error energy = 20 dB, int8 adds
    little), the file is far smaller, and its factors are int8."""
    from lens_ops import LoRAModel
    src = LoRAModel.load(made[prompt["1"]["inputs"]["lora_name"]])
    saved = _saved_files(server, new_files)
    assert len(saved) == 1, saved
    out = LoRAModel.load(saved[0])
    assert os.path.getsize(saved[0]) < 0.5 * os.path.getsize(src.source or made[prompt["1"]["inputs"]["lora_name"]])
    assert any(t.dtype == torch.int8 for m in out.modules for t in m.tensors.values()), "no int8 factors saved"
    by_name = {m.name: m for m in out.modules}
    worst = min(_snr_db(m.delta(torch.float64), by_name[m.name].delta(torch.float64)) for m in src.modules)
    assert worst >= 19.5, f"worst module ΔW SNR {worst:.1f} dB after prune 0.99 + int8"


def _source_file(prompt, link, made) -> str | None:
    """The LoRA file behind a LORA_MODEL link when it comes straight from LoadLoRAFile at strength 1."""
    if not isinstance(link, list):
        return None
    src = prompt.get(link[0], {})
    if src.get("class_type") != "LoadLoRAFile" or src["inputs"].get("bake_strength", 1.0) != 1.0:
        return None
    return made.get(src["inputs"].get("lora_name"))


def _tensors(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def _node_conflict_scan(server, prompt, nid, entry, made, new_files):
    """The conflict score and the recommended ratio the node shows equal lens_ops.conflict.scan's on the files."""
    a = _source_file(prompt, prompt[nid]["inputs"].get("lora_a"), made)
    b = _source_file(prompt, prompt[nid]["inputs"].get("lora_b"), made)
    if not (a and b):
        return
    from lens_ops import LoRAModel
    from lens_ops.conflict import scan
    kw = {}
    if isinstance(prompt[nid]["inputs"].get("problem_threshold"), (int, float)):
        kw["problem_threshold"] = prompt[nid]["inputs"]["problem_threshold"]
    rep = scan(LoRAModel.load(a), LoRAModel.load(b), **kw)
    view = entry["outputs"][nid]["lens_conflict"][0]
    assert abs(view["overall"] - rep["overall"]["conflict_score"]) <= 1e-4 * max(1.0, abs(view["overall"]))
    assert view["ratio"] == rep["recommended_ratio"]["text"]
    assert view["problems"] == len(rep["problem_modules"])


def _node_pack_loradb(server, prompt, nid, entry, made, new_files):
    """A lossless PackLoRADB collection gives back every packed file byte for byte."""
    inputs = prompt[nid]["inputs"]
    if not str(inputs.get("optimisation", "")).startswith("none"):
        return
    dbs = [f for f in new_files if f.endswith(".loradb")]
    assert len(dbs) == 1, f"PackLoRADB wrote {dbs}"
    sources = [made[v] for k, v in inputs.items() if k.startswith("lora_file_") and v in made]
    from lens_ops.loradb import open_collection
    with open_collection(dbs[0]) as col:
        got = {bytes(col.extract_bytes(e)) for e in col.entries}
    for path in sources:
        assert open(path, "rb").read() in got, f"{os.path.basename(path)} does not come back bit-exact"
    LORADB_MEMBERS[dbs[0]] = sources   # a later workflow extracting from it is checked against these


def _node_extract_loradb(server, prompt, nid, entry, made, new_files):
    """Entries extracted from a collection packed here (losslessly) and saved are the packed LoRAs' tensors."""
    members = LORADB_MEMBERS.get(os.path.join(server.base, "loradb", str(prompt[nid]["inputs"].get("loradb"))))
    saved = _saved_files(server, new_files)
    if not members or not saved:
        return
    originals = [_tensors(m) for m in members]
    for path in saved:
        t = _tensors(path)
        same = [o for o in originals if o.keys() == t.keys() and all(torch.equal(o[k], t[k]) for k in o)]
        assert same, f"{path} is none of the packed LoRAs"


NODE_CHECKS = {   # run for every node of the type, in any workflow
    "ConflictScan": _node_conflict_scan,
    "PackLoRADB": _node_pack_loradb,
    "ExtractLoRADB": _node_extract_loradb,
}


def _check_batch_folder(server, prompt, entry, made, new_files):
    """The batch example as meant: `lora-lens queue` sends it once per LoRA of a folder to this server; every
    LoRA gets a pruned file and the summary lists them."""
    folder = os.path.join(server.loras, "batch_example")
    for i in range(3):
        make_lora_file(os.path.join(folder, f"batch_{i}.safetensors"), 900 + i)
    wf = os.path.join(server.base, "batch_workflow.json")
    with open(wf, "w") as f:
        json.dump(prompt, f)
    summary = os.path.join(server.base, "batch_summary.json")
    r = subprocess.run([sys.executable, "-m", "lens_ops", "queue", "--server", server.url, "--workflow", wf,
                        "--over", folder, "--names-relative-to", server.loras, "--summary", summary],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.load(open(summary))
    assert data["succeeded"] == 3, data
    for job in data["jobs"]:
        assert job["output_files"], job
        for rel in job["output_files"]:
            assert os.path.isfile(os.path.join(server.output, rel)), rel


EXTRA_CHECKS = {
    "08_batch_optimise_folder": _check_batch_folder,
    "01_load_inspect_save": _check_load_inspect_save,
    "05_ultra_compress": _check_ultra_compress,
}


# ----------------------------------------------------------------------------------------- tests
def _sample_prompt(ckpt: str, lora: str | None = None, strength: float = 1.0, steps: int = 2, seed: int = 7) -> dict:
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                  "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": 5.0,
                                                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    if lora:
        p["8"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                        "strength_model": strength, "strength_clip": strength}}
        p["2"]["inputs"]["clip"] = ["8", 1]
        p["3"]["inputs"]["clip"] = ["8", 1]
        p["5"]["inputs"]["model"] = ["8", 0]
    return p


def _image(server, entry, nid="7"):
    import numpy as np
    from PIL import Image
    img = entry["outputs"][nid]["images"][0]
    root = server.output if img.get("type") == "output" else temp_dir(server)
    path = os.path.join(root, img["subfolder"], img["filename"])
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64), path


def _log_since(server, offset: int) -> str:
    with open(server.log_path, errors="replace") as f:
        f.seek(offset)
        return f.read()


def test_tiny_checkpoint_samples(comfy_server):
    """CheckpointLoaderSimple loads the random SD 1.5 checkpoint as SD1.5 and a 2-step 64×64 sample decodes;
    the image is exactly what ComfyUI computed (the same prompt repeats bit for bit) and not one flat colour."""
    place_checkpoint(comfy_server, "tiny_sd15.safetensors")
    choices = comfy_server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]
    assert "tiny_sd15.safetensors" in choices["ckpt_name"][0]
    prompt = _sample_prompt("tiny_sd15.safetensors")
    assert __import__("lens_ops.workflow", fromlist=["x"]).check_prompt(prompt, comfy_server.object_info()) == []
    off = os.path.getsize(comfy_server.log_path)
    entry, _, secs = run_workflow(comfy_server, prompt)
    TIMINGS["tiny checkpoint: 2-step 64x64 sample"] = secs
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    log = _log_since(comfy_server, off)
    assert "model_type EPS" in log, log[-2000:]
    assert "unet missing" not in log and "clip missing" not in log, log[-2000:]
    img, path = _image(comfy_server, entry)
    assert img.shape == (64, 64, 3)
    assert img.std() > 0.5, f"{path} is one flat colour (NaN/inf in sampling or decoding?)"


def test_core_lora_loader_applies_sd15_lora(comfy_server):
    """A generated SD 1.5 kohya LoRA (rank 4) through core LoraLoader: every key applies (no 'lora key not
    loaded' in the server log) and, at a visible strength, the sample changes."""
    from lens_ops.synth import make_lora
    place_checkpoint(comfy_server, "tiny_sd15.safetensors")
    sd = make_lora("sd15_kohya", rank=4, seed=3)
    save_file(dict(sd), os.path.join(comfy_server.loras, "sd15_r4.safetensors"))
    base, _ = _image(comfy_server, comfy_server.run(_sample_prompt("tiny_sd15.safetensors", seed=11)))
    off = os.path.getsize(comfy_server.log_path)
    entry, _, secs = run_workflow(comfy_server, _sample_prompt("tiny_sd15.safetensors", "sd15_r4.safetensors",
                                                               strength=8.0, seed=11))
    TIMINGS["tiny checkpoint + LoraLoader (sd15_kohya r4)"] = secs
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    log = _log_since(comfy_server, off)
    assert "lora key not loaded" not in log, [l for l in log.splitlines() if "lora key not loaded" in l][:5]
    with_lora, _ = _image(comfy_server, entry)
    assert abs(with_lora - base).max() > 0, "the LoRA changed nothing in the sample"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: os.path.splitext(os.path.basename(p))[0])
def test_example_workflow_runs(path, comfy_server):
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        prompt = json.load(f)
    made = prepare(comfy_server, prompt)
    info = comfy_server.object_info()
    from lens_ops.workflow import check_prompt
    assert check_prompt(prompt, info) == [], f"{name} does not fit this server's /object_info"
    fresh_outputs(comfy_server, prompt)
    free_cache(comfy_server)
    off = os.path.getsize(comfy_server.log_path)
    entry, new_files, secs = run_workflow(comfy_server, fast(prompt))
    unloaded = [l for l in _log_since(comfy_server, off).splitlines() if "lora key not loaded" in l]
    assert not unloaded, f"{name}: a LoRA did not fully apply to the model: {unloaded[:5]}"
    TIMINGS[name] = secs
    assert entry["status"]["status_str"] == "success", f"{name}: {errors_of(entry)}"
    check_outputs(comfy_server, prompt, entry, info, new_files)
    for nid, node in prompt.items():
        check = NODE_CHECKS.get(node["class_type"])
        if check:
            check(comfy_server, prompt, nid, entry, made, new_files)
    extra = EXTRA_CHECKS.get(name)
    if extra:
        extra(comfy_server, prompt, entry, made, new_files)


def test_template_browser_lists_exactly_the_examples(comfy_server):
    """ComfyUI's template browser lists every .json in the pack's example_workflows/ as a template: each must
    be a UI workflow the frontend can open, and every example must be listed."""
    from integration.conftest import PACK_NAME
    listed = sorted(comfy_server.get("/api/workflow_templates").get(PACK_NAME, []))
    api_dir = os.path.join(ROOT, "example_workflows", "api")
    ui_names = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(api_dir, "*.json")))
    not_workflows = []
    for name in listed:
        data = comfy_server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        if not (isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data):
            not_workflows.append(name)
    assert not not_workflows, (f"the template browser lists {not_workflows}, which are not UI workflows "
                               "(keep only workflows in example_workflows/)")
    assert listed == ui_names


def test_zz_report_timings(comfy_server):
    """Not a check: prints how long each run took on this machine (run pytest with -s to see it)."""
    print("\nworkflow timings on this machine (s):")
    for k, v in TIMINGS.items():
        print(f"  {v:7.1f}  {k}")
