"""PruneRank engine against float64 dense references: Eckart–Young optimality, alpha semantics, kinds,
carried keys, metadata, never-larger, bit-identical when nothing is dropped."""
import json
import math

import pytest
import torch

from lens_ops import LensError, LoRAModel
from lens_ops.prune import parse_recipe, parse_recipes, prune_many, prune_model
from lens_ops.synth import make_lora
from lora_factory import gen, kind_tensors, pair, rel_err


def crafted(n, m, s, g, dtype=torch.float64):
    """(up, down) with up@down having exactly the singular values s (orthonormal bases, unbalanced)."""
    r = len(s)
    u, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    t = torch.rand(r, generator=g, dtype=torch.float64) + 0.5  # uneven split between up and down
    s = torch.as_tensor(s, dtype=torch.float64)
    return (u * (s * t)).to(dtype), ((v / t).T).to(dtype)


def dense_ref(m):
    return m.delta(torch.float64).reshape(m.weight_shape()[0], -1)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_eckart_young_error_equals_dropped_singular_values(k):
    g = gen(1)
    up, down = pair(96, 80, 12, g, eff=3)
    sd = {"lora_unet_a.lora_up.weight": up.double(), "lora_unet_a.lora_down.weight": down.double(),
          "lora_unet_a.alpha": torch.tensor(6.0, dtype=torch.float64)}
    model = LoRAModel.from_state_dict(sd)
    ref = 0.5 * up.double() @ down.double()
    s = torch.linalg.svdvals(ref)
    out, rep = prune_model(model, f"rank={k}")
    new = out.modules[0]
    assert new.rank() == k
    err = (dense_ref(new) - ref).norm()
    assert abs(err - s[k:].norm()) <= 1e-9 * s[0]
    # and the kept part is the optimal rank-k truncation itself
    u, sv, vh = torch.linalg.svd(ref)
    best = (u[:, :k] * sv[:k]) @ vh[:k]
    assert rel_err(dense_ref(new), best) < 1e-9
    e = rep["modules"][0]
    assert abs(e["rel_error"] - float(s[k:].norm() / s.norm())) < 1e-9
    assert e["old_rank"] == 12 and e["new_rank"] == k
    assert abs(e["snr_db"] - 20 * math.log10(float(s.norm() / s[k:].norm()))) < 1e-6


def test_balanced_factors():
    g = gen(2)
    up, down = crafted(40, 30, [5.0, 2.0, 1.0, 0.1], g)
    model = LoRAModel.from_state_dict({"x.lora_up.weight": up, "x.lora_down.weight": down, "x.alpha": torch.tensor(4.0, dtype=torch.float64)})
    out, _ = prune_model(model, "rank=3")
    m = out.modules[0]
    cu = m.tensors["up"].norm(dim=0)
    cd = m.tensors["down"].norm(dim=1)
    assert torch.allclose(cu, cd, rtol=1e-6)


@pytest.mark.parametrize("conv", ["kohya", "kohya_noalpha", "peft"])
def test_alpha_semantics(conv):
    g = gen(3)
    up, down = pair(64, 48, 8, g, eff=2)
    names = {"kohya": ("lora_unet_b.lora_up.weight", "lora_unet_b.lora_down.weight"),
             "kohya_noalpha": ("lora_unet_b.lora_up.weight", "lora_unet_b.lora_down.weight"),
             "peft": ("transformer.b.lora_B.weight", "transformer.b.lora_A.weight")}[conv]
    sd = {names[1]: down, names[0]: up}
    if conv == "kohya":
        sd["lora_unet_b.alpha"] = torch.tensor(3.0)
    model = LoRAModel.from_state_dict(sd)
    ref = dense_ref(model.modules[0])
    out, _ = prune_model(model, "rank=4")
    st = out.state_dict()
    assert set(st) == set(sd)  # same keys: no alpha added to PEFT / alpha-less files, none lost
    new = out.modules[0]
    if conv == "kohya":
        # alpha/rank ratio kept (kohya semantics): 3/8 · 4
        assert st["lora_unet_b.alpha"].item() == pytest.approx(1.5)
    s = torch.linalg.svdvals(ref)
    err = (dense_ref(new) - ref).norm()
    assert abs(err - s[4:].norm()) < 1e-5 * s[0]


