"""QA of SD3/SD3.5 blends across vocabularies, checked with ComfyUI's own key map and patching (in process).

ComfyUI's `model_lora_keys_unet` for an SD3 model (a stand-in object: its class, state-dict names and unet_config)
maps kohya `lora_unet_joint_blocks_…` names and the diffusers names with its four SD3 prefixes (`transformer.`,
`base_model.model.`, OneTrainer `lora_transformer_`, SimpleTuner `lycoris_`) onto the MMDiT weights, split q/k/v as
row offsets and the swapped modulations through `swap_scale_shift`. `load_lora` + `calculate_weight` apply the
blend and, separately, both inputs stacked at their strengths: the patched weights agree within float rounding,
for every convention, both orders, SD3 medium, SD3.5 large and SD3.5 medium; every module of the blend is read."""
import pytest
import torch

from lens_ops import LoRAModel
from lens_ops.blend import blend
from comfy_stand_in import stand_in_model
from test_qa_sd3 import MODELS, PREFIXES, diffusers_lora, mmdit_lora, mmdit_weights, model_of


def _setup(comfy, model, blocks, seed=0):
    import comfy.model_base
    h, n, _ = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    base = {f"diffusion_model.{k}.weight": 1e-3 * torch.randn(s, generator=g)
            for k, s in mmdit_weights(model, blocks).items()}
    config = {"depth": h // 64, "num_blocks": n}
    key_map = comfy.lora.model_lora_keys_unet(stand_in_model(comfy.model_base.SD3, base, config), {})
    return base, key_map


def _apply(comfy, loras, strengths, key_map, base):
    """ComfyUI's load_lora + calculate_weight as ModelPatcher.add_patches queues them; returns the patched weights
    and, per LoRA, the module names ComfyUI did not read."""
    queued = {k: [] for k in base}
    unread = []
    for sd, s in zip(loras, strengths):
        patches = comfy.lora.load_lora(dict(sd), key_map, log_missing=False)
        for pk, v in patches.items():
            key, offset, fn = (pk, None, None) if isinstance(pk, str) else (pk[0], pk[1], pk[2] if len(pk) > 2 else None)
            queued[key].append((s, v, 1.0, offset, fn))
        names = {m.name for m in LoRAModel.from_state_dict(dict(sd)).modules}
        unread.append(sorted(n for n in names if n not in key_map))
    return {k: comfy.lora.calculate_weight(queued[k], base[k].clone().float(), k) for k in base}, unread


def _compare(stacked, applied, base, tol):
    changed = 0
    for key in base:
        d_stack, d_blend = stacked[key] - base[key], applied[key] - base[key]
        if float(d_stack.norm()) == 0:
            assert float(d_blend.norm()) == 0, key
            continue
        changed += 1
        assert float((d_blend - d_stack).norm() / d_stack.norm()) < tol, key
    return changed


CASES = [("sd3m", (0, 23)), ("sd35l", (0, 37)), ("sd35m", (0, 12, 23))]


@pytest.mark.parametrize("model,blocks", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("convention", list(PREFIXES))
@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_blend_applies_like_both_stacked(comfy_inproc, model, blocks, convention, first):
    comfy = comfy_inproc.comfy
    base, key_map = _setup(comfy, model, blocks)
    k = mmdit_lora(model, blocks, basic=True, seed=11)
    d = diffusers_lora(model, blocks, convention=convention, basic=True, seed=12)
    loras = [k, d] if first == "mmdit" else [d, k]
    w = [0.8, -0.6]
    stacked, unread = _apply(comfy, loras, w, key_map, base)
    assert unread == [[], []]                                  # ComfyUI reads every module of both inputs
    out, rep = blend([model_of(x) for x in loras], w, "concat")
    assert not rep["warnings"]
    applied, unread = _apply(comfy, [out.state_dict()], [1.0], key_map, base)
    assert unread == [[]], unread                              # and every module of the blend
    assert _compare(stacked, applied, base, 1e-5) == len(base)  # every weight changed, as stacked
