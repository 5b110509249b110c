"""Batch runs: workflow substitution, UI→API conversion and checks, the queue scheduler against fake
servers (shortest queue first, retry when a server goes away, refusals, Ctrl-C), and `lora-lens batch`."""
import json
import os

import pytest
from safetensors.torch import save_file

from lens_ops import LensError
from lens_ops.cli import main
from lens_ops.comfy_api import ServerGone
from lens_ops.queue_runner import Job, QueueRunner
from lens_ops.workflow import apply_sets, check_prompt, expand_over, lora_inputs, parse_sets, ui_to_api
from lora_factory import convention_lora, gen

PROMPT = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "x"}},
          "2": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["1", 0], "filename_prefix": "a", "copy_to_loras": False}}}


def test_sets_and_lora_inputs():
    p = apply_sets(PROMPT, parse_sets(["2.filename_prefix=out/b", "SaveLoRAFile.copy_to_loras=true"]))
    assert p["2"]["inputs"]["filename_prefix"] == "out/b" and p["2"]["inputs"]["copy_to_loras"] is True
    assert PROMPT["2"]["inputs"]["filename_prefix"] == "a"
    assert lora_inputs(p) == [("1", "lora_name")]
    with pytest.raises(LensError, match="NODE.INPUT=VALUE"):
        parse_sets(["nonsense"])
    with pytest.raises(LensError, match="not in the workflow"):
        apply_sets(PROMPT, parse_sets(["9.x=1"]))


def test_expand_over(tmp_path):
    (tmp_path / "sub").mkdir()
    for n in ("a.safetensors", "sub/b.safetensors", "c.txt"):
        (tmp_path / n).write_bytes(b"")
    files, root = expand_over(str(tmp_path))
    assert [os.path.relpath(f, root) for f in files] == ["a.safetensors", os.path.join("sub", "b.safetensors")]
    with pytest.raises(LensError, match="No .safetensors"):
        expand_over(str(tmp_path / "nothing*"))


OBJECT_INFO = {
    "LoadLoRAFile": {"input": {"required": {"lora_name": [["a.safetensors", "b.safetensors"], {}]},
                               "optional": {"bake_strength": ["FLOAT", {"min": -10, "max": 10}]}},
                     "output": ["LORA_MODEL", "STRING"]},
    "SaveLoRAFile": {"input": {"required": {"lora": ["LORA_MODEL", {}], "filename_prefix": ["STRING", {}],
                                            "copy_to_loras": ["BOOLEAN", {}]}}, "output": ["STRING"]},
    "KSampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                        "steps": ["INT", {"min": 1, "max": 100}]}}, "output": ["LATENT"]},
}


def test_ui_to_api_and_checks():
    ui = {"nodes": [{"id": 1, "type": "LoadLoRAFile", "widgets_values": ["a.safetensors", 1.0], "inputs": []},
                    {"id": 2, "type": "SaveLoRAFile", "widgets_values": ["out/x", True],
                     "inputs": [{"name": "lora", "type": "LORA_MODEL", "link": 5}]},
                    {"id": 3, "type": "Note", "widgets_values": ["hello"]},
                    {"id": 4, "type": "KSampler", "widgets_values": [42, "randomize", 7], "inputs": []}],
          "links": [[5, 1, 0, 2, 0, "LORA_MODEL"]]}
    api = ui_to_api(ui, OBJECT_INFO)
    assert set(api) == {"1", "2", "4"}
    assert api["1"]["inputs"] == {"lora_name": "a.safetensors", "bake_strength": 1.0}
    assert api["2"]["inputs"] == {"filename_prefix": "out/x", "copy_to_loras": True, "lora": ["1", 0]}
    assert api["4"]["inputs"] == {"seed": 42, "steps": 7}
    problems = check_prompt(api, OBJECT_INFO)
    assert problems == ["node 4 (KSampler): required input model missing"]
    api["1"]["inputs"]["lora_name"] = "zzz.safetensors"
    api["1"]["inputs"]["bake_strength"] = 50
    api["2"]["inputs"]["lora"] = ["1", 1]
    text = "\n".join(check_prompt(api, OBJECT_INFO))
    assert "not one of its choices" in text and "outside" in text and "expects LORA_MODEL but gets STRING" in text


