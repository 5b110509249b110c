"""BlendLoRAs: concat reproduces w1·ΔW1 + w2·ΔW2 exactly, svd reaches the optimal truncation error, TIES/DARE
match straightforward dense implementations; filters, block weights, carried modules, conventions, dtype,
metadata, refusals, CLI and node."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blend_fixtures import SD15_LAYERS, dense, kohya, make_pair, peft
from lens_ops import LensError, LoRAModel
from lens_ops.blend import blend, parse_block_weights
from lens_ops.blend.methods import dare_masks
from lens_ops.conflict import problem_list, scan
from lens_ops.synth import make_lora
from lora_factory import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = [n for n, *_ in SD15_LAYERS]


def refs(f1, f2, w1, w2, s1, s2):
    return {n: w1 * dense(u1, d1, s1) + w2 * dense(u2, d2, s2) for n, (u1, d1), (u2, d2) in zip(NAMES, f1, f2)}


def out_delta(model, name):
    return model.get(name).delta(torch.float64).reshape(model.get(name).weight_shape()[0], -1)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("w1,w2", [(0.7, 0.3), (1.0, -0.6), (-0.4, 1.3)])
def test_concat_is_exact(w1, w2):
    f1, f2 = make_pair(r1=6, r2=3, seed=1)
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS, f1, alpha_frac=0.5))
    b = LoRAModel.from_state_dict(peft(SD15_LAYERS, f2))
    out, rep = blend([a, b], [w1, w2], "concat")
    ref = refs(f1, f2, w1, w2, 0.5, 1.0)
    for n in NAMES:
        m = out.get(n)
        assert m.rank() == 9 and set(m.keys) == {"up", "down", "alpha"}
        assert rel(out_delta(out, n), ref[n]) < 1e-6
    assert rep["modules"]["blended"] == len(NAMES)


def test_concat_into_peft_folds_scales_and_keeps_peft_names():
    f1, f2 = make_pair(r1=4, r2=5, seed=2)
    a = LoRAModel.from_state_dict(peft(SD15_LAYERS, f1))
    b = LoRAModel.from_state_dict(kohya(SD15_LAYERS, f2, alpha_frac=0.25))
    out, _ = blend([a, b], [0.5, 2.0], "concat")
    sd = out.state_dict()
    assert not any(k.endswith(".alpha") for k in sd) and all(".lora_A." in k or ".lora_B." in k for k in sd)
    ref = refs(f1, f2, 0.5, 2.0, 1.0, 0.25)
    for (n, pn, *_) in SD15_LAYERS:
        assert rel(out_delta(out, pn), ref[n]) < 1e-6


def test_svd_error_equals_optimal_truncation_error():
    f1, f2 = make_pair(r1=8, r2=6, seed=3)
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS, f1))
    b = LoRAModel.from_state_dict(kohya(SD15_LAYERS, f2))
    for k in (3, 7):
        out, rep = blend([a, b], [0.8, 0.6], "svd", k)
        ref = refs(f1, f2, 0.8, 0.6, 0.5, 0.5)
        for n in NAMES:
            s = torch.linalg.svdvals(ref[n])
            optimal = float(s[k:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
            got = rel(out_delta(out, n), ref[n])
            assert out.get(n).rank() == k
            assert got == pytest.approx(optimal, rel=1e-4, abs=1e-6)
        assert rep["relative_error"]["max"] == pytest.approx(
            max(float((lambda s: s[k:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())(torch.linalg.svdvals(r)))
                for r in ref.values()), rel=1e-4)
    exact, _ = blend([a, b], [0.8, 0.6], "svd", 0)
    for n in NAMES:
        assert rel(out_delta(exact, n), refs(f1, f2, 0.8, 0.6, 0.5, 0.5)[n]) < 1e-5


def test_pca_is_near_optimal_and_seeded():
    f1, f2 = make_pair(r1=24, r2=24, seed=4)
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS[1:3], f1[1:3]))
    b = LoRAModel.from_state_dict(kohya(SD15_LAYERS[1:3], f2[1:3]))
    out, _ = blend([a, b], [1.0, 1.0], "pca", 6, seed=1)
    again, _ = blend([a, b], [1.0, 1.0], "pca", 6, seed=1)
    for (n, *_), (u1, d1), (u2, d2) in zip(SD15_LAYERS[1:3], f1[1:3], f2[1:3]):
        ref = dense(u1, d1, 0.5) + dense(u2, d2, 0.5)
        s = torch.linalg.svdvals(ref)
        optimal = float(s[6:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        got = rel(out_delta(out, n), ref)
        assert optimal * (1 - 1e-4) <= got <= optimal * 1.1 + 1e-6
        assert torch.equal(out.get(n).tensors["up"], again.get(n).tensors["up"])


def ties_reference(taus, density):
    """TIES written out entry by entry from the paper (trim, elect, disjoint mean)."""
    import numpy as np
    ts = [t.double().numpy().ravel() for t in taus]
    trimmed = []
    for t in ts:
        k = max(1, int(round(density * t.size)))
        keep = np.argsort(-np.abs(t), kind="stable")[:k]
        z = np.zeros_like(t)
        z[keep] = t[keep]
        trimmed.append(z)
    out = np.zeros_like(ts[0])
    for j in range(out.size):
        vals = [z[j] for z in trimmed]
        sgn = np.sign(sum(vals))
        agree = [v for v in vals if v != 0 and np.sign(v) == sgn]
        out[j] = sum(agree) / len(agree) if agree else 0.0
    return torch.from_numpy(out.reshape(taus[0].shape))


def test_ties_matches_dense_reference():
    layers = SD15_LAYERS[:1] + SD15_LAYERS[3:4]
    f1, f2 = make_pair(r1=5, r2=4, seed=5, layers=layers)
    a = LoRAModel.from_state_dict(kohya(layers, f1, dtype=torch.float64))
    b = LoRAModel.from_state_dict(kohya(layers, f2, dtype=torch.float64))
    out, _ = blend([a, b], [0.9, -0.7], "ties", rank=40, density=0.3, compute_dtype=torch.float64)
    for (n, *_), (u1, d1), (u2, d2) in zip(layers, f1, f2):
        ref = ties_reference([0.9 * dense(u1, d1, 0.5), -0.7 * dense(u2, d2, 0.5)], 0.3)
        assert rel(out.get(n).delta(torch.float64), ref) < 1e-6


def test_dare_matches_dense_reference_and_is_reproducible():
    layers = SD15_LAYERS[:1]
    f1, f2 = make_pair(r1=5, r2=4, seed=6, layers=layers)
    a = LoRAModel.from_state_dict(kohya(layers, f1, dtype=torch.float64))
    b = LoRAModel.from_state_dict(kohya(layers, f2, dtype=torch.float64))
    out, _ = blend([a, b], [0.5, 0.8], "dare", rank=40, density=0.4, seed=9, compute_dtype=torch.float64)
    again, _ = blend([a, b], [0.5, 0.8], "dare", rank=40, density=0.4, seed=9, compute_dtype=torch.float64)
    other, _ = blend([a, b], [0.5, 0.8], "dare", rank=40, density=0.4, seed=10, compute_dtype=torch.float64)
    n = layers[0][0]
    from lens_ops.conflict.matching import canonical_key
    key = canonical_key(a.modules[0])
    t1, t2 = 0.5 * dense(*f1[0], 0.5), 0.8 * dense(*f2[0], 0.5)
    m1, m2 = dare_masks(t1.shape, 0.4, 9, key, 2)
    assert 0.3 < float(m1.double().mean()) < 0.5 and not torch.equal(m1, m2)
    ref = t1 * m1 / 0.4 + t2 * m2 / 0.4
    assert rel(out.get(n).delta(torch.float64), ref) < 1e-6
    assert torch.equal(out.get(n).tensors["up"], again.get(n).tensors["up"])
    assert rel(other.get(n).delta(torch.float64), ref) > 0.1


def test_filters_block_weights_and_problem_list():
    f1, f2 = make_pair(seed=7)
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS, f1))
    b = LoRAModel.from_state_dict(kohya(SD15_LAYERS[:4], [(-u, d) for u, d in f1[:4]]))
    rep = scan(a, b)
    out, r = blend([a, b], [1.0, 0.5], "concat", exclude=problem_list(rep))
    assert {m.name for m in out.modules} == {NAMES[4]} and r["modules"]["excluded"] == 4
    kept, _ = blend([a, b], [1.0, 0.5], "concat", exclude="down_blocks_0", excluded_keep="first")
    assert kept.get(NAMES[0]).rank() == 6 and kept.get(NAMES[3]).rank() == 12
    inc, _ = blend([a, b], [1.0, 0.5], "concat", include="mid_block")
    assert [m.name for m in inc.modules] == [NAMES[2]]
    bw, _ = blend([a, b], [1.0, 0.5], "concat", block_weights="te=0:in=0.5:mid=0:out=2")
    ref = refs(f1, [(-u, d) for u, d in f1[:4]], 1.0, 0.5, 0.5, 0.5)
    assert bw.get(NAMES[4]) is None and bw.get(NAMES[2]) is None
    assert rel(out_delta(bw, NAMES[0]), 0.5 * ref[NAMES[0]]) < 1e-6
    assert rel(out_delta(bw, NAMES[3]), 2 * ref[NAMES[3]]) < 1e-6


def test_block_weight_parsing():
    bw = parse_block_weights("te=0.5:unet=1.5, double0-9=0.8 single=0.25 double=0.5 in4-8=0")
    sd = {}
    for n in ("lora_unet_double_blocks_3_img_attn_proj", "lora_unet_double_blocks_12_txt_mlp_0",
              "lora_unet_single_blocks_3_linear1", "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
        sd.update({n + ".lora_up.weight": torch.randn(8, 2), n + ".lora_down.weight": torch.randn(2, 8)})
    flux = LoRAModel.from_state_dict(sd)
    by_block = {m.block: bw.multiplier(m) for m in flux.modules}
    assert by_block["double 3"] == 1.5 * 0.8 and by_block["double 12"] == 1.5 * 0.5
    assert by_block["single 3"] == 1.5 * 0.25 and by_block["te1"] == 0.5
    with pytest.raises(LensError, match="Unknown block weight key"):
        parse_block_weights("foo=1")
    with pytest.raises(LensError, match="not a number"):
        parse_block_weights("te=x")


def test_only_in_one_carried_with_weight_and_renamed():
    f1, f2 = make_pair(seed=8)
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS[:3], f1[:3], dtype=torch.bfloat16))
    b = LoRAModel.from_state_dict(peft(SD15_LAYERS, f2, dtype=torch.float16))
    out, rep = blend([a, b], [0.5, -2.0], "svd", 4)
    te = out.get(NAMES[4])           # PEFT text_encoder.… written as kohya lora_te_…
    assert te is not None and set(te.keys.values()) <= {NAMES[4] + s for s in (".lora_up.weight", ".lora_down.weight", ".alpha")}
    ref = -2.0 * dense(*[t.to(torch.float16).float() for t in f2[4]])
    assert rel(te.delta(torch.float64), ref) < 1e-2
    assert all(t.dtype == torch.bfloat16 for m in out.modules for r, t in m.tensors.items() if r != "alpha")
    assert rep["modules"]["carried"] == 2 and rep["modules"]["renamed"] == 2


def test_metadata_merged_and_trigger_words_united():
    f1, f2 = make_pair(seed=9)
    sa, sb = kohya(SD15_LAYERS, f1), peft(SD15_LAYERS, f2)
    a = LoRAModel.from_state_dict(sa, {"ss_output_name": "alpha_style", "modelspec.trigger_phrase": "foo, bar",
                                      "ss_network_dim": "6"}, source="/x/a.safetensors")
    b = LoRAModel.from_state_dict(sb, {"modelspec.title": "beta", "trigger_words": '["bar", "baz"]'},
                                  source="/x/b.safetensors")
    out, _ = blend([a, b], [0.7, 0.3], "concat")
    meta = out.metadata
    assert json.loads(meta["lora_lens.trigger_words"]) == ["foo", "bar", "baz"]
    src = json.loads(meta["lora_lens.blend_sources"])
    assert [s["file"] for s in src] == ["a.safetensors", "b.safetensors"] and [s["weight"] for s in src] == [0.7, 0.3]
    assert meta["ss_network_dim"] == "10"
    prov = json.loads(meta["lora_lens.provenance"])
    assert prov[-1]["op"] == "blend" and prov[-1]["settings"]["method"] == "concat"


def test_refusals():
    f1, f2 = make_pair()
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS[:2], f1[:2]))
    b = LoRAModel.from_state_dict(kohya(SD15_LAYERS[2:], f2[2:]))
    with pytest.raises(LensError, match="no layer in common"):
        blend([a, b], [1, 1])
    both, _ = blend([a, b], [1, 1], allow_disjoint=True)
    assert len(both) == len(SD15_LAYERS)
    sdxl = LoRAModel.from_state_dict(make_lora("sdxl_kohya", rank=2, seed=1,
                                                  name_filter=lambda n: "te2" in n and "layers_0_" in n))
    with pytest.raises(LensError, match="different base models"):
        blend([a, sdxl], [1, 1])
    with pytest.raises(LensError, match="Unknown blend method"):
        blend([a, a], [1, 1], "average")
    with pytest.raises(LensError, match="one weight per LoRA"):
        blend([a, a], [1])


@pytest.mark.parametrize("method", ["concat", "svd", "ties"])
def test_nan_input_is_refused_naming_the_module(method):
    """A NaN/Inf factor would spread into the blend: refused in one sentence that names the module; excluding
    that module blends the rest."""
    f1, f2 = make_pair()
    sd = kohya(SD15_LAYERS, f1)
    bad = SD15_LAYERS[1][0]
    sd[bad + ".lora_up.weight"][0, 0] = float("nan")
    a, b = LoRAModel.from_state_dict(sd), LoRAModel.from_state_dict(kohya(SD15_LAYERS, f2))
    with pytest.raises(LensError, match=f"Module {bad} contains NaN/Inf values"):
        blend([a, b], [0.5, 0.5], method, rank=4)
    out, _ = blend([a, b], [0.5, 0.5], method, rank=4, exclude=bad)
    assert out.get(bad) is None and all(torch.isfinite(t).all() for m in out.modules for t in m.tensors.values())


def test_cli_blend_three_inputs(tmp_path):
    f1, f2 = make_pair(seed=10)
    f3, _ = make_pair(seed=11)
    paths = []
    for i, sd in enumerate([kohya(SD15_LAYERS, f1, dtype=torch.float16), peft(SD15_LAYERS, f2),
                            kohya(SD15_LAYERS, f3)]):
        p = tmp_path / f"l{i}.safetensors"
        save_file(sd, str(p))
        paths.append(str(p))
    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-m", "lens_ops", "blend", f"{paths[0]}:0.7", f"{paths[1]}:0.3",
                        f"{paths[2]}:-0.2", "--method", "concat", "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    m = LoRAModel.load(str(out))
    ref = {n: 0.7 * dense(*x, 0.5) + 0.3 * dense(*y) - 0.2 * dense(*z, 0.5)
           for n, x, y, z in zip(NAMES, [(u.half(), d.half()) for u, d in f1], f2, f3)}
    for n in NAMES:
        assert rel(out_delta(m, n), ref[n]) < 2e-3   # fp16 output (the first LoRA's dtype)
        assert m.get(n).tensors["up"].dtype == torch.float16
    r = subprocess.run([sys.executable, "-m", "lens_ops", "blend", f"{paths[0]}:0.7", f"{paths[1]}:0.3",
                        "--method", "svd", "--rank", "4", "-o", paths[0]], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "overwrite" in r.stderr


def test_blend_node(comfy_env):
    pack, _ = comfy_env
    f1, f2 = make_pair(seed=12)
    node = pack.NODE_CLASS_MAPPINGS["BlendLoRAs"]
    tip = node.INPUT_TYPES()["required"]["weight_a"][1]["tooltip"]
    assert "equals loading both LoRAs at those strengths" in tip
    out = node().blend(kohya(SD15_LAYERS, f1), peft(SD15_LAYERS, f2), 0.6, -0.4, 0, "concat")
    lora, text = out["result"]
    m = LoRAModel.from_state_dict(lora)
    ref = refs(f1, f2, 0.6, -0.4, 0.5, 1.0)
    assert all(rel(out_delta(m, n), ref[n]) < 1e-6 for n in NAMES)
    assert "lora_lens.blend_sources" in lora.metadata and "concat" in text


@pytest.mark.parametrize("values", ["gaussian", "ties", "spiky", "float64"])
def test_magnitude_threshold_equals_kthvalue(values):
    """TIES's magnitude threshold on big layers comes from a sample of rows plus one counting pass over row blocks,
    and from bit-pattern histograms when that bracket misses or holds too many tied values; it must be the exact
    kthvalue of the magnitudes for every rank, with heavy ties and with a few huge outliers."""
    from lens_ops.blend import rowwise
    g = torch.Generator().manual_seed(7)
    rows, cols = 1601, 1023
    n = rows * cols
    if values == "ties":
        x = torch.randint(-40, 40, (n,), generator=g).float()
    elif values == "float64":
        x = torch.randn(n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(n, generator=g)
    if values == "spiky":
        x[torch.randint(0, n, (50,), generator=g)] = 1e6      # outliers the row sample mostly misses
    src = rowwise.Rows.dense(x.reshape(rows, cols))
    mags = x.abs()
    for k in (1, 2, 50, 777, n // 3, n // 2, n - 60, n - 1, n):
        assert torch.equal(rowwise.magnitude_threshold(src, k), mags.kthvalue(n - k + 1).values), (values, k)
    for j in (1, 999, n // 2, n):   # the exact fallback on its own
        assert torch.equal(rowwise._threshold_by_histograms(src, j), mags.kthvalue(j).values), (values, j)


def _lokr_lora(seed: int, layers: int = 3, width: int = 320, factor: int = 8, rank: int = 8) -> dict:
    """LoKr modules the way LyCORIS writes them for a width×width layer: a factor×factor w1 from two rank-`rank`
    factors and a (width/factor)² w2 from two more, so each module stores ~2.6k numbers for a 100k-entry ΔW."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    side = width // factor
    for i in range(layers):
        p = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{'qkv'[i]}"
        sd[p + ".lokr_w1_a"] = torch.randn(factor, rank, generator=g).half()
        sd[p + ".lokr_w1_b"] = torch.randn(rank, factor, generator=g).half()
        sd[p + ".lokr_w2_a"] = (torch.randn(side, rank, generator=g) * 0.1).half()
        sd[p + ".lokr_w2_b"] = (torch.randn(rank, side, generator=g) * 0.1).half()
        sd[p + ".alpha"] = torch.tensor(float(rank))
    return sd


def test_exact_blend_of_lokr_files_warns_about_its_size_and_stays_exact():
    a, b = _lokr_lora(1), _lokr_lora(2)
    out, rep = blend([a, b], [0.6, 0.4], method="concat")
    grew = [w for w in rep["warnings"] if "its inputs'" in w]
    assert len(grew) == 1 and "LoKr" in grew[0] and "svd" in grew[0], rep["warnings"]
    ma, mb = LoRAModel.from_state_dict(a), LoRAModel.from_state_dict(b)
    for m in out.modules:   # still exactly the weighted sum: the warning changes nothing in the file
        ref = 0.6 * ma.get(m.name).delta(torch.float64) + 0.4 * mb.get(m.name).delta(torch.float64)
        assert rel_err(m.delta(torch.float64), ref) < 2e-3   # fp16 output
    # a LoRA blend of the same layers grows by its ranks only: no warning
    la = make_lora("sd15_kohya", rank=8, seed=3, dtype=torch.float16, max_modules=6)
    lb = make_lora("sd15_kohya", rank=8, seed=4, dtype=torch.float16, max_modules=6)
    _, rep2 = blend([la, lb], [0.5, 0.5], method="concat")
    assert not [w for w in rep2["warnings"] if "its inputs'" in w]
