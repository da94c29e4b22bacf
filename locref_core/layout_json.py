"""Layout JSON in and out, with validation errors that say how to fix the input.

Version 1, as the box widget writes it (coordinates normalised to [0, 1]):

    {"version": 1, "width": 512, "height": 512,
     "boxes": [{"x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.9, "label": "a red car"}]}

Also read: `"units": "pixels"` (x0..y1 in pixels of the JSON's width/height), per-box
`{"x", "y", "width", "height"}` in pixels, and ComfyUI's `BOUNDING_BOX` list
`[{"x", "y", "width", "height", "metadata": {...}}]` in pixels of the canvas.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .layout import MAX_BOXES, Box, Layout

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
LABEL_KEYS = ("label", "text", "prompt", "name", "class")
EMPTY_LAYOUT_JSON = '{"version": 1, "boxes": []}'


def parse_layout_json(text: str, width: int, height: int, warn: bool = True) -> Layout:
    """Parse box JSON (version 1 or a BOUNDING_BOX list) into a layout on a width x height canvas.
    warn=False: boxes that overhang the canvas are clipped without a warning (a dry run)."""
    if text is None or not str(text).strip():
        return Layout(width, height, ())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"boxes_json is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}). "
            f'Redraw the boxes, or fix the text; an empty layout is {EMPTY_LAYOUT_JSON}'
        ) from None
    return layout_from_data(data, width, height, warn)


def layout_from_data(data: Any, width: int, height: int, warn: bool = True) -> Layout:
    """Build a layout from already-decoded JSON data (dict of version 1, or a box list)."""
    if isinstance(data, list):
        return Layout(width, height, tuple(bounding_boxes_to_boxes(data, width, height, warn)))
    if not isinstance(data, Mapping):
        raise ValueError(
            f"boxes_json must be an object like {EMPTY_LAYOUT_JSON} or a list of boxes, "
            f"got {type(data).__name__}"
        )
    version = data.get("version", LAYOUT_VERSION)
    if version != LAYOUT_VERSION:
        raise ValueError(
            f"boxes_json has version {version!r}; this version of the pack reads version "
            f"{LAYOUT_VERSION}. Update the pack, or redraw the boxes."
        )
    units = data.get("units", "normalized")
    if units not in ("normalized", "normalised", "pixels"):
        raise ValueError(f'boxes_json "units" is {units!r}; use "normalized" or "pixels"')
    ref_w = _positive_number(data.get("width", width), "width")
    ref_h = _positive_number(data.get("height", height), "height")
    raw_boxes = data.get("boxes", [])
    if not isinstance(raw_boxes, list):
        raise ValueError(f'boxes_json "boxes" must be a list, got {type(raw_boxes).__name__}')
    _check_count(raw_boxes)
    boxes = []
    for i, raw in enumerate(raw_boxes):
        edges = _box_edges(raw, i, units == "pixels", ref_w, ref_h)
        boxes.append(_make_box(edges, _label_of(raw, i), i, warn))
    return Layout(width, height, tuple(boxes))


def bounding_boxes_to_boxes(items: Any, width: int, height: int, warn: bool = True) -> list[Box]:
    """ComfyUI `BOUNDING_BOX` items (pixels of the canvas) to normalised boxes."""
    if isinstance(items, Mapping):
        items = [items]
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ValueError(f"bounding boxes must be a list of {{x, y, width, height}}, got {items!r}")
    if len(items) == 1 and isinstance(items[0], list):  # one image's list inside a batch list
        items = items[0]
    _check_count(items)
    boxes = []
    for i, raw in enumerate(items):
        if not isinstance(raw, Mapping):
            raise ValueError(f"bounding box {i} must be an object {{x, y, width, height}}, "
                             f"got {raw!r}")
        edges = _xywh_edges(raw, i, width, height)
        boxes.append(_make_box(edges, _label_of(raw, i), i, warn))
    return boxes


def layout_to_json(layout: Layout) -> str:
    """Version-1 JSON of the layout's geometry and labels (reference images are not stored)."""
    return json.dumps(layout_to_data(layout))


