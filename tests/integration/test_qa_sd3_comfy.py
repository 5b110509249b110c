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


def _blend_vs_stacked(comfy, loras, w, key_map, base):
    """Apply the files stacked and their `concat` blend through ComfyUI; every module of the blend must be read.
    Returns (per input file, the modules ComfyUI did not read; the blend report; the blend; how many weights
    changed alike within 1e-5 — _compare fails on any that differ)."""
    stacked, stacked_unread = _apply(comfy, loras, w, key_map, base)
    out, rep = blend([model_of(x) for x in loras], w, "concat")
    applied, unread = _apply(comfy, [out.state_dict()], [1.0], key_map, base)
    assert unread == [[]], unread
    return stacked_unread, rep, out, _compare(stacked, applied, base, 1e-5)


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
    unread, rep, _, changed = _blend_vs_stacked(comfy, loras, w, key_map, base)
    assert unread == [[], []]                                  # ComfyUI reads every module of both inputs
    assert not rep["warnings"]
    assert changed == len(base)                                # every weight changed, as stacked


def _split(sd, in_block0):
    """(the modules of block 0, the rest) of a state dict, by module name."""
    a, b = {}, {}
    for key, t in sd.items():
        (a if in_block0(key) else b)[key] = t
    return a, b


def _block0(key):
    return any(s in key for s in ("joint_blocks_0_", "transformer_blocks.0.", "transformer_blocks_0_"))


@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_partial_lokr_dora_and_block_weights_apply_like_stacking(comfy_inproc, first):
    """SD3.5 large: a kohya file with a LoKr qkv in block 0, a DoRA attn.proj in block 37 (only it has that layer,
    strength 1) and LoRA elsewhere, against a OneTrainer file covering only to_q and pos_embed.proj; blended with
    joint0=0.5 (double0 for a diffusers-first blend's own word works the same): ComfyUI applies the blend like both
    files stacked, block 0 at half strength."""
    comfy = comfy_inproc.comfy
    model, blocks = "sd35l", (0, 37)
    base, key_map = _setup(comfy, model, blocks, seed=5)
    k = mmdit_lora(model, (0,), layers={"x_block.attn.qkv"}, seed=61, kind="lokr")
    k.update(mmdit_lora(model, (37,), layers={"x_block.attn.proj"}, seed=62, kind="dora"))
    k.update(mmdit_lora(model, blocks, layers={"context_block.attn.qkv", "x_embedder.proj",
                                               "context_block.adaLN_modulation.1"}, basic=True, seed=63))
    d = diffusers_lora(model, blocks, parts={"attn.to_q", "pos_embed.proj", "norm1_context.linear"},
                       convention="onetrainer", basic=True, seed=64)
    w = {"k": 1.0, "d": 0.7}
    loras = [("k", k), ("d", d)] if first == "mmdit" else [("d", d), ("k", k)]
    parts, strengths = [], []
    for tag, sd in loras:
        b0, rest = _split(sd, _block0)
        parts += [b0, rest]
        strengths += [0.5 * w[tag], w[tag]]
    stacked, unread = _apply(comfy, parts, strengths, key_map, base)
    assert all(u == [] for u in unread)
    item = "joint0=0.5" if first == "mmdit" else "double0=0.5"
    out, rep = blend([model_of(sd) for _, sd in loras], [w[t] for t, _ in loras], "concat", block_weights=item)
    assert not rep["warnings"]
    applied, unread = _apply(comfy, [out.state_dict()], [1.0], key_map, base)
    assert unread == [[]], unread
    changed = _compare(stacked, applied, base, 1e-5)
    # x qkv, context qkv and context modulation of both blocks, block 37's x proj (DoRA), x_embedder
    assert changed == 8


@pytest.mark.parametrize("convention", ["transformer", "onetrainer"])
@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_text_encoder_modules_mixed_with_the_transformer_apply_like_stacking(comfy_inproc, convention, first):
    """CLIP-L, CLIP-G and T5 modules next to the transformer's (kohya `lora_te1_/te2_/te3_`, diffusers
    `text_encoder.`/`text_encoder_2.`): ComfyUI's CLIP key map (SD3's three encoders) and SD3 key map read every
    module of the blend, which patches text encoders and transformer like both files stacked."""
    from types import SimpleNamespace
    from test_qa_sd3 import TE
    comfy = comfy_inproc.comfy
    base, key_map = _setup(comfy, "sd3m", (0,), seed=7)
    g = torch.Generator().manual_seed(8)
    te_w = {"clip_l.transformer." + TE["te1"][0] + ".weight": TE["te1"][1],
            "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
            "clip_g.transformer." + TE["te2"][0] + ".weight": TE["te2"][1],
            "t5xxl.transformer." + TE["te3"][0] + ".weight": TE["te3"][1]}
    te_base = {k: 1e-3 * torch.randn(s, generator=g) for k, s in te_w.items()}
    key_map = comfy.lora.model_lora_keys_clip(SimpleNamespace(state_dict=lambda: te_base), dict(key_map))
    base = {**base, **te_base}
    k = mmdit_lora("sd3m", (0,), layers={"x_block.attn.qkv", "x_block.mlp.fc2"}, te=True, seed=71)
    d = diffusers_lora("sd3m", (0,), parts={"attn.to_k", "ff.net.2"}, convention=convention, te=True, seed=72)
    if convention == "transformer":     # diffusers SD3 trainers train the two CLIPs; ComfyUI has no text_encoder_3.
        d = {n: t for n, t in d.items() if not n.startswith("text_encoder_3.")}
    loras = [k, d] if first == "mmdit" else [d, k]
    w = [1.2, -0.5]
    unread, _, _, changed = _blend_vs_stacked(comfy, loras, w, key_map, base)
    assert unread == [[], []]
    assert changed == 5   # 3 text-encoder weights, qkv, fc2


