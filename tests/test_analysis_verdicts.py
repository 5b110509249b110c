"""Scores, findings and the compression estimate pinned on crafted LoRAs."""
import math

import pytest
import torch

from lens_ops import LoRAModel
from lens_ops.analysis import analyze
from lens_ops.st_io import save_file
from lens_ops.synth import spectrum_factors
from lora_factory import gen

SHAPES = [(64, 48), (64, 64), (48, 64), (96, 64)]


def crafted(rank=32, used=32, n_mod=8, alpha=None, seed=0, dtype=torch.float16, te=False):
    """A LoRA whose modules use exactly `used` directions (flat spectrum) out of `rank`."""
    g = gen(seed)
    sd = {}
    for i in range(n_mod):
        out_f, in_f = SHAPES[i % len(SHAPES)]
        u, _ = torch.linalg.qr(torch.randn(out_f, used, generator=g))
        v, _ = torch.linalg.qr(torch.randn(in_f, used, generator=g))
        up = torch.zeros(out_f, rank)
        down = torch.zeros(rank, in_f)
        up[:, :used] = u * 0.05
        down[:used] = v.T
        name = f"lora_unet_input_blocks_{i % 4}_1_transformer_blocks_{i}_attn1_to_q"
        sd[name + ".lora_up.weight"] = up.to(dtype)
        sd[name + ".lora_down.weight"] = down.to(dtype)
        sd[name + ".alpha"] = torch.tensor(float(alpha if alpha is not None else rank)).to(dtype)
    return sd


def finding(rep, fid):
    return next((f for f in rep["findings"] if f["id"] == fid), None)


def test_inflated_rank_gives_low_efficiency_and_a_finding():
    rep = analyze(LoRAModel.from_state_dict(crafted(rank=32, used=2)))
    # each module needs 2 of 32 directions: used/stored = 2·(n+m) / 32·(n+m)
    assert rep["scores"]["efficiency"] == pytest.approx(100 * 2 / 32, abs=0.1)
    f = finding(rep, "rank_inflation")
    assert f and f["evidence"]["effective_rank_99_median"] == 2 and f["evidence"]["nominal_rank_median"] == 32
    assert rep["scores"]["health"] == 100


def test_fully_used_rank_is_efficient():
    rep = analyze(LoRAModel.from_state_dict(crafted(rank=16, used=16)))
    assert rep["scores"]["efficiency"] == pytest.approx(100.0, abs=0.1)
    assert finding(rep, "rank_inflation") is None
    assert rep["scores"]["health"] == 100


def test_nan_is_flagged_and_caps_health():
    sd = crafted(rank=8, used=4)
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key][3, 1] = float("nan")
    sd[key][5, 0] = float("inf")
    rep = analyze(LoRAModel.from_state_dict(sd))
    f = finding(rep, "nonfinite")
    assert f and f["severity"] == "critical" and f["evidence"]["values"] == 2
    assert rep["scores"]["health"] <= 10
    name = key[: -len(".lora_up.weight")]
    assert rep["modules"][name]["factors"]["nan"] == 1 and rep["modules"][name]["factors"]["inf"] == 1
    assert rep["modules"][name]["singular_values"] is None
    assert rep["summary"]["nonfinite_modules"] == 1


def test_dead_modules_penalised_by_fraction():
    sd = crafted(rank=8, used=4, n_mod=8)
    ups = [k for k in sd if k.endswith("lora_up.weight")][:2]
    for k in ups:
        sd[k].zero_()
    rep = analyze(LoRAModel.from_state_dict(sd))
    f = finding(rep, "dead_modules")
    assert f and f["evidence"]["modules"] == 2
    assert rep["scores"]["health"] == pytest.approx(100 - 40 * 2 / 8)
    assert rep["summary"]["dead_modules"] == 2


def test_extreme_alpha_flagged():
    rep = analyze(LoRAModel.from_state_dict(crafted(rank=4, used=4, alpha=64)))
    f = finding(rep, "extreme_alpha")
    assert f and f["evidence"]["modules"] == 8
    assert rep["scores"]["health"] == 90
    rep = analyze(LoRAModel.from_state_dict(crafted(rank=4, used=4, alpha=2)))
    assert finding(rep, "extreme_alpha") is None


def test_exploding_block_flagged():
    sd = crafted(rank=4, used=2, n_mod=8)
    for k in sd:
        if "input_blocks_3_" in k and k.endswith("lora_up.weight"):
            sd[k] = sd[k] * 50
    rep = analyze(LoRAModel.from_state_dict(sd))
    f = finding(rep, "exploding_norms")
    assert f and list(f["evidence"]["blocks"]) == ["input 3"]


def test_heavy_tails_flagged():
    g = gen(4)
    sd = crafted(rank=8, used=8, n_mod=4, dtype=torch.float32)
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    up = sd[key]
    up[:] = 0.01 * torch.randn(up.shape, generator=g)
    up[0] *= 200  # one row of ΔW dominates: a few huge elements
    rep = analyze(LoRAModel.from_state_dict(sd))
    assert finding(rep, "heavy_tails")


def test_compression_estimate_is_the_exact_file_size(tmp_path):
    sd = crafted(rank=16, used=3, n_mod=6)
    sd.update({"lora_unet_extra.lora_up.weight": torch.randn(8, 2).half(),
               "lora_unet_extra.lora_down.weight": torch.randn(2, 8).half()})
    model = LoRAModel.from_state_dict(sd, {"ss_network_dim": "16"})
    rep = analyze(model)
    comp = rep["compression"]
    for level, spec in comp["levels"].items():
        # write the resized file for real: every module truncated to max(1, k) (or kept when not smaller)
        out = {}
        for m in model.modules:
            e = rep["modules"][m.name]
            k = max(1, e[f"effective_rank_{level}"])
            for role, key in m.keys.items():
                t = m.tensors[role]
                if role == "up" and k < t.shape[1]:
                    t = t[:, :k].contiguous()
                elif role == "down" and k < t.shape[0]:
                    t = t[:k].contiguous()
                out[key] = t
        path = tmp_path / f"r{level}.safetensors"
        save_file(out, str(path), model.metadata)
        assert path.stat().st_size == spec["file_bytes"], level
    now = tmp_path / "now.safetensors"
    save_file(model.state_dict(), str(now), model.metadata)
    assert now.stat().st_size == comp["file_bytes_now"]
    assert comp["levels"]["99"]["relative_error"] == pytest.approx(math.sqrt(0.01))


def test_te_mismatch_and_trigger_words():
    sd = crafted(rank=4, used=2, n_mod=4)
    g = gen(9)
    up, down = spectrum_factors(2048 // 32, 2048 // 32, 4, g, 2.0, 0.5, 0.01)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = up.half()
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = down.half()
    sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight"] = torch.randn(640, 4).half() * .01
    sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"] = torch.randn(4, 2048).half() * .01
    rep = analyze(LoRAModel.from_state_dict(sd))
    assert rep["summary"]["architecture_id"] == "sdxl"
    f = finding(rep, "te_mismatch")
    assert f and f["evidence"]["missing"] == ["te2"]
    assert finding(rep, "no_trigger_words")
    rep2 = analyze(LoRAModel.from_state_dict(sd, {"ss_tag_frequency": '{"a": {"sks dog": 5}}'}))
    assert finding(rep2, "no_trigger_words") is None and rep2["summary"]["trigger_words"] == ["sks dog"]
