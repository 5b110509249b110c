"""ConflictScan and BlendLoRAs across SD3's two block vocabularies: kohya/MMDiT names (`lora_unet_joint_blocks_N_…`,
fused `x_block_attn_qkv` / `context_block_attn_qkv`) against diffusers/PEFT names (`transformer.transformer_blocks.N.
attn.to_q` …, split).

The fixtures are written here from the facts of ComfyUI's `mmdit_to_diffusers` (comfy/utils.py), independently of
lens_ops.conflict.crossnames: q/k/v are the row thirds of qkv (hidden size h = 1536 for SD3 medium, 24 blocks),
`attn.to_out.0` is `x_block.attn.proj`, `norm1_context.linear` is `context_block.adaLN_modulation.1` — except in the
last block, whose pre-only context modulation (2h rows) has its shift/scale halves swapped: that one must not be
paired. References are dense float64."""
import pytest
import torch

from lens_ops import LoRAModel
from lens_ops.blend import blend
from lens_ops.conflict import scan
from lens_ops.conflict.matching import match_modules
from lens_ops.synth import spectrum_factors

H = 1536
LAST = 23
# MMDiT layer of block b -> (out rows, in) ; diffusers part -> (MMDiT layer, first row, stop row)
MMDIT = {"x_block.attn.qkv": (3 * H, H), "context_block.attn.qkv": (3 * H, H), "x_block.attn.proj": (H, H),
         "context_block.adaLN_modulation.1": (6 * H, H), "x_block.mlp.fc2": (H, 4 * H)}
DIFFUSERS = {"attn.to_q": ("x_block.attn.qkv", 0, H), "attn.to_k": ("x_block.attn.qkv", H, 2 * H),
             "attn.add_q_proj": ("context_block.attn.qkv", 0, H), "attn.add_k_proj": ("context_block.attn.qkv", H, 2 * H),
             "attn.add_v_proj": ("context_block.attn.qkv", 2 * H, 3 * H), "attn.to_out.0": ("x_block.attn.proj", 0, H),
             "norm1_context.linear": ("context_block.adaLN_modulation.1", 0, 6 * H), "ff.net.2": ("x_block.mlp.fc2", 0, H)}


def _out_rows(layer, block):
    rows, cols = MMDIT[layer]
    if layer == "context_block.adaLN_modulation.1" and block == LAST:
        rows = 2 * H       # pre-only: shift and scale only
    return rows, cols


