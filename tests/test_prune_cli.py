"""`lora-lens prune` command line and the PruneRank node (without ComfyUI, via the comfy_env stand-ins)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from lens_ops import LoRAModel
from lens_ops.cli import main
from lens_ops.st_io import atomic_save
from lens_ops.synth import make_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample(tmp_path, name="in.safetensors", layout="sd15_kohya", rank=16, seed=0, n=24):
    sd = make_lora(layout, rank=rank, seed=seed, max_modules=n)
    return atomic_save(sd, str(tmp_path / name), sd.metadata), sd


def test_prune_one_file(tmp_path, capsys):
    src, sd = sample(tmp_path)
    out = str(tmp_path / "out.safetensors")
    assert main(["prune", src, "-o", out, "--recipe", "energy=0.99", "--report", str(tmp_path / "r.json")]) == 0
    assert os.path.getsize(out) < os.path.getsize(src)
    m = LoRAModel.load(out)
    assert m.convention == LoRAModel.load(src).convention
    rep = json.load(open(tmp_path / "r.json"))
    assert rep["recipe"] == "energy=0.99"
    for key in ("old_rank", "new_rank", "bytes_saved", "rel_error", "rle_lora", "rle_ckpt", "snr_db"):
        assert key in rep["modules"][0]
    assert rep["file_bytes_out"] == os.path.getsize(out)
    text = capsys.readouterr().out
    assert "ΔW error" in text and "wrote" in text


def test_several_recipes_several_outputs(tmp_path):
    src, _ = sample(tmp_path)
    outdir = tmp_path / "o"
    assert main(["prune", src, "-o", str(outdir), "--recipe", "energy=0.9:rank=4:spn_lora=1,thr=-1", "-q"]) == 0
    files = sorted(os.listdir(outdir))
    assert len(files) == 3, files
    ranks = {f: {m.rank() for m in LoRAModel.load(str(outdir / f)).modules} for f in files}
    assert any(r == {4} for r in ranks.values())


def test_several_recipes_with_file_output_get_suffixes(tmp_path):
    src, _ = sample(tmp_path)
    assert main(["prune", src, "-o", str(tmp_path / "x.safetensors"), "--recipe", "rank=2:rank=4", "-q"]) == 0
    names = sorted(f for f in os.listdir(tmp_path) if f.startswith("x_"))
    assert names == ["x_rank2.safetensors", "x_rank4.safetensors"]


def test_batch_with_progress(tmp_path):
    a, _ = sample(tmp_path, "a.safetensors", seed=1)
    b, _ = sample(tmp_path, "b.safetensors", seed=2)
    r = subprocess.run([sys.executable, "-m", "lens_ops", "prune", a, b, "-o", str(tmp_path / "out"), "--recipe",
                        "rank=4", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["a_pruned.safetensors", "b_pruned.safetensors"]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("[1/2] a.safetensors") and lines[1].startswith("[2/2] b.safetensors")


def test_bad_recipe_writes_nothing(tmp_path, capsys):
    src, _ = sample(tmp_path)
    out = tmp_path / "never.safetensors"
    assert main(["prune", src, "-o", str(out), "--recipe", "energy=1.5"]) == 2
    err = capsys.readouterr().err
    assert "Allowed:" in err and "sv_fro" in err
    assert not out.exists()
    assert main(["prune", src, "-o", str(out), "--recipe", "fro_ckpt=1,thr=-2"]) == 2
    assert "--base" in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_overwrite_input(tmp_path, capsys):
    src, sd = sample(tmp_path)
    before = open(src, "rb").read()
    assert main(["prune", src, "-o", src, "--recipe", "rank=2"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert open(src, "rb").read() == before


def test_base_checkpoint_option(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    monkeypatch.setenv("LORA_LENS_CACHE", str(tmp_path / "cache"))
    src, sd = sample(tmp_path, layout="sdxl_kohya", rank=8, n=10)
    model = LoRAModel.load(src)
    g = torch.Generator().manual_seed(0)
    ck = {}
    for m in model.modules:
        ws = m.weight_shape()
        rest = m.name[len("lora_unet_"):] if m.name.startswith("lora_unet_") else None
        if rest is None:
            continue
        ck["model.diffusion_model." + rest + ".weight"] = torch.randn(*ws, generator=g) * 0.02
    # the TE modules: CLIP-L keys as in an SDXL checkpoint
    for m in model.modules:
        if m.name.startswith("lora_te1_"):
            ck["conditioner.embedders.0.transformer." + m.name[len("lora_te1_"):] + ".weight"] = \
                torch.randn(*m.weight_shape(), generator=g) * 0.02
    save_file(ck, str(tmp_path / "base.safetensors"))
    out = str(tmp_path / "o.safetensors")
    assert main(["prune", src, "-o", out, "--recipe", "fro_ckpt=1,thr=-3", "--base", str(tmp_path / "base.safetensors"),
                 "--report", str(tmp_path / "r.json"), "-q"]) == 0
    rep = json.load(open(tmp_path / "r.json"))
    assert all(e["rle_ckpt"] is not None for e in rep["modules"] if e["new_rank"])
    assert os.listdir(tmp_path / "cache")


# ------------------------------------------------------------------ node
def test_node_contract_and_run(comfy_env):
    pack, paths = comfy_env
    import importlib
    cls = importlib.import_module(pack.__name__ + ".nodes").NODE_CLASS_MAPPINGS["PruneRank"]
    spec = cls.INPUT_TYPES()
    for group in spec.values():
        for name, (typ, opts) in group.items():
            assert "tooltip" in opts, name
    assert cls.RETURN_TYPES == ("LORA_MODEL", "STRING")
    sd = make_lora("sd15_kohya", rank=16, seed=3, max_modules=12)
    res = cls().prune(sd, method="energy", value=0.95, recipe="")
    lora, report = res["result"]
    assert isinstance(lora, dict) and "energy=0.95" in report
    assert sum(t.numel() for t in lora.values()) < sum(t.numel() for t in sd.values())
    view = json.loads(res["ui"]["lens_prune"][0])
    assert len(view["modules"]) == 12 and view["modules"][0]["old"] == 16
    assert "ss_network_dim" in lora.metadata and "lora_lens.provenance" in lora.metadata
    res = cls().prune(sd, method="recipe", value=0, recipe="spn_lora=1,thr=-1")
    assert "spn_lora=1,thr=-1" in res["result"][1]
    res = cls().prune(sd, method="rank", value=4, recipe="")
    assert all(t.shape[0] == 4 for k, t in res["result"][0].items() if k.endswith("lora_down.weight"))
    with pytest.raises(ValueError, match="Allowed") as e:  # the pack's own LensError (a ValueError)
        cls().prune(sd, method="recipe", value=0, recipe="nonsense=1")
    assert type(e.value).__name__ == "LensError"


def test_node_base_from_comfy_maps_keys_like_comfy_lora(comfy_env, monkeypatch):
    """The node's MODEL/CLIP adapter: key maps from comfy.lora (string keys and (key, (dim, start, size))
    slices of fused weights) resolve to the model's tensors; ckpt scores then run."""
    import importlib
    import types
    pack, _ = comfy_env
    mod = importlib.import_module(pack.__name__ + ".nodes.prune")
    sd = make_lora("sd15_kohya", rank=8, seed=4, max_modules=6)
    model = LoRAModel.from_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    weights, key_map = {}, {}
    for i, m in enumerate(model.modules):
        ws = m.weight_shape()
        if i == 0:  # a fused weight: this module is the middle third of it
            weights["diffusion_model.fused.weight"] = torch.randn(3 * ws[0], *ws[1:], generator=g)
            key_map[m.name] = ("diffusion_model.fused.weight", (0, ws[0], ws[0]))
        else:
            weights[f"diffusion_model.w{i}.weight"] = torch.randn(*ws, generator=g)
            key_map[m.name] = f"diffusion_model.w{i}.weight"
    lora_mod = types.ModuleType("comfy.lora")
    lora_mod.model_lora_keys_unet = lambda model, km: {**km, **key_map}
    lora_mod.model_lora_keys_clip = lambda model, km: km
    monkeypatch.setitem(sys.modules, "comfy.lora", lora_mod)
    sys.modules["comfy"].lora = lora_mod
    fp = sys.modules["folder_paths"]
    monkeypatch.setattr(fp, "get_user_directory", lambda: str(comfy_env[1]["root"]), raising=False)

    class Inner:
        def state_dict(self):
            return weights

    patcher = types.SimpleNamespace(model=Inner())
    base = mod.base_from_comfy(patcher, None)
    first = model.modules[0]
    ws = first.weight_shape()
    assert torch.equal(base.weight(first), weights["diffusion_model.fused.weight"][ws[0]:2 * ws[0]])
    n = base.norms(model.modules[1])
    assert n["fro"] == pytest.approx(float(weights["diffusion_model.w1.weight"].norm()), rel=1e-5)
    cls = importlib.import_module(pack.__name__ + ".nodes").NODE_CLASS_MAPPINGS["PruneRank"]
    res = cls().prune(sd, method="recipe", value=0, recipe="fro_ckpt=1,thr=-6", model=patcher)
    view = json.loads(res["ui"]["lens_prune"][0])
    assert len(view["modules"]) == 6
    assert os.path.isdir(os.path.join(str(comfy_env[1]["root"]), "lora_lens", "norms"))


