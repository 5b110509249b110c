"""ConflictScan and BlendLoRAs across block vocabularies: SGM ↔ diffusers UNet names (SD 1.5, SDXL) and BFL ↔
diffusers FLUX names, fused qkv/linear1 against split to_q/to_k/to_v/proj_mlp.

Fixtures start from the real trainer layouts (lens_ops.synth) and are renamed here with closed-form rules written
independently of lens_ops.conflict.crossnames; references are dense float64 (row by row for FLUX's big layers)."""
import functools
import re

import pytest
import torch

from lens_ops import LensError, LoRAModel
from lens_ops.blend import blend
from lens_ops.conflict import scan
from lens_ops.conflict.matching import match_modules
from lens_ops.synth import make_lora

# ------------------------------------------------------------------ independent renaming (kohya underscore names)
RES = {"conv1": "in_layers_2", "time_emb_proj": "emb_layers_1", "conv2": "out_layers_3",
       "conv_shortcut": "skip_connection"}


def to_sgm(name: str, up_attn: set) -> str:
    """kohya diffusers UNet name -> kohya SGM name, for UNets with 2 res blocks per level (SD 1.5, SDXL).
    up_attn: the up_blocks indices that hold attention (their upsampler is the block's 3rd layer)."""
    p = "lora_unet_"
    assert name.startswith(p)
    s = name[len(p):]
    rules = [
        (r"down_blocks_(\d+)_attentions_(\d+)_(.+)", lambda x, i, r: f"input_blocks_{3 * int(x) + int(i) + 1}_1_{r}"),
        (r"down_blocks_(\d+)_resnets_(\d+)_(\w+)", lambda x, i, r: f"input_blocks_{3 * int(x) + int(i) + 1}_0_{RES[r]}"),
        (r"down_blocks_(\d+)_downsamplers_0_conv", lambda x: f"input_blocks_{3 * int(x) + 3}_0_op"),
        (r"mid_block_attentions_0_(.+)", lambda r: f"middle_block_1_{r}"),
        (r"mid_block_resnets_(\d)_(\w+)", lambda j, r: f"middle_block_{2 * int(j)}_{RES[r]}"),
        (r"up_blocks_(\d+)_attentions_(\d+)_(.+)", lambda x, i, r: f"output_blocks_{3 * int(x) + int(i)}_1_{r}"),
        (r"up_blocks_(\d+)_resnets_(\d+)_(\w+)", lambda x, i, r: f"output_blocks_{3 * int(x) + int(i)}_0_{RES[r]}"),
        (r"up_blocks_(\d+)_upsamplers_0_conv",
         lambda x: f"output_blocks_{3 * int(x) + 2}_{2 if int(x) in up_attn else 1}_conv"),
        (r"time_embedding_linear_(\d)", lambda k: f"time_embed_{2 * (int(k) - 1)}"),
        (r"add_embedding_linear_(\d)", lambda k: f"label_emb_0_{2 * (int(k) - 1)}"),
        (r"conv_in", lambda: "input_blocks_0_0"), (r"conv_out", lambda: "out_2"),
    ]
    for rx, f in rules:
        m = re.fullmatch(rx, s)
        if m:
            return p + f(*m.groups())
    raise AssertionError(f"no rule for {name}")


def from_sgm(name: str, up_attn: set) -> str:
    """The inverse (kohya SGM -> kohya diffusers), by arithmetic on the block numbers."""
    p = "lora_unet_"
    s = name[len(p):]
    inv = {v: k for k, v in RES.items()}
    m = re.fullmatch(r"input_blocks_(\d+)_(\d)_(.+)", s)
    if m:
        n, j, r = int(m.group(1)), m.group(2), m.group(3)
        x, i = (n - 1) // 3, (n - 1) % 3
        if r == "op":
            return p + f"down_blocks_{x}_downsamplers_0_conv"
        return p + (f"down_blocks_{x}_attentions_{i}_{r}" if j == "1" else f"down_blocks_{x}_resnets_{i}_{inv[r]}")
    m = re.fullmatch(r"middle_block_(\d)_(.+)", s)
    if m:
        j, r = int(m.group(1)), m.group(2)
        return p + (f"mid_block_attentions_0_{r}" if j == 1 else f"mid_block_resnets_{j // 2}_{inv[r]}")
    m = re.fullmatch(r"output_blocks_(\d+)_(\d)_(.+)", s)
    if m:
        n, j, r = int(m.group(1)), int(m.group(2)), m.group(3)
        x, i = n // 3, n % 3
        if r == "conv":
            return p + f"up_blocks_{x}_upsamplers_0_conv"
        return p + (f"up_blocks_{x}_attentions_{i}_{r}" if j == 1 else f"up_blocks_{x}_resnets_{i}_{inv[r]}")
    return name


