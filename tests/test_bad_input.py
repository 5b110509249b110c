"""Bad input: one clear LensError sentence, nothing written, never a crash or an unpickle."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from lens_ops import LensError, LoRAModel
from lens_ops.st_io import safe_join
from lens_ops.summary import summarize
from lora_factory import convention_lora, gen


@pytest.fixture
def good(tmp_path):
    p = str(tmp_path / "good.safetensors")
    save_file(convention_lora("kohya_unet", gen(0)), p)
    return p


def write_raw(path, header: dict | bytes, data: bytes = b"", declared_len=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared_len is None else declared_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + raw + data)
    return path


CASES = {
    "empty file": (lambda p: open(p, "wb").close(), "truncated"),
    "header length past end": (lambda p: write_raw(p, {}, declared_len=10_000), "runs past the end"),
    "absurd header length": (lambda p: write_raw(p, {}, declared_len=1 << 60), "header claims"),
    "header not json": (lambda p: write_raw(p, b"{not json"), "not JSON"),
    "header not object": (lambda p: write_raw(p, b"[1, 2]"), "not a JSON object"),
    "unknown dtype": (lambda p: write_raw(p, {"a.lora_up.weight": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype"),
    "offsets past data": (lambda p: write_raw(p, {"a.alpha": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "past the end"),
    "overlapping offsets": (lambda p: write_raw(p, {"a.lora_up.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                     "a.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    "size does not match shape": (lambda p: write_raw(p, {"a.alpha": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "holds 8 bytes"),
    "bad metadata": (lambda p: write_raw(p, {"__metadata__": {"a": 1}}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_headers_give_one_clear_error(case, tmp_path):
    make, words = CASES[case]
    p = str(tmp_path / "bad.safetensors")
    make(p)
    with pytest.raises(LensError, match=words):
        LoRAModel.load(p)


def test_truncated_data(good, tmp_path):
    data = open(good, "rb").read()
    p = str(tmp_path / "cut.safetensors")
    open(p, "wb").write(data[:-100])
    with pytest.raises(LensError, match="truncated|past the end"):
        LoRAModel.load(p)


def test_up_down_that_do_not_chain(tmp_path):
    p = str(tmp_path / "x.safetensors")
    save_file({"lora_unet_a.lora_up.weight": torch.randn(8, 4), "lora_unet_a.lora_down.weight": torch.randn(3, 6)}, p)
    with pytest.raises(LensError, match="do not chain"):
        LoRAModel.load(p)


def test_nan_is_reported_per_module_but_loads(tmp_path):
    sd = convention_lora("kohya_unet", gen(0), dtype=torch.float32)
    k = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[k][0, 0] = float("nan")
    sd[k][1, 0] = float("inf")
    p = str(tmp_path / "nan.safetensors")
    save_file(sd, p)
    s = summarize(LoRAModel.load(p))
    assert s["nonfinite_modules"] == {k[: -len(".lora_up.weight")]: 2}
    assert any("NaN/Inf" in w for w in s["warnings"])


def test_checkpoint_is_refused(tmp_path):
    p = str(tmp_path / "model.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4),
               "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4)}, p)
    with pytest.raises(LensError, match="full model checkpoint"):
        LoRAModel.load(p)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_are_refused_without_reading(suffix, tmp_path):
    p = tmp_path / ("evil" + suffix)
    p.write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(LensError, match="never unpickle"):
        LoRAModel.load(str(p))


def test_pickle_content_behind_safetensors_name(tmp_path):
    p = tmp_path / "evil.safetensors"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(LensError):
        LoRAModel.load(str(p))


def test_empty_lora(tmp_path):
    p = str(tmp_path / "empty.safetensors")
    save_file({}, p)
    with pytest.raises(LensError, match="no tensors"):
        LoRAModel.load(p)


def test_paths_outside_a_folder_are_refused(tmp_path):
    assert safe_join(str(tmp_path), "a/b.safetensors").startswith(str(tmp_path))
    for bad in ("../x.safetensors", "/etc/passwd", "a/../../x"):
        with pytest.raises(LensError, match="outside"):
            safe_join(str(tmp_path), bad)


def test_missing_file():
    with pytest.raises(LensError, match="does not exist"):
        LoRAModel.load("/nonexistent/x.safetensors")
