"""Blend straight into a file (the CLI path): the streamed file holds exactly the in-memory blend's tensors, keys
and metadata, keeps no output tensor in memory, never overwrites an input and leaves nothing behind on errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from blend_fixtures import SD15_LAYERS, kohya, make_pair, peft
from lens_ops import LensError, LoRAModel
from lens_ops.blend import blend, blend_to_file
from lens_ops.st_io import atomic_save, load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(tmp_path):
    f1, f2 = make_pair(r1=6, r2=4, seed=4)
    sa = kohya(SD15_LAYERS, f1, dtype=torch.float16)
    sb = peft(SD15_LAYERS[1:], f2[1:], dtype=torch.float16)          # other convention, one layer only in A
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    atomic_save(sa, pa, {"ss_output_name": "alpha_lora"})
    atomic_save(sb, pb, {"modelspec.title": "beta"})
    return pa, pb


@pytest.mark.parametrize("method,rank", [("concat", 0), ("svd", 3), ("ties", 4)])
def test_streamed_file_equals_in_memory_blend(tmp_path, method, rank):
    pa, pb = _files(tmp_path)
    a, b = LoRAModel.load(pa), LoRAModel.load(pb)
    mem, rep_mem = blend([a, b], [0.7, -0.3], method, rank)
    out = str(tmp_path / "out.safetensors")
    shapes, rep = blend_to_file([a, b], [0.7, -0.3], out, method=method, rank=rank)
    assert rep["output"]["file"] == os.path.abspath(out)
    tensors, meta = load_file(out)
    want = mem.state_dict()
    assert list(tensors) == list(want)                                  # same keys, same order
    for k, t in want.items():
        assert tensors[k].dtype == t.dtype and torch.equal(tensors[k], t), k
    strip = lambda m: {k: v for k, v in m.items() if k != "lora_lens.provenance"}
    assert strip(meta) == strip(mem.metadata)
    assert json.loads(meta["lora_lens.provenance"])[-1]["settings"] == \
        json.loads(mem.metadata["lora_lens.provenance"])[-1]["settings"]
    # nothing of the result stays in memory: only shape-only (meta) tensors besides 0-dim alphas
    assert all(t.device.type == "meta" for m in shapes.modules for r, t in m.tensors.items() if t.ndim)
    assert rep["output"]["tensor_bytes"] == rep_mem["output"]["tensor_bytes"] == os.path.getsize(out) - \
        (8 + int.from_bytes(open(out, "rb").read(8), "little"))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".lens-")] == []


def test_errors_leave_nothing_and_inputs_are_never_overwritten(tmp_path):
    pa, pb = _files(tmp_path)
    a, b = LoRAModel.load(pa), LoRAModel.load(pb)
    before = os.listdir(tmp_path)
    with pytest.raises(LensError, match="empty"):
        blend_to_file([a, b], [0.0, 0.0], str(tmp_path / "x.safetensors"))
    with pytest.raises(LensError, match="overwrite"):
        blend_to_file([a, b], [1.0, 1.0], pa)
    assert sorted(os.listdir(tmp_path)) == sorted(before)
    assert LoRAModel.load(pa).nbytes == a.nbytes


def test_cli_blend_streams_and_matches_stacking(tmp_path):
    pa, pb = _files(tmp_path)
    out = str(tmp_path / "ab.safetensors")
    p = subprocess.run([sys.executable, "-m", "lens_ops", "blend", f"{pa}:0.7", f"{pb}:0.3", "--method", "concat",
                        "-o", out, "--json"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["output"]["file"] == os.path.abspath(out)
    res, a, b = LoRAModel.load(out), LoRAModel.load(pa), LoRAModel.load(pb)
    got = {m.name: m for m in res.modules}
    bmods = {(m.name.split(".", 1)[1].replace(".", "_")): m for m in b.modules}
    for m in a.modules:
        ref = 0.7 * m.delta(torch.float64)
        other = [x for k, x in bmods.items() if m.name.endswith(k)]
        if other:
            ref = ref + 0.3 * other[0].delta(torch.float64)
        d = got[m.name].delta(torch.float64)
        assert float((d - ref).norm() / ref.norm()) < 2e-3, m.name
