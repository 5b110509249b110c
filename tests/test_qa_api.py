"""Unit regressions for bugs found by driving every node through a real ComfyUI server's API
(tests/integration/test_qa_api_comfy.py reproduces each one through /prompt)."""
import torch

from lens_ops import LoRAModel
from lens_ops.analysis import analyze


def _core_trained_like(seed=0):
    """What core's TrainLoraNode returns after one AdamW step: LoRA pairs with a 0-d alpha, and `.diff` /
    `.diff_b` tensors for 1-D weights and biases whose entries all equal ±lr (so same-shape ones are equal)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        n = f"diffusion_model.input_blocks.{i + 1}.1.proj_in"
        sd[n + ".lora_up.weight"] = (1e-3 * torch.randn(32, 4, generator=g)).bfloat16()
        sd[n + ".lora_down.weight"] = torch.randn(4, 16, generator=g).bfloat16()
        sd[n + ".alpha"] = torch.tensor(1.0).bfloat16()
        sd[n + ".diff_b"] = torch.full((32,), 1e-3).bfloat16()
        sd[f"diffusion_model.input_blocks.{i + 1}.1.norm.diff"] = torch.full((32,), -1e-3).bfloat16()
    return sd


def test_analyze_equal_diff_modules_are_duplicates_not_a_crash():
    """Two `.diff` modules with the same ΔW (a dense diff has no second factor) crashed the duplicate check
    with AttributeError: 'NoneType' object has no attribute 'shape'."""
    sd = _core_trained_like()
    # a full `.diff` equal to a LoRA pair's ΔW (one side dense, the other factored; a 32×4 layer so both have
    # 4 singular values) and one that differs
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(32, 4, generator=g), torch.randn(4, 4, generator=g)
    sd["diffusion_model.label_emb.0.0.lora_up.weight"] = up
    sd["diffusion_model.label_emb.0.0.lora_down.weight"] = down
    sd["diffusion_model.out.2.diff"] = (up.double() @ down.double()).float()
    sd["diffusion_model.out.3.diff"] = (up.double() @ down.double()).flip(0).float().contiguous()
    rep = analyze(LoRAModel.from_state_dict(sd))
    dups = sorted(sorted(p) for p in rep["duplicates"])
    assert dups == [["diffusion_model.input_blocks.1.1.norm", "diffusion_model.input_blocks.2.1.norm"],
                    ["diffusion_model.label_emb.0.0", "diffusion_model.out.2"]], dups