def test_fp16_alpha_not_representable_is_compensated():
    g = gen(4)
    up, down = pair(64, 48, 9, g, eff=3)
    sd = {"m.lora_up.weight": up.half(), "m.lora_down.weight": down.half(), "m.alpha": torch.tensor(1.0 / 3).half()}
    model = LoRAModel.from_state_dict(sd)
    ref = dense_ref(model.modules[0])
    out, _ = prune_model(model, "rank=7")
    new = out.modules[0]
    s = torch.linalg.svdvals(ref)
    err = float((dense_ref(new) - ref).norm())
    opt = float(s[7:].norm())
    assert err <= opt + 3e-3 * float(s.norm())  # fp16 storage rounding only
    assert out.state_dict()["m.alpha"].dtype == torch.float16


def test_nothing_to_drop_is_bit_identical_and_never_larger():
    sd = make_lora("sd15_kohya", rank=4, seed=5, max_modules=30)
    model = LoRAModel.from_state_dict(sd)
    out, rep = prune_model(model, "rank=64")
    st = out.state_dict()
    assert list(st) == list(sd)
    assert all(torch.equal(st[k], sd[k]) for k in sd)
    assert rep["total"]["bytes_out"] == rep["total"]["bytes_in"]
    for recipe in ("energy=0.9", "sv_ratio=4", "dtype=fp32,rank=3"):
        out, rep = prune_model(model, recipe)
        assert out.nbytes <= model.nbytes
        for e in rep["modules"]:
            assert e["new_rank"] <= e["old_rank"]
            assert e["bytes_out"] <= e["bytes_in"]


def test_locon_3x3_keeps_conv_shapes_and_delta():
    t, ref = kind_tensors("locon3x3", gen(6), torch.float64)
    # a larger rank so there is something to drop
    up, down = pair(16, 6 * 9, 8, gen(7), eff=2)
    sd = {"lora_unet_c.lora_up.weight": up.double().reshape(16, 8, 1, 1),
          "lora_unet_c.lora_down.weight": down.double().reshape(8, 6, 3, 3), "lora_unet_c.alpha": torch.tensor(4.0, dtype=torch.float64)}
    model = LoRAModel.from_state_dict(sd)
    out, _ = prune_model(model, "rank=3")
    st = out.state_dict()
    assert tuple(st["lora_unet_c.lora_up.weight"].shape) == (16, 3, 1, 1)
    assert tuple(st["lora_unet_c.lora_down.weight"].shape) == (3, 6, 3, 3)
    ref = (0.5 * up.double() @ down.double())
    s = torch.linalg.svdvals(ref)
    err = (out.modules[0].delta(torch.float64).reshape(16, -1) - ref).norm()
    assert abs(err - s[3:].norm()) < 1e-9 * s[0]


def test_tucker_folds_to_plain_conv_or_stays():
    g = gen(8)
    r = 6
    sd = {"lora_unet_t.lora_up.weight": torch.randn(64, r, 1, 1, generator=g, dtype=torch.float64),
          "lora_unet_t.lora_down.weight": torch.randn(r, 32, 1, 1, generator=g, dtype=torch.float64),
          "lora_unet_t.lora_mid.weight": torch.randn(r, r, 3, 3, generator=g, dtype=torch.float64),
          "lora_unet_t.alpha": torch.tensor(3.0, dtype=torch.float64)}
    model = LoRAModel.from_state_dict(sd)
    ref = dense_ref(model.modules[0])
    out, rep = prune_model(model, "rank=2")
    st = out.state_dict()
    assert "lora_unet_t.lora_mid.weight" not in st
    assert tuple(st["lora_unet_t.lora_down.weight"].shape) == (2, 32, 3, 3)
    s = torch.linalg.svdvals(ref)
    assert abs((dense_ref(out.modules[0]) - ref).norm() - s[2:].norm()) < 1e-9 * s[0]
    # rank 5 as a plain conv LoRA would be larger than the Tucker original: kept bit-identical
    out, rep = prune_model(model, "rank=5")
    assert all(torch.equal(out.state_dict()[k], sd[k]) for k in sd)
    assert "bit-identical" in rep["modules"][0]["note"]


def test_dora_output_axis_pruned_input_axis_refused_without_base():
    g = gen(9)
    up, down = pair(24, 16, 6, g, eff=2)
    out_axis = {"lora_unet_d.lora_up.weight": up, "lora_unet_d.lora_down.weight": down,
                "lora_unet_d.alpha": torch.tensor(6.0), "lora_unet_d.dora_scale": torch.rand(24, 1, generator=g) + 0.5}
    out, rep = prune_model(LoRAModel.from_state_dict(out_axis), "rank=2")
    assert out.modules[0].rank() == 2
    assert torch.equal(out.state_dict()["lora_unet_d.dora_scale"], out_axis["lora_unet_d.dora_scale"])
    in_axis = dict(out_axis)
    in_axis["lora_unet_d.dora_scale"] = torch.rand(1, 16, generator=g) + 0.5
    out, rep = prune_model(LoRAModel.from_state_dict(in_axis), "rank=2")
    assert all(torch.equal(out.state_dict()[k], in_axis[k]) for k in in_axis)
    assert "DoRA" in rep["modules"][0]["note"] and "base" in rep["modules"][0]["note"]


