"""A real ComfyUI for the integration suite (see ../shared/README.md for how to get one here).

Set COMFYUI_DIR to a ComfyUI checkout and run these tests with a Python that has ComfyUI's requirements
(e.g. COMFYUI_DIR=/work/comfyui /work/comfyui-venv/bin/python -m pytest tests/integration). Without
COMFYUI_DIR every test here is skipped with that reason.

Fixtures:
- `comfy_inproc`: ComfyUI's own `comfy.lora.load_lora` + `calculate_weight` in this process, as
  `apply(lora_state_dict, {lora_module_name: model_key}, {model_key: weight}, strength=1.0) -> {model_key: patched}`.
- `comfy_server`: one real server for the session, started with this pack on its custom-node path and
  a temporary loras folder; `.url`, `.loras`, `.output`, `.object_info()`, `.run(prompt) -> history entry`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
PACK_NAME = "comfyui-lora-lens"


def pytest_collection_modifyitems(config, items):
    if COMFYUI_DIR and os.path.isfile(os.path.join(COMFYUI_DIR, "main.py")):
        return
    reason = ("COMFYUI_DIR is not set: no real ComfyUI to test against (see ../shared/README.md)"
              if not COMFYUI_DIR else f"COMFYUI_DIR={COMFYUI_DIR} has no main.py")
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def comfy_inproc():
    if COMFYUI_DIR not in sys.path:
        sys.path.insert(0, COMFYUI_DIR)
    try:
        from comfy.cli_args import args
        args.cpu = True
        import comfy.lora
        import comfy.model_management  # noqa: F401
    except Exception as e:  # missing ComfyUI requirements in this Python
        pytest.skip(f"ComfyUI is not importable in this Python ({e}); use ComfyUI's own environment")
    import torch

    def apply(lora, to_load: dict, weights: dict, strength: float = 1.0) -> dict:
        patches = comfy.lora.load_lora(dict(lora), to_load, log_missing=False)
        out = {}
        for key, w in weights.items():
            patch = patches.get(key)
            w = w.clone().to(torch.float32)
            if patch is not None:
                w = comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)], w, key)
            out[key] = w
        return out
    apply.comfy = comfy
    return apply


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: str, loras: str | None = None):
        self.base = base
        self.loras = loras or os.path.join(base, "loras")
        self.output = os.path.join(base, "output")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "server.log")
        self.proc = None

    def start(self, python: str):
        for d in ("custom_nodes", "loras", "output", "temp", "input", "user", "loradb", "checkpoints"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        os.symlink(ROOT, os.path.join(self.base, "custom_nodes", PACK_NAME))
        cfg = os.path.join(self.base, "extra_model_paths.yaml")
        with open(cfg, "w") as f:
            f.write(f"lens:\n    base_path: {self.base}\n    custom_nodes: custom_nodes\n    loras: {self.loras}\n"
                    f"    loradb: loradb\n    checkpoints: checkpoints\n")
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--extra-model-paths-config", cfg,
             "--output-directory", self.output, "--temp-directory", os.path.join(self.base, "temp"),
             "--input-directory", os.path.join(self.base, "input"),
             "--user-directory", os.path.join(self.base, "user")],
            cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited at start:\n" + open(self.log_path).read()[-3000:])
            try:
                self.get("/object_info/LoadLoRAFile")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError("ComfyUI did not answer in 120 s:\n" + open(self.log_path).read()[-3000:])

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def object_info(self, node: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node}" if node else ""))

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        if status != 200:
            raise AssertionError(f"/prompt refused the prompt ({status}): {json.dumps(body)[:2000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") == "error" or not entry["status"]["completed"]:
                    if entry["status"].get("status_str") == "error":
                        return entry
                return entry
            time.sleep(0.3)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue a prompt and return its /history entry (status, outputs with each node's ui dict)."""
        return self.wait(self.queue(prompt), timeout)


@pytest.fixture(scope="session")
def comfy_server():
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    base = tempfile.mkdtemp(prefix="lens-comfy-")
    server = ComfyServer(base)
    try:
        yield server.start(python)
    finally:
        server.stop()
        if os.environ.get("KEEP_COMFY_TMP") is None:
            shutil.rmtree(base, ignore_errors=True)


def errors_of(entry: dict) -> str:
    """Readable error text of a failed history entry ('' when it succeeded)."""
    msgs = [m for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
    return "; ".join(f"{m[1].get('node_type')}: {m[1].get('exception_message')}" for m in msgs)
