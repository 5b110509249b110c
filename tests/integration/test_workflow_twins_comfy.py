"""The API twins equal what a real server's node definitions make of the UI files (widget order, names),
so the frontend and `lora-lens queue` send the same prompt."""
import glob
import json
import os

import pytest

from conftest import ROOT
from lens_ops.workflow import ui_to_api

UI_FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_twin_matches_real_object_info(path, comfy_server):
    info = comfy_server.object_info()
    ui = json.load(open(path))
    real = ui_to_api(ui, info)
    twin = json.load(open(os.path.join(ROOT, "example_workflows", "api", os.path.basename(path))))
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}
    assert strip(real) == strip(twin)
