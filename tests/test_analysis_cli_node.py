"""`lora-lens analyze` and the AnalyzeLoRA node: contracts, and the node's JSON is what the view reads."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from lens_ops.synth import make_lora

REQUIRED = ("rank", "alpha", "effective_rank_90", "effective_rank_99", "effective_rank_999", "singular_values")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    sd = make_lora("sdxl_kohya", rank=8, seed=3, max_modules=30)
    path = tmp_path_factory.mktemp("an") / "sample.safetensors"
    save_file(dict(sd), str(path), metadata=sd.metadata)
    return path, sd


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lens_ops", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_json_only_json_with_module_names_as_in_file(sample):
    path, sd = sample
    r = cli("analyze", str(path), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)  # the whole stdout is the JSON report
    names = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in sd}
    assert set(rep["modules"]) == names
    for name, e in rep["modules"].items():
        for key in REQUIRED:
            assert key in e, (name, key)
        assert e["rank"] == 8 and e["alpha"] == 4.0
        assert len(e["singular_values"]) == 8
        assert e["effective_rank_90"] <= e["effective_rank_99"] <= e["effective_rank_999"] <= 8


def test_cli_text_and_errors(sample, tmp_path, capsys):
    from lens_ops.cli import main
    path, _ = sample
    png = tmp_path / "h.png"
    assert main(["analyze", str(path), "--table", "5", "--image", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Efficiency:" in out and "Health:" in out and "k99" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", str(path), "--llm"]) == 0
    assert "LoRA ANALYSIS REPORT" in capsys.readouterr().out
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    assert main(["analyze", str(empty), "--json"]) == 2
    r = capsys.readouterr()
    assert r.out == "" and "no tensors" in r.err and "Traceback" not in r.err
    unk = tmp_path / "unknown.safetensors"
    save_file({"foo.bar": torch.randn(3, 3), "baz": torch.randn(2)}, str(unk))
    assert main(["analyze", str(unk), "--json"]) == 2
    r = capsys.readouterr()
    assert r.out == "" and "unknown kind" in r.err


def test_node_outputs_and_ui_payload_identical(comfy_env, sample):
    pack, _ = comfy_env
    _, sd = sample
    node = pack.NODE_CLASS_MAPPINGS["AnalyzeLoRA"]()
    out = node.analyze(sd)
    report_json, summary, image, llm = out["result"]
    assert out["ui"]["lens_analysis"] == [report_json]  # the dashboard reads exactly the returned JSON
    rep = json.loads(report_json)
    assert set(rep["modules"]) and "Efficiency" in summary and "LoRA ANALYSIS REPORT" in llm
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3 and image.dtype == torch.float32
    assert float(image.min()) >= 0 and float(image.max()) <= 1


@pytest.mark.skipif(shutil.which("node") is None, reason="node (JavaScript) is not installed")
def test_web_view_reads_the_node_json(comfy_env, sample, tmp_path):
    """The view's own reader (web/lib/lens_report.js prepareReport) accepts the node's JSON as is."""
    pack, _ = comfy_env
    _, sd = sample
    report_json = pack.NODE_CLASS_MAPPINGS["AnalyzeLoRA"]().analyze(sd)["ui"]["lens_analysis"][0]
    f = tmp_path / "report.json"
    f.write_text(report_json)
    script = (f"import {{prepareReport}} from {json.dumps(os.path.join(ROOT, 'web/lib/lens_report.js'))};\n"
              "import {readFileSync} from 'node:fs';\n"
              f"const v = prepareReport(readFileSync({json.dumps(str(f))}, 'utf8'));\n"
              "console.log(JSON.stringify({rows: v.rows.length, blocks: v.blocks.length, spectra: v.spectra.size,"
              " points: v.map.points.length, health: v.scores.health, sim: v.similarity.length}));\n")
    js = tmp_path / "check.mjs"
    js.write_text(script)
    r = subprocess.run(["node", str(js)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    rep = json.loads(report_json)
    assert got["rows"] == len(rep["modules"]) and got["blocks"] == len(rep["blocks"]["blocks"])
    assert got["points"] == len(rep["map"]["points"]) and got["health"] == rep["scores"]["health"]
    assert got["sim"] == len(rep["similarity"]) and got["spectra"] == len(rep["modules"])