def comfy_dora(w, delta, mag):
    """ComfyUI weight_decompose at strength 1 (input axis): m·(W+ΔW)/‖W+ΔW‖ per input column."""
    wc = w + delta
    norm = wc.transpose(0, 1).reshape(wc.shape[1], -1).norm(dim=1, keepdim=True).reshape(wc.shape[1], 1).transpose(0, 1)
    return wc * (mag / (norm + torch.finfo(torch.float32).eps))


def test_dora_input_axis_recomputed_with_base():
    from lens_ops.prune import DictBase
    g = gen(10)
    up, down = pair(24, 16, 6, g, eff=2)
    w = torch.randn(24, 16, generator=g) * 0.05
    sd = {"lora_unet_d.lora_up.weight": up * 10, "lora_unet_d.lora_down.weight": down,
          "lora_unet_d.alpha": torch.tensor(6.0), "lora_unet_d.dora_scale": torch.rand(1, 16, generator=g) + 0.5}
    model = LoRAModel.from_state_dict(sd)
    base = DictBase(lambda name: w if name == "lora_unet_d" else None, "test-ident", cache_dir="")
    out, rep = prune_model(model, "rank=3", base=base)
    old, new = model.modules[0], out.modules[0]
    assert new.rank() == 3
    assert not torch.equal(new.tensors["dora_scale"], old.tensors["dora_scale"])
    w_old = comfy_dora(w, old.delta(torch.float32), old.tensors["dora_scale"].float())
    w_new = comfy_dora(w, new.delta(torch.float32), new.tensors["dora_scale"].float())
    dropped = new.delta(torch.float32) - old.delta(torch.float32)
    # the applied weight changes exactly by the dropped part, rescaled column-wise by m / ‖W+ΔW‖
    expect = dropped * (old.tensors["dora_scale"] / ((w + old.delta(torch.float32)).norm(dim=0, keepdim=True)))
    assert rel_err(w_new - w_old, expect) < 1e-4


def test_loha_left_and_said_or_converted():
    g = gen(11)
    r = 4
    a1, b1, a2, b2 = (torch.randn(s, generator=g) * 0.1 for s in [(128, r), (r, 96), (128, r), (r, 96)])
    sd = {"lora_unet_h.hada_w1_a": a1, "lora_unet_h.hada_w1_b": b1, "lora_unet_h.hada_w2_a": a2,
          "lora_unet_h.hada_w2_b": b2, "lora_unet_h.alpha": torch.tensor(2.0)}
    ref = (2.0 / r) * ((a1.double() @ b1.double()) * (a2.double() @ b2.double()))
    up, down = pair(32, 16, 8, gen(12))
    sd.update({"lora_unet_l.lora_up.weight": up, "lora_unet_l.lora_down.weight": down, "lora_unet_l.alpha": torch.tensor(8.0)})
    model = LoRAModel.from_state_dict(sd)
    out, rep = prune_model(model, "rank=2")
    assert all(torch.equal(out.state_dict()[k], sd[k]) for k in sd if k.startswith("lora_unet_h"))
    note = next(e["note"] for e in rep["modules"] if e["name"] == "lora_unet_h")
    assert "LoHa" in note and "left" in note
    out, rep = prune_model(model, "rank=4,lyco=convert")
    st = out.state_dict()
    assert "lora_unet_h.lora_up.weight" in st and "lora_unet_h.hada_w1_a" not in st
    new = out.get("lora_unet_h")
    assert new.kind.name == "lora" and new.rank() == 4
    s = torch.linalg.svdvals(ref)
    err = (new.delta(torch.float64) - ref).norm()
    assert abs(err - s[4:].norm()) < 1e-5 * s.norm()
    assert out.nbytes < model.nbytes


