"""QuantizeInt8 against a real ComfyUI: core's own load_lora + calculate_weight (the LoraLoader path) applies
our int8/fp8 files exactly as the dequantized LoRA, for every kind; a file saved by SaveLoRAFile through the
server's /prompt patches weights within float rounding of the fp16 original's dequantized ΔW; ApplyLoRA
applies an in-graph quantized LoRA through comfy.sd.load_lora_for_models, giving the same image as core's
LoraLoader on the saved file."""
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

from integration.conftest import errors_of
from integration.sampling import sample_prompt, saved_image
from lens_ops import LoRAModel
from lens_ops.quantize import quantize_model
from lora_factory import convention_lora, gen, kind_tensors

FOLD_KINDS = ["lora", "lora_noalpha", "locon3x3", "tucker", "dora", "loha", "loha_cp", "lokr", "lokr_full", "lokr_ab"]
NAME = "lora_unet_x"


def naive_dequantized(state, carrier=None):
    out = {}
    for k, v in state.items():
        if k.endswith((".alpha", ".dora_scale")) or (carrier and k.endswith(carrier)):
            out[k] = v.float()
            continue
        x = v.float()
        s = float(x.abs().max()) / 127
        out[k] = (torch.round(x / s).clamp(-127, 127).double() * s).float()
    return out


def applied(comfy_inproc, sd, shape, seed=2):
    base = 1e-3 * torch.randn(shape, generator=gen(seed))
    return comfy_inproc(sd, {NAME: "w"}, {"w": base})["w"] - base


@pytest.mark.parametrize("kind", FOLD_KINDS)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_core_applies_quantized_file_as_dequantized(kind, fmt, comfy_inproc, tmp_path):
    t, _ = kind_tensors(kind, gen(21), torch.float16)
    sd = {NAME + k: v for k, v in t.items()}
    for method in ("auto", "naive"):
        q, _ = quantize_model(sd, fmt=fmt, method=method)
        path = q.save(str(tmp_path / f"{kind}_{fmt}_{method}.safetensors"), q.metadata)
        import comfy.utils
        loaded = comfy.utils.load_torch_file(path, safe_load=True)  # the reader LoraLoader uses
        mq = LoRAModel.from_state_dict(loaded).modules[0]
        shape = mq.weight_shape()
        got = applied(comfy_inproc, loaded, shape)
        if kind == "dora":
            # DoRA re-normalises with the base weight: compare core on our file with core on the dequantized floats
            deq = {k: (v.float() if k.endswith((".alpha", ".dora_scale")) else v.float()) for k, v in loaded.items()}
            deq[NAME + ".alpha"] = torch.tensor(mq.alpha)
            want = applied(comfy_inproc, deq, shape)
            ok = (got - want).norm() / want.norm()
            assert ok < 1e-5, (kind, fmt, method, float(ok))
            if method == "naive" and fmt == "int8":
                ref_sd = naive_dequantized(sd)
                want2 = applied(comfy_inproc, ref_sd, shape)
                assert (got - want2).norm() / want2.norm() < 1e-5
            continue
        want = mq.delta(torch.float64).float()  # the dequantized ΔW, from the file's own numbers
        assert (got - want).norm() / want.norm() < 1e-5, (kind, fmt, method)
        if method == "naive" and fmt == "int8":  # independent reference: round(x/s)·s per tensor, original alpha
            ref = LoRAModel.from_state_dict(naive_dequantized(sd, ".lokr_w1" if kind == "lokr_full" else None))
            want2 = ref.modules[0].delta(torch.float64).float()
            assert (got - want2).norm() / want2.norm() < 1e-5, kind


