"""QA against a real ComfyUI server: unusual but real files through the pack's nodes via /prompt, outputs
applied by core's load_lora machinery, bad inputs answered with a sentence and nothing written."""
import os

import torch
from safetensors import safe_open

from lens_ops import LoRAModel
from lens_ops.st_io import atomic_save
from lens_ops.synth import make_lora
from integration.conftest import errors_of


def _files(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs) if os.path.isdir(folder) else []


def test_prune_node_on_bf16_locon_output_applies_like_input(comfy_server, comfy_inproc):
    """LoadLoRAFile → PruneRank (rank) → SaveLoRAFile on a bf16 LyCORIS LoCon with 3×3 convs: the saved file
    keeps key names and dtype, and core applies the ΔW the report promises."""
    sd = make_lora("sdxl_lycoris_locon", rank=8, dtype=torch.bfloat16, seed=9,
                   name_filter=lambda n: "in_layers" in n or "out_layers" in n or "attn1_to_q" in n, max_modules=10)
    assert any(v.dim() == 4 and v.shape[-1] == 3 for v in sd.values())
    atomic_save(sd, os.path.join(comfy_server.loras, "qa_locon_bf16.safetensors"), sd.metadata)
    prompt = {"1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "qa_locon_bf16.safetensors"}},
              "2": {"class_type": "PruneRank", "inputs": {"lora": ["1", 0], "method": "rank", "value": 4,
                                                          "recipe": ""}},
              "3": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["2", 0], "filename_prefix": "qa/locon",
                                                              "copy_to_loras": False}}}
    info = comfy_server.object_info("PruneRank")["PruneRank"]["input"]
    for opt in ("required", "optional"):
        for name, spec in info.get(opt, {}).items():
            if name not in prompt["2"]["inputs"] and opt == "required" and isinstance(spec[1], dict) \
                    and "default" in spec[1]:
                prompt["2"]["inputs"][name] = spec[1]["default"]
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    out = [p for p in _files(os.path.join(comfy_server.output, "qa")) if "locon" in p]
    assert len(out) == 1
    with safe_open(out[0], "pt") as f:
        keys = set(f.keys())
        assert keys == set(sd), keys ^ set(sd)
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    src, dst = LoRAModel.from_state_dict(dict(sd)), LoRAModel.load(out[0])
    assert {m.rank() for m in dst} == {4}
    import comfy.utils
    got = comfy.utils.load_torch_file(out[0], safe_load=True)
    for m in src:
        shape = tuple(m.weight_shape())
        base = torch.zeros(shape)
        ref = comfy_inproc(dict(sd), {m.name: "w"}, {"w": base})["w"].double()
        new = comfy_inproc(got, {m.name: "w"}, {"w": base})["w"].double()
        # rank-4 truncation of the exact ΔW (Eckart–Young): error equals the dropped singular values
        s = torch.linalg.svdvals(ref.reshape(shape[0], -1))
        want = float(s[4:].norm() / s.norm())
        err = float((new - ref).norm() / ref.norm())
        assert abs(err - want) < 2e-2 * max(want, 1e-3) + 3e-3, (m.name, err, want)


def test_save_prefix_outside_output_is_refused_and_nothing_written(comfy_server):
    sd = make_lora("sd15_kohya", rank=4, seed=2, max_modules=3)
    atomic_save(sd, os.path.join(comfy_server.loras, "qa_small.safetensors"), sd.metadata)
    before = set(_files(comfy_server.base))
    for prefix in ("../../qa_escape/x", "/tmp/qa_escape_abs/x"):
        entry = comfy_server.run({
            "1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "qa_small.safetensors"}},
            "2": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["1", 0], "filename_prefix": prefix,
                                                            "copy_to_loras": False}}})
        assert entry["status"]["status_str"] == "error"
        msg = errors_of(entry)
        assert "output folder" in msg and "Traceback" not in msg, msg
        assert len(msg.strip().splitlines()) == 1, msg
    assert set(_files(comfy_server.base)) - before <= {os.path.join(comfy_server.base, "server.log")}
    assert not os.path.exists("/tmp/qa_escape_abs")


def test_prune_node_that_would_remove_everything_reads_as_sentence(comfy_server):
    sd = make_lora("sd15_kohya", rank=4, seed=3, max_modules=3)
    atomic_save(sd, os.path.join(comfy_server.loras, "qa_remove_all.safetensors"), sd.metadata)
    entry = comfy_server.run({
        "1": {"class_type": "LoadLoRAFile", "inputs": {"lora_name": "qa_remove_all.safetensors"}},
        "2": {"class_type": "PruneRank", "inputs": {"lora": ["1", 0], "method": "recipe", "value": 0.99,
                                                    "recipe": "spn_lora=1,thr=30"}},
        "3": {"class_type": "SaveLoRAFile", "inputs": {"lora": ["2", 0], "filename_prefix": "qa/remove_all",
                                                        "copy_to_loras": False}}})
    assert entry["status"]["status_str"] == "error"
    msg = errors_of(entry)
    # PruneRank itself refuses since the QA API round (it used to hand SaveLoRAFile an empty LORA_MODEL)
    assert "PruneRank" in msg and "removes every module" in msg and "Traceback" not in msg, msg
    assert not [p for p in _files(os.path.join(comfy_server.output, "qa")) if "remove_all" in p]
