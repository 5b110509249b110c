"""AnalyzeLoRA numbers against dense float64 references: spectra, norms, statistics, blocks, similarity."""
import math

import pytest
import torch

from lens_ops import LensError, LoRAModel
from lens_ops.analysis import analyze
from lens_ops.analysis.blocks import smallest_block_set
from lens_ops.analysis.spectra import analyze_modules, batched_singular_values
from lens_ops.analysis.stats import effective_rank
from lens_ops.lowrank import singular_values
from lens_ops.synth import make_lora
from lora_factory import KINDS, gen, kind_tensors, pair, rel_err

REF_KINDS = [k for k in KINDS if kind_tensors(k, gen(0))[1] is not None]


def dense_numbers(ref: torch.Tensor) -> dict:
    mat = ref.reshape(ref.shape[0], -1) if ref.ndim >= 2 else ref.reshape(-1, 1)
    s = torch.linalg.svdvals(mat)
    flat = mat.flatten()
    return {"s": s, "spectral": float(s[0]), "fro": float(mat.norm()), "nuclear": float(s.sum()),
            "mean": float(flat.mean()), "std": float(flat.std(unbiased=False)), "flat": flat}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-3)])
@pytest.mark.parametrize("kind", REF_KINDS)
def test_every_kind_equals_dense_reference(kind, dtype, tol):
    t, _ = kind_tensors(kind, gen(3), dtype)
    sd = {"lora_unet_x" + k: v for k, v in t.items()}
    model = LoRAModel.from_state_dict(sd)
    # reference from the stored (possibly half-precision) values, in float64, straight from the formulas
    _, ref = kind_tensors(kind, gen(3), torch.float64)
    t64 = {k: v.double() for k, v in t.items()}
    ref = LoRAModel.from_state_dict({"lora_unet_x" + k: v for k, v in t64.items()}).modules[0].delta(torch.float64) \
        if dtype != torch.float64 else ref
    d = dense_numbers(ref)
    e = analyze_modules(model)["lora_unet_x"]
    k = e["singular_values"]
    s = torch.tensor(k, dtype=torch.float64)
    assert rel_err(s, d["s"][: s.numel()]) < tol
    assert float(d["s"][s.numel():].abs().max() if d["s"].numel() > s.numel() else 0) <= tol * d["spectral"]
    for ours, theirs in ((e["spectral_norm"], d["spectral"]), (e["frobenius_norm"], d["fro"]),
                         (e["nuclear_norm"], d["nuclear"]), (e["std"], d["std"])):
        assert abs(ours - theirs) <= tol * abs(theirs)
    assert abs(e["mean"] - d["mean"]) <= tol * d["std"]
    for key, p in (("90", .9), ("99", .99), ("999", .999)):
        assert e[f"effective_rank_{key}"] == effective_rank(d["s"], p)
    assert e["route"] == ("factored" if kind in ("lora", "lora_noalpha", "locon3x3", "tucker", "dora")
                          else "kronecker" if kind.startswith("lokr") else "dense")
    if kind == "dora":
        assert "DoRA" in e["note"]


def test_factored_route_on_realistic_lora_float64():
    sd = make_lora("sd15_kohya_locon", rank=8, dtype=torch.float64, seed=4,
                   name_filter=lambda n: "down_blocks_0_attentions_0" in n or "down_blocks_0_resnets_0_conv1" in n)
    model = LoRAModel.from_state_dict(sd)
    entries = analyze_modules(model)
    for m in model.modules:
        e = entries[m.name]
        d = dense_numbers(m.delta(torch.float64))
        s = torch.tensor(e["singular_values"], dtype=torch.float64)
        assert rel_err(s, d["s"][: s.numel()]) < 1e-5, m.name
        assert abs(e["frobenius_norm"] - d["fro"]) < 1e-5 * d["fro"]
        assert abs(e["nuclear_norm"] - d["nuclear"]) < 1e-5 * d["nuclear"]
        assert abs(e["mean"] - d["mean"]) < 1e-5 * d["std"]
        assert abs(e["std"] - d["std"]) < 1e-5 * d["std"]
        # sampled elements are exact ΔW elements: inside the true range, below the bound
        lo, hi = float(d["flat"].min()), float(d["flat"].max())
        el = e["elements"]
        assert lo - 1e-12 <= el["min"] <= el["max"] <= hi + 1e-12
        assert e["linf_bound"] >= max(abs(lo), abs(hi)) * (1 - 1e-9)
        if el["source"] == "all elements":
            q = torch.quantile(d["flat"], torch.tensor([.01, .05, .25, .5, .75, .95, .99], dtype=torch.float64))
            assert torch.allclose(torch.tensor(list(el["percentiles"].values()), dtype=torch.float64), q,
                                  atol=1e-6 * d["std"])
            assert el["min"] == pytest.approx(lo) and el["max"] == pytest.approx(hi)


