"""QuantizeInt8: folding is exact for every kind and naming, metrics equal a float64 reference,
degenerate tensors do not divide by zero, NaN is refused, size/quality targets on realistic layouts."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_ops import LensError, LoRAModel
from lens_ops.quantize import dequantize_model, format_report, quantize_model
from lens_ops.quantize import transforms
from lens_ops.quantize.codec import decode, encode
from lens_ops.synth import make_lora
from lora_factory import CONVENTIONS, convention_lora, gen, kind_tensors, rel_err

FOLD_KINDS = ["lora", "lora_noalpha", "locon3x3", "tucker", "dora", "loha", "loha_cp", "lokr", "lokr_full", "lokr_ab"]
NAME = "lora_unet_down_blocks_0_attentions_0_proj_in"


def state_of(kind, seed=0, dtype=torch.float16):
    t, _ = kind_tensors(kind, gen(seed), dtype)
    return {NAME + k: v for k, v in t.items()}


def naive_dequantized(state: dict, carrier_role: str | None = None) -> dict:
    """Independent reference: every factor tensor replaced by round(x/s)·s, s = max|x|/127 (float64)."""
    out = {}
    for k, v in state.items():
        if k.endswith((".alpha", ".dora_scale")) or (carrier_role and k.endswith(carrier_role)):
            out[k] = v.double()
            continue
        x = v.float()
        s = float(x.abs().max()) / 127
        out[k] = (torch.round(x / s).clamp(-127, 127).double() * s) if s > 0 else x.double()
    return out


def roundtrip(tmp_path, out_model, name="q.safetensors"):
    p = str(tmp_path / name)
    out_model.save(p, out_model.metadata)
    return LoRAModel.load(p), p


@pytest.mark.parametrize("kind", FOLD_KINDS)
def test_folding_is_exact(kind, tmp_path):
    """ΔW of the saved int8 file (folded alpha, as ComfyUI applies it) == ΔW of the dequantized LoRA."""
    sd = state_of(kind, seed=3)
    q, rep = quantize_model(sd, method="naive", dense_metrics="on")
    back, path = roundtrip(tmp_path, q)
    raw = load_file(path)
    m = back.modules[0]
    factors = [k for k in raw if not k.endswith((".alpha", ".dora_scale"))]
    carrier = ".lokr_w1" if kind == "lokr_full" else None
    assert all(raw[k].dtype == torch.int8 for k in factors if not (carrier and k.endswith(carrier)))
    ref_model = LoRAModel.from_state_dict(naive_dequantized(sd, carrier))
    ref = ref_model.modules[0].delta(torch.float64)
    got = m.delta(torch.float64)
    assert rel_err(got, ref) < 2e-6, kind
    if kind == "lokr_full":
        assert raw[NAME + ".lokr_w1"].dtype == torch.float32 and raw[NAME + ".alpha"].item() == 7.0
    else:
        assert raw[NAME + ".alpha"].dtype == torch.float32 and raw[NAME + ".alpha"].ndim == 0
    if kind == "dora":
        assert raw[NAME + ".dora_scale"].dtype == torch.float16
        assert torch.equal(raw[NAME + ".dora_scale"], sd[NAME + ".dora_scale"])


@pytest.mark.parametrize("kind", FOLD_KINDS)
@pytest.mark.parametrize("method", ["auto", "rebalance+rotate", "fp8"])
def test_default_and_fp8_keep_delta(kind, method, tmp_path):
    sd = state_of(kind, seed=4)
    _, ref = kind_tensors(kind, gen(4), torch.float16)
    ref = LoRAModel.from_state_dict(sd).modules[0].delta(torch.float64)
    q, rep = quantize_model(sd, fmt="fp8" if method == "fp8" else "int8",
                            method="auto" if method == "fp8" else method)
    back, path = roundtrip(tmp_path, q)
    raw = load_file(path)
    want = torch.float8_e4m3fn if method == "fp8" else torch.int8
    assert sum(t.dtype == want for t in raw.values()) >= (1 if kind == "lokr_full" else 2)
    err = rel_err(back.modules[0].delta(torch.float64), ref)
    assert err < (0.08 if method == "fp8" else 0.03), (kind, err)
    # the reported ΔW error is the error of the file we wrote
    assert rep["delta"]["rel_frobenius"] == pytest.approx(err, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("conv", sorted(CONVENTIONS))
def test_every_naming_convention(conv, tmp_path):
    sd = convention_lora(conv, gen(1), n_modules=2, rank=4)
    base = LoRAModel.from_state_dict(sd)
    q, rep = quantize_model(sd)
    back, path = roundtrip(tmp_path, q)
    raw = load_file(path)
    assert rep["modules_quantized"] == 2
    for m0 in base.modules:
        m1 = back.get(m0.name)
        assert m1.kind.name == "lora" and m1.tensors["up"].dtype == torch.int8
        assert m1.keys["up"] == m0.keys["up"] and m1.keys["down"] == m0.keys["down"]
        assert m1.key_for("alpha") in raw  # added where the format had none
        assert rel_err(m1.delta(torch.float64), m0.delta(torch.float64)) < 0.03


def test_metrics_equal_float64_reference():
    sd = make_lora("sd15_kohya", rank=8, seed=2, max_modules=6, dtype=torch.float32)
    model = LoRAModel.from_state_dict(sd)
    q, rep = quantize_model(model, dense_metrics="on")
    sig = err = abs_sum = 0.0
    mx, n = 0.0, 0
    per = {p["name"]: p for p in rep["per_module"]}
    for m0 in model.modules:
        up, down = sd[m0.name + ".lora_up.weight"].double(), sd[m0.name + ".lora_down.weight"].double()
        a0 = sd[m0.name + ".alpha"].item()
        ref = (a0 / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
        m1 = q.get(m0.name)
        a1 = m1.tensors["alpha"].double().item()
        got = (a1 / down.shape[0]) * (m1.tensors["up"].double().flatten(1) @ m1.tensors["down"].double().flatten(1))
        e = got - ref
        d = per[m0.name]["delta"]
        assert d["snr_db"] == pytest.approx(10 * math.log10(float((ref ** 2).sum() / (e ** 2).sum())), abs=1e-6)
        assert d["mse"] == pytest.approx(float((e ** 2).mean()), rel=1e-9)
        assert d["mae"] == pytest.approx(float(e.abs().mean()), rel=1e-9)
        assert d["max_error"] == pytest.approx(float(e.abs().max()), rel=1e-9)
        assert d["rel_frobenius"] == pytest.approx(float(e.norm() / ref.norm()), rel=1e-9)
        sig += float((ref ** 2).sum()); err += float((e ** 2).sum()); abs_sum += float(e.abs().sum())
        mx = max(mx, float(e.abs().max())); n += e.numel()
    t = rep["delta"]
    assert t["snr_db"] == pytest.approx(10 * math.log10(sig / err), abs=1e-6)
    assert t["mse"] == pytest.approx(err / n, rel=1e-9) and t["mae"] == pytest.approx(abs_sum / n, rel=1e-9)
    assert t["max_error"] == pytest.approx(mx, rel=1e-9)
    assert t["rel_frobenius"] == pytest.approx(math.sqrt(err / sig), rel=1e-9)


def test_factor_metrics_equal_dense_metrics():
    """Without the dense pass, SNR/MSE/relative error come from the factors and still equal the dense ones."""
    sd = make_lora("sdxl_kohya", rank=16, seed=5, max_modules=8)
    _, dense = quantize_model(sd, dense_metrics="on")
    _, fact = quantize_model(sd, dense_metrics="off")
    assert fact["delta"]["mae"] is None and fact["delta"]["max_error"] is None
    for a, b in zip(dense["per_module"], fact["per_module"]):
        assert a["delta"]["snr_db"] == pytest.approx(b["delta"]["snr_db"], abs=2e-3)
        assert a["delta"]["mse"] == pytest.approx(b["delta"]["mse"], rel=1e-3)


def test_stored_tensor_metrics_equal_reference():
    sd = convention_lora("kohya_unet", gen(3), n_modules=2, rank=8, dtype=torch.float32)
    q, rep = quantize_model(sd, method="naive")
    sig = err = 0.0
    for k, v in sd.items():
        if k.endswith(".alpha"):
            continue
        x = v.double()
        s = float(x.abs().max()) / 127
        e = torch.round(x / s).clamp(-127, 127) * s - x
        sig += float((x ** 2).sum()); err += float((e ** 2).sum())
    assert rep["stored"]["snr_db"] == pytest.approx(10 * math.log10(sig / err), abs=1e-4)


def test_zero_and_constant_tensors_do_not_divide_by_zero(tmp_path):
    up = torch.zeros(16, 4, dtype=torch.float16)
    down = torch.full((4, 8), 0.25, dtype=torch.float16)
    sd = {"lora_unet_a.lora_up.weight": up, "lora_unet_a.lora_down.weight": down,
          "lora_unet_a.alpha": torch.tensor(2.0),
          "lora_unet_b.lora_up.weight": torch.full((16, 4), -0.5), "lora_unet_b.lora_down.weight": torch.full((4, 8), 0.25),
          "lora_unet_b.alpha": torch.tensor(4.0)}
    q, rep = quantize_model(sd, dense_metrics="on")
    back, _ = roundtrip(tmp_path, q)
    for m in back.modules:
        assert math.isfinite(m.alpha)
        assert torch.isfinite(m.delta(torch.float64)).all()
    assert not back.get("lora_unet_a").delta().any()
    b0 = LoRAModel.from_state_dict(sd).get("lora_unet_b").delta(torch.float64)
    assert torch.allclose(back.get("lora_unet_b").delta(torch.float64), b0, rtol=1e-6, atol=0)
    assert rep["zero_modules"] == 1
    text = format_report(rep)
    assert "nan" not in text.lower()
    q8, _ = encode(torch.zeros(3, 3))
    assert not q8.any()
    qc, s = encode(torch.full((5,), 3.0))
    assert s == pytest.approx(3.0 / 127) and torch.equal(qc, torch.full((5,), 127, dtype=torch.int8))


def test_nan_refused_and_nothing_written(tmp_path):
    sd = convention_lora("kohya_unet", gen(0), n_modules=2, rank=4)
    sd[next(k for k in sd if k.endswith("lora_down.weight"))][0, 0] = float("nan")
    with pytest.raises(LensError, match="NaN"):
        quantize_model(sd)
    for kind, role in (("lokr_full", ".lokr_w1"), ("lokr_full", ".lokr_w2"), ("tucker", ".lora_mid.weight"),
                       ("loha", ".hada_w2_b"), ("dora", ".dora_scale")):
        bad = state_of(kind)
        bad[NAME + role] = bad[NAME + role].clone()
        bad[NAME + role].view(-1)[1] = float("inf") if kind == "tucker" else float("nan")
        with pytest.raises(LensError, match="NaN"):
            quantize_model(bad)
    from lens_ops.cli import main
    src = str(tmp_path / "nan.safetensors")
    save_file(sd, src)
    out = tmp_path / "out.safetensors"
    assert main(["quantize", src, "-o", str(out)]) == 2
    assert not out.exists()


def test_transforms_keep_delta():
    g = gen(7)
    for r in (8, 12, 32):
        b, a = torch.randn(40, r, generator=g, dtype=torch.float64), torch.randn(r, 30, generator=g, dtype=torch.float64)
        q = transforms.rotation(r, torch.float64)
        assert torch.allclose(q @ q.T, torch.eye(r, dtype=torch.float64), atol=1e-12)
        for meth in transforms.METHODS:
            b2, a2 = transforms.apply(meth, b, a)
            assert torch.allclose(b2 @ a2, b @ a, atol=1e-10)
    assert transforms.rotation_name(32) == "Hadamard"


def test_threshold_warns_and_keeps_fp16(tmp_path):
    sd = make_lora("sdxl_kohya", rank=8, seed=1, max_modules=6)
    q, rep = quantize_model(sd, min_snr=200.0)
    assert len(rep["below_threshold"]) == 6 and rep["warnings"] and "--keep-fp16" in rep["warnings"][0]
    q, rep = quantize_model(sd, min_snr=200.0, keep_below=True)
    back, path = roundtrip(tmp_path, q)
    raw = load_file(path)
    assert all(v.dtype == torch.float16 for v in raw.values())  # every module kept, original keys and dtypes
    assert set(raw) == set(sd)
    assert rep["delta"]["rel_frobenius"] == 0.0
    q, rep = quantize_model(sd, min_snr=float(sorted(p["delta"]["snr_db"] for p in
                                                     quantize_model(sd)[1]["per_module"])[2]) + 1e-6, keep_below=True)
    kinds = {str(t.dtype) for t in q.state_dict().values()}
    assert "torch.int8" in kinds and "torch.float16" in kinds  # mixed file
    assert rep["modules_quantized"] == 3


def test_dequantize_roundtrip(tmp_path):
    sd = make_lora("sdxl_kohya", rank=8, seed=1, max_modules=5)
    q, _ = quantize_model(sd)
    for dt, tol in (("fp16", 2e-3), ("bf16", 1.5e-2)):
        dq, rep = dequantize_model(q, dt)
        assert rep["modules_converted"] == 5
        for m0 in q.modules:
            m1 = dq.get(m0.name)
            assert m1.tensors["up"].dtype == getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dt])
            assert m1.alpha == m1.rank()
            assert rel_err(m1.delta(torch.float64), m0.delta(torch.float64)) < tol


def test_size_target(tmp_path):
    sd = make_lora("sdxl_kohya", rank=32, seed=0, max_modules=60)
    src = str(tmp_path / "in.safetensors")
    save_file(sd, src, metadata=sd.metadata)
    q, _ = quantize_model(LoRAModel.load(src))
    _, out = roundtrip(tmp_path, q)
    assert os.path.getsize(out) <= 0.52 * os.path.getsize(src)


@pytest.mark.parametrize("layout,rank,mods", [("sdxl_kohya", 32, 40), ("flux_kohya", 64, 6)])
def test_quality_targets(layout, rank, mods):
    """Default: median per-module ΔW SNR ≥ 40 dB and ≥ 3 dB above naive per-tensor rounding."""
    sd = make_lora(layout, rank=rank, seed=11, max_modules=mods)
    _, best = quantize_model(sd, dense_metrics="off")
    _, naive = quantize_model(sd, method="naive", dense_metrics="off")
    assert best["delta"]["median_snr_db"] >= 40.0
    assert best["delta"]["median_snr_db"] >= naive["delta"]["median_snr_db"] + 3.0


def test_auto_is_best_measured():
    sd = make_lora("sdxl_kohya", rank=16, seed=9, max_modules=6)
    _, auto = quantize_model(sd, method="auto", dense_metrics="off")
    for meth in transforms.METHODS:
        _, fixed = quantize_model(sd, method=meth, dense_metrics="off")
        for a, f in zip(auto["per_module"], fixed["per_module"]):
            assert a["delta"]["snr_db"] >= f["delta"]["snr_db"] - 0.05


def test_app_separate_scale_files_read_as_dequantized(tmp_path):
    """The desktop app's plain int8 (scale keys no loader reads) is read as its exact dequantized values."""
    sd = convention_lora("kohya_unet", gen(2), n_modules=2, rank=4, dtype=torch.float32)
    app, deq = {}, {}
    for i, (k, v) in enumerate(sd.items()):
        if k.endswith(".alpha"):
            app[k] = deq[k] = v
            continue
        q, s = encode(v.float())
        app[k] = q
        app[(k + "_scale") if i % 2 else k[: -len(".weight")] + ".scale"] = torch.tensor(s, dtype=torch.float32)
        deq[k] = decode(q, torch.tensor(s, dtype=torch.float32).item(), torch.float64)
    p = str(tmp_path / "app.safetensors")
    save_file(app, p)
    got = LoRAModel.load(p)
    ref = LoRAModel.from_state_dict(deq)
    assert len(got.modules) == 2 and all(m.kind.name == "lora" for m in got.modules)
    for m in ref.modules:
        assert rel_err(got.get(m.name).delta(torch.float64), m.delta(torch.float64)) < 1e-6
    q, rep = quantize_model(got)  # and it re-quantizes into the loadable folded form
    assert rep["modules_quantized"] == 2
    assert not any(k.endswith("scale") for k in q.state_dict())