@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_dora_fused_layer_only_one_file_has_is_carried_whole(comfy_inproc, first):
    """A kohya DoRA context qkv that the diffusers file does not touch: carried whole under its kohya name in either
    order (a diffusers-first blend cut it into add_q/k/v pieces and refused); ComfyUI applies blend = stacked."""
    comfy = comfy_inproc.comfy
    base, key_map = _setup(comfy, "sd3m", (0,), seed=9)
    k = mmdit_lora("sd3m", (0,), layers={"context_block.attn.qkv"}, seed=81, kind="dora")
    k.update(mmdit_lora("sd3m", (0,), layers={"x_block.attn.qkv"}, seed=82))
    d = diffusers_lora("sd3m", (0,), parts={"attn.to_q", "attn.to_v"}, convention="flash", seed=83)
    loras = [k, d] if first == "mmdit" else [d, k]
    w = [1.0, 0.6] if first == "mmdit" else [0.6, 1.0]
    _, _, out, changed = _blend_vs_stacked(comfy, loras, w, key_map, base)
    assert "lora_unet_joint_blocks_0_context_block_attn_qkv" in {m.name for m in out.modules}
    assert changed == 2


@pytest.mark.parametrize("first", ["mmdit", "diffusers"])
def test_simpletuner_lokr_parts_against_a_fused_lora_apply_like_stacking(comfy_inproc, first):
    """SimpleTuner LyCORIS LoKr on split to_q/to_k/add_v_proj (`lycoris_…lokr_w1/lokr_w2_a/b`) against a kohya LoRA
    on the fused qkv layers (a LoKr inside a row stack / against row slices): ComfyUI applies blend = stacked."""
    comfy = comfy_inproc.comfy
    base, key_map = _setup(comfy, "sd35m", (0,), seed=11)
    k = mmdit_lora("sd35m", (0,), layers={"x_block.attn.qkv", "context_block.attn.qkv", "x_block.attn2.qkv"}, seed=91)
    d = diffusers_lora("sd35m", (0,), parts={"attn.to_q", "attn.to_k", "attn.add_v_proj", "attn2.to_v"},
                       convention="simpletuner", seed=92, kind="lokr")
    loras = [k, d] if first == "mmdit" else [d, k]
    w = [0.9, -1.1]
    unread, _, _, changed = _blend_vs_stacked(comfy, loras, w, key_map, base)
    assert unread == [[], []]
    assert changed == 3


@pytest.mark.parametrize("order", ["kdo", "dok", "okd"])
def test_three_files_in_three_conventions_apply_like_stacking(comfy_inproc, order):
    """kohya MMDiT, diffusers `transformer.` and OneTrainer files covering different parts of the same layers (qkv
    vs to_q vs to_k/to_v, both swapped modulations, x_embedder vs pos_embed): one blend, any order, reads in ComfyUI
    exactly like the three stacked."""
    comfy = comfy_inproc.comfy
    model, blocks = "sd3m", (0, 23)
    base, key_map = _setup(comfy, model, blocks, seed=13)
    files = {"k": mmdit_lora(model, blocks, basic=True, seed=1, layers={
                 "x_block.attn.qkv", "context_block.attn.qkv", "context_block.adaLN_modulation.1",
                 "final_layer.adaLN_modulation.1", "x_embedder.proj"}),
             "d": diffusers_lora(model, blocks, convention="transformer", basic=True, seed=2, parts={
                 "attn.to_q", "attn.add_k_proj", "norm1_context.linear", "norm_out.linear"}),
             "o": diffusers_lora(model, blocks, convention="onetrainer", basic=True, seed=3, parts={
                 "attn.to_v", "attn.to_k", "pos_embed.proj", "norm1_context.linear"})}
    loras = [files[c] for c in order]
    w = [0.5, -0.7, 1.1]
    unread, rep, _, changed = _blend_vs_stacked(comfy, loras, w, key_map, base)
    assert unread == [[], [], []]
    assert not rep["warnings"]
    # x qkv, context qkv and context modulation of both blocks, x_embedder, the final modulation
    assert changed == 8