def test_unknown_and_diff_keys_carried_bit_identical():
    up, down = pair(32, 16, 8, gen(13))
    d, _ = kind_tensors("diff", gen(14))
    sd = {"lora_unet_l.lora_up.weight": up, "lora_unet_l.lora_down.weight": down, "lora_unet_l.alpha": torch.tensor(8.0),
          "some.random.tensor": torch.arange(5.0), **{"lora_unet_df" + k: v for k, v in d.items()}}
    model = LoRAModel.from_state_dict(sd)
    out, rep = prune_model(model, "rank=2")
    st = out.state_dict()
    for k in ("some.random.tensor", "lora_unet_df.diff", "lora_unet_df.diff_b"):
        assert torch.equal(st[k], sd[k])
    assert len(rep["modules"]) == 3


def test_metadata_updated_with_provenance():
    sd = make_lora("sdxl_kohya", rank=8, seed=15, max_modules=12)
    model = LoRAModel.from_state_dict(sd)
    out, _ = prune_model(model, "rank=4")
    assert out.metadata["ss_network_dim"] == "4"
    assert float(out.metadata["ss_network_alpha"]) == pytest.approx(2.0)  # alpha/rank ratio 4/8 kept
    prov = json.loads(out.metadata["lora_lens.provenance"])
    assert prov[-1]["op"] == "prune" and prov[-1]["settings"]["recipe"] == "rank=4"
    out, _ = prune_model(model, "energy=0.95")
    assert out.metadata["ss_network_dim"] in ("Dynamic",) or out.metadata["ss_network_dim"].isdigit()
    # everything else in the metadata is kept
    for k, v in sd.metadata.items():
        if not k.startswith("ss_network_"):
            assert out.metadata[k] == v


def test_rescale_scales_delta():
    up, down = pair(32, 16, 8, gen(16), eff=2)
    sd = {"l.lora_up.weight": up.double(), "l.lora_down.weight": down.double(), "l.alpha": torch.tensor(8.0, dtype=torch.float64)}
    model = LoRAModel.from_state_dict(sd)
    ref = dense_ref(model.modules[0])
    out, rep = prune_model(model, "rank=8,rescale=0.5")
    assert rel_err(dense_ref(out.modules[0]), 0.5 * ref) < 1e-10


def test_zero_module_removed_and_reported():
    up, down = pair(32, 16, 4, gen(17))
    sd = {"a.lora_up.weight": up, "a.lora_down.weight": down, "a.alpha": torch.tensor(4.0),
          "z.lora_up.weight": torch.zeros(32, 4), "z.lora_down.weight": down.clone(), "z.alpha": torch.tensor(4.0)}
    out, rep = prune_model(LoRAModel.from_state_dict(sd), "energy=0.99")
    assert out.get("z") is None
    e = next(e for e in rep["modules"] if e["name"] == "z")
    assert e["note"].startswith("removed") and e["new_rank"] == 0


def test_several_recipes_from_one_decomposition():
    sd = make_lora("sd15_kohya", rank=16, seed=18, max_modules=20, dtype=torch.float32)
    model = LoRAModel.from_state_dict(sd)
    res = prune_many(model, "energy=0.9:rank=2:sv_fro=0.95")
    assert [r[1]["recipe"] for r in res] == ["energy=0.9", "rank=2", "sv_fro=0.95"]
    single = prune_model(model, "rank=2")[0]
    a, b = res[1][0].state_dict(), single.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_in_fp16_out_and_dtype_option():
    sd = make_lora("sd15_kohya", rank=8, seed=19, max_modules=6)
    model = LoRAModel.from_state_dict(sd)
    out, _ = prune_model(model, "rank=2")
    assert all(t.dtype == torch.float16 for t in out.state_dict().values())
    out, _ = prune_model(model, "rank=2,dtype=bf16")
    assert out.modules[0].tensors["up"].dtype == torch.bfloat16


def test_real_sdxl_layout_all_modules_error_matches_report():
    sd = make_lora("sdxl_kohya_locon", rank=8, seed=20, max_modules=40, dtype=torch.float32)
    model = LoRAModel.from_state_dict(sd)
    out, rep = prune_model(model, "energy=0.95")
    by = {e["name"]: e for e in rep["modules"]}
    for m in model.modules:
        new = out.get(m.name)
        ref = m.delta(torch.float64)
        got = new.delta(torch.float64) if new is not None else torch.zeros_like(ref)
        assert abs(rel_err(got, ref) - by[m.name]["rel_error"]) < 1e-4
        assert by[m.name]["energy_kept"] >= 0.95 - 1e-9


@pytest.mark.parametrize("layout", ["flux_kohya", "flux_diffusers_peft", "flux_aitoolkit_peft", "flux_kohya_te1",
                                    "sd15_kohya_locon", "sdxl_lycoris_locon", "flux_diffusers_peft_ext"])
