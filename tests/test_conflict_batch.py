"""ConflictScan's batched route (modules of one shape measured together, Gram products batched, r×r work batched,
eigen fallback for ill-conditioned factors) equals a dense float64 computation module by module."""
import pytest
import torch

from lens_ops import LoRAModel
from lens_ops.conflict import scan
from lens_ops.conflict.metrics import lowrank_metrics, lowrank_metrics_batch
from lora_factory import gen, pair


def _dense(d1, d2, tol=1e-3):
    n1, n2 = d1.norm(), d2.norm()
    out = {"cosine": float((d1 * d2).sum() / (n1 * n2)), "norm_a": float(n1), "norm_b": float(n2),
           "interference": float((d1 + d2).norm() / (n1 + n2))}
    u1, s1, v1 = torch.linalg.svd(d1, full_matrices=False)
    u2, s2, v2 = torch.linalg.svd(d2, full_matrices=False)
    k1, k2 = int((s1 > tol * s1[0]).sum()), int((s2 > tol * s2[0]).sum())
    k = min(k1, k2)
    out["column_overlap"] = float(torch.linalg.svdvals(u1[:, :k1].T @ u2[:, :k2]).pow(2).sum() / k)
    out["row_overlap"] = float(torch.linalg.svdvals(v1[:k1] @ v2[:k2].T).pow(2).sum() / k)
    e12 = (u2[:, :k2].T @ d1 @ v2[:k2].T).pow(2).sum() / n1 ** 2
    e21 = (u1[:, :k1].T @ d2 @ v1[:k1].T).pow(2).sum() / n2 ** 2
    out["energy_overlap"] = float((e12 * e21).sqrt())
    return out


def _deficient(up, down):
    """Rank-deficient factors (and ΔW): Cholesky of their Grams fails → eigen route; same subspaces as ΔW."""
    r = down.shape[0]
    up[:, r // 2:] = up[:, :r - r // 2] * 0.5
    down[r // 2:] = 0


def _lora(factors, names, alpha, dtype):
    sd = {}
    for name, (up, down) in zip(names, factors):
        sd[name + ".lora_up.weight"] = up.to(dtype)
        sd[name + ".lora_down.weight"] = down.to(dtype)
        sd[name + ".alpha"] = torch.tensor(float(alpha))
    return LoRAModel.from_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_batched_scan_equals_dense_float64(dtype):
    g = gen(11)
    names = [f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_{i}_attn1_to_q" for i in range(9)]
    names += [f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_{i}_ff_net_2" for i in range(5)]
    shapes = [(48, 40)] * 9 + [(40, 96)] * 5
    flav = ["plain", "deficient", "plain", "plain", "deficient", "plain", "plain", "zero_b", "plain"] + ["plain"] * 5
    fa, fb = [], []
    for (o, i), f in zip(shapes, flav):
        u1, d1 = pair(o, i, 8, g, eff=2.0)                 # decaying spectra
        u2, d2 = pair(o, i, 6, g, eff=2.0)
        u2[:, :3] = -0.7 * u1[:, :3] + 0.3 * u2[:, :3]   # partly opposed, partly shared subspaces
        d2[:3] = d1[:3]
        if f == "zero_b":
            u2 = torch.zeros_like(u2)
        if f == "deficient":
            _deficient(u1, d1)
            _deficient(u2, d2)
        fa.append((u1, d1))
        fb.append((u2, d2))
    a, b = _lora(fa, names, 4.0, dtype), _lora(fb, names, 6.0, dtype)
    rep = scan(a, b)
    assert rep["compared_modules"] == len(names)
    for name, (u1, d1), (u2, d2), f in zip(names, fa, fb, flav):
        q1, q2 = u1.to(dtype).double() @ d1.to(dtype).double(), u2.to(dtype).double() @ d2.to(dtype).double()
        got = rep["modules"][name]
        if f == "zero_b":
            assert got["norm_b"] == 0 and got["cosine"] == 0 and got["energy_overlap"] == 0
            continue
        ref = _dense(q1 * (4.0 / 8), q2 * (6.0 / 6))
        assert abs(got["cosine"] - ref["cosine"]) < 1e-5, name
        assert abs(got["cosine"]) > 1e-3                  # not a trivially zero cosine
        for k in ("norm_a", "norm_b", "interference"):
            assert got[k] == pytest.approx(ref[k], rel=1e-5), (name, k)
        for k in ("column_overlap", "row_overlap", "energy_overlap"):
            assert abs(got[k] - ref[k]) < 1e-4, (name, k, got[k], ref[k])


def test_batch_kernel_equals_single_module_kernel():
    g = gen(5)
    b1, a1, b2, a2, s1, s2 = [], [], [], [], [], []
    for j in range(6):
        u1, d1 = pair(64, 80, 12, g)
        u2, d2 = pair(64, 80, 5, g)
        if j == 2:
            u1[:, 6:] = u1[:, :6]                           # ill-conditioned: eigen fallback inside the batch
        if j == 4:
            d2 = torch.zeros_like(d2)                       # zero module
        b1.append(u1), a1.append(d1), b2.append(u2), a2.append(d2), s1.append(0.5 + j), s2.append(-1.5)
    got = lowrank_metrics_batch(torch.stack(b1), torch.stack(a1), torch.stack(b2), torch.stack(a2), s1, s2)
    for j in range(6):
        ref = lowrank_metrics((b1[j], a1[j], s1[j]), (b2[j], a2[j], s2[j]))
        assert set(got[j]) == set(ref)
        for k, v in ref.items():
            if isinstance(v, float):
                assert got[j][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (j, k)
            else:
                assert got[j][k] == v, (j, k)


def test_batched_scan_of_int8_factors_equals_dense_float64():
    g = gen(21)
    q = lambda t: (t / t.abs().max() * 127).round().to(torch.int8)
    names = [f"lora_unet_up_blocks_1_attentions_0_transformer_blocks_{i}_attn2_to_v" for i in range(4)]
    sa, sb, refs = {}, {}, []
    for name in names:
        u1, d1 = pair(40, 56, 6, g, eff=2.0)
        u2, d2 = pair(40, 56, 6, g, eff=2.0)
        u2[:, :2] = -u1[:, :2]
        d2[:2] = d1[:2]
        for sd, (u, d), alpha in ((sa, (u1, d1), 3e-7), (sb, (u2, d2), 5e-6)):     # tiny folded alphas
            sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"] = q(u), q(d)
            sd[name + ".alpha"] = torch.tensor(alpha)
        refs.append((q(u1).double() @ q(d1).double() * (3e-7 / 6), q(u2).double() @ q(d2).double() * (5e-6 / 6)))
    rep = scan(LoRAModel.from_state_dict(sa), LoRAModel.from_state_dict(sb))
    for name, (r1, r2) in zip(names, refs):
        got, ref = rep["modules"][name], _dense(r1, r2)
        assert abs(got["cosine"] - ref["cosine"]) < 1e-5 and got["cosine"] < -0.05
        assert got["norm_a"] == pytest.approx(ref["norm_a"], rel=1e-5)