def test_small_module_uses_all_elements_exactly():
    up, down = pair(40, 30, 4, gen(8))
    model = LoRAModel.from_state_dict({"lora_unet_a.lora_up.weight": up.double(),
                                       "lora_unet_a.lora_down.weight": down.double()})
    e = analyze_modules(model)["lora_unet_a"]
    flat = (up.double() @ down.double()).flatten()
    el = e["elements"]
    assert el["source"] == "all elements" and el["count"] == 1200
    assert el["l1_norm"] == pytest.approx(float(flat.abs().sum()), rel=1e-9)
    assert el["linf_norm"] == pytest.approx(float(flat.abs().max()), rel=1e-9)
    assert el["positive_fraction"] == pytest.approx(float((flat > 0).double().mean()))
    assert el["median"] == pytest.approx(float(flat.quantile(0.5)), rel=1e-9)
    assert sum(el["histogram"]["counts"]) == 1200
    fs = e["factors"]
    allf = torch.cat([up.double().flatten(), down.double().flatten()])
    assert fs["l1_norm"] == pytest.approx(float(allf.abs().sum()), rel=1e-9)
    assert fs["l2_norm"] == pytest.approx(float(allf.norm()), rel=1e-9)
    assert fs["linf_norm"] == pytest.approx(float(allf.abs().max()), rel=1e-12)


def test_batched_route_equals_shared_singular_values():
    g = gen(12)
    bs, as_ = zip(*[pair(96, 64, 16, g, eff=3) for _ in range(5)])
    b, a = torch.stack(bs).double(), torch.stack(as_).double()
    got = batched_singular_values(b, a)
    for i in range(5):
        assert torch.allclose(got[i], singular_values(b[i], a[i]), rtol=1e-10, atol=1e-14 * float(got[i, 0]))


def test_weight_dependent_and_unknown_are_reported_not_guessed():
    sd = {}
    for kind in ("glora", "oft", "set"):
        t, _ = kind_tensors(kind, gen(1))
        sd.update({f"lora_unet_{kind}" + k: v for k, v in t.items()})
    t, _ = kind_tensors("lora", gen(2))
    sd.update({"lora_unet_plain" + k: v for k, v in t.items()})
    sd["something_else"] = torch.randn(3)
    rep = analyze(LoRAModel.from_state_dict(sd))
    mods = rep["modules"]
    assert set(mods) == {"lora_unet_glora", "lora_unet_oft", "lora_unet_set", "lora_unet_plain", "something_else"}
    for name in ("lora_unet_glora", "lora_unet_oft"):
        assert mods[name]["singular_values"] is None and "base weight" in mods[name]["note"]
    assert mods["lora_unet_plain"]["singular_values"]
    assert any(f["id"] == "weight_dependent" for f in rep["findings"])


def test_bad_input_is_a_sentence():
    with pytest.raises(LensError, match="no modules"):
        analyze(LoRAModel([], {}))
    with pytest.raises(LensError, match="unknown kind"):
        analyze(LoRAModel.from_state_dict({"foo.bar": torch.randn(4, 4), "baz": torch.randn(2)}))
    with pytest.raises(LensError, match="no tensors"):
        LoRAModel.from_state_dict({})


def test_blocks_shares_and_smallest_set():
    sd = make_lora("sdxl_kohya", rank=4, seed=5, max_modules=60)
    rep = analyze(LoRAModel.from_state_dict(sd), block_share=0.8)
    b = rep["blocks"]
    assert sum(v["share"] for v in b["blocks"].values()) == pytest.approx(1.0)
    total = sum(e["energy"] for e in rep["modules"].values())
    for name, blk in b["blocks"].items():
        mine = sum(e["energy"] for e in rep["modules"].values() if e["block"] == name)
        assert blk["energy"] == pytest.approx(mine) and blk["share"] == pytest.approx(mine / total)
    chosen = b["smallest_set"]
    shares = {k: v["share"] for k, v in b["blocks"].items()}
    assert sum(shares[c] for c in chosen) >= 0.8
    # minimal: no set with one block fewer reaches the target (the largest blocks are the best such set)
    best_smaller = sorted(shares.values(), reverse=True)[: len(chosen) - 1]
    assert sum(best_smaller) < 0.8
    assert smallest_block_set({"a": .5, "b": .3, "c": .2}, .75) == ["a", "b"]


