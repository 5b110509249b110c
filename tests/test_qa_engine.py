"""QA regressions found by adversarial runs of `lora-lens info/analyze/prune` on unusual but real files."""
import os

import torch

from lens_ops import LoRAModel
from lens_ops.cli import main
from lens_ops.st_io import atomic_save
from lens_ops.synth import make_lora, spectrum_factors


def _sample(tmp_path, name="in.safetensors", layout="sd15_kohya", rank=8, n=12, seed=0, **kw):
    sd = make_lora(layout, rank=rank, seed=seed, max_modules=n, **kw)
    return atomic_save(sd, str(tmp_path / name), sd.metadata), sd


def test_several_recipes_one_impossible_writes_nothing(tmp_path, capsys):
    """A later recipe whose size= cannot be met used to fail only after the earlier outputs were written."""
    src, _ = _sample(tmp_path)
    out = tmp_path / "o"
    rc = main(["prune", src, "-o", str(out), "-q", "--recipe", "rank=2:energy=0.9:spn_lora=1,size=0.0001"])
    assert rc != 0
    assert "size=" in capsys.readouterr().err
    assert not out.exists() or os.listdir(out) == []


def test_prune_that_removes_every_module_refuses_instead_of_writing_an_empty_file(tmp_path, capsys):
    """alpha=0 (or a recipe dropping every dimension) used to write a file with no tensors that no loader
    (ours included) accepts."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i in range(3):
        up, down = spectrum_factors(64, 32, 4, g, eff_rank=2.0, decay=0.5, magnitude=0.01)
        base = f"lora_unet_down_blocks_0_attentions_{i}_proj_in"
        sd[base + ".lora_down.weight"] = down.half()
        sd[base + ".lora_up.weight"] = up.half()
        sd[base + ".alpha"] = torch.tensor(0.0).half()
    src = atomic_save(sd, str(tmp_path / "alpha0.safetensors"), {})
    out = tmp_path / "out.safetensors"
    rc = main(["prune", src, "-o", str(out), "--recipe", "energy=0.99"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "lora-lens:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    # a recipe that drops every dimension of a live LoRA: same answer
    src2, _ = _sample(tmp_path, "live.safetensors")
    rc = main(["prune", src2, "-o", str(out), "--recipe", "spn_lora=1,thr=30"])
    assert rc != 0 and not out.exists()
    # in memory (the node) the report still says what happened; SaveLoRAFile then refuses the empty LoRA
    from lens_ops.prune import prune_model
    res, rep = prune_model(LoRAModel.load(src2), "spn_lora=1,thr=30")
    assert len(res.modules) == 0 and all("removed" in e["note"] for e in rep["modules"])


def test_metadata_beats_a_weak_guess(tmp_path):
    """A file with only self-attention UNet modules (no cross-attention width) or only CLIP-L text-encoder
    modules was called SD 1.5 even when its training metadata said SDXL or FLUX."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i, p in enumerate(("q", "k", "v")):
        up, down = spectrum_factors(640, 640, 4, g, eff_rank=2.0, decay=0.5, magnitude=0.01)
        base = f"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_{p}"
        sd[base + ".lora_down.weight"] = down.half()
        sd[base + ".lora_up.weight"] = up.half()
        sd[base + ".alpha"] = torch.tensor(2.0).half()
    assert LoRAModel.from_state_dict(sd, {"ss_base_model_version": "sdxl_base_v1-0"}).architecture.id == "sdxl"
    # the first modules of a real SDXL file are its CLIP-L (te1) ones: names alone cannot tell SD 1.5
    te = make_lora("sdxl_kohya", rank=4, seed=1, name_filter=lambda n: n.startswith("lora_te1_"), max_modules=6)
    assert te.metadata.get("ss_base_model_version", "").startswith("sdxl")
    assert LoRAModel.from_state_dict(dict(te), te.metadata).architecture.id == "sdxl"
    flux_te = make_lora("flux_kohya_te1", rank=4, seed=1, name_filter=lambda n: n.startswith("lora_te1_"),
                        max_modules=6)
    assert LoRAModel.from_state_dict(dict(flux_te), flux_te.metadata).architecture.id == "flux1"
    # without metadata, SD 1.5 text-encoder names still read as SD 1.5
    sd15 = make_lora("sd15_kohya", rank=4, seed=1, name_filter=lambda n: n.startswith("lora_te_"), max_modules=6)
    assert LoRAModel.from_state_dict(dict(sd15)).architecture.id == "sd1"


def test_several_recipes_one_removing_everything_writes_nothing(tmp_path):
    src, _ = _sample(tmp_path)
    out = tmp_path / "o"
    assert main(["prune", src, "-o", str(out), "-q", "--recipe", "rank=2:spn_lora=1,thr=30"]) != 0
    assert not out.exists() or os.listdir(out) == []


def test_save_node_prefix_outside_output_is_one_sentence(comfy_env):
    """ComfyUI's own refusal is a four-line '**** ERROR: Saving image ...' message; ours is one sentence."""
    import pytest
    from lora_factory import convention_lora, gen
    pack, dirs = comfy_env
    lora = convention_lora("kohya_unet", gen(0))
    for prefix in ("../../evil/x", "/tmp/qa_lens_abs_escape/x"):
        with pytest.raises(Exception) as e:
            pack.NODE_CLASS_MAPPINGS["SaveLoRAFile"]().save(lora, prefix)
        msg = str(e.value)
        assert "output folder" in msg and len(msg.strip().splitlines()) == 1 and "image" not in msg, msg
    assert not os.path.exists("/tmp/qa_lens_abs_escape")


