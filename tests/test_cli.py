"""The `lora-lens` command line: info output, one-sentence errors with non-zero exit, demo end to end."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from lens_ops.cli import main
from lora_factory import convention_lora, gen


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lens_ops", *args], capture_output=True, text=True, timeout=600)


def test_info_prints_summary(tmp_path, capsys):
    from lens_ops.synth import make_lora
    sd = make_lora("sdxl_kohya", rank=4, seed=0)
    p = str(tmp_path / "x.safetensors")
    save_file(sd, p, metadata=sd.metadata)
    assert main(["info", p]) == 0
    out = capsys.readouterr().out
    assert "Architecture: SDXL" in out and "kohya" in out and "fp16" in out and "Rank: 4" in out
    assert main(["info", p, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["architecture"] == "SDXL" and s["modules"] == 986 and s["modules_by_component"]["text encoder 2"] == 192


def test_bad_input_exits_nonzero_with_one_sentence(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    r = run_cli("info", str(p))
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "not JSON" in r.stderr
    r = run_cli("info", str(p), "--debug")
    assert "Traceback" in r.stderr


def test_missing_file_exits_nonzero():
    r = run_cli("info", "/no/such/file.safetensors")
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_demo_runs_every_step(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path), "--rank", "4")
    assert r.returncode == 0, r.stderr
    assert "Architecture: SDXL" in r.stdout and "bit-identical" in r.stdout
    assert any(f.startswith("sample_sdxl_kohya_r4") for f in os.listdir(tmp_path))


def test_program_exit_keeps_output_and_exit_code(tmp_path):
    """`python -m lens_ops` (and the console script) leave with os._exit once torch is loaded: the whole
    piped output still arrives, the written file is complete and in place, exit codes are kept."""
    from lens_ops import LoRAModel
    from lens_ops.synth import make_lora
    sd = make_lora("sdxl_kohya", rank=8, seed=3)
    src = str(tmp_path / "in.safetensors")
    save_file(sd, src, metadata=sd.metadata)
    out = str(tmp_path / "out.safetensors")
    r = run_cli("prune", src, "-o", out, "--recipe", "rank=4")
    assert r.returncode == 0, r.stderr
    assert "wrote " + out in r.stdout and r.stdout.rstrip().endswith("s)")  # the last line, flushed
    m = LoRAModel.load(out)
    assert {x.rank() for x in m.modules} == {4}
    assert [f for f in os.listdir(tmp_path) if f.startswith(".lens-")] == []  # no temp file left
    r = run_cli("prune", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_unavailable_device_is_one_sentence(tmp_path, capsys):
    """--device cuda on a machine without CUDA said "unexpected error (AssertionError: Torch not compiled with
    CUDA enabled)"."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from safetensors.torch import save_file
    from lens_ops.cli import main
    from lens_ops.synth import make_lora
    sd = make_lora("sdxl_kohya", rank=4, seed=1, max_modules=2)
    src = str(tmp_path / "in.safetensors")
    save_file(dict(sd), src)
    out = tmp_path / "o.safetensors"
    assert main(["prune", src, "-o", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "unexpected" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_int8_file_has_no_extreme_alpha_warning(tmp_path, capsys):
    """Our own int8 output (scales folded into alpha) was flagged "Extreme alpha/rank"."""
    import json
    from safetensors.torch import save_file
    from lens_ops.cli import main
    from lens_ops.synth import make_lora
    sd = make_lora("sdxl_kohya", rank=8, seed=1, max_modules=4)
    src, q = str(tmp_path / "in.safetensors"), str(tmp_path / "q.safetensors")
    save_file(dict(sd), src)
    assert main(["quantize", src, "-o", q]) == 0
    capsys.readouterr()
    assert main(["analyze", q, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "extreme_alpha" not in json.dumps(rep.get("findings"))


def test_peft_dora_is_flagged_as_not_applied_by_comfyui(tmp_path, capsys):
    """PEFT DoRA keeps its magnitude in `lora_magnitude_vector`, which ComfyUI's loader does not read (it reads
    kohya's `.dora_scale`): `info` said "+ DoRA" with no word that ComfyUI applies a plain LoRA."""
    import json
    import torch
    from safetensors.torch import save_file
    from lens_ops.cli import main
    g = torch.Generator().manual_seed(4)
    base = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    sd = {base + ".lora_A.weight": torch.randn(4, 320, generator=g), base + ".lora_B.weight": torch.randn(320, 4, generator=g),
          base + ".lora_magnitude_vector": torch.rand(320, generator=g) + 0.5}
    p = str(tmp_path / "peft_dora.safetensors")
    save_file(sd, p)
    assert main(["info", p, "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert any("PEFT DoRA" in w and "plain LoRA" in w for w in warnings), warnings
    kohya = {"lora_unet_x.lora_up.weight": torch.randn(8, 2, generator=g), "lora_unet_x.lora_down.weight": torch.randn(2, 8, generator=g),
             "lora_unet_x.dora_scale": torch.rand(8, 1, generator=g)}
    q = str(tmp_path / "kohya_dora.safetensors")
    save_file(kohya, q)
    assert main(["info", q, "--json"]) == 0
    assert not any("PEFT DoRA" in w for w in json.loads(capsys.readouterr().out)["warnings"])


def test_disk_full_is_one_sentence_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A write the system refuses (here: disk full midway through the streamed output) is reported in the system's
    own words in one line, exit 1, and neither the output nor a temporary file is left behind."""
    import errno
    from lens_ops import st_io
    from lens_ops.synth import make_lora
    sd = make_lora("sdxl_kohya", rank=4, seed=0, max_modules=8)
    src = str(tmp_path / "in.safetensors")
    save_file(sd, src, metadata=sd.metadata)
    real_add, calls = st_io.StreamWriter.add, []

    def add(self, key, tensor):
        calls.append(key)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._tmp if hasattr(self, "_tmp") else None)
        return real_add(self, key, tensor)
    monkeypatch.setattr(st_io.StreamWriter, "add", add)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert main(["quantize", src, "-o", str(out_dir / "q.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "unexpected" not in err, err
    assert os.listdir(out_dir) == []


def test_help_lists_every_command_without_importing_the_engine():
    """`lora-lens --help` reads the menu from the command files (no torch import: ~1 s saved) and lists the same
    commands, in the same order and with the same help, as the imported modules."""
    from lens_ops.cli import command_listing, command_modules
    assert command_listing() == [(m.NAME, m.HELP) for m in command_modules()]
    code = ("import sys, runpy; sys.argv = ['lora-lens', '--help']\n"
            "try:\n    runpy.run_module('lens_ops', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "quantize" in r.stdout and "extract" in r.stdout, r.stdout
    assert r.stderr.strip().splitlines()[-1] == "False", r.stderr