# ------------------------------------------------------------------ fast exact metrics (factors) and sampled rows
def _dense_reference(sd, q, name):
    """(ref ΔW, quantized ΔW) in float64 straight from the tensors (alpha/rank · up @ down)."""
    up, down = sd[name + ".lora_up.weight"].double(), sd[name + ".lora_down.weight"].double()
    r = down.shape[0]
    ref = (sd[name + ".alpha"].item() / r) * (up.flatten(1) @ down.flatten(1))
    m1 = q.get(name)
    got = (m1.tensors["alpha"].double().item() / r) * (m1.tensors["up"].double().flatten(1)
                                                       @ m1.tensors["down"].double().flatten(1))
    return ref, got


def _big_decaying_lora(seed=21):
    """Modules large enough for the float32 Gram route (> metrics.SMALL elements), decaying spectra."""
    from lens_ops.synth import spectrum_factors
    g = gen(seed)
    sd = {}
    for i, (n, m, r) in enumerate(((640, 640, 64), (1280, 320, 48), (96, 1024, 64))):
        up, down = spectrum_factors(n, m, r, g, eff_rank=6.0, decay=0.5, magnitude=0.01)
        name = f"lora_unet_big_{i}"
        sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"] = up, down
        sd[name + ".alpha"] = torch.tensor(float(r) / 2)
    # a LoCon conv module (up 320×32×1×1, down 32×320×3×3): the int8 route on a flattened kernel
    up, down = spectrum_factors(320, 320 * 9, 32, g, eff_rank=6.0, decay=0.5, magnitude=0.01)
    sd["lora_unet_big_conv.lora_up.weight"] = up.reshape(320, 32, 1, 1)
    sd["lora_unet_big_conv.lora_down.weight"] = down.reshape(32, 320, 3, 3)
    sd["lora_unet_big_conv.alpha"] = torch.tensor(16.0)
    return sd