class FakeServer:
    """Stands in for ComfyClient: a queue length, prompts it finishes when asked, or gone."""
    def __init__(self, url, queue_len=0, gone=False, refuse=False):
        self.url, self.alive, self.q, self.gone, self.refuse = url, True, queue_len, gone, refuse
        self.submitted, self.deleted, self.interrupted = [], [], []

    def queue_remaining(self):
        if self.gone:
            raise ServerGone(self.url)
        return self.q

    def submit(self, prompt):
        if self.gone:
            raise ServerGone(self.url)
        if self.refuse:
            raise LensError(f"{self.url} refused the prompt: bad input")
        self.submitted.append(prompt)
        return f"{self.url}-{len(self.submitted)}"

    def history(self, pid):
        if self.gone:
            raise ServerGone(self.url)
        return {"status": {"completed": True, "status_str": "success", "messages": []},
                "outputs": {"2": {"text": [f"done {pid}"], "images": [{"filename": f"{pid}.png", "subfolder": "o"}]}}}

    def listen(self, on_event, stop):
        return None

    def delete(self, ids):
        self.deleted += ids

    def interrupt(self, pid=None):
        self.interrupted.append(pid)


def jobs(n):
    return [Job(f"l{i}.safetensors", {"i": i}) for i in range(n)]


def test_scheduler_prefers_shorter_queue_and_collects_outputs():
    busy, idle = FakeServer("busy", queue_len=10), FakeServer("idle", queue_len=0)
    js = QueueRunner([busy, idle], jobs(2), per_server=2, poll_seconds=0).run()
    assert all(j.status == "success" for j in js)
    assert len(idle.submitted) == 2 and not busy.submitted
    assert js[0].files == ["o/idle-1.png"] and js[0].reports == ["done idle-1"]


def test_scheduler_retries_on_another_server_when_one_goes_away():
    dead, ok = FakeServer("dead", gone=True), FakeServer("ok", queue_len=5)
    js = QueueRunner([dead, ok], jobs(3), poll_seconds=0).run()
    assert all(j.status == "success" and j.server == "ok" for j in js)
    assert not dead.alive


def test_scheduler_reports_refusals_and_total_loss():
    js = QueueRunner([FakeServer("r", refuse=True)], jobs(1), poll_seconds=0).run()
    assert js[0].status == "error" and "refused" in js[0].error
    js = QueueRunner([FakeServer("d", gone=True)], jobs(2), poll_seconds=0).run()
    assert all(j.status == "error" for j in js)


def test_cancel_deletes_and_interrupts_only_ours():
    s = FakeServer("s")
    runner = QueueRunner([s], jobs(2), poll_seconds=99)
    runner._dispatch()
    runner.cancel()
    assert sorted(s.deleted) == ["s-1", "s-2"] and sorted(s.interrupted) == ["s-1", "s-2"]
    assert all(j.status == "cancelled" for j in runner.jobs)


def test_batch_runs_in_process(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    for i in range(2):
        save_file(convention_lora("kohya_unet", gen(i)), str(loras / f"l{i}.safetensors"))
    (loras / "broken.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all}")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(PROMPT))
    out = tmp_path / "out"
    rc = main(["batch", "--workflow", str(wf), "--over", str(loras), "-o", str(out), "--set", "2.filename_prefix=r/x"])
    assert rc == 1  # the broken file fails, the others succeed
    summary = json.loads((out / "summary.json").read_text())
    by = {j["lora"]: j for j in summary["jobs"]}
    assert by["broken.safetensors"]["status"] == "error" and "not JSON" in by["broken.safetensors"]["error"]
    assert by["l0.safetensors"]["status"] == "success" and by["l0.safetensors"]["output_files"] == ["r/x_00001_.safetensors"]
    assert len(os.listdir(out / "r")) == 2


def test_queue_refuses_ui_workflow(tmp_path):
    wf = tmp_path / "ui.json"
    wf.write_text(json.dumps({"nodes": [], "links": []}))
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert main(["queue", "--server", "http://127.0.0.1:9", "--workflow", str(wf), "--over", str(tmp_path)]) == 2
