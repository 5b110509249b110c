"""Selection rules on crafted spectra: each kohya rule, the energy rule and each resize_lora recipe must
give, per module, exactly the rank its definition gives; size budgets met within one module's cost;
bad recipes rejected with a message listing what is allowed."""
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from lens_ops import LensError, LoRAModel
from lens_ops.prune import CheckpointBase, parse_recipe, parse_recipes, prune_model
from lora_factory import gen

# spectra chosen so no rule lands on a tie
SPECTRA = [
    [10.0, 5.0, 2.0, 1.1, 0.5, 0.21, 0.09, 0.031],
    [3.0, 2.9, 2.7, 2.2, 1.3, 0.7, 0.33, 0.12],
    [1.0, 0.33, 0.11, 0.037, 0.0123, 0.0041, 0.00137, 0.00046],
    [7.0, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
]
SHAPES = [(48, 40), (64, 24), (32, 56), (40, 40)]
ALPHAS = [4.0, None, 2.0, 8.0]


def crafted_model(dtype=torch.float64, spectra=SPECTRA, shapes=SHAPES, alphas=ALPHAS):
    """LoRA whose modules' ΔW (scale included) have exactly the given singular values."""
    g = gen(42)
    sd = {}
    for i, (s, (n, m), alpha) in enumerate(zip(spectra, shapes, alphas)):
        r = len(s)
        scale = alpha / r if alpha is not None else 1.0
        u, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
        t = torch.rand(r, generator=g, dtype=torch.float64) + 0.5
        sv = torch.tensor(s, dtype=torch.float64) / scale
        name = f"lora_unet_blk_{i}"
        sd[f"{name}.lora_up.weight"] = (u * (sv * t)).to(dtype)
        sd[f"{name}.lora_down.weight"] = (v / t).T.contiguous().to(dtype)
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return LoRAModel.from_state_dict(sd)


# ---------------------------------------------------------------- definitions, written independently
def ref_energy(s, e):
    s2 = [x * x for x in s]
    tot = sum(s2)
    acc = 0.0
    for k, x in enumerate(s2, 1):
        acc += x
        if acc >= e * tot:
            return k
    return len(s)


def ref_sv_ratio(s, t):  # kohya: keep σ_i > σ_max / t, at least 1
    return max(1, sum(1 for x in s if x > s[0] / t))


def ref_sv_fro(s, t):  # kohya: fewest k with sqrt(Σ_{i<k} σ²)/‖σ‖ ≥ t
    tot = math.sqrt(sum(x * x for x in s))
    acc = 0.0
    for k, x in enumerate(s, 1):
        acc += x * x
        if math.sqrt(acc) / tot >= t:
            return k
    return len(s)


def ref_sv_cumulative(s, t):  # kohya: fewest k with Σ_{i<k} σ / Σσ ≥ t
    tot = sum(s)
    acc = 0.0
    for k, x in enumerate(s, 1):
        acc += x
        if acc / tot >= t:
            return k
    return len(s)


def ranks(out):
    return [out.get(f"lora_unet_blk_{i}").rank() if out.get(f"lora_unet_blk_{i}") else 0 for i in range(len(SPECTRA))]


@pytest.mark.parametrize("rule,values,ref", [
    ("energy", [0.5, 0.9, 0.99, 0.999], ref_energy),
    ("sv_ratio", [0.5, 2, 5, 10, 100, 1000], ref_sv_ratio),
    ("sv_fro", [0.5, 0.9, 0.97, 0.999, 1.2], ref_sv_fro),
    ("sv_cumulative", [0.3, 0.6, 0.8, 0.95], ref_sv_cumulative),
])
def test_rules_give_the_rank_of_their_definition(rule, values, ref):
    model = crafted_model()
    for v in values:
        out, rep = prune_model(model, f"{rule}={v}")
        expect = [min(ref(s, v), len(s)) for s in SPECTRA]
        assert ranks(out) == expect, (rule, v)


def test_rank_rule_caps_other_rules():
    model = crafted_model()
    out, _ = prune_model(model, "rank=3")
    assert ranks(out) == [3, 3, 3, 3]
    out, _ = prune_model(model, "sv_ratio=100,rank=4")
    assert ranks(out) == [min(4, ref_sv_ratio(s, 100)) for s in SPECTRA]
    out, _ = prune_model(model, "energy=0.999,sv_fro=0.9")
    assert ranks(out) == [min(ref_energy(s, 0.999), ref_sv_fro(s, 0.9)) for s in SPECTRA]


def log10(x):
    return math.log10(x)


def ref_scores(s, shape, weights, rescale=1.0, base=None):
    """resize_lora's score: log10(σ_i·rescale) − Σ_j w_j·log10(ref_j), weights normalised to sum 1."""
    tot = sum(weights.values())
    w = {k: v / tot for k, v in weights.items()}
    n, m = shape
    out = []
    for x in s:
        sc = log10(x) + log10(rescale)
        sc -= w.get("spn_lora", 0) * log10(s[0])
        sc -= w.get("fro_lora", 0) * log10(math.sqrt(sum(y * y for y in s)))
        sc -= w.get("params", 0) * log10(n + m)
        if base:
            sc -= w.get("spn_ckpt", 0) * log10(base["spn"])
            sc -= w.get("fro_ckpt", 0) * log10(base["fro"])
        out.append(sc)
    return out


@pytest.mark.parametrize("recipe,weights,thr,rescale", [
    ("spn_lora=1,thr=-1", {"spn_lora": 1}, -1.0, 1.0),
    ("spn_lora,thr=-0.7", {"spn_lora": 1}, -0.7, 1.0),
    ("fro_lora=1,thr=-1.3", {"fro_lora": 1}, -1.3, 1.0),
    ("fro_lora=3,spn_lora=1,thr=-1.1", {"fro_lora": 3, "spn_lora": 1}, -1.1, 1.0),
    ("params=1,thr=-2.9", {"params": 1}, -2.9, 1.0),
    ("spn_lora=0.8,params=0.2,thr=-1.2", {"spn_lora": 0.8, "params": 0.2}, -1.2, 1.0),
    ("spn_lora=1,thr=-1,rescale=0.5", {"spn_lora": 1}, -1.0, 0.5),
])
def test_resize_lora_thr_recipes(recipe, weights, thr, rescale):
    model = crafted_model()
    out, rep = prune_model(model, recipe)
    expect = [sum(1 for sc in ref_scores(s, sh, weights, rescale) if sc > thr) for s, sh in zip(SPECTRA, SHAPES)]
    assert ranks(out) == expect
    if rescale != 1.0:
        m0, o0 = model.get("lora_unet_blk_0"), out.get("lora_unet_blk_0")
        sv = torch.linalg.svdvals(o0.delta(torch.float64))
        assert float(sv[0]) == pytest.approx(rescale * SPECTRA[0][0], rel=1e-9)


def test_rle_lora_reported_as_resize_lora():
    model = crafted_model()
    out, rep = prune_model(model, "spn_lora=1,thr=-1")
    for e, s in zip(rep["modules"], SPECTRA):
        k = e["new_rank"]
        assert e["rle_lora"] == pytest.approx(math.sqrt(sum(x * x for x in s[k:])) / math.sqrt(sum(x * x for x in s)), rel=1e-9)
        assert e["rle_ckpt"] is None


def test_size_recipe_meets_budget_within_one_module():
    model = crafted_model(torch.float32)
    full = model.nbytes
    for size_mib in (0.02, 0.035, 0.05):
        out, rep = prune_model(model, f"spn_lora=1,size={size_mib}")
        path_bytes = out.nbytes
        target = size_mib * 2 ** 20
        assert path_bytes <= target
        one_module = max(m.nbytes for m in model.modules)
        assert target - path_bytes <= one_module or path_bytes == full
        # greedy by score: every kept dimension scores above every dropped one
        kept, dropped = [], []
        for s, sh, k in zip(SPECTRA, SHAPES, ranks(out)):
            sc = ref_scores(s, sh, {"spn_lora": 1})
            kept += sc[:k]
            dropped += sc[k:]
        assert not kept or not dropped or min(kept) > max(dropped) - 1e-12


def test_size_recipe_written_file(tmp_path):
    model = crafted_model(torch.float32)
    out, rep = prune_model(model, "params=0.3,spn_lora=0.7,size=0.03")
    p = out.save(str(tmp_path / "o.safetensors"))
    assert os.path.getsize(p) <= 0.03 * 2 ** 20


def test_global_budget_best_energy_per_byte(tmp_path):
    model = crafted_model(torch.float32)
    full = os.path.getsize(model.save(str(tmp_path / "full.safetensors")))
    for b in (0.004, 0.007, 0.009, 0.05):
        out, rep = prune_model(model, f"budget={b}")
        p = out.save(str(tmp_path / f"b{b}.safetensors"))
        assert os.path.getsize(p) <= b * 2 ** 20
        one_module = max(m.nbytes for m in model.modules)
        assert b * 2 ** 20 - os.path.getsize(p) <= one_module or os.path.getsize(p) == full
        # optimality of the greedy: kept σ²/byte all ≥ dropped σ²/byte
        kept, dropped = [], []
        for s, (n, m), k in zip(SPECTRA, SHAPES, ranks(out)):
            v = [x * x / (4 * (n + m)) for x in s]
            kept += v[:k]
            dropped += v[k:]
        assert not kept or not dropped or min(kept) >= max(dropped) * (1 - 1e-9)
    with pytest.raises(LensError, match="smaller than"):
        prune_model(model, "budget=0.000001")


def make_checkpoint(path, model, g):
    """A fake base checkpoint whose keys map to the LoRA modules the way ComfyUI maps them."""
    sd = {}
    for m in model.modules:
        n = m.weight_shape()[0]
        k = int(torch.tensor(m.weight_shape()[1:]).prod())
        key = "model.diffusion_model." + m.name[len("lora_unet_"):].replace("_", ".", 0) + ".weight"
        sd[key] = torch.randn(n, k, generator=g) * 0.05
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3, generator=g)
    save_file(sd, path)
    return sd


