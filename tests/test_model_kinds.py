"""Every module kind: parsed to the right kind, ΔW equal to an independent float64 reference,
alpha semantics exactly as ComfyUI applies them, exact rescaling."""
import pytest
import torch

from lens_ops import LoRAModel
from lora_factory import EXPECTED_KIND, KINDS, gen, kind_tensors, rel_err


def model_of(kind, dtype=torch.float32, seed=0):
    t, ref = kind_tensors(kind, gen(seed), dtype)
    sd = {"lora_unet_mid_block_attentions_0_proj_in" + k: v for k, v in t.items()}
    return LoRAModel.from_state_dict(sd), ref


@pytest.mark.parametrize("kind", KINDS)
def test_kind_detected_and_nothing_dropped(kind):
    model, _ = model_of(kind)
    assert len(model) == 1
    m = model.modules[0]
    assert m.kind.name == EXPECTED_KIND[kind]
    assert set(model.state_dict()) == {"lora_unet_mid_block_attentions_0_proj_in" + s
                                       for s in kind_tensors(kind, gen(0))[0]}


@pytest.mark.parametrize("kind", [k for k in KINDS if kind_tensors(k, gen(0))[1] is not None])
def test_delta_matches_float64_reference(kind):
    model, ref = model_of(kind, torch.float64)
    d = model.modules[0].delta(torch.float64)
    assert d.shape == ref.shape
    assert rel_err(d, ref) < 1e-12


@pytest.mark.parametrize("kind", ["lora", "locon3x3", "loha", "lokr"])
def test_delta_in_fp16_matches_reference_within_half_precision(kind):
    model, _ = model_of(kind, torch.float16)
    # the reference from the same fp16-rounded tensors, computed in float64
    ref = model.modules[0].delta(torch.float64)
    assert rel_err(model.modules[0].delta(torch.float32), ref) < 1e-5


@pytest.mark.parametrize("kind", ["glora", "oft", "boft", "set"])
def test_weight_dependent_kinds_have_no_standalone_delta(kind):
    model, _ = model_of(kind)
    assert model.modules[0].delta() is None


def test_lowrank_factors_reproduce_delta_for_conv_and_tucker():
    for kind in ("locon3x3", "tucker"):
        model, ref = model_of(kind, torch.float64)
        b, a, s = model.modules[0].lowrank(torch.float64)
        assert b.shape[1] == a.shape[0] == 4
        assert rel_err((s * b @ a).reshape(ref.shape), ref) < 1e-12


def test_alpha_semantics_kohya_peft_and_fp16_rounding():
    g = gen(1)
    up, down = torch.randn(8, 4, generator=g), torch.randn(4, 6, generator=g)
    kohya = LoRAModel.from_state_dict({"lora_unet_x.lora_up.weight": up, "lora_unet_x.lora_down.weight": down,
                                       "lora_unet_x.alpha": torch.tensor(1.0)}).modules[0]
    assert kohya.scale() == pytest.approx(0.25)
    peft = LoRAModel.from_state_dict({"transformer.x.lora_B.weight": up, "transformer.x.lora_A.weight": down}).modules[0]
    assert peft.alpha is None and peft.scale() == 1.0
    # alpha stored in fp16 is read as its fp16 value, exactly like ComfyUI's tensor.item()
    odd = LoRAModel.from_state_dict({"lora_unet_x.lora_up.weight": up, "lora_unet_x.lora_down.weight": down,
                                     "lora_unet_x.alpha": torch.tensor(0.1, dtype=torch.float16)}).modules[0]
    assert odd.alpha == torch.tensor(0.1, dtype=torch.float16).item() != 0.1


@pytest.mark.parametrize("kind", ["lora", "tucker", "loha", "lokr", "lokr_ab", "diff"])
def test_scaled_is_exact(kind):
    model, _ = model_of(kind, torch.float64)
    before = model.modules[0].delta(torch.float64)
    after = model.scaled(-0.7).modules[0].delta(torch.float64)
    assert rel_err(after, -0.7 * before) < 1e-12


def test_dora_refuses_baked_strength():
    from lens_ops import LensError
    model, _ = model_of("dora")
    assert model.modules[0].is_dora
    with pytest.raises(LensError, match="DoRA"):
        model.scaled(0.5)


def test_unknown_tensors_are_carried_through():
    sd = {"lora_unet_x.lora_up.weight": torch.randn(4, 2), "lora_unet_x.lora_down.weight": torch.randn(2, 3),
          "emb_params": torch.randn(2, 768), "lora_unet_y.lora_up.bias": torch.randn(4)}
    model = LoRAModel.from_state_dict(sd)
    kinds = {m.name: m.kind.name for m in model}
    assert kinds["lora_unet_x"] == "lora" and kinds["emb_params"] == "unknown"
    out = model.state_dict()
    assert list(out) == list(sd) and all(out[k] is sd[k] for k in sd)


def test_is_zero_detects_untrained_modules():
    sd = {"a.lora_up.weight": torch.zeros(4, 2), "a.lora_down.weight": torch.randn(2, 3),
          "b.lora_up.weight": torch.randn(4, 2), "b.lora_down.weight": torch.randn(2, 3)}
    model = LoRAModel.from_state_dict(sd)
    assert [m.is_zero() for m in model] == [True, False]