def _lora(mods: dict, dtype=torch.float64):
    sd = {}
    for name, (up, down, alpha) in mods.items():
        sd[f"{name}.lora_up.weight"] = up.to(dtype)
        sd[f"{name}.lora_down.weight"] = down.to(dtype)
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return LoRAModel.from_state_dict(sd)


def test_similarity_exact_and_sketch_against_dense(monkeypatch):
    g = gen(21)
    base_up, base_down = pair(48, 40, 4, g)
    mods = {}
    for i in range(5):
        up, down = pair(48, 40, 4, g)
        mods[f"lora_unet_input_blocks_{i}_1_proj_in"] = ((up + (3 - i) * base_up), (down + (3 - i) * base_down), 2.0)
    model = _lora(mods)
    from lens_ops.analysis import similarity
    entries = analyze_modules(model)

    def dense_cos(names):
        ds = [model.get(n).delta(torch.float64).flatten() for n in names]
        return torch.tensor([[float(x @ y / (x.norm() * y.norm())) for y in ds] for x in ds])

    grp = similarity.similarity_groups(model, entries)[0]
    assert grp["method"].startswith("exact")
    assert torch.allclose(torch.tensor(grp["matrix"], dtype=torch.float64), dense_cos(grp["modules"]).double(), atol=1e-5)
    monkeypatch.setattr(similarity, "FLOP_BUDGET", 0)
    grp = similarity.similarity_groups(model, entries)[0]
    assert grp["method"].startswith("estimated")
    err = (torch.tensor(grp["matrix"], dtype=torch.float64) - dense_cos(grp["modules"]).double()).abs().max()
    assert err < 0.2


def test_duplicates_and_outliers_found():
    g = gen(30)
    mods = {}
    for i in range(12):
        up, down = pair(32, 24, 4, g)
        mods[f"lora_unet_output_blocks_{i}_1_proj_out"] = (up, down, 4.0)
    dup = mods["lora_unet_output_blocks_3_1_proj_out"]
    mods["lora_unet_output_blocks_99_1_proj_out"] = (dup[0].clone(), dup[1].clone(), 4.0)
    up, down = pair(32, 24, 4, g)
    mods["lora_unet_output_blocks_50_1_proj_out"] = (up * 300, down, 4.0)
    rep = analyze(_lora(mods))
    assert ["lora_unet_output_blocks_3_1_proj_out", "lora_unet_output_blocks_99_1_proj_out"] in rep["duplicates"]
    assert any(f["id"] == "duplicates" for f in rep["findings"])
    assert rep["map"]["outliers"][0] == "lora_unet_output_blocks_50_1_proj_out"
    assert len(rep["map"]["points"]) == len(rep["map"]["modules"]) == 14


def test_released_file_pages_keep_every_value(tmp_path):
    """Analysing a mapped file gives its clean pages back to the OS; data (and in-place edits) survive."""
    from lens_ops.analysis.pages import PageReleaser
    from lens_ops.st_io import atomic_save
    sd = make_lora("sd15_kohya", rank=16, seed=6, max_modules=24)
    path = atomic_save(sd, str(tmp_path / "x.safetensors"), sd.metadata)
    model = LoRAModel.load(path)
    edited = model.modules[3].tensors["up"]
    edited[0, 0] = 1.5  # an in-place write makes a private copy of that page: it must not be dropped
    with_release = analyze_modules(model, release_pages=True)
    without = analyze_modules(model, release_pages=False)
    assert with_release == without
    assert float(edited[0, 0]) == 1.5
    for m, ref in zip(model.modules, LoRAModel.from_state_dict(sd).modules):
        for role, t in m.tensors.items():
            if m is model.modules[3] and role == "up":
                assert torch.equal(t[1:], ref.tensors[role][1:]) and torch.equal(t[0, 1:], ref.tensors[role][0, 1:])
            else:
                assert torch.equal(t, ref.tensors[role]), (m.name, role)
    pr = PageReleaser(path)
    if pr:  # Linux with a mapped file: something was actually given back
        pr.release([t for m in model.modules for t in m.tensors.values()])
        assert pr.released > 0
        pr.close()
