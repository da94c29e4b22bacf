"""FG-DM through a real ComfyUI server: both example workflows (SBPC -> Mask Edit -> seg
ControlNet -> image, and SBPC -> Map To Layout -> LocRef Apply), and bad inputs that must give a
clear error while the server goes on serving."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from comfy_harness import (PromptRejected, fetch_image, queue_prompt, upload_image,
                           validation_refusal as rejection, wait_for_history)
from harness_fgdm import CONTROLNET_NAME, FACTOR_NAME, install_fgdm_models
from harness_locref import install_locref_models
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
EDIT_WORKFLOW = ROOT / "workflows" / "api" / "fgdm_sbpc_edit_controlnet.api.json"
LAYOUT_WORKFLOW = ROOT / "workflows" / "api" / "fgdm_sbpc_to_locref.api.json"
N, MAP, SIZE, STEPS = 3, 64, 128, 2


@pytest.fixture(scope="module")
def fgdm_server(comfy_server):
    install_fgdm_models(comfy_server.base_dir)
    install_locref_models(comfy_server.base_dir)
    upload_image(comfy_server, Image.new("RGB", (64, 48), (200, 120, 40)), "ref_dog.png")
    return comfy_server


def small(path: pathlib.Path, ckpt: str, seed: int = 5) -> dict:
    """An example workflow pointed at the test files and made small and quick (CPU)."""
    prompt = json.loads(path.read_text())
    prompt["1"]["inputs"]["ckpt_name"] = ckpt
    prompt["4"]["inputs"]["factor_name"] = FACTOR_NAME
    prompt["6"]["inputs"].update(n=N, steps=STEPS, map_width=MAP, map_height=MAP, seed=seed,
                                 output_width=SIZE, output_height=SIZE)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "KSampler":
            inputs["steps"] = STEPS
        if node["class_type"] in ("EmptyLatentImage", "FGDMMapToLayout"):
            inputs.update(width=SIZE, height=SIZE)
        if node["class_type"] == "ControlNetLoader":
            inputs["control_net_name"] = CONTROLNET_NAME
        if node["class_type"] == "LoadImage":
            inputs["image"] = "ref_dog.png"
        if node["class_type"] == "FGDMMapToLayout":  # random weights: take whatever is there
            inputs.update(objects="", min_area=0.0)
        if node["class_type"] == "LocRefReference":
            inputs.update(label="", box_index=0)
    return prompt


def run(server, prompt: dict, timeout: float = 900) -> dict:
    return wait_for_history(server, queue_prompt(server, prompt), timeout)


def errors_of(entry: dict) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


def images(server, entry: dict, node: str) -> list[np.ndarray]:
    return [np.asarray(fetch_image(server, info).convert("RGB"))
            for info in entry["outputs"][node]["images"]]


def test_sbpc_edit_controlnet_workflow(fgdm_server, sd15_checkpoint_name):
    entry = run(fgdm_server, small(EDIT_WORKFLOW, sd15_checkpoint_name))
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    [image] = images(fgdm_server, entry, "16")
    assert image.shape == (SIZE, SIZE, 3)
    [grid] = images(fgdm_server, entry, "7")
    assert grid.shape == (2 * 164 + 4, 2 * 164 + 4, 3)  # 3 candidates: 2 x 2 tiles of 160 px
    [before_after] = images(fgdm_server, entry, "9")
    assert before_after.shape[1] > 2 * SIZE
    # SBPC and Mask Edit show pictures on themselves (ui images): candidates; map + preview.
    assert len(entry["outputs"]["6"]["images"]) == 1
    assert len(entry["outputs"]["8"]["images"]) == 2
    log = fgdm_server.log_text()
    assert "SBPC: chose candidate" in log


def test_sbpc_to_locref_workflow(fgdm_server, sd15_checkpoint_name):
    entry = run(fgdm_server, small(LAYOUT_WORKFLOW, sd15_checkpoint_name))
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    [image] = images(fgdm_server, entry, "19")
    assert image.shape == (SIZE, SIZE, 3)
    [layout] = images(fgdm_server, entry, "12")
    assert layout.shape == (SIZE, SIZE, 3)


def test_bad_operations_json_is_refused_when_queued(fgdm_server, sd15_checkpoint_name):
    prompt = small(EDIT_WORKFLOW, sd15_checkpoint_name)
    del prompt["7"]  # else the host runs the still-valid candidates preview alone (HTTP 200)
    prompt["8"]["inputs"]["operations"] = '{"version": 1, "operations": [{"op": "move",'
    assert "operations - edit operations are not valid JSON" in rejection(fgdm_server, prompt, "8")
    prompt["8"]["inputs"]["operations"] = '{"version": 1, "operations": [{"op": "explode"}]}'
    assert "explode" in rejection(fgdm_server, prompt, "8")


def test_object_not_in_the_palette_is_refused_when_queued(fgdm_server, sd15_checkpoint_name):
    prompt = small(EDIT_WORKFLOW, sd15_checkpoint_name)
    prompt["6"]["inputs"]["objects"] = "person, flying saucer"
    assert "objects - unknown object 'flying saucer'" in rejection(fgdm_server, prompt, "6")


@pytest.mark.parametrize("n", [0, 65])
def test_out_of_range_n_is_rejected_and_the_server_goes_on(fgdm_server, sd15_checkpoint_name, n):
    prompt = small(EDIT_WORKFLOW, sd15_checkpoint_name)
    prompt["6"]["inputs"]["n"] = n
    with pytest.raises(PromptRejected) as err:
        queue_prompt(fgdm_server, prompt)
    [problem] = err.value.body["node_errors"]["6"]["errors"]
    assert problem["type"] in ("value_smaller_than_min", "value_bigger_than_max")
    assert problem["extra_info"]["input_name"] == "n"
    entry = run(fgdm_server, small(EDIT_WORKFLOW, sd15_checkpoint_name, seed=9))
    assert entry["status"]["status_str"] == "success", errors_of(entry)