def test_saved_by_savelorafile_patches_like_dequantized(comfy_server, comfy_inproc):
    from lens_ops.synth import make_lora
    sd = make_lora("sdxl_kohya", rank=16, seed=8, max_modules=12)
    save_file(dict(sd), os.path.join(comfy_server.loras, "q_in.safetensors"), metadata=sd.metadata)
    for method in ("auto", "naive"):
        prompt = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "q_in.safetensors"}},
                  "2": {"class_type": "QuantizeInt8", "inputs": {"lora": ["1", 0], "format": "int8", "method": method,
                                                                 "min_snr_db": 40.0, "keep_fp16_below": False}},
                  "3": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["2", 0], "filename_prefix": f"q/{method}",
                                                                 "copy_to_loras": False}}}
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "success", errors_of(entry)
        report = entry["outputs"]["2"]["text"][0]
        assert "ΔW" in report and "SNR" in report and "MSE" in report and "MAE" in report
        assert "max error" in report and "relative Frobenius error" in report
        folder = os.path.join(comfy_server.output, "q")
        path = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.startswith(method))[-1])
        assert os.path.getsize(path) <= 0.52 * os.path.getsize(os.path.join(comfy_server.loras, "q_in.safetensors"))
        import comfy.utils
        loaded = comfy.utils.load_torch_file(path, safe_load=True)
        assert sum(v.dtype == torch.int8 for v in loaded.values()) == 24
        original = LoRAModel.from_state_dict(dict(sd))
        mine = LoRAModel.from_state_dict(loaded)
        ref_naive = LoRAModel.from_state_dict(naive_dequantized(dict(sd)))
        for m0 in original.modules:
            shape = m0.weight_shape()
            base = 1e-3 * torch.randn(shape, generator=gen(5))
            got = comfy_inproc(loaded, {m0.name: "w"}, {"w": base})["w"] - base
            deq = mine.get(m0.name).delta(torch.float64).float()
            assert (got - deq).norm() / deq.norm() < 1e-5
            if method == "naive":
                want = ref_naive.get(m0.name).delta(torch.float64).float()
                assert (got - want).norm() / want.norm() < 1e-5
            fp16 = m0.delta(torch.float64).float()
            assert (got - fp16).norm() / fp16.norm() < (0.02 if method == "auto" else 0.06)


def test_apply_lora_matches_core_loraloader(comfy_server):
    """Quantize in the graph, ApplyLoRA it: same image as core LoraLoader on the saved int8 file."""
    from integration.tiny_checkpoint import cached_sd15_checkpoint
    from lens_ops.synth import make_lora
    dest = os.path.join(comfy_server.base, "checkpoints", "tiny_sd15.safetensors")
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(cached_sd15_checkpoint(python=os.environ.get("COMFYUI_PYTHON", sys.executable)), dest)
    sd = make_lora("sd15_kohya", rank=4, seed=3)
    save_file(dict(sd), os.path.join(comfy_server.loras, "sd15_q.safetensors"), metadata=sd.metadata)
    quant = {"10": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "sd15_q.safetensors"}},
             "11": {"class_type": "QuantizeInt8", "inputs": {"lora": ["10", 0], "format": "int8", "method": "auto",
                                                             "min_snr_db": 40.0, "keep_fp16_below": False}},
             "12": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["11", 0], "filename_prefix": "sd15q",
                                                             "copy_to_loras": False}}}
    entry = comfy_server.run(quant)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    names = [f for f in os.listdir(comfy_server.output) if f.startswith("sd15q")]
    assert len(names) == 1
    saved = "sd15q_int8.safetensors"  # put where LoraLoader lists it (the server's loras folder)
    shutil.copy(os.path.join(comfy_server.output, names[0]), os.path.join(comfy_server.loras, saved))
    base = saved_image(comfy_server, comfy_server.run(sample_prompt("tiny_sd15.safetensors", {}, ["1", 0], ["1", 1])))
    apply_nodes = dict(quant)
    del apply_nodes["12"]
    apply_nodes["13"] = {"class_type": "ApplyLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": ["11", 0],
                                                               "strength_model": 8.0, "strength_clip": 8.0}}
    off = os.path.getsize(comfy_server.log_path)
    e1 = comfy_server.run(sample_prompt("tiny_sd15.safetensors", apply_nodes, ["13", 0], ["13", 1]))
    assert e1["status"]["status_str"] == "success", errors_of(e1)
    log = open(comfy_server.log_path).read()[off:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    core = {"14": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": saved,
                                                          "strength_model": 8.0, "strength_clip": 8.0}}}
    e2 = comfy_server.run(sample_prompt("tiny_sd15.safetensors", core, ["14", 0], ["14", 1]))
    assert e2["status"]["status_str"] == "success", errors_of(e2)
    a, b = saved_image(comfy_server, e1), saved_image(comfy_server, e2)
    assert abs(a - base).max() > 0, "ApplyLoRA changed nothing"
    assert abs(a - b).max() <= 1, "ApplyLoRA (in-graph int8) and LoraLoader (saved int8 file) differ"
    info = comfy_server.object_info("ApplyLoRA")["ApplyLoRA"]
    assert info["output"] == ["MODEL", "CLIP"] and set(info["input"]["required"]) >= {
        "model", "clip", "lora", "strength_model", "strength_clip"}
