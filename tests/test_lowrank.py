"""The shared factored-SVD kernels against dense float64 references on decaying spectra."""
import pytest
import torch

from lens_ops.lowrank import balanced_factors, factored_svd, frobenius_inner, frobenius_norm, singular_values
from lora_factory import gen, pair


@pytest.mark.parametrize("shape", [(64, 48, 8), (300, 20, 16), (20, 300, 16), (128, 128, 32)])
def test_factored_svd_equals_dense(shape):
    n, m, r = shape
    b, a = (x.double() for x in pair(n, m, r, gen(sum(shape)), eff=4))
    dense = 0.37 * b @ a
    ref = torch.linalg.svdvals(dense)[: min(r, n, m)]
    u, s, vh = factored_svd(b, a, 0.37)
    assert torch.allclose(s, ref, rtol=1e-10, atol=1e-14 * ref[0])
    assert ((u * s) @ vh - dense).norm() / dense.norm() < 1e-12
    assert torch.allclose(singular_values(b, a, 0.37), s, rtol=1e-12, atol=1e-14 * ref[0])


def test_truncation_error_is_eckart_young():
    b, a = (x.double() for x in pair(80, 60, 16, gen(5), eff=3))
    dense = b @ a
    u, s, vh = factored_svd(b, a)
    for k in (1, 4, 9):
        bb, aa = balanced_factors(u, s, vh, k)
        err = (bb @ aa - dense).norm()
        assert abs(err - s[k:].pow(2).sum().sqrt()) < 1e-10 * s[0]


def test_inner_products_equal_dense():
    g = gen(9)
    b1, a1 = (x.double() for x in pair(50, 40, 8, g))
    b2, a2 = (x.double() for x in pair(50, 40, 4, g))
    assert abs(frobenius_inner(b1, a1, b2, a2) - ((b1 @ a1) * (b2 @ a2)).sum()) < 1e-14
    assert abs(frobenius_norm(b1, a1) - (b1 @ a1).norm()) < 1e-14


@pytest.mark.parametrize("shape", [(50, 8), (300, 64), (7, 200, 96), (3, 2, 90, 33)])
def test_gram_equals_full_product(shape):
    from lens_ops.lowrank import gram
    x = torch.randn(*shape, dtype=torch.float64)
    ref = x.transpose(-2, -1) @ x
    assert torch.allclose(gram(x), ref, rtol=1e-12, atol=1e-10)
    xt = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64).transpose(-2, -1)  # non-contiguous
    assert torch.allclose(gram(xt), xt.transpose(-2, -1) @ xt, rtol=1e-12, atol=1e-10)
