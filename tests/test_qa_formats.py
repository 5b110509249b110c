"""Format coverage and error handling found by QA on LoRA layouts seen in the wild (via the CLI).

Each test is a minimal reproduction of a failure a user hit with a file layout the other suites do not
cover; files are small and generated under tmp_path.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lens_ops.analysis import spectra
from lens_ops.model import LoRAModel


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("layout", ["conv4d_w2_full", "flat_both_decomposed"])
def test_lokr_spectrum_exact_without_svd_of_the_wide_delta(tmp_path, monkeypatch, layout):
    """A real LyCORIS LoKr (SD 1.5, 1280×11520 conv modules) took minutes per module in `analyze`: the
    dense ΔW was decomposed as a wide matrix. Its spectrum is the Kronecker product's, σ(w1)⊗σ(w2)."""
    g = _g(1)
    key = "lora_unet_down_blocks_2_resnets_0_conv2"
    sd = {key + ".lokr_w1_a": torch.randn(8, 2, generator=g), key + ".lokr_w1_b": torch.randn(2, 4, generator=g),
          key + ".alpha": torch.tensor(2.0)}
    if layout == "conv4d_w2_full":   # w2 a whole 4-D kernel: ΔW = kron(w1[:, :, None, None], w2)
        w2 = torch.randn(40, 4, generator=g) @ torch.randn(4, 80 * 9, generator=g)
        sd[key + ".lokr_w2"] = w2.reshape(40, 80, 3, 3).contiguous()
    else:                            # smart_falcon's layout: 2-D kron, reshaped to the conv weight by ComfyUI
        sd[key + ".lokr_w2_a"] = torch.randn(40, 4, generator=g)
        sd[key + ".lokr_w2_b"] = torch.randn(4, 80 * 9, generator=g) * 0.1
    path = tmp_path / "lokr.safetensors"
    save_file(sd, str(path))
    model = LoRAModel.load(str(path))
    m = model.modules[0]
    ref_s = torch.linalg.svdvals(m.delta(torch.float64).reshape(320, -1))
    shapes = []
    real = torch.linalg.svdvals

    def spy(x, *a, **k):
        shapes.append(tuple(x.shape))
        return real(x, *a, **k)

    monkeypatch.setattr(torch.linalg, "svdvals", spy)
    e = spectra.analyze_modules(model)[m.name]
    s = torch.tensor(e["singular_values"], dtype=torch.float64)
    assert s.shape == ref_s.shape
    assert float((s - ref_s).norm() / ref_s.norm()) < 1e-5
    assert e["effective_rank_99"] <= 4 * 2
    # nothing as large as ΔW (320 × 2880) went through an SVD
    assert max(a * b for a, b in shapes) < 320 * 2880 // 10, shapes


def test_dense_spectrum_of_a_wide_diff_is_taken_on_the_tall_side(tmp_path, monkeypatch):
    """LAPACK's svdvals is ~30× slower on a wide matrix than on its transpose (same values)."""
    g = _g(2)
    key = "diffusion_model.input_blocks.1.0.in_layers.2"
    d = torch.randn(16, 8, generator=g) @ torch.randn(8, 320 * 9, generator=g)
    save_file({key + ".diff": d.reshape(16, 320, 3, 3).contiguous()}, str(tmp_path / "diff.safetensors"))
    model = LoRAModel.load(str(tmp_path / "diff.safetensors"))
    shapes = []
    real = torch.linalg.svdvals

    def spy(x, *a, **k):
        shapes.append(tuple(x.shape))
        return real(x, *a, **k)

    monkeypatch.setattr(torch.linalg, "svdvals", spy)
    e = spectra.analyze_modules(model)[key]
    assert all(r >= c for r, c in shapes), shapes
    ref = torch.linalg.svdvals(d.double())
    s = torch.tensor(e["singular_values"], dtype=torch.float64)
    assert float((s - ref).norm() / ref.norm()) < 1e-4