@pytest.mark.parametrize("method", ["rebalance+rotate", "naive", "auto"])
def test_factor_metrics_exact_against_dense_float64(method):
    """SNR/MSE/relative error from the factors (float32 Grams on these sizes) == dense float64 reference, and the
    tolerance is tight enough to catch a missing cross term (the assert below it proves the test can fail)."""
    from lens_ops.quantize import metrics
    sd = _big_decaying_lora()
    assert all(sd[k].numel() + sd[k.replace("up", "down")].numel() > metrics.SMALL
               for k in sd if k.endswith("lora_up.weight"))
    q, rep = quantize_model(sd, method=method, metrics="sampled")
    per = {p["name"]: p["delta"] for p in rep["per_module"]}
    for name in {k.split(".")[0] for k in sd}:
        ref, got = _dense_reference(sd, q, name)
        e = got - ref
        sig, err = float((ref ** 2).sum()), float((e ** 2).sum())
        d = per[name]
        assert d["snr_db"] == pytest.approx(10 * math.log10(sig / err), abs=2e-3)
        assert d["mse"] == pytest.approx(err / e.numel(), rel=5e-4)
        assert d["rel_frobenius"] == pytest.approx(math.sqrt(err / sig), rel=3e-4)
        assert d["metrics"] == "sampled-rows"
    # errors correlated between the sides (a systematic shrink): the cross term 2⟨E_b·a, bq·E_a⟩ is half the
    # error, the factor form still equals the dense reference, and the form without it would be far off
    m0 = LoRAModel.from_state_dict(sd).modules[0]
    b, a, s = m0.lowrank(torch.float64)
    bq, aq = 0.99 * b, 0.99 * a
    dense = float(((s * (b @ a - bq @ aq)) ** 2).sum())
    full = metrics.lowrank_error(b.float(), a.float(), bq.float(), aq.float(), s)
    eb, ea = b - bq, a - aq
    no_cross = s * s * float(((eb.T @ eb) * (a @ a.T)).sum() + ((bq.T @ bq) * (ea @ ea.T)).sum())
    assert full == pytest.approx(dense, rel=5e-4)
    assert abs(no_cross - dense) / dense > 0.3