def kohya_sd3(seed, blocks=(0, LAST), rank=4, alpha=2.0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in blocks:
        for layer in MMDIT:
            o, i = _out_rows(layer, b)
            up, down = spectrum_factors(o, i, rank, g, eff_rank=2.0, decay=0.5, magnitude=0.01)
            name = f"lora_unet_joint_blocks_{b}_" + layer.replace(".", "_")
            sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"] = up.to(dtype), down.to(dtype)
            sd[name + ".alpha"] = torch.tensor(alpha).to(dtype)
    return sd


def diffusers_sd3(seed, blocks=(0, LAST), rank=3, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in blocks:
        for part, (layer, r0, r1) in DIFFUSERS.items():
            o = _out_rows(layer, b)[0] if part == "norm1_context.linear" else r1 - r0
            up, down = spectrum_factors(o, MMDIT[layer][1], rank, g, eff_rank=2.0, decay=0.5, magnitude=0.01)
            name = f"transformer.transformer_blocks.{b}.{part}"
            sd[name + ".lora_B.weight"], sd[name + ".lora_A.weight"] = up.to(dtype), down.to(dtype)
    return sd


def dense(sd):
    m = LoRAModel.from_state_dict(dict(sd))
    return {mod.name: mod.delta(torch.float64) for mod in m.modules}


def kname(b, layer):
    return f"lora_unet_joint_blocks_{b}_" + layer.replace(".", "_")


def dname(b, part):
    return f"transformer.transformer_blocks.{b}.{part}"


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_both_files_read_as_sd3():
    assert LoRAModel.from_state_dict(kohya_sd3(1)).architecture.id == "sd3"
    assert LoRAModel.from_state_dict(diffusers_sd3(2)).architecture.id == "sd3"


def test_fused_and_split_modules_pair_and_the_swapped_last_modulation_does_not():
    a, b = LoRAModel.from_state_dict(kohya_sd3(1)), LoRAModel.from_state_dict(diffusers_sd3(2))
    res = match_modules(a, b)
    pairs = {ma.name: mb for _, ma, mb in res.shared}
    for blk in (0, LAST):
        assert set(pairs[kname(blk, "x_block.attn.qkv")].source_names) == {dname(blk, "attn.to_q"),
                                                                          dname(blk, "attn.to_k")}
        assert len(pairs[kname(blk, "context_block.attn.qkv")].source_names) == 3
        assert pairs[kname(blk, "x_block.attn.proj")].name == dname(blk, "attn.to_out.0")
        assert pairs[kname(blk, "x_block.mlp.fc2")].name == dname(blk, "ff.net.2")
    assert pairs[kname(0, "context_block.adaLN_modulation.1")].name == dname(0, "norm1_context.linear")
    last = kname(LAST, "context_block.adaLN_modulation.1")
    assert last not in pairs
    assert last in {m.name for _, m in res.only_a}
    assert dname(LAST, "norm1_context.linear") in {m.name for _, m in res.only_b}
    assert not res.warnings


def test_scan_cosines_equal_dense_float64_across_vocabularies():
    ka, db = kohya_sd3(3), diffusers_sd3(4)
    # the diffusers to_q is made to share the kohya qkv's first rows exactly (cosine 1 on that piece)
    k = LoRAModel.from_state_dict(dict(ka))
    qkv = k.get(kname(0, "x_block.attn.qkv"))
    b_, a_, s = qkv.lowrank(torch.float32)
    db[dname(0, "attn.to_q") + ".lora_B.weight"] = (b_[:H] * s).half()
    db[dname(0, "attn.to_q") + ".lora_A.weight"] = a_.half()
    rep = scan(ka, db)
    mods = {m["name"]: m for m in rep["modules"]} if isinstance(rep.get("modules"), list) else rep["modules"]
    da, dd = dense(ka), dense(db)
    checked = 0
    for name, m in mods.items():
        if name == kname(0, "x_block.attn.qkv"):
            full = da[name]
            other = torch.zeros_like(full)
            other[:H] = dd[dname(0, "attn.to_q")]
            other[H:2 * H] = dd[dname(0, "attn.to_k")]
            ref = float((full * other).sum() / (full.norm() * other.norm()))
            assert abs(m["cosine"] - ref) < 1e-5
            checked += 1
        if name == kname(0, "x_block.attn.proj"):
            x, y = da[name], dd[dname(0, "attn.to_out.0")]
            assert abs(m["cosine"] - float((x * y).sum() / (x.norm() * y.norm()))) < 1e-5
            checked += 1
    assert checked == 2


@pytest.mark.parametrize("first", ["kohya", "diffusers"])
def test_concat_blend_equals_the_stacked_sum_in_the_first_files_vocabulary(first):
    ka, db = kohya_sd3(5), diffusers_sd3(6)
    w = (0.7, -0.4)
    loras = [ka, db] if first == "kohya" else [db, ka]
    out, rep = blend(loras, list(w), "concat")
    assert not rep["warnings"]
    got = {m.name: m.delta(torch.float64) for m in out.modules}
    dk, dd = dense(ka), dense(db)
    wk, wd = (w[0], w[1]) if first == "kohya" else (w[1], w[0])
    for blk in (0, LAST):
        # fused reference per MMDiT layer: the kohya ΔW plus the diffusers parts placed at their rows
        for layer in MMDIT:
            ref = wk * dk[kname(blk, layer)]
            parts = [(p, r0, r1) for p, (lay, r0, r1) in DIFFUSERS.items() if lay == layer]
            swapped = layer == "context_block.adaLN_modulation.1" and blk == LAST
            if not swapped:
                for p, r0, r1 in parts:
                    ref[r0:r1] += wd * dd[dname(blk, p)]
            if first == "kohya":
                assert rel(got[kname(blk, layer)], ref) < 2e-3, layer     # fp16 output
            else:
                for p, r0, r1 in parts:
                    if not swapped:
                        assert rel(got[dname(blk, p)], ref[r0:r1]) < 2e-3, p
        if first == "diffusers":   # the kohya qkv's rows no diffusers part covers (v) come out as to_v
            assert rel(got[dname(blk, "attn.to_v")], wk * dk[kname(blk, "x_block.attn.qkv")][2 * H:]) < 2e-3
    # the swapped last modulation: both carried, each under its own name, at its own strength
    assert rel(got[kname(LAST, "context_block.adaLN_modulation.1")],
               wk * dk[kname(LAST, "context_block.adaLN_modulation.1")]) < 2e-3
    assert rel(got[dname(LAST, "norm1_context.linear")], wd * dd[dname(LAST, "norm1_context.linear")]) < 2e-3


@pytest.mark.parametrize("item", ["joint0=0.25", "double0=0.25"])
def test_block_weights_reach_both_vocabularies_of_one_sd3_block(item):
    """`joint0` (MMDiT's word) and `double0` (what diffusers' transformer_blocks.0 is labelled) weight the same block in
    both files, including the layers only the second file has and the swapped modulation carried from it."""
    ka, db = kohya_sd3(7, blocks=(0,)), diffusers_sd3(8, blocks=(0,))
    out, _ = blend([ka, db], [1.0, 1.0], "concat", block_weights=item)
    dk, dd = dense(ka), dense(db)
    got = {m.name: m.delta(torch.float64) for m in out.modules}
    ref = 0.25 * dk[kname(0, "x_block.attn.qkv")]
    ref[:H] += 0.25 * dd[dname(0, "attn.to_q")]
    ref[H:2 * H] += 0.25 * dd[dname(0, "attn.to_k")]
    assert rel(got[kname(0, "x_block.attn.qkv")], ref) < 2e-3
    out2, _ = blend([db, ka], [1.0, 1.0], "concat", block_weights=item)
    got2 = {m.name: m.delta(torch.float64) for m in out2.modules}
    assert rel(got2[dname(0, "attn.to_v")], 0.25 * dk[kname(0, "x_block.attn.qkv")][2 * H:]) < 2e-3
    ref_q = 0.25 * (dd[dname(0, "attn.to_q")] + dk[kname(0, "x_block.attn.qkv")][:H])
    assert rel(got2[dname(0, "attn.to_q")], ref_q) < 2e-3
