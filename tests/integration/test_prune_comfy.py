"""PruneRank against a real ComfyUI: input and output applied with core's load_lora + calculate_weight
give ΔWs that differ exactly by the dropped dimensions; the node runs through /prompt."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lens_ops import LoRAModel
from lens_ops.prune import prune_model
from lens_ops.synth import make_lora
from lora_factory import gen, pair
from integration.conftest import errors_of


def cases():
    g = gen(31)
    up, down = pair(64, 48, 12, g, eff=3)
    cu, cd = pair(16, 8 * 9, 8, g, eff=2)
    pu, pd = pair(40, 32, 10, g, eff=3)
    return {
        "kohya_linear": ({"lora_unet_a.lora_up.weight": up, "lora_unet_a.lora_down.weight": down,
                          "lora_unet_a.alpha": torch.tensor(5.0)}, "lora_unet_a", (64, 48)),
        "locon_3x3": ({"lora_unet_c.lora_up.weight": cu.reshape(16, 8, 1, 1),
                       "lora_unet_c.lora_down.weight": cd.reshape(8, 8, 3, 3), "lora_unet_c.alpha": torch.tensor(4.0)},
                      "lora_unet_c", (16, 8, 3, 3)),
        "peft_no_alpha": ({"transformer.blk.lora_A.weight": pd, "transformer.blk.lora_B.weight": pu},
                          "transformer.blk", (40, 32)),
        "fp16_kohya": ({"lora_unet_h.lora_up.weight": up.half(), "lora_unet_h.lora_down.weight": down.half(),
                        "lora_unet_h.alpha": torch.tensor(1.0 / 3).half()}, "lora_unet_h", (64, 48)),
        "dora_output_axis": ({"lora_unet_d.lora_up.weight": up, "lora_unet_d.lora_down.weight": down,
                              "lora_unet_d.alpha": torch.tensor(12.0),
                              "lora_unet_d.dora_scale": torch.rand(64, 1, generator=g) + 0.5}, "lora_unet_d", (64, 48)),
    }


@pytest.mark.parametrize("case", list(cases()))
@pytest.mark.parametrize("recipe", ["rank=3", "energy=0.95", "sv_fro=0.9"])
def test_comfy_applies_input_and_output_alike(case, recipe, comfy_inproc):
    sd, name, shape = cases()[case]
    model = LoRAModel.from_state_dict(sd)
    out, rep = prune_model(model, recipe)
    st = out.state_dict()
    assert {k.rsplit(".", 2)[0] for k in st} <= {k.rsplit(".", 2)[0] for k in sd}  # same convention
    assert set(st) <= set(sd)
    base = 0.05 * torch.randn(shape, generator=gen(5))
    w_in = comfy_inproc(sd, {name: "w"}, {"w": base})["w"]
    w_out = comfy_inproc(dict(st), {name: "w"}, {"w": base})["w"]
    e = rep["modules"][0]
    if case.startswith("dora"):
        # ComfyUI normalises by the base weight's row norms on this axis, so the applied change is linear in
        # ΔW: the output differs from the input by m/‖W‖ · (ΔW_out − ΔW_in), nothing else
        mag = sd["lora_unet_d.dora_scale"].float()
        scale = mag / (base.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
        dd = out.modules[0].delta(torch.float64).float() - model.modules[0].delta(torch.float64).float()
        assert float(((w_out - w_in) - scale * dd).norm() / (scale * dd).norm()) < 1e-3
        assert float(dd.norm() / model.modules[0].delta(torch.float64).norm()) == pytest.approx(e["rel_error"], rel=1e-3)
        return
    d_in, d_out = w_in - base, w_out - base
    ours = model.modules[0].delta(torch.float64).float()
    assert (d_in - ours.reshape(shape)).norm() / ours.norm() < 1e-4
    # truncation error as ComfyUI applies it equals the reported error (Eckart–Young: the dropped σ's)
    got = float((d_out - d_in).norm() / d_in.norm())
    tol = 5e-3 if case.startswith("fp16") else 2e-4
    assert abs(got - e["rel_error"]) < tol + 1e-3 * e["rel_error"], (got, e["rel_error"])
    # and the kept part is the optimal one: compare with a float64 dense truncation at the same rank
    ref = model.modules[0].delta(torch.float64).reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(ref, full_matrices=False)
    k = e["new_rank"]
    best = ((u[:, :k] * s[:k]) @ vh[:k]).reshape(shape).float()
    assert float((d_out - best).norm() / best.norm()) < (6e-3 if case.startswith("fp16") else 3e-4)


def test_real_layout_file_loads_like_input(comfy_inproc):
    sd = make_lora("sdxl_kohya_locon", rank=16, seed=7, max_modules=24, dtype=torch.float16)
    model = LoRAModel.from_state_dict(sd)
    out, rep = prune_model(model, "energy=0.99")
    by = {e["name"]: e for e in rep["modules"]}
    for m in model.modules:
        shape = m.weight_shape()
        base = 0.05 * torch.randn(shape, generator=gen(hash(m.name) % 1000))
        w_in = comfy_inproc(sd, {m.name: "w"}, {"w": base})["w"]
        w_out = comfy_inproc(dict(out.state_dict()), {m.name: "w"}, {"w": base})["w"]
        d_in = w_in - base
        got = float((w_out - w_in).norm() / d_in.norm())
        assert abs(got - by[m.name]["rel_error"]) < 5e-3, m.name


def test_prune_node_through_prompt(comfy_server):
    sd = make_lora("sd15_kohya", rank=16, seed=9, max_modules=20)
    save_file(dict(sd), os.path.join(comfy_server.loras, "prune_in.safetensors"), metadata=sd.metadata)
    info = comfy_server.object_info("PruneRank")["PruneRank"]
    for group in ("required", "optional"):
        for name, spec in info["input"][group].items():
            assert spec[1].get("tooltip"), name
    assert info["output"] == ["LORA_MODEL", "STRING"]
    prompt = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "prune_in.safetensors"}},
              "2": {"class_type": "PruneRank", "inputs": {"lora": ["1", 0], "method": "energy", "value": 0.95,
                                                           "recipe": ""}},
              "3": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["2", 0], "filename_prefix": "pruned/p",
                                                              "copy_to_loras": False}}}
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    ui = entry["outputs"]["2"]
    view = json.loads(ui["lens_prune"][0])
    assert len(view["modules"]) == 20 and view["total"]["bytes_saved"] > 0
    assert "energy=0.95" in ui["text"][0]
    files = os.listdir(os.path.join(comfy_server.output, "pruned"))
    path = os.path.join(comfy_server.output, "pruned", files[0])
    assert os.path.getsize(path) < os.path.getsize(os.path.join(comfy_server.loras, "prune_in.safetensors"))
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert "prune" in meta["lora_lens.provenance"] and meta["ss_network_dim"] in ("Dynamic",) + tuple(
            str(i) for i in range(1, 17))
    # a bad recipe is one readable sentence in the node's error
    bad = dict(prompt)
    bad["2"] = {"class_type": "PruneRank", "inputs": {"lora": ["1", 0], "method": "recipe", "value": 0.0,
                                                       "recipe": "energy=7"}}
    entry = comfy_server.run(bad)
    assert entry["status"]["status_str"] == "error"
    assert "Allowed" in errors_of(entry)