def test_lowrank_error_no_cancellation_on_tiny_errors():
    """Error energy 1e-12 of the signal (float32 factors): the E-based Gram form keeps its relative accuracy
    where ‖BA‖² − 2⟨BA, B̂Â⟩ + ‖B̂Â‖² would return noise."""
    from lens_ops.quantize.metrics import lowrank_error
    from lens_ops.synth import spectrum_factors
    b, a = spectrum_factors(512, 384, 32, gen(5), eff_rank=4.0, decay=0.5, magnitude=1.0)
    g = gen(6)
    bq = b + 1e-6 * b.abs().max() * torch.rand(b.shape, generator=g).sub(0.5)
    aq = a + 1e-6 * a.abs().max() * torch.rand(a.shape, generator=g).sub(0.5)
    ref = float(((b.double() @ a.double() - bq.double() @ aq.double()) ** 2).sum())
    sig = float(((b.double() @ a.double()) ** 2).sum())
    assert ref / sig < 1e-10
    err, s2 = lowrank_error(b, a, bq, aq, 1.0, with_signal=True)
    assert err == pytest.approx(ref, rel=1e-3)
    assert s2 == pytest.approx(sig, rel=1e-5)
    naive = sig - 2 * float(((b @ a) * (bq @ aq)).sum()) + float(((bq @ aq) ** 2).sum())  # float32, cancels
    assert abs(naive - ref) / ref > 1e-2


