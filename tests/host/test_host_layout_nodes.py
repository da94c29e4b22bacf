"""The layout nodes in a real ComfyUI: registration, the example workflow, errors over HTTP."""

from __future__ import annotations

import copy
import json
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from comfy_harness import (
    PACK_DIR_NAME,
    PromptRejected,
    fetch_image,
    get_object_info,
    pack_import_failures,
    queue_prompt,
    upload_image,
    wait_for_history,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
API_WORKFLOW = WORKFLOWS / "api" / "locref_layout_preview.api.json"
UI_WORKFLOW = WORKFLOWS / "locref_layout_preview.json"
SOCKET_TYPES_WITH_WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def pack_node_ids() -> set[str]:
    """Node ids the pack registers, read from its sources without importing it."""
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        text = path.read_text()
        if "NODE_CLASS_MAPPINGS = {" in text:
            block = text.split("NODE_CLASS_MAPPINGS = {", 1)[1].split("}", 1)[0]
            ids |= set(re.findall(r'"(\w+)"\s*:', block))
    return ids


def run_prompt(server, prompt: dict, timeout: float = 120) -> dict:
    return wait_for_history(server, queue_prompt(server, prompt), timeout)


def output_images(server, entry: dict) -> list[Image.Image]:
    images = []
    for node_out in entry.get("outputs", {}).values():
        images += [fetch_image(server, info) for info in node_out.get("images", [])]
    return images


@pytest.fixture(scope="module")
def red_example(comfy_server):
    """Upload a solid red 96x64 picture as the workflow's example.png."""
    upload_image(comfy_server, Image.new("RGB", (96, 64), (255, 0, 0)), "example.png")
    return "example.png"


def test_pack_loads_without_import_failure(comfy_server):
    assert pack_import_failures(comfy_server.log_text()) == []


def test_object_info_lists_every_node_with_tooltips(comfy_server):
    info = get_object_info(comfy_server)
    ids = pack_node_ids()
    assert {"LocRefBoxes", "LocRefReference", "LocRefLayoutPreview", "LocRefAdapterLoader",
            "LocRefApply"} <= ids
    missing = ids - set(info)
    assert not missing, f"not registered: {missing}"
    for node_id in ids:
        node = info[node_id]
        assert node["category"].startswith("LocRef/"), node_id
        assert node["description"], node_id
        assert node["display_name"] and node["display_name"] != node_id
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_example_workflow_draws_boxes_where_the_json_puts_them(comfy_server, red_example):
    prompt = json.loads(API_WORKFLOW.read_text())
    entry = run_prompt(comfy_server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = output_images(comfy_server, entry)
    boxes_doc = json.loads(prompt["2"]["inputs"]["boxes_json"])
    width, height = prompt["2"]["inputs"]["width"], prompt["2"]["inputs"]["height"]
    pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape == (height, width, 3)
    from locref_core.preview import box_colour

    for i, box in enumerate(boxes_doc["boxes"]):
        x0, y0 = round(box["x0"] * width), round(box["y0"] * height)
        x1, y1 = round(box["x1"] * width), round(box["y1"] * height)
        colour = np.array(box_colour(i))
        mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2 + 8
        assert (pixels[y1 - 1, mid_x] == colour).all(), f"box {i}: bottom edge"
        assert (pixels[mid_y, x1 - 1] == colour).all(), f"box {i}: right edge"
        assert (pixels[mid_y, x0] == colour).all(), f"box {i}: left edge"
        assert not (pixels[y1 + 2, mid_x] == colour).all(), f"box {i}: outline leaks below"
        # The red reference fills the middle of its box (aspect kept, centred).
        assert (pixels[(y0 + y1) // 2, mid_x] == [255, 0, 0]).all(), f"box {i}: reference"
    # Outside every box the canvas is neutral grey.
    assert (pixels[4, 4] == [128, 128, 128]).all() and (pixels[-4, -4] == [128, 128, 128]).all()
    red = (pixels == [255, 0, 0]).all(axis=-1)
    inside = np.zeros_like(red)
    for box in boxes_doc["boxes"]:
        inside[round(box["y0"] * height):round(box["y1"] * height),
               round(box["x0"] * width):round(box["x1"] * width)] = True
    assert red.any() and not (red & ~inside).any(), "red reference pixels outside the boxes"


def test_malformed_boxes_json_is_refused_at_queue_time_and_the_server_goes_on(comfy_server,
                                                                            red_example):
    good = json.loads(API_WORKFLOW.read_text())
    bad = copy.deepcopy(good)
    bad["2"]["inputs"]["boxes_json"] = '{"version": 1, "boxes": [{"x0": 0.5, "y0": 0.1, "x1": 0.2'
    with pytest.raises(PromptRejected) as err:
        queue_prompt(comfy_server, bad)
    [problem] = err.value.body["node_errors"]["2"]["errors"]
    assert problem["type"] == "custom_validation_failed"
    assert problem["details"].startswith("boxes_json - boxes_json is not valid JSON")

    inverted = copy.deepcopy(good)
    inverted["2"]["inputs"]["boxes_json"] = json.dumps(
        {"version": 1, "boxes": [{"x0": 0.6, "y0": 0.1, "x1": 0.2, "y1": 0.5, "label": "cat"}]})
    with pytest.raises(PromptRejected) as err:
        queue_prompt(comfy_server, inverted)
    assert "box 0 ('cat') has zero or negative size" in json.dumps(err.value.body)

    good["6"]["inputs"]["filename_prefix"] = "LocRef/after_error"  # a fresh prompt, not cached
    entry = run_prompt(comfy_server, good)
    assert entry["status"]["status_str"] == "success"
    assert len(output_images(comfy_server, entry)) == 1


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to API format with the host's own input order."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        spec = object_info[node["type"]]["input"]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link")}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name, (kind, *opts) in spec.get(section, {}).items():
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
                elif isinstance(kind, list) or kind in SOCKET_TYPES_WITH_WIDGETS:
                    inputs[name] = values.pop(0)
                    opts = opts[0] if opts else {}
                    if opts.get("control_after_generate") or opts.get("image_upload"):
                        values.pop(0)  # the extra widget the editor adds after this one
        assert values == [], f"node {node['id']}: unused widget values {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_ui_workflow_is_the_api_workflow(comfy_server):
    info = get_object_info(comfy_server)
    converted = ui_to_api(json.loads(UI_WORKFLOW.read_text()), info)
    api = json.loads(API_WORKFLOW.read_text())
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                         for k, v in api.items()}


def test_workflows_are_served_as_templates(comfy_server):
    import requests

    listing = requests.get(f"{comfy_server.url}/workflow_templates", timeout=10).json()
    names = listing[PACK_DIR_NAME]
    assert sorted(names) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert not any(name.endswith(".api") for name in names)  # API files live in workflows/api/
    served = requests.get(f"{comfy_server.url}/api/workflow_templates/{PACK_DIR_NAME}/"
                          f"{UI_WORKFLOW.name}", timeout=10)
    assert served.status_code == 200 and served.json() == json.loads(UI_WORKFLOW.read_text())
