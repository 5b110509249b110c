"""PackLoRADB / ExtractLoRADB without ComfyUI (stand-in folder_paths): graph LoRAs + picked files in,
<name>.loradb in the loradb folder, entries back as LORA_MODEL list, files into loras."""
import hashlib
import os

import pytest
import torch

from lens_ops import LensError
from lens_ops.st_io import save_file
from lens_ops.synth import make_lora


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_pack_and_extract_nodes(comfy_env):
    pack_mod, paths = comfy_env
    nodes = pack_mod.NODE_CLASS_MAPPINGS
    a = make_lora("sdxl_kohya", rank=4, seed=1, max_modules=6)
    b = make_lora("sdxl_kohya", rank=4, seed=2, max_modules=6)
    save_file(b, str(paths["loras"] / "b.safetensors"), b.metadata)
    p = nodes["PackLoRADB"]()
    info = nodes["PackLoRADB"].INPUT_TYPES()
    assert all("tooltip" in v[1] for sec in info.values() for v in sec.values())
    out = p.pack(name=["Chars"], creator=["me"], description=["d"], tags=["x, y"], optimisation=["none (lossless)"],
                 recipe=["energy=0.9997"], shared_basis=["off"], snr_db=[35.0], overwrite=[False],
                 loras=[a], lora_names=["hero"], lora_file_1=["b.safetensors"], lora_file_2=["(none)"])
    path = out["result"][1][0]
    assert path == str(paths["root"] / "loradb" / "Chars.loradb") and os.path.exists(path)
    assert "2 entries" in out["ui"]["text"][0]
    x = nodes["ExtractLoRADB"]()
    assert "Chars.loradb" in nodes["ExtractLoRADB"].INPUT_TYPES()["required"]["loradb"][0]
    res = x.extract("Chars.loradb", "b", write_to_loras=False)
    loras, names, text = res["result"]
    assert names == ["b"] and "hero" in text and "Collection: Chars by me" in text
    assert all(torch.equal(loras[0][k], b[k]) for k in b)
    os.unlink(paths["loras"] / "b.safetensors")
    res = x.extract("Chars.loradb", "all", write_to_loras=True)
    assert res["result"][1] == ["hero", "b"]
    assert sorted(os.listdir(paths["loras"])) == ["b.safetensors", "hero.safetensors"]
    with pytest.raises(Exception, match="no entry named"):
        x.extract("Chars.loradb", "nope")
    with pytest.raises(Exception, match="not a .loradb file"):
        x.extract("../../etc/passwd", "all")
    # a second pack with the same name does not overwrite
    out2 = p.pack(name=["Chars"], creator=[""], description=[""], tags=[""], optimisation=["none (lossless)"],
                  recipe=[""], shared_basis=["off"], snr_db=[35.0], overwrite=[False], loras=[a])
    assert out2["result"][1][0].endswith("Chars_2.loradb")


def test_pack_node_int8_folded_alpha_extracts_quantizeint8_files(comfy_env):
    """The node's "int8 (folded alpha)" optimisation: entries come back as QuantizeInt8's int8 LoRA (scales in
    alpha), the same tensors `quantize_model` writes."""
    from lens_ops.quantize import quantize_model
    pack_mod, paths = comfy_env
    nodes = pack_mod.NODE_CLASS_MAPPINGS
    a = make_lora("sdxl_kohya", rank=4, seed=5, max_modules=4)
    out = nodes["PackLoRADB"]().pack(name=["Q"], creator=[""], description=[""], tags=[""],
                                     optimisation=["int8 (folded alpha)"], recipe=[""], shared_basis=["off"],
                                     snr_db=[35.0], overwrite=[False], loras=[a], lora_names=["hero"])
    assert "int8 (folded alpha)" in out["ui"]["text"][0]
    loras, names, _ = nodes["ExtractLoRADB"]().extract("Q.loradb", "hero", write_to_loras=False)["result"]
    want = quantize_model(a)[0].state_dict()
    assert set(loras[0]) == set(want) and all(torch.equal(loras[0][k], v) for k, v in want.items())
    assert any(v.dtype == torch.int8 for v in loras[0].values())