def test_sampled_rows_mae_max_exact_on_their_rows():
    """Default on big files: MAE/max error exactly on a deterministic sample of ΔW rows (labelled); on request
    (metrics="exact") on every entry; both against the dense float64 reference."""
    from lens_ops.quantize.metrics import SAMPLE_ROWS, sample_rows
    sd = _big_decaying_lora(seed=22)
    q, rep = quantize_model(sd, metrics="sampled")
    qx, repx = quantize_model(sd, metrics="exact")
    per, perx = {p["name"]: p["delta"] for p in rep["per_module"]}, {p["name"]: p["delta"] for p in repx["per_module"]}
    tot_abs, tot_n, tot_max = 0.0, 0, 0.0
    for name in {k.split(".")[0] for k in sd}:
        ref, got = _dense_reference(sd, q, name)
        idx = sample_rows(ref.shape[0])
        assert idx is not None and len(idx) == SAMPLE_ROWS
        assert idx[0] == 0 and idx[-1] == ref.shape[0] - 1
        e = (got - ref)[idx]
        assert per[name]["mae"] == pytest.approx(float(e.abs().mean()), rel=1e-4)
        assert per[name]["max_error"] == pytest.approx(float(e.abs().max()), rel=1e-4)
        tot_abs += float(e.abs().sum()); tot_n += e.numel(); tot_max = max(tot_max, float(e.abs().max()))
        ex = got - ref  # same quantized factors: metrics mode does not change the file
        assert torch.equal(qx.get(name).tensors["up"], q.get(name).tensors["up"])
        assert perx[name]["mae"] == pytest.approx(float(ex.abs().mean()), rel=1e-6)
        assert perx[name]["max_error"] == pytest.approx(float(ex.abs().max()), rel=1e-6)
        assert perx[name]["metrics"] == "exact"
        assert per[name]["snr_db"] == pytest.approx(perx[name]["snr_db"], abs=2e-3)
    assert rep["metrics"] == "sampled-rows" and repx["metrics"] == "exact"
    assert rep["delta"]["mae"] == pytest.approx(tot_abs / tot_n, rel=1e-4)
    assert rep["delta"]["max_error"] == pytest.approx(tot_max, rel=1e-4)
    assert rep["delta"]["sampled_entries"] == tot_n
    assert rep["delta"]["mse"] == pytest.approx(repx["delta"]["mse"], rel=5e-4)  # MSE over every entry
    text = format_report(rep)
    assert "sample of" in text and "exact" in text
    _, small = quantize_model(make_lora("sd15_kohya", rank=4, seed=1, max_modules=3))
    assert small["metrics"] == "exact"  # auto: small files get the dense pass


