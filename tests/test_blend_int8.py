"""Blending int8 LoRAs made by QuantizeInt8 (scales folded into tiny alphas, e.g. 1e-7): the blend reproduces
w1·ΔW₁ + w2·ΔW₂ of their dequantized ΔW within fp16 rounding (dense float64 reference), including modules only
one LoRA has (carried at their weight without leaving the int8 grid)."""
import pytest
import torch

from blend_fixtures import SD15_LAYERS, kohya, make_pair
from lens_ops import LoRAModel
from lens_ops.blend import blend
from lens_ops.blend.output import balance_components
from lens_ops.quantize import quantize_model

FP16_BOUND = 2e-3   # a few fp16 roundings (2⁻¹¹ ≈ 4.9e-4 per stored factor entry) on Frobenius-relative error


def _int8_pair(seed):
    f1, f2 = make_pair(r1=8, r2=6, seed=seed)
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS, f1, dtype=torch.float16))
    b = LoRAModel.from_state_dict(kohya(SD15_LAYERS[:-1], f2[:-1], dtype=torch.float16))   # last layer only in A
    qa, _ = quantize_model(a)
    qb, _ = quantize_model(b)
    qa, qb = LoRAModel.from_state_dict(qa.state_dict()), LoRAModel.from_state_dict(qb.state_dict())
    assert all(m.tensors["up"].dtype == torch.int8 for m in qa.modules + qb.modules)
    assert min(m.alpha for m in qa.modules) < 1e-3          # tiny folded scales: the case that used to underflow
    return qa, qb


def _rel(x, ref):
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", ["concat", "svd"])
@pytest.mark.parametrize("w", [(0.7, 0.3), (1.0, -0.6)])
def test_int8_blend_reproduces_weighted_sum(method, w):
    qa, qb = _int8_pair(3)
    res, rep = blend([qa, qb], list(w), method)
    out = LoRAModel.from_state_dict(res.state_dict())      # what a file / ComfyUI would read
    mb = {m.name: m for m in qb.modules}
    assert rep["output"]["dtype"] == "float16"
    for ma in qa.modules:
        ref = w[0] * ma.delta(torch.float64)
        if ma.name in mb:
            ref = ref + w[1] * mb[ma.name].delta(torch.float64)
        got = out.get(ma.name)
        assert got is not None, ma.name
        err = _rel(got.delta(torch.float64), ref)
        assert err < FP16_BOUND, (ma.name, err)
        if ma.name not in mb:   # carried: still int8, the weight folded into alpha exactly
            assert got.tensors["up"].dtype == torch.int8 and err < 1e-6


def test_balance_components_is_exact_and_only_touches_unbalanced_columns():
    g = torch.Generator().manual_seed(0)
    up = torch.randn(30, 4, generator=g)
    down = torch.randn(4, 20, generator=g)
    up[:, 1] *= 1e-7                       # a tiny folded scale in one column
    down[2] *= 1e-5                        # and one in a row of down
    u2, d2 = balance_components(up, down)
    assert torch.equal(u2[:, 0], up[:, 0]) and torch.equal(d2[3], down[3])      # balanced columns untouched
    assert torch.allclose((u2.double() @ d2.double()), up.double() @ down.double(), rtol=0, atol=1e-12)
    for j in (1, 2):
        ratio = d2[j].pow(2).mean().sqrt() / u2[:, j].pow(2).mean().sqrt()
        assert 0.25 < float(ratio) < 4
    # cast to fp16: the balanced factors keep the product within fp16 rounding, the raw ones do not
    ref = up.double() @ down.double()
    assert _rel(u2.half().double() @ d2.half().double(), ref) < 2e-3
    assert _rel(up[:, 1:2].half().double() @ down[1:2].half().double(), up[:, 1:2].double() @ down[1:2].double()) > 1e-2
