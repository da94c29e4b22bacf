"""LocRef generation through a real ComfyUI server: the example workflows (references, and
regional prompts with nothing but the checkpoint), isolation between runs, and awkward inputs
that must give a result or a clear error, never a dead server."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from comfy_harness import PromptRejected, fetch_image, queue_prompt, upload_image, wait_for_history
from harness_locref import free_cache, install_locref_models

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "api" / "locref_generate.api.json"
PREVIEW_WORKFLOW = ROOT / "workflows" / "api" / "locref_layout_preview.api.json"
REGIONAL_WORKFLOW = ROOT / "workflows" / "api" / "locref_regional_prompts.api.json"
SIZE, STEPS = 256, 2


@pytest.fixture(scope="module")
def locref_server(comfy_server):
    install_locref_models(comfy_server.base_dir)
    upload_image(comfy_server, Image.new("RGB", (96, 64), (255, 0, 0)), "ref_red.png")
    upload_image(comfy_server, Image.new("RGB", (64, 96), (0, 0, 255)), "ref_blue.png")
    # the layout-preview workflow (queued as a cheap flush below) loads example.png; upload it
    # here so this module does not depend on test_host_layout_nodes having run first
    upload_image(comfy_server, Image.new("RGB", (96, 64), (255, 0, 0)), "example.png")
    return comfy_server


def locref_prompt(sd15_checkpoint_name: str, seed: int = 7) -> dict:
    """The example workflow, pointed at the test files and made small and quick."""
    prompt = json.loads(WORKFLOW.read_text())
    prompt["1"]["inputs"]["ckpt_name"] = sd15_checkpoint_name
    prompt["4"]["inputs"]["image"] = "ref_red.png"
    prompt["5"]["inputs"]["image"] = "ref_blue.png"
    for node in ("6", "12"):
        prompt[node]["inputs"].update(width=SIZE, height=SIZE)
    prompt["13"]["inputs"].update(steps=STEPS, seed=seed)
    return prompt


def plain_prompt(sd15_checkpoint_name: str, seed: int, prefix: str) -> dict:
    """The same graph without LocRef: KSampler takes the checkpoint's model directly."""
    prompt = locref_prompt(sd15_checkpoint_name, seed)
    prompt["13"]["inputs"]["model"] = ["1", 0]
    for node in ("2", "3", "4", "5", "6", "7", "8", "9", "16", "17"):
        del prompt[node]
    prompt["15"]["inputs"]["filename_prefix"] = prefix
    return prompt


def run(server, prompt: dict, timeout: float = 600) -> dict:
    return wait_for_history(server, queue_prompt(server, prompt), timeout)


def errors_of(entry: dict) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


def saved(server, entry: dict, node: str) -> np.ndarray:
    [info] = entry["outputs"][node]["images"]
    return np.asarray(fetch_image(server, info).convert("RGB"))


def test_example_workflow_generates_an_image(locref_server, sd15_checkpoint_name):
    entry = run(locref_server, locref_prompt(sd15_checkpoint_name))
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    image = saved(locref_server, entry, "15")
    assert image.shape == (SIZE, SIZE, 3)
    layout = saved(locref_server, entry, "17")
    assert layout.shape == (SIZE, SIZE, 3)
    assert (layout == [255, 0, 0]).all(-1).any() and (layout == [0, 0, 255]).all(-1).any()
    log = locref_server.log_text()
    assert "LocRef: loaded ipadapter/ip-adapter_sd15.safetensors" in log


def test_references_change_the_image(locref_server, sd15_checkpoint_name):
    base = run(locref_server, locref_prompt(sd15_checkpoint_name, seed=11))
    weak = locref_prompt(sd15_checkpoint_name, seed=11)
    weak["9"]["inputs"]["strength"] = 0.0
    unpatched = run(locref_server, weak)
    plain = run(locref_server, plain_prompt(sd15_checkpoint_name, 11, "LocRef/plain_s11"))
    a, b, c = (saved(locref_server, e, "15") for e in (base, unpatched, plain))
    assert not np.array_equal(a, c), "LocRef had no effect on the image"
    assert np.array_equal(b, c), "strength 0 must equal the plain model"


def test_nothing_leaks_into_a_later_plain_run(locref_server, sd15_checkpoint_name):
    run(locref_server, locref_prompt(sd15_checkpoint_name, seed=21))
    after = run(locref_server, plain_prompt(sd15_checkpoint_name, 22, "LocRef/plain_after"))
    free_cache(locref_server)  # applied after the next prompt, so queue a cheap one first
    preview = json.loads(PREVIEW_WORKFLOW.read_text())
    preview["6"]["inputs"]["filename_prefix"] = "LocRef/flush"
    run(locref_server, preview)
    fresh = run(locref_server, plain_prompt(sd15_checkpoint_name, 22, "LocRef/plain_fresh"))
    assert after["status"]["status_str"] == fresh["status"]["status_str"] == "success"
    assert np.array_equal(saved(locref_server, after, "15"), saved(locref_server, fresh, "15"))