def test_fast_rotation_matches_dense_rotation():
    """The blocked b·D·Q / Qᵀ·D⁻¹·a (diagonal folded into the blocks) equals the dense Q of rotation()."""
    g = gen(8)
    for r in (16, 64, 96, 128, 20):
        b, a = torch.randn(50, r, generator=g, dtype=torch.float64), torch.randn(r, 30, generator=g, dtype=torch.float64)
        d = transforms.rebalance_diag(b, a)
        q = transforms.rotation(r, torch.float64)
        b2, a2 = transforms.apply("rebalance+rotate", b, a)
        assert torch.allclose(b2, (b * d) @ q, atol=1e-12) and torch.allclose(a2, q.T @ (a / d.unsqueeze(1)), atol=1e-12)
        b3, a3 = transforms.apply("rotate", b, a)
        assert torch.allclose(b3, b @ q, atol=1e-12) and torch.allclose(a3, q.T @ a, atol=1e-12)


def test_int8_gram_route_equals_float_route(monkeypatch):
    """The int8 route (fold._int8_candidate: codes plus two int8 levels of their rounding errors from the encoder's
    residual, exact int32 products) gives the same codes and ΔW / stored-tensor metrics as the all-float route,
    and both equal the dense float64 reference."""
    from lens_ops.quantize import fold, metrics
    sd = _big_decaying_lora(seed=23)
    calls = []
    real = fold.level_grams
    monkeypatch.setattr(fold, "level_grams", lambda *a: calls.append(1) or real(*a))
    q, fast = quantize_model(sd, metrics="sampled")
    assert calls  # the int route ran
    monkeypatch.setattr(fold, "_int8_candidate", lambda *a: None)
    monkeypatch.setattr(metrics, "_code_grams", lambda *a: None)
    q_slow, slow = quantize_model(sd, metrics="sampled")
    for k, t in q.state_dict().items():
        assert torch.equal(t, q_slow.state_dict()[k]), k
    for f, s in zip(fast["per_module"], slow["per_module"]):
        assert f["delta"]["snr_db"] == pytest.approx(s["delta"]["snr_db"], abs=2e-5)
        assert f["delta"]["mse"] == pytest.approx(s["delta"]["mse"], rel=5e-6)
        for key in ("mae", "max_error"):        # sampled rows: same rows, other (exact) formula
            assert f["delta"][key] == pytest.approx(s["delta"][key], rel=1e-5)
        for key in ("snr_db", "mse", "mae", "max_error"):
            assert f["tensors"][key] == pytest.approx(s["tensors"][key], rel=1e-4), key
    per = {p["name"]: p["delta"] for p in fast["per_module"]}
    for name in {k.split(".")[0] for k in sd}:
        ref, got = _dense_reference(sd, q, name)
        assert per[name]["mse"] * ref.numel() == pytest.approx(float(((got - ref) ** 2).sum()), rel=5e-6)


