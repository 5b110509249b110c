"""Files LoRA Lens writes get the permissions of any new file of the user's (0666 minus the umask), not
mkstemp's private 0600: atomic saves, streamed outputs, and streamed outputs whose payload was moved up."""
import os
import stat

import pytest
from safetensors.torch import save_file

from lens_ops.cli import main
from lens_ops.synth import make_lora


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the umask is read from /proc (Linux)")
@pytest.mark.parametrize("command", [["quantize"], ["prune", "--recipe", "rank=2"], ["prune", "--recipe", "rank=2:rank=3"]])
def test_outputs_follow_the_umask(tmp_path, capsys, umask_022, command):
    sd = make_lora("sdxl_kohya", rank=4, seed=2, max_modules=4)
    src = str(tmp_path / "in.safetensors")
    save_file(dict(sd), src, metadata=sd.metadata)
    if ":" in command[-1]:  # several recipes: a folder of outputs
        out = str(tmp_path / "outs")
        argv = ["prune", src, "-o", out, "--recipe", command[-1]]
    else:
        out = str(tmp_path / "a.safetensors")
        argv = [command[0], src, "-o", out] + command[1:]
    assert main(argv) == 0, capsys.readouterr().err
    outs = [os.path.join(out, f) for f in os.listdir(out)] if os.path.isdir(out) else [out]
    assert outs
    for p in outs:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644, p
