"""StreamWriter: a safetensors file written tensor by tensor equals the one written at once."""
import os

import pytest
import torch
from safetensors.torch import load_file

from lens_ops.errors import LensError
from lens_ops.st_io import StreamWriter, atomic_save, read_header


def _tensors():
    g = torch.Generator().manual_seed(3)
    return {"a.lora_up.weight": torch.randn(7, 3, generator=g).half(),
            "a.lora_down.weight": torch.randn(3, 5, generator=g).bfloat16(),
            "a.alpha": torch.tensor(3.0),
            "b.empty": torch.zeros(0, 4),
            "b.q": torch.randint(-127, 128, (4, 4), dtype=torch.int8)}


@pytest.mark.parametrize("reserve", [0, 64, 1 << 16])
def test_stream_writer_matches_whole_file(tmp_path, reserve):
    ts = _tensors()
    meta = {"ss_network_dim": "3", "note": "ü" * 50}
    out = str(tmp_path / "s.safetensors")
    with StreamWriter(out, header_reserve=reserve) as w:
        for k, v in ts.items():
            w.add(k, v)
        w.close(meta)
    got = load_file(out)
    assert list(got) == list(ts) or set(got) == set(ts)
    for k in ts:
        assert got[k].dtype == ts[k].dtype and torch.equal(got[k], ts[k])
    entries, metadata, _ = read_header(out)
    assert metadata == meta and list(entries) == list(ts)
    ref = str(tmp_path / "ref.safetensors")
    atomic_save(ts, ref, meta)
    if reserve == 0:  # no reserve: the header is exactly the one save_file writes
        assert open(out, "rb").read() == open(ref, "rb").read()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".lens-")] == []


def test_stream_writer_abort_and_errors_leave_nothing(tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError):
        with StreamWriter(str(out)) as w:
            w.add("t", torch.ones(3))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    w = StreamWriter(str(out))
    w.add("t", torch.ones(3))
    with pytest.raises(LensError):
        w.add("t", torch.ones(3))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_stream_writer_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "in.safetensors"
    atomic_save({"t": torch.ones(2)}, str(src))
    with pytest.raises(LensError, match="overwrite"):
        StreamWriter(str(src), forbid=(str(src),))