@pytest.mark.parametrize("shape", [(700, 900, 64), (320, 2560, 32), (1280, 640, 128), (9000, 5000, 3)])
def test_code_grams_against_float64(shape):
    """The int32 blocks equal the float64 Gram blocks of the same factors, block by block, and the error energy
    from them equals the dense float64 ΔW error to ~1e-6 — tight enough that dropping the last level's
    diagonal (a bias of 254⁻² ≈ 1.6e-5) or any cross block fails it."""
    from lens_ops.quantize import metrics
    from lens_ops.quantize.fold import _encode
    from lens_ops.synth import spectrum_factors
    n, m, r = shape
    b, a = spectrum_factors(n, m, r, gen(31 + r), eff_rank=8.0, decay=0.5, magnitude=1.0)
    b, a = transforms.apply("rebalance+rotate", b, a)
    qb, sb, bq, eb = _encode(b, "int8", "b")
    qa, sa, aq, ea = _encode(a, "int8", "a")
    blocks = metrics._code_grams(qb, eb, sb, qa, ea, sa)
    if blocks is None:
        pytest.skip("no int8 matrix product on this platform (the float route is used)")
    B, A, Bq, Aq = b.double(), a.double(), bq.double(), aq.double()
    Eb, Ea = B - Bq, A - Aq
    refs = (Eb.T @ Eb, Eb.T @ Bq, Bq.T @ Bq, A @ A.T, Ea @ Ea.T, A @ Ea.T)
    for got, ref in zip(blocks, refs):
        assert rel_err(got, ref) < 1e-4, rel_err(got, ref)
    err, sig = metrics.lowrank_error(b, a, bq, aq, 1.0, with_signal=True, eb=eb, ea=ea, qb=qb, sb=sb, qa=qa, sa=sa)
    dense = float(((B @ A - Bq @ Aq) ** 2).sum())
    assert err == pytest.approx(dense, rel=2e-6)
    assert sig == pytest.approx(float(((B @ A) ** 2).sum()), rel=1e-6)


@pytest.mark.parametrize("shape", [(700, 900, 64), (1280, 640, 128), (9000, 300, 8)])
def test_int8_candidate_against_float64(shape):
    """The residual route (fold._int8_candidate) against dense float64: the codes are codec.encode's, the ΔW error
    and signal energies match to ~1e-6, the stored-tensor stats and the sampled ΔW rows' MAE / max error to float
    rounding."""
    from lens_ops.quantize import fold
    from lens_ops.quantize.metrics import sample_rows
    from lens_ops.synth import spectrum_factors
    n, m, r = shape
    b, a = spectrum_factors(n, m, r, gen(41 + r), eff_rank=8.0, decay=0.5, magnitude=1.0)
    b, a = transforms.apply("rebalance+rotate", b, a)
    got = fold._int8_candidate(b, a, 0.75, "sampled", "x")
    if got is None:
        pytest.skip("no int8 matrix product on this platform (the float route is used)")
    qb, sb = encode(b, "int8")
    qa, sa = encode(a, "int8")
    assert torch.equal(got.qb, qb) and torch.equal(got.qa, qa) and (got.sb, got.sa) == (sb, sa)
    B, A = b.double(), a.double()
    Bq, Aq = qb.double() * sb, qa.double() * sa
    diff = 0.75 * (B @ A - Bq @ Aq)
    assert got.err == pytest.approx(float((diff ** 2).sum()), rel=2e-6)
    assert got.delta.signal == pytest.approx(float(((0.75 * B @ A) ** 2).sum()), rel=1e-6)
    rows = diff[sample_rows(n)]
    assert got.delta.abs_count == rows.numel() and got.delta.sampled
    assert got.delta.abs_sum == pytest.approx(float(rows.abs().sum()), rel=1e-5)
    assert got.delta.max_abs == pytest.approx(float(rows.abs().max()), rel=1e-5)
    e = torch.cat([(B - Bq).reshape(-1), (A - Aq).reshape(-1)])
    x = torch.cat([B.reshape(-1), A.reshape(-1)])
    t = got.tensors
    assert t.signal == pytest.approx(float(x.pow(2).sum()), rel=1e-5)
    assert t.error == pytest.approx(float(e.pow(2).sum()), rel=1e-5)
    assert t.abs_sum == pytest.approx(float(e.abs().sum()), rel=1e-5)
    assert t.max_abs == pytest.approx(float(e.abs().max()), rel=1e-5)
    assert t.count == x.numel()


