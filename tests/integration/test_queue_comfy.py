"""`lora-lens queue` against real ComfyUI servers: prompts spread over two servers, a dead server's
prompts retried elsewhere, outputs and summary written."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from safetensors.torch import save_file

from integration.conftest import ComfyServer
from lora_factory import convention_lora, gen

WORKFLOW = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "x"}},
            "2": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["1", 0], "filename_prefix": "queued/lora",
                                                            "copy_to_loras": False}}}


@pytest.fixture(scope="module")
def second_server(comfy_server):
    base = tempfile.mkdtemp(prefix="lens-comfy2-")
    server = ComfyServer(base, loras=comfy_server.loras)
    try:
        yield server.start(os.environ.get("COMFYUI_PYTHON", sys.executable))
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_queue_spreads_and_retries(comfy_server, second_server, tmp_path):
    folder = os.path.join(comfy_server.loras, "batch")
    os.makedirs(folder, exist_ok=True)
    for i in range(6):
        save_file(convention_lora("kohya_unet", gen(100 + i)), os.path.join(folder, f"q{i}.safetensors"))
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(WORKFLOW))
    summary = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, "-m", "lens_ops", "queue", "--server", comfy_server.url,
                        "--server", second_server.url, "--server", "http://127.0.0.1:9",
                        "--workflow", str(wf), "--over", folder, "--names-relative-to", comfy_server.loras,
                        "--per-server", "1", "--summary", str(summary)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(summary.read_text())
    assert data["succeeded"] == 6
    servers = {j["server"] for j in data["jobs"]}
    assert servers == {comfy_server.url, second_server.url}
    assert all(len(j["output_files"]) == 1 and j["output_files"][0].startswith("queued/lora_") for j in data["jobs"])
    written = os.listdir(os.path.join(comfy_server.output, "queued")) + \
        os.listdir(os.path.join(second_server.output, "queued"))
    assert len(written) == 6
