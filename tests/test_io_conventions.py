"""Reading and writing: every key convention parses to LoRA modules and writes back bit for bit;
the real layouts round-trip; real files load; outputs are atomic and never overwrite the input."""
import os

import pytest
import torch
from safetensors.torch import save_file

from lens_ops import LensError, LoRAModel
from lens_ops.st_io import load_file
from lens_ops.synth import layout_names, load_layout, make_lora
from conftest import shared_path
from lora_factory import CONVENTIONS, EXPECTED_COMPONENT, convention_lora, gen, rel_err


@pytest.mark.parametrize("conv", sorted(CONVENTIONS))
def test_convention_parses_and_round_trips(conv, tmp_path):
    sd = convention_lora(conv, gen(3))
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src), metadata={"ss_network_dim": "4"})
    model = LoRAModel.load(str(src))
    assert len(model) == 3 and all(m.kind.name == "lora" and m.rank() == 4 for m in model)
    if conv in EXPECTED_COMPONENT:
        assert {m.component for m in model} == {EXPECTED_COMPONENT[conv]}
    else:
        assert {m.component for m in model} <= {"unet", "transformer"}
    alpha = CONVENTIONS[conv][3]
    for m in model:
        b, a = m.tensors["up"].double(), m.tensors["down"].double()
        ref = (2.0 / 4 if alpha else 1.0) * b @ a
        assert rel_err(m.delta(torch.float64), ref) < 1e-12
    out = model.save(str(tmp_path / "out.safetensors"))
    assert open(out, "rb").read() == src.read_bytes()


@pytest.mark.parametrize("layout", layout_names())
def test_real_layouts_round_trip_bit_exact(layout, tmp_path):
    lay = load_layout(layout)
    sd = make_lora(layout, rank=4, seed=7)
    src = str(tmp_path / f"{layout}.safetensors")
    save_file(sd, src, metadata=sd.metadata)
    model = LoRAModel.load(src)
    assert len(model) == len(lay["modules"])
    assert all(m.kind.name == "lora" for m in model)
    assert model.metadata == sd.metadata
    out = model.save(str(tmp_path / "copy.safetensors"))
    assert open(out, "rb").read() == open(src, "rb").read()
    tensors, _ = load_file(out)
    assert list(tensors) == list(load_file(src)[0])


def test_save_keeps_dtypes_and_order_of_mixed_file(tmp_path):
    sd = {"lora_unet_b.lora_up.weight": torch.randn(4, 2, dtype=torch.bfloat16),
          "lora_unet_b.lora_down.weight": torch.randn(2, 3).to(torch.float8_e4m3fn),
          "lora_unet_b.alpha": torch.tensor(1.0),
          "lora_unet_a.lora_up.weight": torch.randint(-127, 127, (4, 2), dtype=torch.int8),
          "lora_unet_a.lora_down.weight": torch.randn(2, 3, dtype=torch.float16)}
    src = str(tmp_path / "mixed.safetensors")
    save_file(sd, src)
    model = LoRAModel.load(src)
    assert model.precision.startswith("mixed")
    back, _ = load_file(model.save(str(tmp_path / "o.safetensors")))
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).contiguous().view(torch.uint8))


def test_never_overwrites_input_and_leaves_no_temp_file(tmp_path):
    sd = convention_lora("kohya_unet", gen(0))
    src = str(tmp_path / "in.safetensors")
    save_file(sd, src)
    before = open(src, "rb").read()
    model = LoRAModel.load(src)
    with pytest.raises(LensError, match="overwrite the input"):
        model.save(src)
    assert open(src, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import lens_ops.st_io as st
    model = LoRAModel.from_state_dict(convention_lora("kohya_unet", gen(0)))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        model.save(str(tmp_path / "x.safetensors"))
    assert os.listdir(tmp_path) == []


def test_real_lokr_file_loads_and_round_trips(tmp_path):
    path = shared_path("real_loras", "lycoris_smart_falcon", "smart_falcon_4_lokr.safetensors")
    model = LoRAModel.load(path)
    assert len(model) == 350 and {m.kind.name for m in model} == {"lokr"}
    assert model.architecture.id == "sd1" and model.precision == "fp16"
    assert sum(m.is_zero() for m in model) == 3
    assert len(model.metadata) == 61
    out = model.save(str(tmp_path / "copy.safetensors"))
    a, ma = load_file(path)
    b, mb = load_file(out)
    assert ma == mb and list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_real_cloneofsimo_file_is_recognised(tmp_path):
    path = shared_path("real_loras", "cloneofsimo_lora", "analog_svd_rank4.safetensors")
    model = LoRAModel.load(path)
    assert len(model) == 192 and all(m.kind.name == "lora" for m in model)
    assert model.convention == "cloneofsimo lora_diffusion"
    assert model.architecture.id == "sd1"
    assert sum(m.component == "te1" for m in model) == 48