SD15_UP_ATTN, SDXL_UP_ATTN = {1, 2, 3}, {0, 1}


def modules_of(sd):
    """{module name: (up 2-D, down 2-D, scale)} from a kohya/PEFT state dict."""
    out = {}
    for k in sd:
        for su, sdn in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if k.endswith(su):
                n = k[: -len(su)]
                up, down = sd[k].double(), sd[n + sdn].double()
                r = down.shape[0]
                a = sd.get(n + ".alpha")
                out[n] = (up.reshape(up.shape[0], -1), down.reshape(r, -1), (float(a) / r) if a is not None else 1.0)
    return out


def renamed(sd, fn, mix_with=None, seed=0):
    """sd with every UNet module renamed by fn; with mix_with (a state dict of the same layout) the factors are
    related to mix_with's: same down, up = 0.8·up_mix + 0.6·own up (so cosines are far from 0)."""
    out = type(sd)()
    out.metadata = dict(getattr(sd, "metadata", {}))
    for k, v in sd.items():
        base = k.split(".")[0]
        t = v
        if mix_with is not None and k in mix_with and not k.endswith(".alpha"):
            if k.endswith(".lora_down.weight"):
                t = mix_with[k].clone()
            else:
                t = 0.8 * mix_with[k] + 0.6 * v
        out[(fn(base) if base.startswith("lora_unet_") else base) + k[len(base):]] = t
    return out


def dense(f):
    up, down, s = f
    return s * up @ down


def cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


# ------------------------------------------------------------------ SD 1.5 / SDXL
SD15_PICK = re.compile(
    r"lora_unet_(down_blocks_0_(attentions_1_(proj_in|transformer_blocks_0_attn1_to_q|transformer_blocks_0_attn2_to_k)"
    r"|resnets_1_(conv1|time_emb_proj)|downsamplers_0_conv)|down_blocks_1_resnets_0_conv_shortcut"
    r"|mid_block_attentions_0_transformer_blocks_0_attn2_to_v|mid_block_resnets_1_time_emb_proj"
    r"|up_blocks_3_attentions_2_(proj_out|transformer_blocks_0_ff_net_2)|up_blocks_3_resnets_2_(conv2|conv_shortcut)"
    r"|up_blocks_2_upsamplers_0_conv|up_blocks_0_resnets_1_time_emb_proj)$"
    r"|lora_te_text_model_encoder_layers_0_self_attn_q_proj$")
SDXL_PICK = re.compile(
    r"lora_unet_(input_blocks_1_0_emb_layers_1|input_blocks_3_0_op|input_blocks_4_0_skip_connection"
    r"|input_blocks_4_1_(proj_in|transformer_blocks_1_attn1_to_q)|input_blocks_8_1_transformer_blocks_9_attn2_to_k"
    r"|middle_block_1_transformer_blocks_9_attn1_to_v|middle_block_2_emb_layers_1"
    r"|output_blocks_1_1_transformer_blocks_3_attn2_to_out_0|output_blocks_5_2_conv|output_blocks_5_1_proj_out"
    r"|output_blocks_7_0_skip_connection|output_blocks_8_0_emb_layers_1)$"
    r"|lora_te1_text_model_encoder_layers_0_self_attn_q_proj$")