def test_lyco_convert_uses_the_exact_factored_svd_not_a_dense_one(monkeypatch):
    """lyco=convert took a float64 dense SVD of every LoKr/LoHa ΔW (20+ minutes and ~3 GB on the real 0.6 MB
    smart_falcon LoKr); kron / Hadamard products have exact factors of inner size r1·r2."""
    from lens_ops.prune import prune_model
    from lens_ops.prune import decompose as dec_mod
    g = torch.Generator().manual_seed(11)
    n = "lora_unet_output_blocks_0_1_proj_out"
    sd = {n + ".lokr_w1": torch.randn(8, 8, generator=g).half(),
          n + ".lokr_w2_a": (torch.randn(40, 4, generator=g) * 0.3).half(),
          n + ".lokr_w2_b": (torch.randn(4, 360, generator=g) * 0.3).half(),
          n + ".alpha": torch.tensor(2.0).half()}
    h = "lora_unet_output_blocks_0_1_proj_in"
    for k, shp in (("hada_w1_a", (320, 4)), ("hada_w1_b", (4, 640)), ("hada_w2_a", (320, 4)), ("hada_w2_b", (4, 640))):
        sd[h + "." + k] = (torch.randn(*shp, generator=g) * 0.2).half()
    sd[h + ".alpha"] = torch.tensor(4.0).half()
    model = LoRAModel.from_state_dict(sd)
    sizes = []
    real_svd = torch.linalg.svd

    def spy(a, *args, **kw):
        sizes.append(a.numel())
        return real_svd(a, *args, **kw)
    monkeypatch.setattr(dec_mod.torch.linalg, "svd", spy)
    out, rep = prune_model(model, "lyco=convert,rank=6")
    monkeypatch.setattr(dec_mod.torch.linalg, "svd", real_svd)
    assert sizes and max(sizes) <= 32 * 32, sizes  # only r1·r2 cores, never the 320×2880 or 320×640 ΔW
    decs = dec_mod.decompose(model.modules, convert_lyco=True)
    for name in (n, h):
        ref = model.get(name).delta(torch.float64).reshape(model.get(name).weight_shape()[0], -1)
        sref = torch.linalg.svdvals(ref)
        d = decs[name]
        k = d.dims
        assert torch.allclose(d.S, sref[:k], rtol=1e-6, atol=1e-9 * float(sref[0]))
        assert float(sref[k:].norm()) <= 1e-9 * float(sref[0])  # nothing lost beyond the inner size
        trunc = (d.U[:, :6].double() * d.S[:6]) @ d.Vh[:6].double()
        want = float(sref[6:].norm() / sref.norm())  # Eckart–Young: the dropped singular values
        assert abs(float((trunc - ref).norm() / ref.norm()) - want) < 1e-4
    new = out.get(h)  # the LoHa is smaller as a rank-6 LoRA: converted; its ΔW is the optimal truncation
    assert new.kind.name == "lora" and new.rank() == 6
    ref = model.get(h).delta(torch.float64)
    s = torch.linalg.svdvals(ref)
    err = float((new.delta(torch.float64).reshape(ref.shape) - ref).norm() / ref.norm())
    assert abs(err - float(s[6:].norm() / s.norm())) < 2e-3


def test_report_shows_no_python_none_for_carried_modules(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    up, down = spectrum_factors(320, 320, 8, g, eff_rank=2.0, decay=0.5, magnitude=0.01)
    sd = {"diffusion_model.middle_block.1.proj_in.lora_up.weight": up.half(),
          "diffusion_model.middle_block.1.proj_in.lora_down.weight": down.half(),
          "diffusion_model.out.2.diff": (torch.randn(4, 320, 3, 3, generator=g) * 0.01).half(),
          "diffusion_model.out.2.diff_b": (torch.randn(4, generator=g) * 0.01).half()}
    src = atomic_save(sd, str(tmp_path / "c.safetensors"), {})
    assert main(["prune", src, "-o", str(tmp_path / "o.safetensors"), "--recipe", "rank=2"]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "-→-" in out


def test_xlabs_lora_rank_metadata_follows_a_fixed_rank_prune(tmp_path):
    g = torch.Generator().manual_seed(4)
    sd = {}
    for p in ("qkv_lora1", "proj_lora1"):
        up, down = spectrum_factors(9216 if "qkv" in p else 3072, 3072, 8, g, eff_rank=2.0, decay=0.5, magnitude=0.01)
        sd[f"double_blocks.0.processor.{p}.down.weight"] = down.bfloat16()
        sd[f"double_blocks.0.processor.{p}.up.weight"] = up.bfloat16()
    src = atomic_save(sd, str(tmp_path / "x.safetensors"), {"lora_rank": "8"})
    out = str(tmp_path / "o.safetensors")
    assert main(["prune", src, "-o", out, "--recipe", "rank=4", "-q"]) == 0
    m = LoRAModel.load(out)
    assert m.metadata["lora_rank"] == "4" and {x.rank() for x in m} == {4}
    assert set(dict(m.state_dict())) == set(sd)


def test_side_files_never_overwrite_the_input(tmp_path, capsys):
    """`analyze X --image X` replaced the LoRA with a PNG; `prune X --report X` replaced it with JSON."""
    src, _ = _sample(tmp_path, n=4)
    before = open(src, "rb").read()
    assert main(["analyze", src, "--image", src]) != 0
    assert main(["prune", src, "-o", str(tmp_path / "o.safetensors"), "--report", src, "-q"]) != 0
    assert main(["prune", src, "-o", str(tmp_path / "o.safetensors"), "--report",
                 str(tmp_path / "o.safetensors"), "-q"]) != 0
    assert open(src, "rb").read() == before and not (tmp_path / "o.safetensors").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("lora-lens:") == 3
    assert main(["analyze", src, "--image", str(tmp_path / "missing" / "x.png")]) != 0
    assert "does not exist" in capsys.readouterr().err
