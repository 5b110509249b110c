"""Format coverage and error handling found by QA on LoRA layouts seen in the wild (via the CLI).

Each test is a minimal reproduction of a failure a user hit with a file layout the other suites do not
cover; files are small and generated under tmp_path.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_factory import convention_lora, gen
from lens_ops.analysis import spectra
from lens_ops.model import LoRAModel


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _spy_svdvals(monkeypatch) -> list:
    """The shapes of the matrices torch.linalg.svdvals is asked to decompose from now on."""
    shapes, real = [], torch.linalg.svdvals

    def spy(x, *a, **k):
        shapes.append(tuple(x.shape))
        return real(x, *a, **k)

    monkeypatch.setattr(torch.linalg, "svdvals", spy)
    return shapes


@pytest.mark.parametrize("layout", ["conv4d_w2_full", "flat_both_decomposed"])
def test_lokr_spectrum_exact_without_svd_of_the_wide_delta(tmp_path, monkeypatch, layout):
    """A real LyCORIS LoKr (SD 1.5, 1280×11520 conv modules) took minutes per module in `analyze`: the
    dense ΔW was decomposed as a wide matrix. Its spectrum is the Kronecker product's, σ(w1)⊗σ(w2)."""
    g = _g(1)
    key = "lora_unet_down_blocks_2_resnets_0_conv2"
    sd = {key + ".lokr_w1_a": torch.randn(8, 2, generator=g), key + ".lokr_w1_b": torch.randn(2, 4, generator=g),
          key + ".alpha": torch.tensor(2.0)}
    if layout == "conv4d_w2_full":   # w2 a whole 4-D kernel: ΔW = kron(w1[:, :, None, None], w2)
        w2 = torch.randn(40, 4, generator=g) @ torch.randn(4, 80 * 9, generator=g)
        sd[key + ".lokr_w2"] = w2.reshape(40, 80, 3, 3).contiguous()
    else:                            # smart_falcon's layout: 2-D kron, reshaped to the conv weight by ComfyUI
        sd[key + ".lokr_w2_a"] = torch.randn(40, 4, generator=g)
        sd[key + ".lokr_w2_b"] = torch.randn(4, 80 * 9, generator=g) * 0.1
    path = tmp_path / "lokr.safetensors"
    save_file(sd, str(path))
    model = LoRAModel.load(str(path))
    m = model.modules[0]
    ref_s = torch.linalg.svdvals(m.delta(torch.float64).reshape(320, -1))
    shapes = _spy_svdvals(monkeypatch)
    e = spectra.analyze_modules(model)[m.name]
    s = torch.tensor(e["singular_values"], dtype=torch.float64)
    assert s.shape == ref_s.shape
    assert float((s - ref_s).norm() / ref_s.norm()) < 1e-5
    assert e["effective_rank_99"] <= 4 * 2
    # nothing as large as ΔW (320 × 2880) went through an SVD
    assert max(a * b for a, b in shapes) < 320 * 2880 // 10, shapes


