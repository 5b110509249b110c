"""Failures found by running the whole CLI on real LoRA files from public repositories (QA round on real files).

Each test rebuilds, small and synthetic, the structure of the real file that showed the problem; none needs
the real file.
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from lens_ops.model import LoRAModel
from lens_ops.summary import summarize


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _falcon_like_lokr(path, zero: set[str]):
    """Kohya-named LyCORIS LoKr as smart_falcon_8_lokr has it: both sides decomposed (w1_a·w1_b, w2_a·w2_b),
    fp16, 0-dim alpha, a conv layer whose 2-D Kronecker product ComfyUI reshapes to the 4-D weight; the
    modules in `zero` untrained (lokr_w2_b all zero, as LyCORIS initialises it)."""
    g = _g(3)
    sd = {}
    shapes = {"lora_unet_down_blocks_2_resnets_0_conv2": ((8, 4), (40, 80 * 9)),
              "lora_unet_mid_block_attentions_0_proj_in": ((8, 8), (40, 40)),
              "lora_te_text_model_encoder_layers_0_mlp_fc1": ((12, 6), (16, 16))}
    for name, ((a, b), (c, d)) in shapes.items():
        sd[name + ".lokr_w1_a"] = torch.randn(a, 2, generator=g).half()
        sd[name + ".lokr_w1_b"] = torch.randn(2, b, generator=g).half()
        sd[name + ".lokr_w2_a"] = torch.randn(c, 4, generator=g).half()
        w2b = torch.randn(4, d, generator=g) * 0.1
        sd[name + ".lokr_w2_b"] = (w2b * 0 if name in zero else w2b).half()
        sd[name + ".alpha"] = torch.tensor(4.0).half()
    save_file(sd, str(path))
    return list(shapes)


def test_lokr_zero_check_does_not_form_the_kronecker_product(tmp_path, monkeypatch):
    """`lora-lens info` on the real SD 1.5 LoKr (smart_falcon_8_lokr, 350 modules) took 10 s of CPU (40 s on
    a busy machine) for a 1 MiB file: finding untrained modules formed every module's dense ΔW = kron(W1, W2).
    kron(W1, W2) is zero exactly when one side is, so the small sides decide it."""
    names = _falcon_like_lokr(tmp_path / "lokr.safetensors", zero={"lora_unet_mid_block_attentions_0_proj_in"})
    model = LoRAModel.load(str(tmp_path / "lokr.safetensors"))
    dense = {m.name: not bool(m.delta(torch.float32).any()) for m in model.modules}
    calls = []
    real = torch.kron
    monkeypatch.setattr(torch, "kron", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = {m.name: m.is_zero() for m in model.modules}
    assert got == dense == {n: n == "lora_unet_mid_block_attentions_0_proj_in" for n in names}
    s = summarize(model)
    assert not calls, "the zero check formed a Kronecker product"
    assert any("1 module(s) are all zero" in w for w in s["warnings"]), s["warnings"]


def _unknown_only(path):
    """A user's hand-renamed diffusers LoRA (timohavdk/sd-lora `new.safetensors`): kohya-looking prefixes but
    `_lora_down.weight` joined by an underscore, which neither LoRA Lens nor ComfyUI's loader reads."""
    g = _g(5)
    sd = {}
    for blk in ("to_k", "to_q"):
        k = f"lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_{blk}"
        sd[k + "_lora_down.weight"] = torch.randn(4, 32, generator=g)
        sd[k + "_lora_up.weight"] = torch.randn(32, 4, generator=g)
    save_file(sd, str(path))


def test_quantize_and_ultra_say_the_groups_are_not_understood(tmp_path, capsys):
    """On a file whose tensor groups are all of unknown kind, `quantize` blamed 'kinds applied without alpha or
    relative to the base weight' and `ultra` said 'every module's ΔW is zero or was removed' (after printing a
    prune report): both wrong reasons. They now say the groups are not understood, and write nothing."""
    from lens_ops.cli import main
    src = tmp_path / "renamed.safetensors"
    _unknown_only(src)
    for cmd in (["quantize"], ["quantize", "--fp8"], ["ultra"]):
        out = tmp_path / f"out_{len(cmd)}_{cmd[0]}.safetensors"
        assert main([*cmd, str(src), "-o", str(out)]) == 2
        cap = capsys.readouterr()
        err = cap.err.strip()
        assert err.count("\n") == 0 and err.startswith("lora-lens: "), err
        assert "not understood" in err and "_lora_down.weight" in err, err
        assert "zero" not in err and "base weight" not in err, err
        assert "Recipe" not in cap.out, cap.out   # no prune report before the refusal
        assert not out.exists()


def _cloneofsimo(path):
    """cloneofsimo lora_diffusion layout (example_loras/lora_disney.safetensors): `unet:<i>:up/down`,
    `text_encoder:<i>:up/down`, fp32, rank 1, two textual-inversion embeddings `<s1>`/`<s2>` and the
    per-module ranks in the header, which is all its loader reads: it has no alpha."""
    g = _g(7)
    sd = {"<s1>": torch.randn(32, generator=g), "<s2>": torch.randn(32, generator=g)}
    meta = {"<s1>": "<embed>", "<s2>": "<embed>", "unet": '["CrossAttention"]', "text_encoder": '["CLIPAttention"]'}
    for comp in ("unet", "text_encoder"):
        for i in range(2):
            sd[f"{comp}:{i}:up"] = torch.randn(32, 1, generator=g) * 0.01
            sd[f"{comp}:{i}:down"] = torch.randn(1, 32, generator=g)
            meta[f"{comp}:{i}:rank"] = "1"
    save_file(sd, str(path), metadata=meta)


def test_quantize_refuses_cloneofsimo_files(tmp_path, capsys):
    """Quantizing the real cloneofsimo `lora_disney` wrote `unet:0.alpha` keys holding the int8 scales: a key
    cloneofsimo's loader cannot parse (it splits every key into name:index:direction) and no other loader
    reads this format, so the codes would be applied raw (ΔW off by 10⁵). quantize/ultra now refuse it in one
    sentence and write nothing; prune and blend keep working (no alpha needed)."""
    from lens_ops.cli import main
    src = tmp_path / "disney.safetensors"
    _cloneofsimo(src)
    for cmd in (["quantize"], ["quantize", "--fp8"], ["ultra", "--recipe", "rank=1"]):
        out = tmp_path / "q.safetensors"
        assert main([*cmd, str(src), "-o", str(out)]) == 2
        cap = capsys.readouterr()
        err = cap.err.strip()
        assert err.count("\n") == 0 and "cloneofsimo" in err and "alpha" in err, err
        assert "Recipe" not in cap.out
        assert not out.exists()
    out = tmp_path / "p.safetensors"
    assert main(["prune", str(src), "-r", "rank=1", "-o", str(out)]) == 0
    assert not any(k.endswith("alpha") for k in LoRAModel.load(str(out)).state_dict())


def test_diffusers_dot_lora_names_are_not_called_attention_processors():
    """The real files of diffusers' LoRA trainers (`unet.….attn1.to_k.lora.down.weight`, e.g.
    Krishna4311/Cloud-LoRA-Object-Removal) were labelled 'diffusers (attention processor)', the name of the
    older `…processor.to_k_lora.down.weight` layout, which stays so labelled."""
    from lora_factory import convention_lora, gen
    assert LoRAModel.from_state_dict(convention_lora("diffusers_lora_dot", gen(0))).convention == "diffusers"
    assert LoRAModel.from_state_dict(convention_lora("diffusers_processor", gen(0))).convention == \
        "diffusers (attention processor)"
