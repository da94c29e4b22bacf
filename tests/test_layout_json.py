import json
import logging
import math

import pytest

from locref_core.layout import MAX_BOXES, Box, Layout
from locref_core.layout_json import (
    bounding_boxes_to_boxes,
    layout_to_json,
    parse_layout_json,
)


def doc(boxes, **extra):
    return json.dumps({"version": 1, "width": 512, "height": 512, "boxes": boxes, **extra})


def test_round_trip_is_exact():
    layout = Layout(640, 384, (Box(0.1, 0.2, 0.55, 0.9, "a red car"),
                               Box(1 / 3, 0.0, 1.0, 2 / 7, "dog")))
    again = parse_layout_json(layout_to_json(layout), 640, 384)
    assert again == layout
    data = json.loads(layout_to_json(layout))
    assert data["version"] == 1 and data["width"] == 640 and len(data["boxes"]) == 2


def test_empty_text_and_empty_list_give_an_empty_layout():
    assert parse_layout_json("", 512, 768).boxes == ()
    assert parse_layout_json('{"version": 1, "boxes": []}', 512, 768) == Layout(512, 768)


def test_canvas_size_comes_from_the_node_not_the_json():
    layout = parse_layout_json(doc([{"x0": 0, "y0": 0, "x1": 0.5, "y1": 0.5}]), 1024, 768)
    assert (layout.width, layout.height) == (1024, 768)
    assert layout.boxes[0].x1 == 0.5


def test_pixel_units_are_normalised_by_the_json_size():
    text = doc([{"x0": 128, "y0": 0, "x1": 384, "y1": 256, "label": "cat"}], units="pixels")
    box = parse_layout_json(text, 1024, 1024).boxes[0]
    assert (box.x0, box.y0, box.x1, box.y1, box.label) == (0.25, 0.0, 0.75, 0.5, "cat")


def test_per_box_xywh_pixels():
    text = doc([{"x": 256, "y": 128, "width": 128, "height": 256}])
    box = parse_layout_json(text, 512, 512).boxes[0]
    assert (box.x0, box.y0, box.x1, box.y1) == (0.5, 0.25, 0.75, 0.75)


def test_bounding_box_list_converts_with_metadata_labels():
    items = [{"x": 64, "y": 32, "width": 128, "height": 96, "metadata": {"label": "umbrella"}},
             {"x": 0, "y": 0, "width": 256, "height": 512, "metadata": {}}]
    boxes = bounding_boxes_to_boxes(items, 256, 512)
    assert boxes[0] == Box(0.25, 32 / 512, 0.75, 128 / 512, "umbrella")
    assert boxes[1] == Box(0.0, 0.0, 1.0, 1.0, "")
    # The same list is accepted directly as boxes_json, and as a single-image batch.
    assert parse_layout_json(json.dumps(items), 256, 512).boxes == tuple(boxes)
    assert bounding_boxes_to_boxes([items], 256, 512) == boxes


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ('{"version": 2, "boxes": []}', "version 2"),
    ('"a string"', "must be an object"),
    ('{"version": 1, "boxes": {}}', '"boxes" must be a list'),
    ('{"version": 1, "units": "inches", "boxes": []}', "units"),
    ('{"version": 1, "width": 0, "boxes": []}', '"width" must be positive'),
])
def test_document_errors(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_layout_json(text, 512, 512)


@pytest.mark.parametrize("box, needle", [
    ({"x0": "0.1", "y0": 0, "x1": 1, "y1": 1}, "x0 must be a number"),
    ({"x0": 0.1, "y0": 0, "x1": 1}, "missing y1"),
    ({"x0": float("nan"), "y0": 0, "x1": 1, "y1": 1}, "finite"),
    ({"x0": 0, "y0": 0, "x1": float("inf"), "y1": 1}, "finite"),
    ({"x0": 0.6, "y0": 0.1, "x1": 0.2, "y1": 0.5}, "swap or redraw"),
    ({"x0": 0.2, "y0": 0.3, "x1": 0.2, "y1": 0.5}, "zero or negative size"),
    ({"x0": 1.1, "y0": 0.1, "x1": 1.4, "y1": 0.5}, "entirely outside"),
    ({"x0": -0.5, "y0": 0.1, "x1": 0.0, "y1": 0.5}, "entirely outside"),
    ({"x0": 0.1, "y0": 0.1, "x1": 0.5, "y1": 0.5, "label": 7}, "label must be text"),
    ([0.1, 0.1, 0.5, 0.5], r'box 1 must be an object like \{"x0": 0.1.*got \[0.1, 0.1, 0.5, 0.5\]'),
    ({"x": 10, "y": 10, "width": 50}, "missing x0, y0, x1, y1"),
])
def test_box_errors_name_the_box(box, needle):
    text = doc([{"x0": 0, "y0": 0, "x1": 0.5, "y1": 0.5, "label": "ok"}, box])
    with pytest.raises(ValueError, match=needle) as err:
        parse_layout_json(text, 512, 512)
    assert "box 1" in str(err.value)


@pytest.mark.parametrize("items, needle", [
    ("0,0,64,64", r"bounding boxes must be a list of \{x, y, width, height\}, got '0,0,64,64'"),
    (7, r"bounding boxes must be a list .*got 7"),
    ([{"x": 0, "y": 0, "width": 64, "height": 64}, [0, 0, 64, 64]],
     r"bounding box 1 must be an object \{x, y, width, height\}, got \[0, 0, 64, 64\]"),
    ([{"x": 0, "y": 0, "width": 64}], r"box 0 is missing height \(pixels\)"),
])
def test_bounding_box_errors_name_the_box(items, needle):
    """What a BOUNDING_BOX input that is not one gets (the Boxes node shows it)."""
    with pytest.raises(ValueError, match=needle):
        bounding_boxes_to_boxes(items, 512, 512)


def test_one_bounding_box_or_one_images_list_in_a_batch_list_is_read():
    one = {"x": 0, "y": 0, "width": 256, "height": 128}
    assert bounding_boxes_to_boxes(one, 512, 512) == bounding_boxes_to_boxes([[one]], 512, 512)
    box = bounding_boxes_to_boxes(one, 512, 512)[0]
    assert (box.x0, box.y0, box.x1, box.y1) == (0.0, 0.0, 0.5, 0.25)


def test_nan_written_by_python_json_is_rejected():
    text = json.dumps({"version": 1, "boxes": [{"x0": math.nan, "y0": 0, "x1": 1, "y1": 1}]})
    with pytest.raises(ValueError, match="box 0: x0 is nan"):
        parse_layout_json(text, 512, 512)


def test_too_many_boxes():
    boxes = [{"x0": 0, "y0": 0, "x1": 0.5, "y1": 0.5}] * (MAX_BOXES + 1)
    with pytest.raises(ValueError, match=f"at most {MAX_BOXES}"):
        parse_layout_json(doc(boxes), 512, 512)
    assert len(parse_layout_json(doc(boxes[:MAX_BOXES]), 512, 512).boxes) == MAX_BOXES


def test_overhanging_box_is_clipped_with_a_warning(caplog):
    text = doc([{"x0": -0.05, "y0": 0.5, "x1": 0.4, "y1": 1.02, "label": "tree"}])
    with caplog.at_level(logging.WARNING):
        box = parse_layout_json(text, 512, 512).boxes[0]
    assert (box.x0, box.y0, box.x1, box.y1) == (0.0, 0.5, 0.4, 1.0)
    assert "'tree'" in caplog.text and "clipped" in caplog.text


def test_bad_canvas_size_is_rejected():
    with pytest.raises(ValueError, match="height=4"):
        Layout(512, 4)