def test_ckpt_scores_with_checkpoint_and_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LENS_CACHE", str(tmp_path / "cache"))
    model = crafted_model(torch.float32)
    ck = str(tmp_path / "base.safetensors")
    sd = make_checkpoint(ck, model, gen(3))
    base = CheckpointBase(ck)
    norms = {}
    for m in model.modules:
        w = sd["model.diffusion_model." + m.name[len("lora_unet_"):] + ".weight"].double()
        norms[m.name] = {"fro": float(w.norm()), "spn": float(torch.linalg.matrix_norm(w, 2))}
    for recipe, weights, thr in [("spn_ckpt=1,thr=-1.5", {"spn_ckpt": 1}, -1.5),
                                 ("fro_ckpt=1,thr=-2", {"fro_ckpt": 1}, -2.0),
                                 ("fro_ckpt=0.8,params=0.2,thr=-2.4", {"fro_ckpt": 0.8, "params": 0.2}, -2.4)]:
        out, rep = prune_model(model, recipe, base=base)
        expect = [sum(1 for sc in ref_scores(s, sh, weights, 1.0, norms[f"lora_unet_blk_{i}"]) if sc > thr)
                  for i, (s, sh) in enumerate(zip(SPECTRA, SHAPES))]
        assert ranks(out) == expect, recipe
        for e in rep["modules"]:
            if e["new_rank"]:
                s = SPECTRA[int(e["name"][-1])]
                k = e["new_rank"]
                assert e["rle_ckpt"] == pytest.approx(math.sqrt(sum(x * x for x in s[k:])) / norms[e["name"]]["fro"], rel=1e-5)
    base.save_cache()
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].startswith("norms-")
    # a copy of the checkpoint under another name hits the same cache; cached values are used
    ck2 = str(tmp_path / "renamed.safetensors")
    os.link(ck, ck2)
    b2 = CheckpointBase(ck2)
    assert b2.identity == base.identity
    b2._load = lambda loc: (_ for _ in ()).throw(AssertionError("read the weights despite the cache"))
    assert b2.norms(model.modules[0])["fro"] == pytest.approx(norms["lora_unet_blk_0"]["fro"], rel=1e-6)