def test_worker_threads_do_not_change_results():
    """Modules quantized side by side (2 workers) give the same file and numbers as one at a time, in file order;
    torch's thread count is restored afterwards, also when a module fails."""
    sd = make_lora("sdxl_kohya", rank=8, seed=2, max_modules=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        q1, r1 = quantize_model(sd)
        torch.set_num_threads(2)
        q2, r2 = quantize_model(sd)
        assert torch.get_num_threads() == 2
        assert [m.name for m in q2.modules] == [m.name for m in q1.modules]
        for a, b in zip(q1.state_dict().values(), q2.state_dict().values()):
            assert torch.equal(a, b)
        assert [p["delta"] for p in r1["per_module"]] == [p["delta"] for p in r2["per_module"]]
        bad = dict(sd)
        k = [k for k in bad if k.endswith("lora_down.weight")][4]
        bad[k] = bad[k].clone()
        bad[k][0, 0] = float("nan")
        with pytest.raises(LensError, match="NaN"):
            quantize_model(bad)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_big_lokr_metrics_summed_in_float64():
    """A LoKr whose ΔW has more than 2²² entries is measured on a float32 dense ΔW; its sums must still be float64
    (a float32 dot product over millions of entries drifted: a real SD 1.5 LoKr's per-module MSE was 0.27 % off)."""
    from lora_factory import pair
    g = gen(51)
    w2a, w2b = pair(530, 530, 8, g)
    w1 = torch.randn(4, 4, generator=g, dtype=torch.float64).float()
    sd = {"lora_unet_big_lokr.lokr_w1": w1, "lora_unet_big_lokr.lokr_w2_a": w2a.float(),
          "lora_unet_big_lokr.lokr_w2_b": w2b.float(), "lora_unet_big_lokr.alpha": torch.tensor(4.0)}
    m = LoRAModel.from_state_dict(sd).modules[0]
    assert math.prod(m.weight_shape()) > 1 << 22
    q, rep = quantize_model(sd, method="naive", metrics="exact")
    ref = m.delta(torch.float64)
    got = q.modules[0].delta(torch.float64)
    err = float(((ref - got) ** 2).sum())
    d = rep["per_module"][0]["delta"]
    assert d["mse"] * ref.numel() == pytest.approx(err, rel=1e-5)
    assert d["mae"] == pytest.approx(float((ref - got).abs().mean()), rel=1e-5)
    assert rep["per_module"][0]["tensors"]["mse"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metrics", ["exact", "sampled"])
def test_keep_fp16_rounds_fp32_and_bf16_modules_to_fp16_and_reports_that_error(dtype, metrics):
    """keep_below stores the weak modules in fp16 (what --keep-fp16 says), whatever the input's float dtype, and the
    report's ΔW error for them is that rounding's, equal to a dense float64 comparison."""
    g = gen(5)
    sd = {}
    for i, kind in enumerate(("lora", "loha", "tucker")):
        t, _ = kind_tensors(kind, g)
        for suffix, v in t.items():
            sd[f"lora_unet_down_blocks_0_attentions_0_proj_in_{i}" + suffix] = v.to(dtype) if v.ndim else v
    q, rep = quantize_model(sd, min_snr=300.0, keep_below=True, metrics=metrics)
    assert rep["modules_quantized"] == 0 and len(rep["modules_kept"]) == 3
    src = LoRAModel.from_state_dict(dict(sd))
    err = sig = 0.0
    for m in q.modules:
        assert all(t.dtype == torch.float16 for r, t in m.tensors.items() if r != "alpha"), m.name
        ref, got = src.get(m.name).delta(torch.float64), m.delta(torch.float64)
        err += float((ref - got).pow(2).sum())
        sig += float(ref.pow(2).sum())
        rec = next(p for p in rep["per_module"] if p["name"] == m.name)
        e = float((ref - got).pow(2).sum())
        if dtype == torch.float32:   # bf16 → fp16 can be exact for these values: then the SNR is 'inf'
            assert rec["delta"]["mse"] == pytest.approx(e / ref.numel(), rel=1e-3)
        assert "kept in fp16" in next(k["reason"] for k in rep["modules_kept"] if k["name"] == m.name)
    if err > 0:
        assert rep["delta"]["snr_db"] == pytest.approx(10 * math.log10(sig / err), abs=0.01)
    else:
        assert rep["delta"]["snr_db"] == "inf"


def test_keep_fp16_leaves_values_beyond_fp16_range_in_their_own_dtype():
    g = gen(6)
    t, _ = kind_tensors("lora", g)
    sd = {"lora_unet_mid_block_attentions_0_proj_in" + k: v for k, v in t.items()}
    sd["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"] = t[".lora_up.weight"] * 1e9   # > 65504
    q, rep = quantize_model(sd, min_snr=300.0, keep_below=True)
    m = q.modules[0]
    assert m.tensors["up"].dtype == torch.float32
    assert "beyond fp16's range" in rep["modules_kept"][0]["reason"]
    assert rep["delta"]["snr_db"] == "inf"   # kept exactly
