"""`lora-lens conflict` and `scan` on bad input: NaN/Inf in a factor or an alpha is named in one sentence (it
reached LAPACK as a raw LinAlgError, or became 'nan : nan' strengths), and --problems/--map never replace an
input."""
import os

import pytest
import torch
from safetensors.torch import save_file

from lens_ops.cli import main
from lens_ops.conflict import scan
from lens_ops.errors import LensError
from lens_ops.synth import make_lora


def _pair(tmp_path, spoil=None, where="a"):
    a = dict(make_lora("sdxl_kohya", rank=8, seed=1, max_modules=6))
    b = dict(make_lora("sdxl_kohya", rank=8, seed=2, max_modules=6))
    target = a if where == "a" else b
    key = None
    if spoil:
        key = sorted(k for k in target if k.endswith(spoil))[2]
        target[key] = target[key].clone()
        target[key].view(-1)[0] = float("nan") if spoil != "alpha" else float("inf")
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(a, pa)
    save_file(b, pb)
    return pa, pb, key


@pytest.mark.parametrize("spoil,where", [("lora_up.weight", "a"), ("lora_down.weight", "b"), ("alpha", "a")])
def test_non_finite_module_is_named(tmp_path, capsys, spoil, where):
    pa, pb, key = _pair(tmp_path, spoil, where)
    assert main(["conflict", pa, pb, "--json"]) == 2
    err = capsys.readouterr().err
    name = key.split(".")[0]
    assert name in err and "NaN/Inf" in err and ("first" if where == "a" else "second") in err, err
    assert "unexpected" not in err and len(err.strip().splitlines()) == 1


def test_non_finite_dense_kind_is_named():
    g = torch.Generator().manual_seed(3)
    key = "lora_unet_input_blocks_4_1_proj_in"
    a = {key + ".hada_w1_a": torch.randn(64, 4, generator=g), key + ".hada_w1_b": torch.randn(4, 64, generator=g),
         key + ".hada_w2_a": torch.randn(64, 4, generator=g), key + ".hada_w2_b": torch.randn(4, 64, generator=g),
         key + ".alpha": torch.tensor(4.0)}
    b = {k: v.clone() for k, v in a.items()}
    b[key + ".hada_w2_b"][1, 1] = float("nan")
    with pytest.raises(LensError, match="second LoRA contains NaN/Inf"):
        scan(a, b)


@pytest.mark.parametrize("flag", ["--problems", "--map"])
def test_side_outputs_never_replace_an_input(tmp_path, capsys, flag):
    pa, pb, _ = _pair(tmp_path)
    before = open(pa, "rb").read()
    assert main(["conflict", pa, pb, flag, pa]) == 2
    assert "Refusing to overwrite the input" in capsys.readouterr().err
    assert open(pa, "rb").read() == before
    assert main(["conflict", pa, pb, flag, str(tmp_path / "missing" / "x.out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_problem_list_is_written(tmp_path, capsys):
    pa, pb, _ = _pair(tmp_path)
    out = tmp_path / "problems.txt"
    assert main(["conflict", pa, pb, "--problems", str(out)]) == 0
    assert out.exists() and [f for f in os.listdir(tmp_path) if f.startswith(".lens-")] == []
