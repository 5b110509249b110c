"""TIES and DARE one block of rows at a time (lens_ops/blend/rowwise.py) against whole-matrix float64 references,
and the blend's dense route never forming a task vector of a module that has factors."""
import pytest
import torch

from lens_ops import LoRAModel
from lens_ops.blend import blend, rowwise
from lens_ops.blend.methods import dare_masks, dare_seeds


def _factors(n, m, r, seed, decay=6.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.exp(-torch.arange(r, dtype=torch.float64) / decay)
    b = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0] * s
    a = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0].T
    return b, a


def _ties_dense(taus, density):
    """TIES over whole float64 matrices: trim by the exact k-th magnitude, elect signs, disjoint mean."""
    trimmed = []
    for t in taus:
        n = t.numel()
        k = max(1, int(round(density * n)))
        thr = t.abs().reshape(-1).kthvalue(n - k + 1).values
        trimmed.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
    sign = torch.sign(sum(trimmed))
    agree = [(t * sign) > 0 for t in trimmed]
    num = sum(torch.where(a, t, torch.zeros_like(t)) for a, t in zip(agree, trimmed))
    return num / sum(a.double() for a in agree).clamp_min(1)


@pytest.mark.parametrize("block", [1 << 18, 4096])
def test_ties_rows_from_factors_equal_the_whole_matrix_route(block, monkeypatch):
    """A layer big enough for the sampled threshold (700×800 entries), factors recomputed per block of rows."""
    monkeypatch.setattr(rowwise, "BLOCK_ENTRIES", block)
    (b1, a1), (b2, a2) = _factors(700, 800, 12, 1), _factors(700, 800, 9, 2)
    t1, t2 = 0.9 * (b1 @ a1), -0.6 * (b2 @ a2)
    got = rowwise.ties_rows([rowwise.Rows.factors(b1, a1, 0.9), rowwise.Rows.factors(b2, a2, -0.6)], 0.3)
    ref = _ties_dense([t1, t2], 0.3)
    assert float((got - ref).norm() / ref.norm()) < 1e-12


def test_threshold_falls_back_exactly_when_the_bracket_holds_too_many_ties(monkeypatch):
    monkeypatch.setattr(rowwise, "GATHER_CAP", 1000)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-30, 30, (900, 700), generator=g).float()
    mags = x.abs().reshape(-1)
    for k in (1, 12345, x.numel() // 2, x.numel()):
        got = rowwise.magnitude_threshold(rowwise.Rows.dense(x), k)
        assert torch.equal(got, mags.kthvalue(x.numel() - k + 1).values)


def test_dare_rows_draw_the_same_masks_as_one_whole_draw(monkeypatch):
    """Blocks of rows consume each input's generator in order: the masks equal one draw of the whole matrix (files
    blended before this change come out the same)."""
    monkeypatch.setattr(rowwise, "BLOCK_ENTRIES", 3000)
    (b1, a1), (b2, a2) = _factors(333, 257, 6, 4), _factors(333, 257, 5, 5)
    t1, t2 = 0.5 * (b1 @ a1), 0.8 * (b2 @ a2)
    seeds = dare_seeds(9, "some.module", 2)
    got = rowwise.dare_rows([rowwise.Rows.factors(b1, a1, 0.5), rowwise.Rows.factors(b2, a2, 0.8)], 0.4, seeds)
    m1, m2 = dare_masks(t1.shape, 0.4, 9, "some.module", 2)
    ref = t1 * m1 / 0.4 + t2 * m2 / 0.4
    assert float((got - ref).norm() / ref.norm()) < 1e-12


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_blend_never_forms_a_dense_task_vector_of_a_factored_module(method, monkeypatch):
    """Working memory: TIES/DARE read LoRA modules through their factors, block by block; asking any module for
    its dense ΔW fails this test."""
    sd = {}
    for i, (b, a) in enumerate([_factors(600, 500, 8, 7), _factors(600, 500, 6, 8)]):
        sd[i] = {"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": b.float(),
                 "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": a.float()}
    x, y = LoRAModel.from_state_dict(sd[0]), LoRAModel.from_state_dict(sd[1])
    want, _ = blend([x, y], [0.7, 0.3], method, rank=16, density=0.3, seed=1)

    def no_dense(self, *a, **k):
        raise AssertionError("dense ΔW formed")
    from lens_ops.model import LoRAModule
    monkeypatch.setattr(LoRAModule, "delta", no_dense)
    got, _ = blend([x, y], [0.7, 0.3], method, rank=16, density=0.3, seed=1)
    name = x.modules[0].name
    assert torch.equal(got.get(name).tensors["up"], want.get(name).tensors["up"])
