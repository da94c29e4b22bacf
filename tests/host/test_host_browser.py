"""Real-browser test of the box canvas: draw boxes with the mouse in ComfyUI's own front end.

``browser/draw_boxes.mjs`` drives Debian's chromium through npm's ``playwright-core``
against the real server: it draws two boxes, moves one, resizes one, labels both, undoes a
third with Ctrl+Z, queues the prompt as the UI does (with a reference on box 0, whose
thumbnail the canvas must then show), reloads the page and checks the boxes are restored,
changes the width, and queues invalid JSON (refused at POST /prompt: error dialog, canvas keeps
the last valid layout) and then valid JSON again; runs a 1x1 reference (LocRef Reference shows
its warning on itself) and opens the Boxes node's help page in the docs panel. This test
uploads the references and checks, from ``/history``, what the server received and how each
prompt ended.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and ``playwright-core``
(``cd tests/host/browser && npm install``); skipped with a reason otherwise.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import comfy_harness

LOG = logging.getLogger(__name__)
BROWSER_DIR = Path(__file__).resolve().parent / "browser"
CHROMIUM = Path("/usr/bin/chromium")
README_SCREENSHOT = comfy_harness.REPO_ROOT / "web" / "box_canvas.png"
REFERENCE_NAME = "locref_browser_reference.png"
REFERENCE_RGB = (255, 150, 0)  # orange: the script looks for it inside box 0 of the canvas
TINY_NAME = "locref_browser_tiny.png"  # a 1x1 reference: LocRef Reference warns on itself


def _browser_skip_reason() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    if shutil.which("node") is None:
        return "node is not on PATH (the browser script runs on Node.js 20+)"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return f"playwright-core is not installed (cd {BROWSER_DIR} && npm install)"
    return None


def _expected_boxes(result: dict[str, Any]) -> list[tuple[float, float, float, float]]:
    """The two boxes the gestures should produce, normalised, from screen coordinates."""
    rect = result["rect"]

    def norm(point: dict[str, float]) -> tuple[float, float]:
        return ((point["x"] - rect["left"]) / rect["width"],
                (point["y"] - rect["top"]) / rect["height"])

    g = {name: [norm(p) for p in pair] for name, pair in result["gestures"].items()}
    (ax0, ay0), (ax1, ay1) = g["drawA"]
    (mx0, my0), (mx1, my1) = g["moveA"]
    dx, dy = mx1 - mx0, my1 - my0
    box_a = (ax0 + dx, ay0 + dy, ax1 + dx, ay1 + dy)
    (bx0, by0), _ = g["drawB"]
    _, (rx, ry) = g["resizeB"]  # B's bottom-right corner dragged to (rx, ry)
    box_b = (bx0, by0, rx, ry)
    return [box_a, box_b]


def _received_boxes_json(entry: dict[str, Any], node_id: int) -> str:
    prompt = entry["prompt"][2]  # [number, prompt id, prompt, extra data, outputs]
    node = prompt[str(node_id)]
    assert node["class_type"] == "LocRefBoxes"
    return node["inputs"]["boxes_json"]


def _upload_reference(server: comfy_harness.ComfyServer) -> str:
    """An orange disc on a blue gradient, 96x64 (its centre is orange), into input/."""
    from PIL import Image, ImageDraw  # noqa: PLC0415 - the host environment's Pillow

    image = Image.new("RGB", (96, 64))
    draw = ImageDraw.Draw(image)
    for y in range(64):
        draw.line([(0, y), (95, y)], fill=(40 + y, 90 + y, 160 + y))
    draw.ellipse([24, 8, 72, 56], fill=REFERENCE_RGB)
    return comfy_harness.upload_image(server, image, REFERENCE_NAME)


def test_draw_boxes_in_the_real_front_end(comfy_server: comfy_harness.ComfyServer,
                                          tmp_path: Path) -> None:
    reason = _browser_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    reference = _upload_reference(comfy_server)
    from PIL import Image  # noqa: PLC0415 - the host environment's Pillow

    tiny = comfy_harness.upload_image(comfy_server, Image.new("RGB", (1, 1), (9, 9, 9)), TINY_NAME)
    start = time.monotonic()
    proc = subprocess.run(  # noqa: S603 - our own script
        ["node", "draw_boxes.mjs", comfy_server.url, str(tmp_path), reference, tiny],
        cwd=BROWSER_DIR,
        capture_output=True, text=True, timeout=420, check=False)
    LOG.info("browser script: %.1f s\n%s", time.monotonic() - start, proc.stdout)
    assert proc.returncode == 0, (
        f"draw_boxes.mjs exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
        f"--- stderr ---\n{proc.stderr}\n--- server log tail ---\n"
        + "\n".join(comfy_server.log_text().splitlines()[-40:]))
    result = json.loads((tmp_path / "result.json").read_text())

    entry = comfy_harness.wait_for_history(comfy_server, result["prompt_id"], timeout=60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    received = _received_boxes_json(entry, result["node_id"])
    assert received == result["boxes_json"]
    data = json.loads(received)
    assert data["version"] == 1 and (data["width"], data["height"]) == (512, 384)
    assert [b["label"] for b in data["boxes"]] == ["a red car", "a blue bird"]
    rect = result["rect"]
    for got, want in zip(data["boxes"], _expected_boxes(result), strict=True):
        edges = (got["x0"], got["y0"], got["x1"], got["y1"])
        scale = (rect["width"], rect["height"]) * 2
        off_px = [abs(g - w) * s for g, w, s in zip(edges, want, scale, strict=True)]
        assert max(off_px) <= 1.0, f"box {edges} vs expected {want}: off by {off_px} px"
    assert result["restored"] == received, "the reloaded page lost the boxes"
    # The Layout Preview sent one thumbnail record for box 0 (the reference) and none for box 1.
    thumbs = [out["locref_thumbs"] for out in entry["outputs"].values() if "locref_thumbs" in out]
    assert len(thumbs) == 1 and thumbs[0][1] is None, thumbs
    assert thumbs[0][0]["subfolder"] == "locref" and thumbs[0][0]["type"] == "temp"
    assert thumbs[0][0]["filename"] in result["thumbnail"]["thumbs"][0]["src"]

    # Invalid JSON: refused at POST /prompt by LocRef Boxes' VALIDATE_INPUTS (no run, no
    # history entry); the front end's error dialog showed the Python message.
    assert result["refused"] is True
    assert "boxes_json is not valid JSON" in result["dialog_text"]
    assert "LocRefBoxes" in result["dialog_text"]
    fixed = comfy_harness.wait_for_history(comfy_server, result["fixed_prompt_id"], timeout=60)
    assert fixed["status"]["status_str"] == "success", fixed["status"]
    assert _received_boxes_json(fixed, result["node_id"]) == received
    LOG.info("canvas aspect %.3f at 512x384, %.3f at 1024x384", result["width"]["aspect_512"],
             result["width"]["aspect_1024"])
    # The 1x1 reference: LocRef Reference ran and showed its warning on itself.
    warned = comfy_harness.wait_for_history(comfy_server, result["warning"]["prompt_id"], 60)
    assert warned["status"]["status_str"] == "success", warned["status"]
    assert "LocRef Reference: the reference is 1x1; it is upscaled" in result["warning"]["text"]
    # The docs panel showed web/docs/LocRefBoxes.md (its inputs and README line).
    page = (comfy_harness.REPO_ROOT / "web" / "docs" / "LocRefBoxes.md").read_text()
    assert "The pack's README, section" in page and "The pack's README, section" in result[
        "help"]["text"]
    assert "Malformed" in result["help"]["text"] and "boxes_json" in result["help"]["text"]
    assert not result["our_errors"], f"errors in the pack's front-end code: {result['our_errors']}"
    if result["page_errors"]:  # the host front end's own start-up errors: only logged
        LOG.warning("page errors outside the pack: %s", result["page_errors"])

    shot = tmp_path / "box_canvas.png"
    assert shot.stat().st_size > 1000
    shutil.copyfile(shot, README_SCREENSHOT)  # the README's picture of the canvas
