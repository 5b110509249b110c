"""The pack as ComfyUI sees it: imported by path as a package, node classes fulfil the node contract,
and LoadLoRAFile → SaveLoRAFile works against ComfyUI-shaped folders."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ROOT
from lora_factory import convention_lora, gen

REQUIRED_NODES = {"LoadLoRAFile", "SaveLoRAFile"}


def test_pack_exports(pack):
    assert REQUIRED_NODES <= set(pack.NODE_CLASS_MAPPINGS)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    assert pack.WEB_DIRECTORY == "./web" and os.path.isdir(os.path.join(ROOT, "web"))


def test_lens_ops_has_no_comfy_import():
    for d, _, files in os.walk(os.path.join(ROOT, "lens_ops")):
        for f in files:
            if f.endswith(".py"):
                src = open(os.path.join(d, f)).read()
                assert "import comfy" not in src and "folder_paths" not in src, f


def test_no_absolute_import_of_pack_modules():
    for d, _, files in os.walk(os.path.join(ROOT, "nodes")):
        for f in files:
            if f.endswith(".py"):
                src = open(os.path.join(d, f)).read()
                assert "from lens_ops" not in src and "import lens_ops" not in src and "from nodes" not in src, f


def test_every_node_fulfils_the_contract(comfy_env):
    pack, _ = comfy_env
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        for attr in ("INPUT_TYPES", "RETURN_TYPES", "FUNCTION", "CATEGORY", "DESCRIPTION"):
            assert hasattr(cls, attr), f"{name} lacks {attr}"
        assert cls.CATEGORY.startswith("LoRA Lens")
        assert callable(getattr(cls(), cls.FUNCTION))
        spec = cls.INPUT_TYPES()
        assert "required" in spec
        for section in ("required", "optional"):
            for inp, decl in spec.get(section, {}).items():
                assert isinstance(decl, tuple) and len(decl) == 2 and decl[1].get("tooltip"), f"{name}.{inp} has no tooltip"
        if hasattr(cls, "RETURN_NAMES"):
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)


def test_load_then_save(comfy_env):
    pack, dirs = comfy_env
    sd = convention_lora("kohya_unet", gen(0))
    save_file(sd, str(dirs["loras"] / "mine.safetensors"), metadata={"ss_output_name": "mine"})
    nodes = pack.NODE_CLASS_MAPPINGS
    assert "mine.safetensors" in nodes["LoadLoRAFile"].INPUT_TYPES()["required"]["lora_name"][0]
    out = nodes["LoadLoRAFile"]().load("mine.safetensors")
    lora, info = out["result"]
    assert isinstance(lora, dict) and set(lora) == set(sd) and "SD 1.5" in info
    assert out["ui"]["text"] == [info]
    from conftest import FakeProgressBar
    assert FakeProgressBar.updates and FakeProgressBar.updates[-1][0] == FakeProgressBar.updates[-1][1] == len(sd)
    res = nodes["SaveLoRAFile"]().save(lora, "loras/test", copy_to_loras=True, note="hello")
    path = res["result"][0]
    assert path.startswith(str(dirs["output"])) and os.path.exists(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert all(torch.equal(f.get_tensor(k), sd[k]) for k in sd)
    assert meta["ss_output_name"] == "mine"
    prov = json.loads(meta["lora_lens.provenance"])
    assert prov[-1]["op"] == "save" and prov[-1]["settings"]["note"] == "hello"
    copies = [f for f in os.listdir(dirs["loras"]) if f != "mine.safetensors"]
    assert len(copies) == 1
    # a second save never overwrites the first
    path2 = nodes["SaveLoRAFile"]().save(lora, "loras/test")["result"][0]
    assert path2 != path and os.path.exists(path)


def test_load_with_baked_strength(comfy_env):
    pack, dirs = comfy_env
    sd = convention_lora("kohya_unet", gen(0), dtype=torch.float32)
    save_file(sd, str(dirs["loras"] / "m.safetensors"))
    lora, info = pack.NODE_CLASS_MAPPINGS["LoadLoRAFile"]().load("m.safetensors", bake_strength=0.5)["result"]
    k = next(k for k in sd if k.endswith("lora_up.weight"))
    assert torch.allclose(lora[k], sd[k] * 0.5) and "baked" in info
    assert "bake_strength" in lora.metadata["lora_lens.provenance"]


def test_load_refuses_names_outside_loras(comfy_env):
    pack, dirs = comfy_env
    from lens_ops import LensError
    (dirs["root"] / "secret.safetensors").write_bytes(b"x")
    with pytest.raises(Exception) as e:
        pack.NODE_CLASS_MAPPINGS["LoadLoRAFile"]().load("../secret.safetensors")
    assert "loras folders" in str(e.value)


def test_save_refuses_prefix_outside_output(comfy_env):
    pack, dirs = comfy_env
    lora = convention_lora("kohya_unet", gen(0))
    with pytest.raises(Exception, match="outside"):
        pack.NODE_CLASS_MAPPINGS["SaveLoRAFile"]().save(lora, "../../evil")


def test_core_plain_dict_is_accepted(comfy_env):
    """A LORA_MODEL from core nodes is a plain dict without metadata."""
    pack, dirs = comfy_env
    lora = dict(convention_lora("peft_transformer", gen(0)))
    path = pack.NODE_CLASS_MAPPINGS["SaveLoRAFile"]().save(lora, "plain")["result"][0]
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(lora)