@functools.lru_cache(maxsize=None)
def sd_pair(layout, pick, rename, r=4, seed=0):
    a = make_lora(layout, rank=r, seed=seed, dtype=torch.float32, name_filter=lambda n: bool(pick.match(n)))
    b0 = make_lora(layout, rank=r, seed=seed + 7, dtype=torch.float32, alpha=r / 4,
                   name_filter=lambda n: bool(pick.match(n)))
    b = renamed(b0, rename, mix_with=a)
    names = {n: rename(n) if n.startswith("lora_unet_") else n for n in modules_of(a)}
    return a, b, names


CASES = {
    "sd15 diffusers vs SGM": ("sd15_kohya_locon", SD15_PICK, lambda n: to_sgm(n, SD15_UP_ATTN)),
    "sdxl SGM vs diffusers": ("sdxl_kohya_locon", SDXL_PICK, lambda n: from_sgm(n, SDXL_UP_ATTN)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unet_vocabularies_pair_and_scan_exactly(case):
    layout, pick, rename = CASES[case]
    a, b, names = sd_pair(layout, pick, rename)
    assert any(names[n] != n for n in names)                       # really two vocabularies
    assert len(names) >= 12
    assert any("conv" in n or "op" in n for n in names)             # convs, down/upsamplers included
    ma, mb = modules_of(a), modules_of(b)
    rep = scan(a, b)
    assert rep["only_in_a"] == [] and rep["only_in_b"] == [] and not rep["warnings"]
    assert set(rep["modules"]) == set(ma)
    for n, e in rep["modules"].items():
        assert e["name_b"] == names[n]
        ref = cos(dense(ma[n]), dense(mb[names[n]]))
        assert abs(ref) > 0.2
        assert e["cosine"] == pytest.approx(ref, abs=1e-5), n
        na, nb = dense(ma[n]).norm(), dense(mb[names[n]]).norm()
        assert e["norm_ratio"] == pytest.approx(float(na / nb), rel=1e-4)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("first", ["a", "b"])
def test_unet_vocabularies_blend_exactly_in_first_convention(case, first):
    layout, pick, rename = CASES[case]
    a, b, names = sd_pair(layout, pick, rename, seed=3)
    ma, mb = modules_of(a), modules_of(b)
    w1, w2 = 0.7, -0.45
    if first == "b":
        a, b, ma, mb = b, a, mb, ma
        names = {v: k for k, v in names.items()}
    out, rep = blend([a, b], [w1, w2], "concat")
    assert {m.name for m in out.modules} == set(ma)                 # the first LoRA's names, nothing carried twice
    assert rep["modules"]["blended"] == len(ma) and not rep["warnings"]
    for n in ma:
        ref = w1 * dense(ma[n]) + w2 * dense(mb[names[n]])
        got = out.get(n).delta(torch.float64).reshape(ref.shape[0], -1)
        assert float((got - ref).norm() / ref.norm()) < 1e-5, n


def test_unet_only_in_second_is_renamed_into_first_vocabulary():
    layout, pick, rename = CASES["sdxl SGM vs diffusers"]
    a, b, names = sd_pair(layout, pick, rename, seed=5)
    drop = [n for n in names if n.startswith("lora_unet_output_blocks_5")]
    assert len(drop) == 2
    a = type(a)({k: v for k, v in a.items() if k.split(".")[0] not in drop})
    out, rep = blend([a, b], [1.0, 0.5], "concat")
    mb = modules_of(b)
    for n in drop:                                                 # B's diffusers module, written under SGM name
        got = out.get(n).delta(torch.float64)
        ref = 0.5 * dense(mb[names[n]])
        assert float((got.reshape(ref.shape[0], -1) - ref).norm() / ref.norm()) < 1e-5
    assert not any(m.name.startswith("lora_unet_up_blocks") for m in out.modules)


# ------------------------------------------------------------------ FLUX: BFL fused vs diffusers split
H = 3072
BFL = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
       "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_single_blocks_0_linear1",
       "lora_unet_double_blocks_1_img_mod_lin"]
# diffusers part -> (BFL module, first row, stop row): written from the FLUX layer layout, not from lens_ops
PARTS = {
    "transformer.transformer_blocks.0.attn.to_q": (BFL[0], 0, H),
    "transformer.transformer_blocks.0.attn.to_k": (BFL[0], H, 2 * H),
    "transformer.transformer_blocks.0.attn.to_v": (BFL[0], 2 * H, 3 * H),
    "transformer.transformer_blocks.0.attn.add_q_proj": (BFL[1], 0, H),
    "transformer.transformer_blocks.0.attn.add_k_proj": (BFL[1], H, 2 * H),   # no add_v_proj: a partial layer
    "transformer.transformer_blocks.0.attn.to_out.0": (BFL[2], 0, H),
    "transformer.single_transformer_blocks.0.attn.to_q": (BFL[3], 0, H),
    "transformer.single_transformer_blocks.0.attn.to_k": (BFL[3], H, 2 * H),
    "transformer.single_transformer_blocks.0.attn.to_v": (BFL[3], 2 * H, 3 * H),   # no proj_mlp
}
LEFTOVER = {"transformer.transformer_blocks.0.attn.add_v_proj": (BFL[1], 2 * H, 3 * H),
            "transformer.single_transformer_blocks.0.proj_mlp": (BFL[3], 3 * H, 7 * H)}


@pytest.fixture(scope="module")
def flux():
    """(BFL kohya state dict, diffusers PEFT state dict) with related factors."""
    r = 4
    a = make_lora("flux_kohya", rank=r, seed=11, dtype=torch.float32, name_filter=lambda n: n in BFL)
    b = make_lora("flux_aitoolkit_peft", rank=r, seed=12, dtype=torch.float32,
                  name_filter=lambda n: n in PARTS)
    assert len(modules_of(a)) == len(BFL) and len(modules_of(b)) == len(PARTS)
    for n, (src, r0, r1) in list(PARTS.items())[:4]:               # some parts share directions with the fused module
        b[n + ".lora_B.weight"] = 0.8 * a[src + ".lora_up.weight"][r0:r1] + 0.6 * b[n + ".lora_B.weight"]
        b[n + ".lora_A.weight"] = a[src + ".lora_down.weight"].clone()
    return a, b


def rows(f, r0, r1):
    up, down, s = f
    return s * up[r0:r1] @ down


def test_flux_fused_first_scan_matches_dense(flux):
    a, b = flux
    ma, mb = modules_of(a), modules_of(b)
    rep = scan(a, b)
    assert set(rep["modules"]) == set(BFL[:4]) and rep["only_in_a"] == [BFL[4]] and rep["only_in_b"] == []
    for n in BFL[:4]:
        total = ma[n][0].shape[0]
        parts = [(p, r0, r1) for p, (src, r0, r1) in PARTS.items() if src == n]
        inner = sum(float((rows(ma[n], r0, r1) * dense(mb[p])).sum()) for p, r0, r1 in parts)
        na = sum(float(rows(ma[n], i, min(i + H, total)).pow(2).sum()) for i in range(0, total, H)) ** 0.5
        nb = sum(float(dense(mb[p]).pow(2).sum()) for p, _, _ in parts) ** 0.5
        e = rep["modules"][n]
        assert e["cosine"] == pytest.approx(inner / (na * nb), abs=1e-5), n
        assert e["norm_ratio"] == pytest.approx(na / nb, rel=1e-4)
        assert all(p in e["name_b"] for p, _, _ in parts)
    assert abs(rep["modules"][BFL[0]]["cosine"]) > 0.2


def test_flux_split_first_scan_matches_dense(flux):
    a, b = flux
    ma, mb = modules_of(a), modules_of(b)
    rep = scan(b, a)
    assert set(rep["modules"]) == set(PARTS)
    for p, (src, r0, r1) in PARTS.items():
        assert rep["modules"][p]["cosine"] == pytest.approx(cos(dense(mb[p]), rows(ma[src], r0, r1)), abs=1e-5), p
    assert rep["modules"]["transformer.transformer_blocks.0.attn.to_q"]["cosine"] > 0.2
    only_b = set(rep["only_in_b"])
    assert f"{BFL[1]}[{2 * H}:{3 * H}]" in only_b and f"{BFL[3]}[{3 * H}:{7 * H}]" in only_b and BFL[4] in only_b


def _check_rows(out, name, ref_fn, r0, r1):
    m = out.get(name)
    up, down, s = m.lowrank(torch.float64)
    for i in range(r0, r1, H):
        j = min(i + H, r1)
        got = s * up[i - r0:j - r0] @ down
        ref = ref_fn(i, j)
        assert float((got - ref).norm() / ref.norm()) < 1e-5, (name, i)


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_flux_blend_fused_first_is_exact_concat(flux, method):
    a, b = flux
    ma, mb = modules_of(a), modules_of(b)
    w1, w2 = 0.6, 0.9
    out, rep = blend([a, b], [w1, w2], method)
    assert {m.name for m in out.modules} == set(BFL)
    for n in BFL:
        total = ma[n][0].shape[0]
        parts = {r0: (p, r1) for p, (src, r0, r1) in PARTS.items() if src == n}

        def ref(i, j, n=n, parts=parts):
            d = w1 * rows(ma[n], i, j)
            if i in parts:
                d = d + w2 * dense(mb[parts[i][0]])
            return d
        _check_rows(out, n, ref, 0, total)
        if method == "concat" and n in (BFL[0], BFL[3]):
            # B = [w1·B1 | blockdiag-by-rows of the parts' w2·B], A = [A1; A_parts]: rank r1 + Σ part ranks
            assert out.get(n).rank() == 4 + 4 * len(parts)


def test_flux_blend_split_first_slices_fused_rows(flux):
    a, b = flux
    ma, mb = modules_of(a), modules_of(b)
    w1, w2 = -0.5, 1.2
    out, rep = blend([b, a], [w1, w2], "concat")
    names = {m.name for m in out.modules}
    assert names == set(PARTS) | set(LEFTOVER) | {"transformer.transformer_blocks.1.norm1.linear"}
    assert all(m.keys["up"].endswith(".lora_B.weight") for m in out.modules)    # PEFT spelling kept
    for p, (src, r0, r1) in PARTS.items():
        _check_rows(out, p, lambda i, j, p=p, src=src, r0=r0: w1 * dense(mb[p])[i - r0:j - r0]
                    + w2 * rows(ma[src], i, j), r0, r1)
    for p, (src, r0, r1) in LEFTOVER.items():      # rows no part of the first LoRA covers, named like its parts
        _check_rows(out, p, lambda i, j, src=src: w2 * rows(ma[src], i, j), r0, r1)
    _check_rows(out, "transformer.transformer_blocks.1.norm1.linear", lambda i, j: w2 * rows(ma[BFL[4]], i, j),
                0, 6 * H)


def test_ties_across_vocabularies_matches_dense():
    from lens_ops.blend.methods import ties_merge
    layout, pick, rename = CASES["sd15 diffusers vs SGM"]
    a, b, names = sd_pair(layout, pick, rename)
    ma, mb = modules_of(a), modules_of(b)
    n = "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q"
    out, _ = blend([a, b], [1.0, 0.5], "ties", rank=6, include=n, density=0.3)
    ref = ties_merge([dense(ma[n]), 0.5 * dense(mb[names[n]])], 0.3)
    got = out.get(n).delta(torch.float64)
    s = torch.linalg.svdvals(ref)
    best = float((s[6:].pow(2).sum() / s.pow(2).sum()).sqrt())
    assert best > 1e-3 and float((got - ref).norm() / ref.norm()) == pytest.approx(best, abs=1e-4)


def test_duplicate_layer_in_two_vocabularies_refused(flux):
    a, b = flux
    both = type(a)({**a, **{k: v for k, v in b.items() if ".transformer_blocks.0.attn.to_q." in k}})
    with pytest.raises(LensError, match="two modules for the same layer"):
        match_modules(LoRAModel.from_state_dict(both), LoRAModel.from_state_dict(b))