def layout_to_data(layout: Layout) -> dict[str, Any]:
    return {
        "version": LAYOUT_VERSION,
        "width": layout.width,
        "height": layout.height,
        "boxes": [
            {"x0": b.x0, "y0": b.y0, "x1": b.x1, "y1": b.y1, "label": b.label} for b in layout.boxes
        ],
    }


def _check_count(raw_boxes: Sequence[Any]) -> None:
    if len(raw_boxes) > MAX_BOXES:
        raise ValueError(
            f"the layout has {len(raw_boxes)} boxes; at most {MAX_BOXES} are supported. "
            "Merge or remove boxes."
        )


def _positive_number(value: Any, name: str) -> float:
    number = _finite(value, f'boxes_json "{name}"')
    if number <= 0:
        raise ValueError(f'boxes_json "{name}" must be positive, got {value!r}')
    return number


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}; coordinates must be finite numbers")
    return float(value)


def _box_name(i: int, raw: Any) -> str:
    label = raw.get("label") if isinstance(raw, Mapping) else None
    return f"box {i} ({label!r})" if label else f"box {i}"


def _box_edges(raw: Any, i: int, pixels: bool, ref_w: float, ref_h: float) -> tuple:
    """(x0, y0, x1, y1) normalised by the JSON's own width/height when in pixels."""
    if not isinstance(raw, Mapping):
        raise ValueError(f'box {i} must be an object like {{"x0": 0.1, "y0": 0.1, "x1": 0.5, '
                         f'"y1": 0.5, "label": "a cat"}}, got {raw!r}')
    if all(k in raw for k in ("x", "y", "width", "height")) and "x0" not in raw:
        return _xywh_edges(raw, i, ref_w, ref_h)
    missing = [k for k in ("x0", "y0", "x1", "y1") if k not in raw]
    if missing:
        raise ValueError(f"{_box_name(i, raw)} is missing {', '.join(missing)}; each box needs "
                         "x0, y0, x1, y1 (or x, y, width, height in pixels)")
    name = _box_name(i, raw)
    x0, y0, x1, y1 = (_finite(raw[k], f"{name}: {k}") for k in ("x0", "y0", "x1", "y1"))
    if pixels:
        x0, x1, y0, y1 = x0 / ref_w, x1 / ref_w, y0 / ref_h, y1 / ref_h
    return x0, y0, x1, y1


def _xywh_edges(raw: Mapping, i: int, ref_w: float, ref_h: float) -> tuple:
    name = _box_name(i, raw)
    missing = [k for k in ("x", "y", "width", "height") if k not in raw]
    if missing:
        raise ValueError(f"{name} is missing {', '.join(missing)} (pixels)")
    x, y, w, h = (_finite(raw[k], f"{name}: {k}") for k in ("x", "y", "width", "height"))
    return x / ref_w, y / ref_h, (x + w) / ref_w, (y + h) / ref_h


def _label_of(raw: Any, i: int) -> str:
    if not isinstance(raw, Mapping):
        return ""
    sources = [raw, raw.get("metadata") if isinstance(raw.get("metadata"), Mapping) else {}]
    for source in sources:
        for key in LABEL_KEYS:
            value = source.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"box {i}: {key} must be text, got {value!r}")
            return value
    return ""


def _make_box(edges: tuple, label: str, i: int, warn: bool = True) -> Box:
    """Validate normalised edges; clip a box that overhangs the canvas, with a warning."""
    x0, y0, x1, y1 = edges
    name = f"box {i} ({label!r})" if label else f"box {i}"
    if x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"{name} has zero or negative size: x0={x0:.4g}, x1={x1:.4g}, y0={y0:.4g}, "
            f"y1={y1:.4g}. x1 must be greater than x0 and y1 greater than y0; swap or redraw it."
        )
    if x1 <= 0 or y1 <= 0 or x0 >= 1 or y0 >= 1:
        raise ValueError(
            f"{name} lies entirely outside the canvas (x {x0:.4g}..{x1:.4g}, y {y0:.4g}..{y1:.4g} "
            "in canvas units 0..1). Move it onto the canvas or delete it."
        )
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)
    if warn and (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        log.warning("LocRef: %s overhangs the canvas and was clipped to (%.4f, %.4f, %.4f, %.4f)",
                    name, cx0, cy0, cx1, cy1)
    return Box(cx0, cy0, cx1, cy1, label)
