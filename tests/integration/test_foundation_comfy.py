"""Foundation against a real ComfyUI: every kind's ΔW equals what core's load_lora + calculate_weight
applies, and LoadLoRAFile → SaveLoRAFile through /prompt yields a file LoraLoader lists."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lens_ops import LoRAModel
from lora_factory import KINDS, convention_lora, gen, kind_tensors
from integration.conftest import errors_of


@pytest.mark.parametrize("kind", [k for k in KINDS if kind_tensors(k, gen(0))[1] is not None and k != "dora"])
def test_delta_equals_comfy_applied_weight(kind, comfy_inproc):
    """DoRA is excluded: its applied change re-normalises the base weight, so it has no stand-alone ΔW."""
    t, _ = kind_tensors(kind, gen(11), torch.float16)
    name = "lora_unet_x"
    sd = {name + k: v for k, v in t.items()}
    m = LoRAModel.from_state_dict(sd).modules[0]
    ours = m.delta(torch.float32)
    base = 1e-3 * torch.randn(ours.shape, generator=gen(2))  # small: float32 rounding of base+ΔW stays far below ΔW
    patched = comfy_inproc(sd, {name: "w"}, {"w": base})["w"]
    got = patched - base
    assert (got - ours).norm() / ours.norm() < 1e-5


def test_load_save_through_prompt(comfy_server):
    sd = convention_lora("kohya_unet", gen(0))
    save_file(sd, os.path.join(comfy_server.loras, "lens_in.safetensors"), metadata={"ss_output_name": "x"})
    info = comfy_server.object_info("LoadLoRAFile")["LoadLoRAFile"]
    assert "lens_in.safetensors" in info["input"]["required"]["lora_name"][0]
    prompt = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "lens_in.safetensors"}},
              "2": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["1", 0], "filename_prefix": "lens/out",
                                                              "copy_to_loras": True}}}
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    saved = entry["outputs"]["2"]["text"][0]
    assert "Saved" in saved
    files = os.listdir(os.path.join(comfy_server.output, "lens"))
    assert len(files) == 1
    with safe_open(os.path.join(comfy_server.output, "lens", files[0]), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), sd[k]) for k in sd)
        assert f.metadata()["ss_output_name"] == "x" and "lora_lens.provenance" in f.metadata()
    choices = comfy_server.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert files[0] in choices
    # copy_to_loras writes into ComfyUI's first loras folder (its own models/loras): leave nothing behind
    from integration.conftest import COMFYUI_DIR
    copy = os.path.join(COMFYUI_DIR, "models", "loras", files[0])
    if os.path.exists(copy):
        os.unlink(copy)


def test_bad_prompt_input_reads_as_sentence(comfy_server):
    bad = os.path.join(comfy_server.loras, "broken.safetensors")
    open(bad, "wb").write(b"\x10\0\0\0\0\0\0\0{not json at all}")
    entry = comfy_server.run({"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "broken.safetensors"}},
                              "2": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["1", 0], "filename_prefix": "x",
                                                                              "copy_to_loras": False}}})
    assert entry["status"]["status_str"] == "error"
    assert "not JSON" in errors_of(entry)