def layout_variant(sd15_checkpoint_name: str, **changes) -> dict:
    prompt = locref_prompt(sd15_checkpoint_name, seed=31)
    for node, inputs in changes.items():
        prompt[node]["inputs"].update(inputs)
    return prompt


def test_zero_boxes_gives_an_error_naming_the_fix(locref_server, sd15_checkpoint_name):
    prompt = layout_variant(sd15_checkpoint_name,
                            **{"6": {"boxes_json": '{"version": 1, "boxes": []}'}})
    entry = run(locref_server, prompt)
    [error] = errors_of(entry)
    assert error["node_type"] == "LocRefReference" and "no boxes" in error["exception_message"]
    # Without Reference nodes, an empty layout runs: LocRef Apply returns the model unpatched.
    prompt["9"]["inputs"]["layout"] = ["6", 0]
    prompt["16"]["inputs"]["layout"] = ["6", 0]
    entry = run(locref_server, prompt)
    assert entry["status"]["status_str"] == "success", errors_of(entry)


@pytest.mark.parametrize("name, image", [
    ("ref_huge.png", Image.new("RGB", (4200, 300), (0, 255, 0))),
    ("ref_grey.png", Image.new("L", (80, 80), 90)),
    ("ref_rgba.png", Image.new("RGBA", (80, 60), (255, 255, 0, 128))),
])
def test_awkward_references_run(locref_server, sd15_checkpoint_name, name, image):
    upload_image(locref_server, image, name)
    entry = run(locref_server, layout_variant(sd15_checkpoint_name, **{"4": {"image": name}}))
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    assert saved(locref_server, entry, "15").shape == (SIZE, SIZE, 3)


def test_unknown_adapter_is_rejected_and_the_server_goes_on(locref_server, sd15_checkpoint_name):
    # The server keeps serving after a failed prompt: the next one succeeds.
    bad = locref_prompt(sd15_checkpoint_name, seed=41)
    bad["3"]["inputs"]["adapter_name"] = "ipadapter/does-not-exist_sd15.safetensors"
    del bad["16"], bad["17"]  # else the host runs the still-valid preview branch alone
    with pytest.raises(PromptRejected) as err:
        queue_prompt(locref_server, bad)
    assert err.value.body["node_errors"]["3"]["errors"][0]["type"] == "value_not_in_list"
    entry = run(locref_server, locref_prompt(sd15_checkpoint_name, seed=41))
    assert entry["status"]["status_str"] == "success"


def regional_prompt(sd15_checkpoint_name: str, seed: int, region_text: float | None = None,
                    prefix: str = "LocRef/regional_test") -> dict:
    """The regional-prompts example, pointed at the test checkpoint (its only file), small."""
    prompt = json.loads(REGIONAL_WORKFLOW.read_text())
    prompt["1"]["inputs"]["ckpt_name"] = sd15_checkpoint_name
    for node in ("2", "6"):
        prompt[node]["inputs"].update(width=SIZE, height=SIZE)
    prompt["7"]["inputs"].update(steps=STEPS, seed=seed)
    prompt["9"]["inputs"]["filename_prefix"] = prefix
    if region_text is not None:
        prompt["3"]["inputs"]["region_text"] = region_text
    return prompt


def test_regional_prompts_workflow_needs_only_the_checkpoint(comfy_server, sd15_checkpoint_name):
    prompt = regional_prompt(sd15_checkpoint_name, seed=51)
    kinds = {node["class_type"] for node in prompt.values()}
    assert not kinds & {"CLIPVisionLoader", "LocRefAdapterLoader", "LoadImage"}, kinds
    entry = run(comfy_server, prompt)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    image = saved(comfy_server, entry, "9")
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0
    layout = saved(comfy_server, entry, "11")  # Preview Image of the layout
    assert layout.shape == (SIZE, SIZE, 3)


def test_region_texts_change_the_image(comfy_server, sd15_checkpoint_name):
    regional = run(comfy_server, regional_prompt(sd15_checkpoint_name, 52, prefix="LocRef/rt_on"))
    off = run(comfy_server, regional_prompt(sd15_checkpoint_name, 52, region_text=0.0,
                                            prefix="LocRef/rt_off"))
    plain = regional_prompt(sd15_checkpoint_name, 52, prefix="LocRef/rt_plain")
    plain["7"]["inputs"]["model"] = ["1", 0]  # KSampler on the checkpoint's model
    for node in ("2", "3", "10", "11"):
        del plain[node]
    plain = run(comfy_server, plain)
    for entry in (regional, off, plain):
        assert entry["status"]["status_str"] == "success", errors_of(entry)
    a, b, c = (saved(comfy_server, e, "9") for e in (regional, off, plain))
    assert not np.array_equal(a, c), "the boxes' texts had no effect on the image"
    assert np.array_equal(b, c), "region_text 0 (no references) must equal the plain model"
