"""Example workflows: every API twin is generated from its UI file and current, and every prompt uses only
nodes and inputs that exist, with valid widget values (against the pack's own node definitions and the
stored definitions of the few core nodes used)."""
import glob
import json
import os

import pytest

from conftest import ROOT
from lens_ops.workflow import check_prompt

WF = os.path.join(ROOT, "example_workflows")
UI_FILES = sorted(f for f in glob.glob(os.path.join(WF, "*.json")) if not f.endswith("core_nodes.json"))


@pytest.fixture(scope="module")
def defs():
    from scripts.build_api_workflows import lora_names_in
    from scripts.workflow_defs import all_object_info
    names = sorted({n for f in UI_FILES for n in lora_names_in(json.load(open(f)))}) or ["example.safetensors"]
    return all_object_info(names)


def test_there_are_examples():
    assert UI_FILES


def test_api_twins_are_generated_and_current():
    from scripts.build_api_workflows import build
    assert build(check=True) == 0
    assert sorted(os.listdir(os.path.join(WF, "api"))) == sorted(os.path.basename(f) for f in UI_FILES)


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_prompt_is_valid(path, defs):
    api = json.load(open(os.path.join(WF, "api", os.path.basename(path))))
    assert check_prompt(api, defs) == []
    ui = json.load(open(path))
    assert any(n["type"] in ("Note", "MarkdownNote") for n in ui["nodes"]), "every example explains itself"