@pytest.mark.parametrize("recipe", ["energy=0.95", "rank=4:sv_fro=0.9", "rank=64", "spn_lora=1,thr=-1.2"])
@pytest.mark.parametrize("window", [96, 7])
def test_streamed_mapped_output_equals_in_memory_result(tmp_path, recipe, window, monkeypatch):
    """What `lora-lens prune` writes (mapped input, output streamed module by module, input pages released)
    is the same file content as the in-memory result, and the input file is untouched."""
    from lens_ops.prune import core, prune_many
    from lens_ops.st_io import read_header
    monkeypatch.setattr(core, "STREAM_WINDOW", window)  # a single recipe runs as one windowed pass
    src, _ = sample(tmp_path, layout="sdxl_kohya", rank=16, n=40)
    before = open(src, "rb").read()
    n = len(recipe.split(":"))
    outs = [str(tmp_path / f"s{i}.safetensors") for i in range(n)]
    streamed = prune_many(LoRAModel.load(src, mapped=True), recipe, outputs=outs)
    in_memory = prune_many(LoRAModel.load(src), recipe)
    for (light, rep), (full, rep2), out in zip(streamed, in_memory, outs):
        assert rep["output"] == os.path.abspath(out)
        got = LoRAModel.load(out).state_dict()
        want = full.state_dict()
        assert list(got) == list(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        def untimed(meta):  # the provenance entry carries the time it was made
            return {k: (re.sub(r'"time": "[^"]*"', "", v) if k == "lora_lens.provenance" else v) for k, v in meta.items()}
        assert untimed(read_header(out)[1]) == untimed(full.metadata)
        assert rep["total"]["bytes_out"] == rep2["total"]["bytes_out"]
        if not rep["unchanged"]:
            assert os.path.getsize(out) < os.path.getsize(src)
        else:  # nothing worth dropping: the output is the input, byte for byte
            assert open(out, "rb").read() == before
    assert open(src, "rb").read() == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".lens-")]


