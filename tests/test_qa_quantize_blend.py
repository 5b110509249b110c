"""QA of QuantizeInt8 / ultra / BlendLoRAs on inputs the feature tests use least (bad paths, NaN in alpha,
already-int8 inputs, no-op dequantize): each bad input gives one clear sentence and writes nothing."""
import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_ops import LensError, LoRAModel
from lens_ops.blend import blend
from lens_ops.cli import main
from lens_ops.quantize import quantize_model
from lens_ops.synth import make_lora
from lora_factory import mismatched_shape_pair


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.fixture
def src(tmp_path):
    sd = make_lora("sdxl_kohya", rank=8, seed=12, max_modules=6)
    p = str(tmp_path / "in.safetensors")
    save_file(sd, p, metadata=sd.metadata)
    return p


def _files(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("cmd", ["quantize", "ultra"])
def test_report_path_never_overwrites_the_input(cmd, src, tmp_path, capsys):
    before, listing = _md5(src), _files(tmp_path)
    out = str(tmp_path / "q.safetensors")
    extra = ["--recipe", "rank=4"] if cmd == "ultra" else []
    assert main([cmd, src, "-o", out, "--report", src, *extra]) == 2
    assert "report" in capsys.readouterr().err.lower()
    assert _md5(src) == before and _files(tmp_path) == listing
    assert main([cmd, src, "-o", out, "--report", out, *extra]) == 2
    assert _files(tmp_path) == listing


def test_report_in_missing_folder_is_refused_before_anything_is_written(src, tmp_path, capsys):
    listing = _files(tmp_path)
    rc = main(["quantize", src, "-o", str(tmp_path / "q.safetensors"), "--report", str(tmp_path / "no" / "r.json")])
    assert rc == 2, "a crash after the output was written"
    err = capsys.readouterr().err
    assert "unexpected error" not in err and "does not exist" in err
    assert _files(tmp_path) == listing


def test_threads_zero_is_refused(src, tmp_path, capsys):
    listing = _files(tmp_path)
    assert main(["quantize", src, "-o", str(tmp_path / "q.safetensors"), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert _files(tmp_path) == listing


def test_dequantize_of_a_float_file_is_refused(src, tmp_path, capsys):
    listing = _files(tmp_path)
    assert main(["quantize", src, "-o", str(tmp_path / "d.safetensors"), "--dequantize", "fp16"]) == 2
    assert "nothing to dequantize" in capsys.readouterr().err
    assert _files(tmp_path) == listing


def test_requantizing_an_int8_file_keeps_its_codes(src, tmp_path):
    """QuantizeInt8 on a QuantizeInt8 output: the int8 modules are already on their grid; re-rounding them
    (after a rotation) only loses precision, so they are kept exactly."""
    q1, _ = quantize_model(LoRAModel.load(src))
    q2, rep = quantize_model(q1)
    for m in q1.modules:
        d1, d2 = m.delta(torch.float64), q2.get(m.name).delta(torch.float64)
        assert torch.equal(d1, d2), m.name
    assert len(rep["modules_kept"]) == len(q1.modules)
    assert "already" in rep["modules_kept"][0]["reason"]


def _nan_alpha(tmp_path, name="a.safetensors", drop_from_other=False):
    sd = make_lora("sd15_kohya", rank=4, seed=3, max_modules=4)
    other = make_lora("sd15_kohya", rank=4, seed=4, max_modules=4)
    bad = [k for k in sd if k.endswith(".alpha")][0]
    sd[bad] = torch.tensor(float("nan")).half()
    if drop_from_other:  # the NaN module is only in the first LoRA: carried, not blended
        stem = bad[: -len(".alpha")]
        other = {k: v for k, v in other.items() if not k.startswith(stem + ".")}
    pa, pb = str(tmp_path / name), str(tmp_path / "b.safetensors")
    save_file(dict(sd), pa)
    save_file(dict(other), pb)
    return pa, pb


@pytest.mark.parametrize("method", ["concat", "svd", "ties"])
@pytest.mark.parametrize("carried", [False, True])
def test_blend_refuses_nan_alpha(method, carried, tmp_path, capsys):
    pa, pb = _nan_alpha(tmp_path, drop_from_other=carried)
    listing = _files(tmp_path)
    rc = main(["blend", pa + ":0.5", pb + ":0.5", "--method", method, "--rank", "2", "-o",
               str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "NaN" in err and "unexpected error" not in err
    assert _files(tmp_path) == listing
    with pytest.raises(LensError, match="NaN"):
        blend([LoRAModel.load(pa), LoRAModel.load(pb)], [0.5, 0.5], method, 2)


def test_blend_output_name_must_be_safetensors(src, tmp_path, capsys):
    other = str(tmp_path / "o.safetensors")
    sd = make_lora("sdxl_kohya", rank=4, seed=13, max_modules=6)
    save_file(sd, other)
    listing = _files(tmp_path)
    assert main(["blend", src, other, "-o", str(tmp_path / "out.txt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert _files(tmp_path) == listing



def _mismatched_pair(tmp_path):
    """One layer name, two different weight shapes, architecture not telling them apart: the blend must refuse
    like ConflictScan does, not crash inside the maths."""
    a, b = mismatched_shape_pair()
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(a, pa)
    save_file(b, pb)
    return pa, pb


@pytest.mark.parametrize("method", ["concat", "svd", "ties"])
def test_blend_refuses_modules_of_different_shapes(method, tmp_path, capsys):
    pa, pb = _mismatched_pair(tmp_path)
    listing = _files(tmp_path)
    rc = main(["blend", pa, pb, "--method", method, "-o", str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "unexpected error" not in err, err
    assert "different base models" in err and "proj_in" in err
    assert _files(tmp_path) == listing
    with pytest.raises(LensError, match="different base models"):
        blend([LoRAModel.load(pa), LoRAModel.load(pb)], [1.0, 1.0], method)


def test_exact_metrics_on_a_big_module_equal_float64():
    """--metrics exact on a module above the float64 dense budget (FLUX-sized layers): ΔW SNR / MSE / relative
    error must still equal a float64 reference (the float32 dot product over millions of entries drifted by
    ~0.1 %); MAE / max error come from the dense pass."""
    from lens_ops.synth import spectrum_factors
    g = torch.Generator().manual_seed(7)
    up, down = spectrum_factors(4608, 1024, 8, g, eff_rank=3.0, decay=0.5, magnitude=0.01)
    name = "lora_unet_single_blocks_0_linear1"
    sd = {name + ".lora_up.weight": up.half(), name + ".lora_down.weight": down.half(), name + ".alpha": torch.tensor(4.0)}
    src = LoRAModel.from_state_dict(sd)
    q, rep = quantize_model(src, metrics="exact")
    ref = src.modules[0].delta(torch.float64)
    got = q.modules[0].delta(torch.float64)
    e = got - ref
    d = rep["per_module"][0]["delta"]
    assert d["metrics"] == "exact"
    assert d["mse"] == pytest.approx(float((e ** 2).mean()), rel=1e-6)
    assert d["rel_frobenius"] == pytest.approx(float(e.norm() / ref.norm()), rel=1e-6)
    assert d["mae"] == pytest.approx(float(e.abs().mean()), rel=1e-5)
    assert d["max_error"] == pytest.approx(float(e.abs().max()), rel=1e-5)


def test_ultra_names_a_nan_alpha_and_an_all_zero_file(tmp_path, capsys):
    pa, _ = _nan_alpha(tmp_path)
    listing = _files(tmp_path)
    assert main(["ultra", pa, "-o", str(tmp_path / "u.safetensors"), "--recipe", "rank=2"]) == 2
    assert "in alpha" in capsys.readouterr().err
    sd = make_lora("sd15_kohya", rank=4, seed=3, max_modules=3)
    zeros = {k: (v if k.endswith(".alpha") else torch.zeros_like(v)) for k, v in sd.items()}
    pz = str(tmp_path / "zeros.safetensors")
    save_file(zeros, pz)
    listing = _files(tmp_path)
    assert main(["ultra", pz, "-o", str(tmp_path / "u.safetensors"), "--recipe", "rank=2"]) == 2
    err = capsys.readouterr().err
    assert "left no LoRA module" in err and "applied without alpha" not in err
    assert _files(tmp_path) == listing


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_dare_report_is_not_labelled_exact(method):
    from lens_ops.cli.blend import format_blend
    a = LoRAModel.from_state_dict(dict(make_lora("sd15_kohya", rank=4, seed=1, max_modules=2)))
    b = LoRAModel.from_state_dict(dict(make_lora("sd15_kohya", rank=4, seed=2, max_modules=2)))
    _, rep = blend([a, b], [0.7, 0.3], method, 0)
    text = format_blend(rep)
    assert rep["relative_error"]["max"] > 0.01
    assert "(exact)" not in text and "Truncation error" not in text
    assert "by design" in text


def test_nan_count_is_of_the_stored_factor_not_of_its_rotation(tmp_path, capsys):
    """One NaN in `up` is reported as one value (the rank-space rotation spreads it over a whole row)."""
    sd = make_lora("sdxl_kohya", rank=8, seed=5, max_modules=2)
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key][3, 2] = float("nan")
    src = str(tmp_path / "nan.safetensors")
    save_file(sd, src)
    assert main(["quantize", src, "-o", str(tmp_path / "q.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "contains 1 NaN/Inf value(s)" in err and "(up)" in err, err
