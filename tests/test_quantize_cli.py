"""`lora-lens quantize` / `lora-lens ultra` and the QuantizeInt8 node (without ComfyUI)."""
import json
import math
import statistics
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_ops import LoRAModel
from lens_ops.cli import main
from lens_ops.synth import make_lora
from lora_factory import rel_err


@pytest.fixture
def src(tmp_path):
    sd = make_lora("sdxl_kohya", rank=16, seed=4, max_modules=10)
    p = str(tmp_path / "in.safetensors")
    save_file(sd, p, metadata=sd.metadata)
    return p


def test_quantize_cli_json_and_file(src, tmp_path, capsys):
    out = str(tmp_path / "q.safetensors")
    assert main(["quantize", src, "-o", out, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("snr_db", "mse", "mae", "max_error", "rel_frobenius", "median_snr_db", "min_snr_db"):
        assert key in rep["delta"]
    for key in ("snr_db", "mse", "mae", "max_error", "rel_frobenius"):
        assert key in rep["stored"]
    assert rep["modules_quantized"] == 10 and len(rep["per_module"]) == 10
    assert rep["file_ratio"] <= 0.52 and os.path.getsize(out) == rep["output_file_bytes"]
    raw = load_file(out)
    assert sum(t.dtype == torch.int8 for t in raw.values()) == 20
    a, b = LoRAModel.load(src), LoRAModel.load(out)
    for m in a.modules:
        assert rel_err(b.get(m.name).delta(torch.float64), m.delta(torch.float64)) < 0.03


def test_quantize_cli_text_fp8_dequantize_keep(src, tmp_path, capsys):
    out = str(tmp_path / "q8.safetensors")
    assert main(["quantize", src, "-o", out, "--fp8"]) == 0
    text = capsys.readouterr().out
    assert "fp8 (e4m3fn)" in text and "SNR" in text and "relative Frobenius error" in text
    assert any(t.dtype == torch.float8_e4m3fn for t in load_file(out).values())
    dq = str(tmp_path / "dq.safetensors")
    assert main(["quantize", out, "-o", dq, "--dequantize", "fp16"]) == 0
    assert "Dequantized 10 module(s) to fp16" in capsys.readouterr().out
    raw = load_file(dq)
    assert all(t.dtype in (torch.float16, torch.float32) for t in raw.values())
    a, b = LoRAModel.load(out), LoRAModel.load(dq)
    for m in a.modules:
        assert rel_err(b.get(m.name).delta(torch.float64), m.delta(torch.float64)) < 2e-3
    kept = str(tmp_path / "kept.safetensors")
    assert main(["quantize", src, "-o", kept, "--min-snr", "300", "--keep-fp16", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["modules_quantized"] == 0 and len(rep["below_threshold"]) == 10
    assert all(t.dtype == torch.float16 for t in load_file(kept).values())
    assert main(["quantize", src, "-o", str(tmp_path / "w.safetensors"), "--min-snr", "300"]) == 0
    assert "Warning: 10 module(s) under 300 dB" in capsys.readouterr().out


def test_quantize_refuses_to_overwrite_input(src):
    assert main(["quantize", src, "-o", src]) == 2


def test_ultra_prunes_then_quantizes(src, tmp_path, capsys):
    pytest.importorskip("lens_ops.prune")
    out = str(tmp_path / "u.safetensors")
    assert main(["ultra", src, "-o", out, "--recipe", "rank=4", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["recipe"] == "rank=4" and "prune" in rep and rep["quantize"]["modules_quantized"] == 10
    raw = load_file(out)
    ups = [t for k, t in raw.items() if k.endswith("lora_up.weight")]
    assert ups and all(t.dtype == torch.int8 and t.shape[1] <= 4 for t in ups)
    assert os.path.getsize(out) < 0.2 * os.path.getsize(src)


def test_quantize_node(comfy_env):
    pack, paths = comfy_env
    from importlib import import_module
    mod = import_module(pack.__name__ + ".nodes.quantize")
    sd = make_lora("sdxl_kohya", rank=8, seed=1, max_modules=4)
    res = mod.QuantizeInt8().quantize(sd, "int8", "auto", 40.0, False)
    lora, report = res["result"]
    assert res["ui"]["text"][0] == report and "ΔW" in report and "MAE" in report
    assert sum(t.dtype == torch.int8 for t in lora.values()) == 8
    assert "lora_lens.provenance" in lora.metadata
    res = mod.QuantizeInt8().quantize(sd, "fp8 (e4m3fn)", "naive", 40.0, True, "off")
    assert "kept" in res["result"][1].lower() or res["result"][1]
    info = mod.ApplyLoRA.INPUT_TYPES()["required"]
    assert list(info) == ["model", "clip", "lora", "strength_model", "strength_clip"]
    assert mod.ApplyLoRA.RETURN_TYPES == ("MODEL", "CLIP")


def test_quantize_cli_metrics_modes(src, tmp_path, capsys):
    """--metrics sampled labels MAE/max error as sampled rows (SNR/MSE exact, equal to --metrics exact), and the
    default method is the benchmark's best (rebalance+rotate)."""
    out = str(tmp_path / "s.safetensors")
    assert main(["quantize", src, "-o", out, "--metrics", "sampled", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert main(["quantize", src, "-o", str(tmp_path / "x.safetensors"), "--metrics", "exact", "--json"]) == 0
    x = json.loads(capsys.readouterr().out)
    assert s["metrics"] == "sampled-rows" and s["delta"]["metrics"] == "sampled-rows"
    assert x["metrics"] == "exact" and x["delta"]["sampled_entries"] is None
    assert s["method"] == "rebalance+rotate" and set(s["methods"]) == {"rebalance+rotate"}
    assert s["delta"]["snr_db"] == pytest.approx(x["delta"]["snr_db"], abs=2e-3)
    assert s["delta"]["sampled_entries"] > 0 and s["delta"]["mae"] > 0 and s["delta"]["max_error"] > 0
    assert main(["quantize", src, "-o", out, "--metrics", "sampled"]) == 0
    text = capsys.readouterr().out
    assert "deterministic sample of 16 rows" in text


@pytest.mark.parametrize("layout", ["sdxl_kohya", "flux_aitoolkit_peft", "sdxl_lycoris_locon"])
def test_quantize_cli_streams_the_same_file_the_engine_builds(tmp_path, capsys, layout):
    """`lora-lens quantize` writes modules as they are done (a StreamWriter): the tensors, names and dtypes equal
    what `quantize_model` + save gives, the metadata carries the provenance, and the unused header reserve is at
    most 0.2 % of the file."""
    from safetensors import safe_open
    from lens_ops.quantize import quantize_model
    sd = make_lora(layout, rank=8, seed=5, max_modules=12)
    src = str(tmp_path / "in.safetensors")
    save_file(dict(sd), src, metadata=sd.metadata)
    out = str(tmp_path / "q.safetensors")
    assert main(["quantize", src, "-o", out]) == 0
    capsys.readouterr()
    ref, _ = quantize_model(LoRAModel.load(src))
    got, want = load_file(out), dict(ref.state_dict())
    assert set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in got)
    with safe_open(out, "pt") as f:
        assert "lora_lens.provenance" in f.metadata()
    with open(out, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
    assert len(header) - len(header.rstrip(b" ")) <= os.path.getsize(out) // 500 + 8


def test_quantize_cli_error_midway_leaves_nothing(tmp_path, capsys):
    """A module that fails after others were already written (NaN in the last one): exit 2, one sentence naming
    it, no output and no temporary file left in the folder."""
    sd = dict(make_lora("sdxl_kohya", rank=8, seed=6, max_modules=8))
    key = sorted(k for k in sd if k.endswith("lora_down.weight"))[-1]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    folder = tmp_path / "w"
    folder.mkdir()
    src = str(tmp_path / "in.safetensors")
    save_file(sd, src)
    assert main(["quantize", src, "-o", str(folder / "q.safetensors")]) == 2
    err = capsys.readouterr().err
    assert key.rsplit(".", 2)[0] in err and "NaN" in err
    assert os.listdir(folder) == []


def test_ultra_on_int8_keeps_the_codes_of_modules_the_prune_left(tmp_path, capsys):
    """`ultra` on a QuantizeInt8 output: modules the recipe leaves as they are keep their stored int8 codes
    bit for bit (they were dequantized for the pruner and re-rounded: lossy for no size gain); pruned
    modules are quantized anew."""
    sd = make_lora("sdxl_kohya", rank=8, seed=3, max_modules=6)
    src, q = str(tmp_path / "in.safetensors"), str(tmp_path / "q.safetensors")
    save_file(dict(sd), src)
    assert main(["quantize", src, "-o", q]) == 0
    same, fewer = str(tmp_path / "same.safetensors"), str(tmp_path / "fewer.safetensors")
    assert main(["ultra", q, "-o", same, "--recipe", "rank=8"]) == 0
    a, b = load_file(q), load_file(same)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["ultra", q, "-o", fewer, "--recipe", "rank=4"]) == 0
    c = load_file(fewer)
    downs = [k for k in c if k.endswith("lora_down.weight")]
    assert downs and all(c[k].dtype == torch.int8 and c[k].shape[0] == 4 for k in downs)
    capsys.readouterr()


def test_ultra_end_to_end_snr_equals_dense_float64(tmp_path, capsys):
    """`ultra` reports the output's ΔW SNR against the ORIGINAL LoRA (prune and int8 errors combined): it must equal a
    dense float64 comparison of the original and the written file, in total and per module."""
    pytest.importorskip("lens_ops.prune")
    src = str(tmp_path / "orig.safetensors")
    save_file(make_lora("sd15_kohya", rank=16, seed=21, max_modules=12), src)
    out = str(tmp_path / "u.safetensors")
    assert main(["ultra", src, "-o", out, "--recipe", "energy=0.995", "--json"]) == 0
    e2e = json.loads(capsys.readouterr().out)["end_to_end"]
    a, b = LoRAModel.load(src), LoRAModel.load(out)
    sig = err = 0.0
    per = []
    for m in a.modules:
        d0 = m.delta(torch.float64)
        got = b.get(m.name)
        d2 = got.delta(torch.float64) if got is not None else torch.zeros_like(d0)
        s, e = float(d0.pow(2).sum()), float((d0 - d2.reshape(d0.shape)).pow(2).sum())
        sig, err = sig + s, err + e
        per.append(10 * math.log10(s / e))
    assert e2e["modules"] == len(a.modules)
    assert abs(e2e["snr_db"] - 10 * math.log10(sig / err)) < 0.01
    assert abs(e2e["min_snr_db"] - min(per)) < 0.01
    assert abs(e2e["median_snr_db"] - statistics.median(per)) < 0.01
    assert main(["ultra", src, "-o", str(tmp_path / "r.safetensors"), "--recipe", "energy=0.995,rescale=0.9"]) == 0
    assert "End to end (vs the original): not given" in capsys.readouterr().out