def test_every_layout_prunes_with_reported_error(layout):
    sd = make_lora(layout, rank=8, seed=21, max_modules=10, dtype=torch.float32)
    model = LoRAModel.from_state_dict(sd)
    out, rep = prune_model(model, "energy=0.9")
    assert model.convention == out.convention
    assert set(out.state_dict()) <= set(sd)
    by = {e["name"]: e for e in rep["modules"]}
    for m in model.modules:
        if m.kind.name != "lora":
            continue
        new = out.get(m.name)
        ref = m.delta(torch.float64)
        got = new.delta(torch.float64) if new is not None else torch.zeros_like(ref)
        assert abs(rel_err(got, ref) - by[m.name]["rel_error"]) < 1e-4


def test_factored_svd_transforms_against_dense():
    from lens_ops.lowrank import factored_svd_transforms
    g = gen(30)
    for n, m, r in [(80, 60, 8), (300, 40, 16)]:
        b, a = (x.double() for x in pair(n, m, r, g, eff=3))
        p, s, qt, ok = factored_svd_transforms(b, a, 0.7)
        assert ok
        ref = 0.7 * b @ a
        sv = torch.linalg.svdvals(ref)[:r]
        assert torch.allclose(s, sv, rtol=1e-9, atol=1e-12 * float(sv[0]))
        u, vh = b @ p, qt @ a
        assert rel_err((u * s) @ vh, ref) < 1e-10
        assert torch.allclose(u.T @ u, torch.eye(r, dtype=torch.float64), atol=1e-8)
    b, a = pair(6, 40, 8, g)
    assert factored_svd_transforms(b, a) is None  # rank above min(n, m): use factored_svd


def test_prune_accepts_int8_input_with_exact_delta():
    """QuantizeInt8 output (int8 factors, scales folded into alpha) prunes from its exact dequantized ΔW."""
    from lens_ops import LoRAModel
    from lens_ops.prune import prune_model
    from lens_ops.quantize import quantize_model
    from lens_ops.synth import make_lora
    src = LoRAModel.from_state_dict(make_lora("sd15_kohya", rank=8, seed=3, max_modules=6))
    q = quantize_model(src)
    q = q[0] if isinstance(q, tuple) else q
    out, rep = prune_model(q, "energy=0.999")
    for mq, mo in zip(q.modules, out.modules):
        ref = mq.delta(torch.float64)
        got = mo.delta(torch.float64)
        assert got.shape == ref.shape
        assert float((got - ref).norm() / ref.norm()) < 0.05   # only the dropped 0.1 % energy (≈3 %) is lost
        assert mo.tensors["up"].is_floating_point()


def test_float32_core_route_and_float64_retry_against_dense():
    """float32 Grams are decomposed in float32 when a is well conditioned; a worse-conditioned a is redone
    in float64. Both reproduce the float64 dense SVD of scale·B@A (singular values and the truncated ΔW)."""
    from lens_ops.lowrank import gram
    from lens_ops.prune.decompose import F32_MAX_COND, _transforms
    g = gen(31)
    bs, as_ = [], []
    for i in range(4):
        b, a = pair(200, 150, 16, g, eff=4)
        if i >= 2:  # rows of a spread over ~10^3.5: above the float32 limit, within float64's
            a = a * torch.logspace(0, -3.5, 16).unsqueeze(1)
        bs.append(b.float())
        as_.append(a.float())
    gb = torch.stack([gram(b) for b in bs])
    ga = torch.stack([gram(a.T) for a in as_])
    assert gb.dtype == torch.float32
    scales = torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
    p, s, qt, ok = _transforms(gb, ga, scales, torch.float32)
    assert bool(ok.all()) and s.dtype == torch.float64
    for j in range(4):
        ref = float(scales[j]) * bs[j].double() @ as_[j].double()
        sv = torch.linalg.svdvals(ref)[:16]
        assert float((s[j] - sv).abs().max() / sv[0]) < 1e-5
        u, vh = bs[j] @ p[j], qt[j] @ as_[j]
        k = 6
        trunc = (u[:, :k].double() * s[j][:k]) @ vh[:k].double()
        u_r, s_r, vh_r = torch.linalg.svd(ref, full_matrices=False)
        best = (u_r[:, :k] * s_r[:k]) @ vh_r[:k]
        assert rel_err(trunc, best) < 2e-5   # the optimal rank-6 truncation (Eckart–Young)
    la = torch.linalg.cholesky(ga[2].double()).diagonal()
    assert float(la.max() / la.min()) > F32_MAX_COND  # those two really took the float64 retry