def test_streamed_prune_failure_leaves_no_file(tmp_path, monkeypatch):
    from lens_ops.prune import core, prune_many
    src, _ = sample(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(core, "module_entry", boom)
    with pytest.raises(RuntimeError):
        prune_many(LoRAModel.load(src, mapped=True), "rank=4", outputs=[str(tmp_path / "o.safetensors")])
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_parallel_windows_match_the_whole_file_decomposition(tmp_path, monkeypatch):
    """The windowed pass (two windows at once on worker threads) keeps the same dimensions as a decomposition
    of the whole file at once, and its ΔW equals that result's to fp16 rounding; torch's thread count is
    given back afterwards; windows respect both their module and their byte limit."""
    from lens_ops.prune import core
    from lens_ops.prune.core import PruneSession, _windows
    src, _ = sample(tmp_path, layout="sdxl_kohya", rank=16, n=40)
    model = LoRAModel.load(src)
    monkeypatch.setattr(core, "STREAM_WINDOW", 5)
    parts = _windows(model.modules, 5, core.STREAM_WINDOW_BYTES)
    assert len(parts) == 8 and [m for p in parts for m in p] == model.modules
    by_bytes = _windows(model.modules, 96, 1)  # every module over the byte limit: one per window
    assert [len(p) for p in by_bytes] == [1] * 40
    threads = torch.get_num_threads()
    windowed, rep = core.prune_many(model, "energy=0.95")[0]
    assert torch.get_num_threads() == threads
    whole, rep2 = PruneSession(LoRAModel.load(src)).run("energy=0.95")
    assert [e["new_rank"] for e in rep["modules"]] == [e["new_rank"] for e in rep2["modules"]]
    assert any(e["new_rank"] < e["old_rank"] for e in rep["modules"])
    for m in whole.modules:
        got, want = windowed.get(m.name).delta(torch.float64), m.delta(torch.float64)
        assert float((got - want).norm() / want.norm()) < 2e-3, m.name

    class Interrupted(Exception):
        pass

    def interrupt(done, total):  # ComfyUI's progress bar raises when the user cancels
        if done >= 10:
            raise Interrupted()
    with pytest.raises(Interrupted):
        core.prune_many(LoRAModel.load(src), "energy=0.95", progress=interrupt)
    assert torch.get_num_threads() == threads