def test_dense_spectrum_of_a_wide_diff_is_taken_on_the_tall_side(tmp_path, monkeypatch):
    """LAPACK's svdvals is ~30× slower on a wide matrix than on its transpose (same values)."""
    g = _g(2)
    key = "diffusion_model.input_blocks.1.0.in_layers.2"
    d = torch.randn(16, 8, generator=g) @ torch.randn(8, 320 * 9, generator=g)
    save_file({key + ".diff": d.reshape(16, 320, 3, 3).contiguous()}, str(tmp_path / "diff.safetensors"))
    model = LoRAModel.load(str(tmp_path / "diff.safetensors"))
    shapes = _spy_svdvals(monkeypatch)
    e = spectra.analyze_modules(model)[key]
    assert all(r >= c for r, c in shapes), shapes
    ref = torch.linalg.svdvals(d.double())
    s = torch.tensor(e["singular_values"], dtype=torch.float64)
    assert float((s - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_analyze_int8_lycoris_file(tmp_path, kind):
    """`lora-lens quantize` writes LoHa/LoKr factors as int8 with the scales in alpha; `analyze` of that
    file failed (IndexError: no floating factor to describe)."""
    g = _g(3)
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    q = lambda *s: torch.randint(-127, 128, s, generator=g, dtype=torch.int8)  # noqa: E731
    if kind == "lokr":
        sd = {key + ".lokr_w1": q(8, 8), key + ".lokr_w2_a": q(80, 4), key + ".lokr_w2_b": q(4, 80)}
    else:
        sd = {key + ".hada_w1_a": q(640, 4), key + ".hada_w1_b": q(4, 640),
              key + ".hada_w2_a": q(640, 4), key + ".hada_w2_b": q(4, 640)}
    sd[key + ".alpha"] = torch.tensor(1e-6)
    save_file(sd, str(tmp_path / "q.safetensors"))
    model = LoRAModel.load(str(tmp_path / "q.safetensors"))
    e = spectra.analyze_modules(model)[key]
    ref = torch.linalg.svdvals(model.modules[0].delta(torch.float64).reshape(640, 640))
    s = torch.tensor(e["singular_values"], dtype=torch.float64)
    assert float((s - ref).norm() / ref.norm()) < 1e-5
    assert e["factors"]["count"] == sum(t.numel() for k, t in sd.items() if not k.endswith("alpha"))


def test_conflict_lokr_2d_vs_lora_1x1_conv_same_layer(tmp_path):
    """SD 1.5 proj_in is a 1×1 conv: kohya writes 4-D LoRA factors, LyCORIS LoKr a 2-D kron that ComfyUI
    reshapes to the weight. Comparing the two was refused as 'trained for different base models'."""
    from lens_ops.conflict.matching import match_modules
    g = _g(4)
    key = "lora_unet_down_blocks_2_attentions_1_proj_in"
    a = {key + ".lokr_w1": torch.randn(8, 8, generator=g), key + ".lokr_w2_a": torch.randn(160, 4, generator=g),
         key + ".lokr_w2_b": torch.randn(4, 160, generator=g), key + ".alpha": torch.tensor(4.0)}
    b = {key + ".lora_down.weight": torch.randn(4, 1280, 1, 1, generator=g),
         key + ".lora_up.weight": torch.randn(1280, 4, 1, 1, generator=g), key + ".alpha": torch.tensor(4.0)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    ma, mb = LoRAModel.load(str(tmp_path / "a.safetensors")), LoRAModel.load(str(tmp_path / "b.safetensors"))
    res = match_modules(ma, mb)
    assert len(res.shared) == 1
    # and a truly different layer size is still refused
    c = {key + ".lora_down.weight": torch.randn(4, 640, 1, 1, generator=g),
         key + ".lora_up.weight": torch.randn(640, 4, 1, 1, generator=g)}
    save_file(c, str(tmp_path / "c.safetensors"))
    with pytest.raises(Exception, match="different base models"):
        match_modules(ma, LoRAModel.load(str(tmp_path / "c.safetensors")))


def _lycoris_conv(kind, seed):
    """One SD 1.5 conv module (320×320×3×3) as LyCORIS writes it without Tucker: a 2-D ΔW over in·kh·kw
    that ComfyUI reshapes to the weight."""
    g = _g(seed)
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    if kind == "lokr":
        sd = {key + ".lokr_w1_a": torch.randn(20, 4, generator=g), key + ".lokr_w1_b": torch.randn(4, 60, generator=g),
              key + ".lokr_w2_a": torch.randn(16, 4, generator=g), key + ".lokr_w2_b": torch.randn(4, 48, generator=g)}
    else:
        sd = {key + f".hada_w{i}_{s}": torch.randn(*shape, generator=g) * 0.1
              for i in (1, 2) for s, shape in (("a", (320, 4)), ("b", (4, 2880)))}
    sd[key + ".alpha"] = torch.tensor(2.0)
    return key, sd


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_blend_lycoris_conv_writes_factors_comfy_reshapes(tmp_path, kind):
    """Blending two LyCORIS LoKr/LoHa files wrote each conv layer as a 2-D `.diff` (320×2880): ComfyUI merges
    a diff only when its shape equals the weight's (320×320×3×3), so those layers were silently dropped.
    The exact result now goes out as LoRA factors, which ComfyUI reshapes to the weight."""
    from lens_ops.blend import blend
    key, a = _lycoris_conv(kind, 5)
    _, b = _lycoris_conv(kind, 6)
    ma, mb = LoRAModel.from_state_dict(a), LoRAModel.from_state_dict(b)
    ref = 0.5 * ma.modules[0].delta(torch.float64).reshape(320, -1) + 0.3 * mb.modules[0].delta(torch.float64).reshape(320, -1)
    for method in ("concat", "svd"):
        out, _ = blend([ma, mb], [0.5, 0.3], method, 0, device="cpu")
        m = out.get(key)
        assert m.kind.name == "lora", (method, m.kind.name, {r: tuple(t.shape) for r, t in m.tensors.items()})
        got = m.delta(torch.float64).reshape(320, -1)
        assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_extract_over_an_existing_file_is_not_called_damaged(tmp_path, capsys):
    """Extracting twice into one folder said "Damaged entry 'x' not extracted (… already exists …)": the entry
    is fine, the file is in the way; the message now says so and names --overwrite."""
    from lens_ops.cli import main
    from lens_ops.synth import make_lora
    sd = make_lora("sdxl_kohya", rank=4, max_modules=2, seed=7)
    src = tmp_path / "one.safetensors"
    save_file(dict(sd), str(src), metadata=sd.metadata)
    db = tmp_path / "c.loradb"
    assert main(["pack", "-o", str(db), str(src)]) == 0
    out = tmp_path / "x"
    assert main(["extract", str(db), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["extract", str(db), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "amaged" not in err and "--overwrite" in err and "already exists" in err, err
    assert len(err.strip().splitlines()) == 1
    assert main(["extract", str(db), "-o", str(out), "--overwrite"]) == 0


def test_lossy_pack_report_with_an_exactly_kept_entry(tmp_path, capsys):
    """`pack --int8 --shared-basis on` of a LoKr file next to a kohya LoRA: the LoKr entry is kept exactly
    (error 0, SNR None = infinite) and printing the report failed with a TypeError after the .loradb
    had been written."""
    from lens_ops.cli import main
    from lens_ops.synth import make_lora
    sd = make_lora("sdxl_kohya", rank=4, max_modules=3, seed=8)
    a = tmp_path / "a.safetensors"
    save_file(dict(sd), str(a), metadata=sd.metadata)
    _, lokr = _lycoris_conv("lokr", 9)
    b = tmp_path / "b.safetensors"
    save_file(lokr, str(b))
    rc = main(["pack", "-o", str(tmp_path / "c.loradb"), "--recipe", "energy=0.9999", "--int8",
               "--shared-basis", "on", str(a), str(b)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "b " in cap.out or "\nb" in cap.out


@pytest.mark.parametrize("layout", ["lora", "rank_above_rows", "lokr"])
def test_prune_names_a_module_with_nan_and_writes_nothing(tmp_path, capsys, layout):
    """A LoRA with one NaN made `lora-lens prune` fail with "unexpected error (_LinAlgError …)" (also on the
    Householder route a rank above the layer's size takes); a LoKr module with NaN, carried through unpruned, was
    written back without a word."""
    from lens_ops.cli import main
    from lens_ops.synth import make_lora
    if layout == "lora":
        sd = dict(make_lora("sdxl_kohya", rank=4, max_modules=4, seed=10))
        key = sorted(k for k in sd if k.endswith("lora_up.weight"))[1]
    elif layout == "rank_above_rows":
        g = _g(12)
        name = "lora_unet_input_blocks_4_1_proj_in"
        sd = {name + ".lora_up.weight": torch.randn(4, 8, generator=g).half(),
              name + ".lora_down.weight": torch.randn(8, 16, generator=g).half(), name + ".alpha": torch.tensor(8.0)}
        key = name + ".lora_up.weight"
    else:
        _, sd = _lycoris_conv("lokr", 11)
        key = next(k for k in sd if k.endswith("lokr_w2_b"))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = float("nan")
    src = tmp_path / "nan.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "out.safetensors"
    assert main(["prune", str(src), "-o", str(out), "-r", "rank=2"]) == 2
    err = capsys.readouterr().err
    assert key.rsplit(".", 1 if layout == "lokr" else 2)[0] in err and "NaN" in err, err
    assert "unexpected" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_blend_dense_result_takes_the_real_conv_shape(tmp_path):
    """LoKr (2-D kron over in·kh·kw) first, LoHa CP (4-D, no exact factors) second: the blended `.diff` took the
    first input's 2-D shape, which ComfyUI does not merge into a 320×320×3×3 conv weight."""
    from lens_ops.blend import blend
    key, a = _lycoris_conv("lokr", 12)
    g = _g(13)
    b = {key + ".hada_t1": torch.randn(4, 4, 3, 3, generator=g), key + ".hada_t2": torch.randn(4, 4, 3, 3, generator=g),
         key + ".alpha": torch.tensor(2.0)}
    for i in (1, 2):
        b[key + f".hada_w{i}_a"] = torch.randn(4, 320, generator=g) * 0.1
        b[key + f".hada_w{i}_b"] = torch.randn(4, 320, generator=g) * 0.1
    ma, mb = LoRAModel.from_state_dict(a), LoRAModel.from_state_dict(b)
    ref = 0.5 * ma.modules[0].delta(torch.float64).reshape(320, -1) + 0.3 * mb.modules[0].delta(torch.float64).reshape(320, -1)
    out, _ = blend([ma, mb], [0.5, 0.3], "concat", 0, device="cpu")
    m = out.get(key)
    assert tuple(m.weight_shape()) == (320, 320, 3, 3)
    got = m.delta(torch.float64).reshape(320, -1)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("conv, label", [("diffusers_processor", "diffusers (attention processor)"),
                                         ("xlabs", "XLabs FLUX")])
def test_attention_processor_names_are_told_apart(conv, label):
    """diffusers' old attention-processor LoRAs (`…attn1.processor.to_q_lora.up.weight`) were labelled XLabs FLUX,
    whose keys also say `.processor.…_lora1.up.weight` but start at double_blocks/single_blocks."""
    model = LoRAModel.from_state_dict(convention_lora(conv, gen(0)))
    assert model.convention == label
