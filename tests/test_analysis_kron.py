"""AnalyzeLoRA on LoKr without forming ΔW (Kronecker structure) and layer similarity from LoKr factor pairs:
every number equals the dense float64 reference."""
import math

import torch

from lens_ops import LoRAModel
from lens_ops.analysis import analyze, spectra
from lens_ops.analysis.similarity import _factors
from lora_factory import gen, kind_tensors


def _lokr_conv(g, w1_whole: bool, tucker: bool = False):
    """A conv LoKr as LyCORIS writes it: W2 = w2_a @ w2_b with w2_b flattened over in·kh·kw, or a Tucker W2
    (t2 with the conv kernel); decaying factors."""
    t = {}
    if w1_whole:
        t["lokr_w1"] = torch.randn(4, 6, generator=g) * torch.logspace(0, -1, 6)
    else:
        t["lokr_w1_a"], t["lokr_w1_b"] = torch.randn(8, 2, generator=g), torch.randn(2, 5, generator=g)
    if tucker:
        t["lokr_t2"] = torch.randn(3, 3, 3, 3, generator=g)
        t["lokr_w2_a"], t["lokr_w2_b"] = torch.randn(3, 16, generator=g), torch.randn(3, 12, generator=g)
    else:
        t["lokr_w2_a"] = torch.randn(16, 3, generator=g) * torch.tensor([1.0, 0.3, 0.05])
        t["lokr_w2_b"] = torch.randn(3, 12 * 9, generator=g)   # LyCORIS: conv W2 flattened to in·kh·kw
    t["alpha"] = torch.tensor(2.0)
    return t


def _models():
    g = gen(41)
    variants = {"conv_w1_whole": _lokr_conv(g, True), "conv_w1_ab": _lokr_conv(g, False),
                "conv_tucker": _lokr_conv(g, True, tucker=True)}
    for kind in ("lokr", "lokr_full", "lokr_ab"):
        variants[kind] = {k.lstrip("."): v for k, v in kind_tensors(kind, g)[0].items()}
    sd = {}
    for i, (name, t) in enumerate(variants.items()):
        for role, x in t.items():
            sd[f"lora_unet_down_blocks_{i}_resnets_0_conv1.{role}"] = x
    return LoRAModel.from_state_dict(sd)


def test_kronecker_route_equals_dense_reference():
    model = _models()
    for m in model.modules:
        assert m.kind.name == "lokr"
        e = spectra.base_entry(m)
        assert spectra._kron_module(m, e, torch.float64, "cpu", torch.Generator().manual_seed(0)), m.name
        d = m.delta(torch.float64)
        mat = d.reshape(d.shape[0], -1)
        sv = torch.linalg.svdvals(mat)
        got = torch.tensor(e["singular_values"], dtype=torch.float64)
        k = min(len(got), len(sv))
        assert float((got[:k] - sv[:k]).abs().max()) <= 1e-6 * float(sv[0]), m.name
        assert e["energy"] == __import__("pytest").approx(float((mat ** 2).sum()), rel=1e-9)
        assert e["mean"] == __import__("pytest").approx(float(mat.mean()), rel=1e-9, abs=1e-15)
        assert e["std"] == __import__("pytest").approx(float(mat.std(unbiased=False)), rel=1e-6)
        assert e["elements"]["l1_norm"] == __import__("pytest").approx(float(mat.abs().sum()), rel=1e-9)
        assert e["linf_bound"] == __import__("pytest").approx(float(mat.abs().max()), rel=1e-9)
        assert e["route"] == "kronecker" and e["numel"] == mat.numel()
        # the sampled elements are ΔW's own elements at the grid crossings
        rows, cols, exact = spectra._sample_grid(mat.shape[0], mat.shape[1], torch.Generator().manual_seed(0), "cpu")
        x = mat[rows][:, cols].reshape(-1)
        assert e["elements"]["min"] == __import__("pytest").approx(float(x.min()), rel=1e-9)
        assert e["elements"]["max"] == __import__("pytest").approx(float(x.max()), rel=1e-9)
        assert e["elements"]["median"] == __import__("pytest").approx(float(x.quantile(0.5)), rel=1e-9, abs=1e-15)


def test_analyze_reports_lokr_modules_through_the_kronecker_route():
    rep = analyze(_models())
    mods = rep["modules"]
    entries = mods.values() if isinstance(mods, dict) else mods
    assert all(e.get("route") == "kronecker" for e in entries)


def test_similarity_factors_of_lokr_are_exact_and_small():
    """The similarity's factor pair of a LoKr module is its exact low-rank form (never a dense ΔW with an
    identity: for a conv layer that identity is in·kh·kw squared)."""
    for m in _models().modules:
        b, a, s = _factors(m, torch.float64, "cpu")
        d = m.delta(torch.float64)
        mat = d.reshape(d.shape[0], -1)
        if a is None:  # a Tucker W2 has no factor pair: dense ΔW, identity left implicit
            assert torch.equal(b, mat)
            continue
        assert b.shape[1] <= min(mat.shape)
        assert float((s * b @ a - mat).norm() / mat.norm()) < 1e-12