def test_subspace_score(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LENS_CACHE", str(tmp_path / "cache"))
    model = crafted_model(torch.float32)
    ck = str(tmp_path / "base.safetensors")
    sd = make_checkpoint(ck, model, gen(4))
    out, rep = prune_model(model, "subspace=1,thr=0.5", base=CheckpointBase(ck))
    for m in model.modules:
        w = sd["model.diffusion_model." + m.name[len("lora_unet_"):] + ".weight"].double()
        u, s, vh = torch.linalg.svd(m.delta(torch.float64))
        k = len(SPECTRA[0])
        proj = ((u[:, :k].T @ w) * vh[:k]).sum(1).abs()
        expect = int(((torch.log10(s[:k]) - torch.log10(proj)) > 0.5).sum())
        got = out.get(m.name).rank() if out.get(m.name) else 0
        assert got == expect


def test_ckpt_score_without_base_is_refused():
    with pytest.raises(LensError, match="base model"):
        prune_model(crafted_model(), "spn_ckpt=1,thr=-1")


@pytest.mark.parametrize("bad", ["", "foo=1", "energy=2", "energy=0", "rank=0", "rank=2.5", "sv_ratio=0",
                                 "sv_fro=-0.5", "sv_cumulative=-1", "spn_lora=1", "thr=-1", "spn_lora=1,thr=-1,size=5",
                                 "spn_lora=x,thr=1", "size=-3,spn_lora", "energy=0.9,,rank=3", "rank=4,rank=5",
                                 "lyco=maybe", "dtype=int4", "rescale=0", "spn_lora=0,thr=-1", "energy", "budget=0"])
def test_bad_recipes_rejected_with_allowed_list(bad):
    with pytest.raises(LensError) as e:
        parse_recipe(bad)
    msg = str(e.value)
    assert "Allowed:" in msg and "energy=" in msg and "sv_ratio" in msg and "spn_lora" in msg and "thr=" in msg


def test_recipe_lists():
    rs = parse_recipes("energy=0.99:rank=16:spn_lora=1,thr=-1:fro_ckpt=0.8,params=0.2,size=50:sv_fro=0.9,rescale=0.9")
    assert [r.text for r in rs][0] == "energy=0.99"
    assert rs[3].weights == pytest.approx({"fro_ckpt": 0.8, "params": 0.2})
    assert rs[3].size_mib == 50 and rs[3].needs_base
    with pytest.raises(LensError, match="Allowed"):
        parse_recipes("energy=0.9::rank=3")
