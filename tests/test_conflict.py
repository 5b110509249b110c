"""ConflictScan: metrics from factors equal dense float64 computations; matching across conventions; clear
refusals; report contract (CLI --json keyed by the first file's module names) and the node."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from blend_fixtures import SD15_LAYERS, dense, kohya, make_pair, peft, related_factors
from lora_factory import gen, kind_tensors, pair
from lens_ops import LensError, LoRAModel
from lens_ops.conflict import lowrank_metrics, match_modules, module_metrics, problem_list, render, scan
from lens_ops.synth import make_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dense_reference(d1, d2, tol=1e-3):
    d1, d2 = d1.double().reshape(d1.shape[0], -1), d2.double().reshape(d2.shape[0], -1)
    n1, n2 = d1.norm(), d2.norm()
    inner = (d1 * d2).sum()
    u1, s1, v1 = torch.linalg.svd(d1, full_matrices=False)
    u2, s2, v2 = torch.linalg.svd(d2, full_matrices=False)
    k1, k2 = int((s1 > tol * s1[0]).sum()), int((s2 > tol * s2[0]).sum())
    cc = torch.linalg.svdvals(u1[:, :k1].T @ u2[:, :k2])
    cr = torch.linalg.svdvals(v1[:k1] @ v2[:k2].T)
    k = min(k1, k2)
    e12 = (u2[:, :k2].T @ d1 @ v2[:k2].T).pow(2).sum() / n1 ** 2
    e21 = (u1[:, :k1].T @ d2 @ v1[:k1].T).pow(2).sum() / n2 ** 2
    return {"cosine": float(inner / (n1 * n2)), "norm_a": float(n1), "norm_b": float(n2),
            "norm_ratio": float(n1 / n2), "interference": float((d1 + d2).norm() / (n1 + n2)),
            "column_overlap": float(cc.pow(2).sum() / k), "row_overlap": float(cr.pow(2).sum() / k),
            "energy_overlap": float((e12 * e21).sqrt())}


@pytest.mark.parametrize("relation", ["mixed", "along", "against", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lowrank_metrics_equal_dense_float64(relation, dtype):
    for seed in range(3):
        u1, d1, u2, d2 = related_factors(56, 72, 6, 9, seed, relation)
        s1, s2 = 0.5, 1.75
        got = lowrank_metrics((u1, d1, s1), (u2, d2, s2), dtype)
        ref = _dense_reference(dense(u1, d1, s1), dense(u2, d2, s2))
        assert abs(got["cosine"] - ref["cosine"]) < 1e-5
        for k in ("norm_a", "norm_b", "norm_ratio", "interference"):
            assert abs(got[k] - ref[k]) <= 1e-5 * abs(ref[k]), k
        # subspaces: the factor bases equal the dense ΔW's column/row spaces for full-rank factors
        for k in ("column_overlap", "row_overlap", "energy_overlap"):
            assert abs(got[k] - ref[k]) < 1e-4, (k, got[k], ref[k])
        assert got["subspace_overlap"] == pytest.approx(math.sqrt(ref["column_overlap"] * ref["row_overlap"]), abs=1e-4)


def test_identical_and_opposed_modules():
    u, d = pair(40, 30, 5, gen(3))
    same = lowrank_metrics((u, d, 1.0), (u.clone(), d.clone(), 1.0))
    assert same["cosine"] == pytest.approx(1, abs=1e-6) and same["conflict"] == pytest.approx(0, abs=1e-6)
    assert same["subspace_overlap"] == pytest.approx(1, abs=1e-5)
    opp = lowrank_metrics((u, d, 1.0), (-u, d, 1.0))
    assert opp["cosine"] == pytest.approx(-1, abs=1e-6) and opp["conflict"] == pytest.approx(1, abs=1e-5)
    assert opp["interference"] == pytest.approx(0, abs=1e-3)


@pytest.mark.parametrize("kind", ["locon3x3", "loha", "lokr", "diff"])
def test_other_kinds_use_dense_delta(kind):
    t1, ref1 = kind_tensors(kind, gen(1))
    t2, ref2 = kind_tensors(kind, gen(2))
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    a = LoRAModel.from_state_dict({name + k: v for k, v in t1.items()})
    b = LoRAModel.from_state_dict({name + k: v for k, v in t2.items()})
    got = module_metrics(a.modules[0], b.modules[0])
    ref = _dense_reference(ref1, ref2)
    assert abs(got["cosine"] - ref["cosine"]) < 1e-5
    assert got["norm_ratio"] == pytest.approx(ref["norm_ratio"], rel=1e-5)


def test_int8_factors_are_compared_as_comfy_reads_them():
    u1, d1, u2, d2 = related_factors(40, 40, 4, 4, 5, "along")
    q = lambda t: (t / t.abs().max() * 127).round().to(torch.int8)
    name = SD15_LAYERS[0][0]
    a = LoRAModel.from_state_dict({name + ".lora_up.weight": q(u1), name + ".lora_down.weight": q(d1),
                                   name + ".alpha": torch.tensor(2.0)})
    b = LoRAModel.from_state_dict({name + ".lora_up.weight": q(u2), name + ".lora_down.weight": q(d2),
                                   name + ".alpha": torch.tensor(4.0)})
    got = module_metrics(a.modules[0], b.modules[0])
    ref = _dense_reference(dense(q(u1).float(), q(d1).float(), 0.5), dense(q(u2).float(), q(d2).float(), 1.0))
    assert abs(got["cosine"] - ref["cosine"]) < 1e-5 and got["cosine"] > 0.3


def test_kohya_and_peft_names_of_the_same_layer_meet():
    f1, f2 = make_pair(seed=1)
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS, f1))
    b = LoRAModel.from_state_dict(peft(SD15_LAYERS, f2))
    m = match_modules(a, b)
    assert len(m.shared) == len(SD15_LAYERS) and not m.only_a and not m.only_b
    rep = scan(a, b)
    # the same numbers as when both use kohya names
    rep2 = scan(a, LoRAModel.from_state_dict(kohya(SD15_LAYERS, f2, alpha_frac=1.0)))
    for name in rep["modules"]:
        assert rep["modules"][name]["cosine"] == pytest.approx(rep2["modules"][name]["cosine"], abs=1e-6)
        assert rep["modules"][name]["name_b"].startswith(("unet.", "text_encoder."))


def test_processor_spelling_meets_peft():
    up, down = pair(40, 40, 4, gen(0))
    a = LoRAModel.from_state_dict({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up,
                                   "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down})
    b = LoRAModel.from_state_dict({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": up,
                                   "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": down})
    assert len(match_modules(a, b).shared) == 1


def test_architecture_mismatch_is_refused():
    a = LoRAModel.from_state_dict(make_lora("sd15_kohya", rank=2, max_modules=30, seed=1))
    b = LoRAModel.from_state_dict(make_lora("flux_kohya", rank=2, max_modules=4, seed=2))
    with pytest.raises(LensError, match="different base models"):
        scan(a, b)


def test_empty_overlap_is_refused():
    f1, f2 = make_pair()
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS[:2], f1[:2]))
    b = LoRAModel.from_state_dict(kohya(SD15_LAYERS[2:], f2[2:]))
    with pytest.raises(LensError, match="no layer in common"):
        scan(a, b)


def test_sgm_vs_diffusers_block_names_now_pair():
    up, down = pair(40, 40, 4, gen(0))
    a = LoRAModel.from_state_dict({"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
                                   "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down})
    b = LoRAModel.from_state_dict(peft(SD15_LAYERS[:1], [(up, down)]))
    rep = scan(a, b)
    (name, e), = rep["modules"].items()
    assert name.startswith("lora_unet_input_blocks_1_1") and e["name_b"] == SD15_LAYERS[0][1]
    assert e["cosine"] == pytest.approx(1, abs=1e-6) and not rep["warnings"]


def test_unmapped_vocabularies_refused_honestly():
    up, down = pair(40, 40, 4, gen(0))
    a = LoRAModel.from_state_dict({"lora_unet_double_blocks_21_img_attn_proj.lora_up.weight": up,
                                   "lora_unet_double_blocks_21_img_attn_proj.lora_down.weight": down})
    b = LoRAModel.from_state_dict({"transformer.transformer_blocks.21.attn.to_out.0.lora_B.weight": up,
                                   "transformer.transformer_blocks.21.attn.to_out.0.lora_A.weight": down})
    assert a.architecture.id == "hunyuan_video"
    with pytest.raises(LensError, match="not implemented"):
        scan(a, b)


def test_report_contract_and_problem_list():
    f1, f2 = make_pair(seed=2, relation="against")
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS, f1))
    b = LoRAModel.from_state_dict(kohya(SD15_LAYERS[:4], [(-u, d) for u, d in f1[:4]]))  # opposite of A
    rep = scan(a, b)
    assert set(rep["modules"]) == {n for n, *_ in SD15_LAYERS[:4]}
    for e in rep["modules"].values():
        assert {"cosine", "norm_ratio", "subspace_overlap"} <= set(e)
        assert e["cosine"] == pytest.approx(-1, abs=1e-5) and e["verdict"] == "problem"
    assert rep["only_in_a"] == [SD15_LAYERS[4][0]]
    assert rep["stability"]["prediction"] == "unstable"
    assert 0 < rep["recommended_ratio"]["a"] <= 1 and 0 < rep["recommended_ratio"]["b"] <= 1
    lines = [l for l in problem_list(rep).splitlines() if not l.startswith("#")]
    assert set(lines) == set(rep["modules"])
    img = render(rep)
    assert img.ndim == 3 and img.shape[2] == 3 and 0 <= img.min() and img.max() <= 1
    assert {"down 0", "mid", "up 1"} <= set(rep["blocks"])


def test_recommended_ratio_balances_norms():
    f1, _ = make_pair(seed=4)
    a = LoRAModel.from_state_dict(kohya(SD15_LAYERS, f1))
    b = LoRAModel.from_state_dict(kohya(SD15_LAYERS, [(2 * u, d) for u, d in f1]))  # same directions, twice as strong
    r = scan(a, b)["recommended_ratio"]
    # identical directions: the stack must not exceed the stronger alone; the stronger gets half the weight
    assert r["a"] == pytest.approx(2 * r["b"], rel=0.05)
    assert r["a"] * 1 + r["b"] * 2 <= 2 + 1e-6


def test_cli_conflict_json(tmp_path):
    f1, f2 = make_pair(seed=5)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(kohya(SD15_LAYERS, f1, dtype=torch.float16), str(pa))
    save_file(peft(SD15_LAYERS, f2, dtype=torch.bfloat16), str(pb))
    out = subprocess.run([sys.executable, "-m", "lens_ops", "conflict", str(pa), str(pb), "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert set(rep["modules"]) == {n for n, *_ in SD15_LAYERS}
    for e in rep["modules"].values():
        assert all(isinstance(e[k], float) for k in ("cosine", "norm_ratio", "subspace_overlap"))
    txt = subprocess.run([sys.executable, "-m", "lens_ops", "conflict", str(pa), str(tmp_path / "nope.safetensors")],
                         capture_output=True, text=True, cwd=ROOT)
    assert txt.returncode == 2 and "does not exist" in txt.stderr


def test_conflict_node(comfy_env):
    pack, _ = comfy_env
    f1, f2 = make_pair(seed=6)
    node = pack.NODE_CLASS_MAPPINGS["ConflictScan"]()
    out = node.scan(kohya(SD15_LAYERS, f1), peft(SD15_LAYERS, f2))
    report, summary, image, problems, ra, rb = out["result"]
    assert set(json.loads(report)["modules"]) == {n for n, *_ in SD15_LAYERS}
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert isinstance(ra, float) and isinstance(rb, float)
    assert out["ui"]["text"] == [summary] and out["ui"]["lens_conflict"][0]["blocks"]
    blended = pack.NODE_CLASS_MAPPINGS["BlendLoRAs"]().blend(kohya(SD15_LAYERS, f1), peft(SD15_LAYERS, f2), ra, rb,
                                                              exclude=problems)["result"][0]
    assert isinstance(blended, dict) and blended


def test_scan_batches_in_parallel_equal_the_serial_scan(monkeypatch):
    """Batches measured two at a time on worker threads (lens_ops.parallel) give the same report as one by one."""
    import importlib
    from lens_ops.parallel import worth_it
    scan_mod = importlib.import_module("lens_ops.conflict.scan")
    a = LoRAModel.from_state_dict(make_lora("sdxl_kohya", rank=8, seed=1, max_modules=120))
    b = LoRAModel.from_state_dict(make_lora("sdxl_kohya", rank=4, seed=2, max_modules=120))
    monkeypatch.setattr(scan_mod, "BATCH_BYTES", 1 << 16)  # many small batches
    seen = []
    par = scan(a, b, progress=lambda d, t: seen.append(d))
    assert worth_it("cpu", 2) == ((os.cpu_count() or 1) > 1)
    assert seen == sorted(seen) and seen[-1] == par["shared_modules"]
    monkeypatch.setattr("lens_ops.parallel.worth_it", lambda device, pieces: False)
    ser = scan(a, b)
    assert par["modules"].keys() == ser["modules"].keys()
    for name, m in ser["modules"].items():
        for key in ("cosine", "norm_ratio", "subspace_overlap", "interference"):
            assert par["modules"][name][key] == pytest.approx(m[key], rel=1e-9, abs=1e-12), (name, key)


@pytest.mark.parametrize("kind", ["lokr", "lokr_ab", "lokr_full"])
def test_lokr_modules_are_compared_from_factors_equal_to_dense(kind):
    """LoKr modules go through their exact two-factor form (kron of the sides' factors), not a dense ΔW and dense
    SVDs: every metric equals the dense float64 comparison."""
    from lens_ops import LoRAModel
    from lens_ops.conflict.metrics import dense_metrics
    name = "lora_unet_mid_block_attentions_0_proj_in"
    (ta, ra), (tb, rb) = kind_tensors(kind, gen(31)), kind_tensors(kind, gen(32))
    a = LoRAModel.from_state_dict({name + k: v for k, v in ta.items()})
    b = LoRAModel.from_state_dict({name + k: v for k, v in tb.items()})
    rep = scan(a, b)
    got = rep["modules"][name]
    ref = dense_metrics(ra.reshape(ra.shape[0], -1), rb.reshape(rb.shape[0], -1))
    assert got["method"] == "factors"
    for key in ("cosine", "norm_ratio", "subspace_overlap", "energy_overlap", "interference"):
        assert abs(got[key] - ref[key]) < 1e-5, (key, got[key], ref[key])
