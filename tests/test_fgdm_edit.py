"""Map editing operations (exact on synthetic maps), their errors, and the map -> layout bridge."""

import json
import logging

import numpy as np
import pytest

from locref_core.fgdm.edit import (
    OPS_VERSION,
    EditOp,
    apply_operations,
    background_class,
    parse_operations,
)
from locref_core.fgdm.palettes import ADE20K, COCO_STUFF
from locref_core.fgdm.recall import resolve_class
from locref_core.fgdm.to_layout import map_to_layout
from locref_core.layout import Box, Layout

P = COCO_STUFF
PERSON, CAR, DOG, CAT = 1, 3, 18, 17
SKY, GRASS, ROAD, SAND, TREE = 157, 124, 149, 154, 169


def doc(*ops):
    return json.dumps({"version": OPS_VERSION, "operations": list(ops)})


def grass_with_dog(h=40, w=60):
    """Grass with a 6 x 8 dog at rows 10..15, columns 20..27."""
    m = np.full((h, w), GRASS)
    m[10:16, 20:28] = DOG
    return m


def bbox(mask):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1  # y0, y1, x0, x1


# ----------------------------------------------------------------------- move


def test_move_by_fractions_lands_exactly_with_the_same_area():
    m = grass_with_dog()
    out = apply_operations(m, doc({"op": "move", "object": "dog", "dx": 0.25, "dy": 0.5}), P)
    expected = np.full_like(m, GRASS)
    expected[30:36, 35:43] = DOG  # 0.25 * 60 = 15 columns, 0.5 * 40 = 20 rows
    assert np.array_equal(out, expected)
    assert (out == DOG).sum() == (m == DOG).sum() == 48


def test_move_in_pixels_and_back_restores_the_map():
    m = grass_with_dog()
    there = apply_operations(
        m, [{"op": "move", "object": DOG, "dx": -7, "dy": 3, "units": "px"}], P
    )
    assert bbox(there == DOG) == (13, 19, 13, 21)
    back = apply_operations(there, [{"op": "move", "object": "dog", "dx": 7, "dy": -3,
                                     "units": "px"}], P)  # fmt: skip
    assert np.array_equal(back, m)


def test_move_fills_with_the_surrounding_class_and_drops_what_leaves_the_map():
    m = np.full((20, 20), SKY)
    m[10:] = ROAD
    m[4:8, 2:6] = CAR  # surrounded by sky only
    out = apply_operations(m, doc({"op": "move", "object": "car", "dx": 0.75}), P)
    assert np.all(out[4:8, 2:17] == SKY)  # vacated -> sky, not road
    assert np.array_equal(out[10:], m[10:])
    assert (out == CAR).sum() == 4 * 3  # 15 px right: columns 2..5 -> 17..20, 20 is dropped
    assert np.all(out[4:8, 17:20] == CAR)


def test_move_entirely_off_the_map_removes_the_object(caplog):
    m = grass_with_dog()
    with caplog.at_level(logging.WARNING):
        out = apply_operations(m, doc({"op": "move", "object": "dog", "dx": 1.0}), P)
    assert not (out == DOG).any() and "entirely off the map" in caplog.text


# ----------------------------------------------------------------------- move_to_box / resize


def test_move_to_box_stretch_puts_the_bbox_exactly_on_the_box():
    m = np.full((40, 80), GRASS)
    m[5:15, 10:15] = PERSON  # 10 x 5
    m[8, 15] = PERSON  # a 1-pixel arm: the shape is not a rectangle
    box = [0.5, 0.25, 0.75, 1.0]  # columns 40..60, rows 10..40
    out = apply_operations(m, doc({"op": "resize", "object": "person", "box": box,
                                   "keep_aspect": False}), P)  # fmt: skip
    assert bbox(out == PERSON) == (10, 40, 40, 60)
    assert np.all(out[5:15, 10:16] == GRASS)  # the old place is background now
    # A rectangle fills its box completely.
    r = np.full((40, 80), GRASS)
    r[5:15, 10:15] = PERSON
    out = apply_operations(r, doc({"op": "move_to_box", "object": 1, "box": box,
                                   "keep_aspect": False}), P)  # fmt: skip
    assert np.all(out[10:40, 40:60] == PERSON) and (out == PERSON).sum() == 30 * 20


def test_move_to_box_keep_aspect_fits_inside_and_centres():
    m = np.full((40, 80), GRASS)
    m[5:15, 10:15] = PERSON  # 10 high x 5 wide
    out = apply_operations(m, doc({"op": "move_to_box", "object": "person",
                                   "box": [0.5, 0.25, 1.0, 1.0]}), P)  # fmt: skip
    # Box: rows 10..40 (30), columns 40..80 (40). Scale 3: 30 x 15, centred in x.
    y0, y1, x0, x1 = bbox(out == PERSON)
    assert (y0, y1) == (10, 40) and (x1 - x0) == 15
    assert x0 - 40 == 80 - x1 - 1 or x0 - 40 == 80 - x1  # centred (odd slack: extra after)
    assert (x0, x1) == (52, 67) and (out == PERSON).sum() == 450


def test_move_to_box_shrinks_and_takes_boxes_by_index():
    m = np.full((50, 50), GRASS)
    m[0:40, 0:40] = CAR
    boxes = [(0.0, 0.0, 0.1, 0.1), Box(0.6, 0.6, 0.8, 0.9, "small")]
    out = apply_operations(m, doc({"op": "move_to_box", "object": "car", "box": 1,
                                   "keep_aspect": False}), P, boxes=boxes)  # fmt: skip
    assert bbox(out == CAR) == (30, 45, 30, 40) and (out == CAR).sum() == 15 * 10
    assert np.all(out[:30] == GRASS)
    # Shrinking keeps the bounding box's edges even when only one far pixel reaches them.
    s = np.full((30, 30), GRASS)
    s[3:9, 3:9] = CAR
    s[0, 0] = CAR  # a lone pixel: the class's bbox is rows/columns 0..8
    out = apply_operations(s, doc({"op": "resize", "object": "car", "box": [0.5, 0.5, 0.6, 0.6],
                                   "keep_aspect": False}), P)  # fmt: skip
    assert bbox(out == CAR) == (15, 18, 15, 18) and out[15, 15] == CAR


# ----------------------------------------------------------------------- flip


def l_shape_map():
    m = np.full((12, 16), ROAD)
    m[2:9, 3:5] = PERSON  # vertical bar on the left
    m[7:9, 5:9] = PERSON  # foot to the right: the shape is asymmetric
    return m


def test_flip_mirrors_an_asymmetric_shape_in_its_bbox():
    m = l_shape_map()
    out = apply_operations(m, doc({"op": "flip", "object": "person"}), P)
    y0, y1, x0, x1 = bbox(m == PERSON)
    assert bbox(out == PERSON) == (y0, y1, x0, x1)
    assert np.array_equal(out[y0:y1, x0:x1], m[y0:y1, x0:x1][:, ::-1])
    assert not np.array_equal(out, m)
    assert np.all(out[2:7, 3:7] == ROAD)  # where the bar was: background
    assert np.array_equal(out[:, x1:], m[:, x1:]) and np.array_equal(out[:y0], m[:y0])


def test_flip_is_its_own_inverse():
    m = l_shape_map()
    once = apply_operations(m, doc({"op": "flip", "object": "person"}), P)
    twice = apply_operations(once, doc({"op": "flip", "object": "person"}), P)
    assert np.array_equal(twice, m)
    both = apply_operations(m, doc({"op": "flip", "object": "person"},
                                   {"op": "flip", "object": "person"}), P)  # fmt: skip
    assert np.array_equal(both, m)


# ----------------------------------------------------------------------- delete


def test_delete_fills_with_the_most_common_ring_class():
    m = np.full((20, 20), SKY)
    m[10:] = GRASS
    m[9:14, 5:9] = DOG  # ring: sky on row 8 (6 px), grass below and beside (more)
    out = apply_operations(m, doc({"op": "delete", "object": "dog"}), P)
    assert np.all(out[9:14, 5:9] == GRASS) and not (out == DOG).any()
    assert np.all(out[9, 5:9] == GRASS)  # the fill is one class, the ring's most common


def test_delete_with_void_fill_and_void_when_nothing_surrounds():
    m = grass_with_dog()
    out = apply_operations(m, doc({"op": "delete", "object": "dog", "fill": "void"}), P)
    assert np.all(out[10:16, 20:28] == P.void_id)
    whole = np.full((5, 5), DOG)
    assert np.all(apply_operations(whole, doc({"op": "delete", "object": "dog"}), P) == 0)
    ade = np.full((5, 5), 12)
    out = apply_operations(ade, doc({"op": "delete", "object": "person"}), ADE20K)
    assert np.all(out == ADE20K.void_id)


def test_background_ignores_other_instances_of_the_class_and_breaks_ties_low():
    m = np.full((9, 9), SKY)
    m[3:6, 3:6] = DOG
    m[3:6, 6:9] = DOG  # another part of the dog class touching: not background
    m[0:3] = ROAD
    mask = np.zeros_like(m, dtype=bool)
    mask[3:6, 3:6] = True
    assert background_class(m, mask, DOG, P) == SKY
    tie = np.array([[CAR, CAR, DOG], [DOG, DOG, DOG], [ROAD, ROAD, DOG]])
    one = np.zeros((3, 3), dtype=bool)
    one[1, 1] = True  # ring: 2 car, 2 road, 4 dog (ignored) -> lower id (car) wins
    assert background_class(tie, one, DOG, P) == CAR


# ----------------------------------------------------------------------- paste and recolor


def test_paste_puts_the_source_object_in_the_box():
    target = np.full((40, 40), GRASS)
    source = np.full((20, 30), SKY)
    source[2:6, 3:11] = CAT  # 4 x 8
    source[10:12, 20:22] = CAT  # a smaller second cat
    out = apply_operations(target, doc({"op": "paste", "object": "cat", "instance": 1,
                                        "box": [0.5, 0.5, 1.0, 1.0]}), P,
                           source_maps=[source])  # fmt: skip
    # Box: rows/columns 20..40 (20 x 20); scale 2.5 -> 10 x 20, centred vertically.
    assert bbox(out == CAT) == (25, 35, 20, 40) and (out == CAT).sum() == 200
    assert np.all(out[out != CAT] == GRASS)  # nothing else changes
    stretched = apply_operations(target, doc({"op": "paste", "source": 1, "object": CAT,
                                              "box": 0, "keep_aspect": False}), P,
                                 boxes=[(0.0, 0.0, 0.25, 0.5)],
                                 source_maps=[target, source])  # fmt: skip
    assert bbox(stretched == CAT) == (0, 20, 0, 10)  # union of both cats, stretched


def test_recolor_whole_class_and_one_instance():
    m = np.full((10, 20), GRASS)
    m[1:3, 1:3] = DOG  # small dog: instance 2
    m[5:9, 10:16] = DOG  # big dog: instance 1
    out = apply_operations(m, doc({"op": "recolor", "object": "dog", "to": "cat"}), P)
    assert np.array_equal(out == CAT, m == DOG)
    out = apply_operations(m, doc({"op": "recolor", "object": "dog", "instance": 2, "to": 17}), P)
    assert np.all(out[1:3, 1:3] == CAT) and np.all(out[5:9, 10:16] == DOG)
    assert (out != m).sum() == 4


def test_instance_selection_only_touches_that_instance():
    m = np.full((20, 30), SAND)
    m[2:8, 2:10] = DOG  # 48 px: instance 1
    m[12:15, 20:23] = DOG  # 9 px: instance 2
    out = apply_operations(m, doc({"op": "move", "object": "dog", "instance": 2, "dx": -5,
                                   "units": "px"}), P)  # fmt: skip
    assert np.array_equal(out[:, :12], m[:, :12])
    assert np.all(out[12:15, 15:18] == DOG) and np.all(out[12:15, 20:23] == SAND)
    out = apply_operations(m, doc({"op": "delete", "object": "dog", "instance": 1}), P)
    assert np.all(out[2:8, 2:10] == SAND) and np.all(out[12:15, 20:23] == DOG)


def test_input_is_never_mutated_and_operations_chain():
    m = grass_with_dog()
    before = m.copy()
    ops = doc({"op": "move", "object": "dog", "dx": 0.1}, {"op": "recolor", "object": "dog",
                                                          "to": "cat"})  # fmt: skip
    out = apply_operations(m, ops, P)
    assert np.array_equal(m, before) and out is not m
    assert (out == CAT).sum() == 48 and np.all(out[10:16, 26:34] == CAT)
    assert np.array_equal(apply_operations(m, "", P), m)
    assert np.array_equal(apply_operations(m, [], P), m)


# ----------------------------------------------------------------------- parsing


def test_parse_accepts_documents_lists_text_and_aliases():
    listed = [
        {"op": "Resize", "object": "a man", "box": 2},
        {"op": "recolor", "object": 124, "to": "sand"},
    ]
    spec = {"version": 1, "operations": listed}
    ops = parse_operations(spec, P)
    assert ops == (EditOp("move_to_box", PERSON, box=2), EditOp("recolor", GRASS, to=SAND))
    assert parse_operations(json.dumps(spec), P) == ops
    assert parse_operations(spec["operations"], P) == ops
    assert parse_operations({"operations": []}, P) == ()
    m = np.full((4, 4), GRASS)
    assert np.all(apply_operations(m, [ops[1]], P) == SAND)
    assert np.all(apply_operations(m, ops[1], P) == SAND)


@pytest.mark.parametrize(
    "spec, message",
    [("{not json", r"not valid JSON .*line 1, column 2.*\"version\": 1"),
     ({"version": 2, "operations": []}, r"version 2; this pack reads version 1"),
     ({"version": 1}, r'no "operations" list'),
     ({"version": 1, "ops": []}, r"unknown keys \['ops'\]"),
     (42, "must be a list"),
     ([{"op": "move", "object": "dog", "dx": 0.1}, "flip"],
      r"operation 2: expected an object like"),
     ([{"op": "rotate", "object": "dog"}], r"operation 1 \(rotate\): unknown op 'rotate'; use one"),
     ([{"object": "dog"}], r'operation 1: no "op"; use one of "move"'),
     ([{"op": "flip", "object": "dgo"}], r"operation 1 \(flip\): unknown object 'dgo'.*'dog'"),
     ([{"op": "flip"}], r'operation 1 \(flip\): give "object"'),
     ([{"op": "flip", "object": "dog", "dx": 1}], r"unknown keys \['dx'\]; flip takes"),
     ([{"op": "move", "object": "dog"}], r'operation 1 \(move\): give "dx" and/or "dy"'),
     ([{"op": "move", "object": "dog", "dx": "left"}], r'"dx" must be a finite number'),
     ([{"op": "move", "object": "dog", "dx": 1, "units": "cm"}], r'"units" is \'cm\''),
     ([{"op": "flip", "object": "dog", "instance": 0}], r'"instance" must be an integer >= 1'),
     ([{"op": "move_to_box", "object": "dog"}], r'give "box"'),
     ([{"op": "move_to_box", "object": "dog", "box": [0, 0, 1.5, 1]}], r"leaves \[0, 1\]"),
     ([{"op": "move_to_box", "object": "dog", "box": [0.6, 0, 0.2, 1]}], r"inverted or empty"),
     ([{"op": "move_to_box", "object": "dog", "box": [0, 0, 1]}], r"4 finite numbers"),
     ([{"op": "move_to_box", "object": "dog", "box": -1}], r'"box" must be an integer >= 0'),
     ([{"op": "move_to_box", "object": "dog", "box": [0, 0, 1, 1], "keep_aspect": "yes"}],
      r'"keep_aspect" must be true or false'),
     ([{"op": "delete", "object": "dog", "fill": "grass"}], r'"fill" is \'grass\''),
     ([{"op": "paste", "object": "dog", "box": 0, "source": -2}], r'"source" must be an integer'),
     ([{"op": "recolor", "object": "dog"}], r'give "to"'),
     ([{"op": "recolor", "object": "dog", "to": "dgo"}], r"unknown target class 'dgo'"),
     ([{"op": "recolor", "object": 999, "to": 1}], r"object id 999 is not in palette"),
     ([{"op": "flip", "object": ["dog"]}],
      r"operation 1 \(flip\): object must be a class name or a palette id, got \['dog'\]"),
     ([{"op": "flip", "object": True}], r"object must be a class name or a palette id, got True"),
     ([{"op": "recolor", "object": "dog", "to": None}],
      r"target class must be a class name or a palette id, got None"),
     ([{"op": "move_to_box", "object": "dog", "box": "left half"}],
      r'"box" must be \[x0, y0, x1, y1\] in \[0, 1\] or a box index, got \'left half\''),
     ([{"op": "move_to_box", "object": "dog", "box": {"x0": 0}}],
      r'"box" must be \[x0, y0, x1, y1\] in \[0, 1\] or a box index')],
)  # fmt: skip
def test_parse_errors_name_the_operation_and_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_operations(spec, P)


def test_integral_floats_are_ids_and_counts_as_json_writers_make_them():
    """1.0 from a JSON writer that makes every number a float reads as 1; 1.5 does not."""
    ops = parse_operations([{"op": "flip", "object": 18.0, "instance": 1.0},
                            {"op": "recolor", "object": "dog", "to": 17.0}], P)
    assert (ops[0].class_id, ops[0].instance, ops[1].to) == (18, 1, 17)
    with pytest.raises(ValueError, match=r'"instance" must be an integer >= 1, got 1.5'):
        parse_operations([{"op": "flip", "object": "dog", "instance": 1.5}], P)


def test_apply_errors_name_the_operation_and_the_fix():
    m = grass_with_dog()
    cases = [
        (
            {"op": "flip", "object": "cat"},
            r"operation 2 \(flip\): there is no 'cat' \(id 17\) in the map; it has grass, dog",
        ),
        (
            {"op": "flip", "object": "dog", "instance": 3},
            r"instance 3 of 'dog' \(id 18\) does not exist: the map has 1 instance",
        ),
        (
            {"op": "move_to_box", "object": "dog", "box": 4},
            r"operation 2 \(move_to_box\): box index 4 is out of range: 1 box",
        ),
        (
            {"op": "paste", "object": "dog", "box": 0, "source": 1},
            r"source map 1 does not exist: 1 source map",
        ),
        ({"op": "paste", "object": "cat", "box": 0}, r"there is no 'cat' .* in source map 0"),
    ]
    for op, message in cases:
        ops = [{"op": "recolor", "object": "grass", "to": "grass"}, op]
        with pytest.raises(ValueError, match=message):
            apply_operations(m, ops, P, boxes=[(0, 0, 0.5, 0.5)], source_maps=[m])
    with pytest.raises(ValueError, match=r"boxes\[0\] .* inverted"):
        apply_operations(m, [], P, boxes=[(0.5, 0, 0.5, 1)])
    with pytest.raises(ValueError, match="none was given"):
        apply_operations(m, [{"op": "paste", "object": "dog", "box": [0, 0, 1, 1]}], P)


# ----------------------------------------------------------------------- map -> layout


def street():
    """100 x 200: sky over road; a car, two people and a dog (tiny)."""
    m = np.full((100, 200), SKY)
    m[50:] = ROAD
    m[60:80, 100:160] = CAR  # 1200 px, box 20 x 60
    m[40:90, 20:40] = PERSON  # 1000 px
    m[45:70, 60:70] = PERSON  # 250 px
    m[95:97, 0:3] = DOG  # 6 px: below 0.5 %
    return m


def test_map_to_layout_boxes_are_pixel_exact_and_big_boxes_behind():
    layout = map_to_layout(street(), P, width=512, height=256)
    assert isinstance(layout, Layout) and (layout.width, layout.height) == (512, 256)
    assert layout.labels == ["sky", "road", "car", "person", "person"]
    sky, road, car, big, small = layout.boxes
    # Pixel-exact: x1 = (last column + 1) / W. Sky is cut by the person at rows 40..49.
    assert (sky.x0, sky.y0, sky.x1, sky.y1) == (0.0, 0.0, 1.0, 0.5)
    assert (road.x0, road.y0, road.x1, road.y1) == (0.0, 0.5, 1.0, 1.0)
    assert (car.x0, car.y0, car.x1, car.y1) == (0.5, 0.6, 0.8, 0.8)
    assert (big.x0, big.y0, big.x1, big.y1) == (0.1, 0.4, 0.2, 0.9)
    assert (small.x0, small.y0, small.x1, small.y1) == (0.3, 0.45, 0.35, 0.7)
    assert all(resolve_class(P, b.label) == c for b, c in zip(layout.boxes, [SKY, ROAD, CAR, 1, 1]))


def test_map_to_layout_orders_by_box_area_not_pixels():
    m = np.full((100, 100), GRASS)
    m[10:12, 0:100] = TREE  # thin: 200 px, box 2 x 100 = 200
    m[30:90, 30:31] = DOG  # 60 px, box 60 x 1
    for i in range(30, 90):
        m[i, 30 + (i - 30)] = CAT  # a 1-px diagonal: 60 px, box 60 x 60 = 3600
    layout = map_to_layout(m, P, width=256, height=256, min_area=0.0, objects=["tree", "cat", 18])
    assert layout.labels == ["cat", "tree", "dog"]


def test_map_to_layout_per_class_objects_min_area_and_max_boxes(caplog):
    m = street()
    union = map_to_layout(m, P, width=256, height=256, per_instance=False, objects=[PERSON])
    assert len(union.boxes) == 1 and union.labels == ["person"]
    b = union.boxes[0]
    assert (b.x0, b.y0, b.x1, b.y1) == (0.1, 0.4, 0.35, 0.9)
    tiny = map_to_layout(m, P, width=256, height=256, min_area=0.0)
    assert "dog" in tiny.labels and len(tiny.boxes) == 6
    assert "dog" not in map_to_layout(m, P, width=256, height=256).labels
    with caplog.at_level(logging.WARNING):
        two = map_to_layout(m, P, width=256, height=256, max_boxes=2)
    assert two.labels == ["sky", "road"] and "keeping the 2 largest" in caplog.text
    three = map_to_layout(m, P, width=256, height=256, max_boxes=3)
    assert three.labels == ["sky", "road", "car"]  # car 1200 px beats person 1000 px


def test_map_to_layout_excludes_void_and_validates():
    m = np.zeros((64, 64), dtype=np.int64)  # all void
    m[0:32, 0:32] = CAR
    layout = map_to_layout(m, P, width=64, height=64)
    assert layout.labels == ["car"]
    assert map_to_layout(m, P, width=64, height=64, objects=[0]).boxes == ()
    with pytest.raises(ValueError, match="min_area is a fraction"):
        map_to_layout(m, P, width=64, height=64, min_area=2.0)
    with pytest.raises(ValueError, match="max_boxes must be in 1..32"):
        map_to_layout(m, P, width=64, height=64, max_boxes=0)
    for not_int in (True, 2.0):
        with pytest.raises(ValueError, match=f"max_boxes must be an integer in 1..32, got "
                                             f"{not_int!r}"):
            map_to_layout(m, P, width=64, height=64, max_boxes=not_int)
    with pytest.raises(ValueError, match="unknown object 'cra'"):
        map_to_layout(m, P, width=64, height=64, objects=["cra"])
    with pytest.raises(ValueError, match="canvas width=10"):
        map_to_layout(m, P, width=10, height=64)


def test_missing_skip_goes_on_past_absent_objects_but_not_absent_sources(caplog):
    m = grass_with_dog()
    ops = [{"op": "flip", "object": "cat"}, {"op": "delete", "object": "dog", "instance": 2},
           {"op": "recolor", "object": "dog", "to": "cat"}]
    with caplog.at_level("WARNING"):
        out = apply_operations(m, ops, P, missing="skip")
    assert "operation 1 (flip) skipped" in caplog.text and "operation 2 (delete)" in caplog.text
    assert np.array_equal(out == P.names.index("cat"), m == P.names.index("dog"))
    with pytest.raises(ValueError, match="in source map 0"):
        apply_operations(m, [{"op": "paste", "object": "cat", "box": [0, 0, 1, 1]}], P,
                         source_maps=[m], missing="skip")
    with pytest.raises(ValueError, match="missing='ignore'"):
        apply_operations(m, [], P, missing="ignore")


def test_an_edit_of_an_unknown_kind_names_the_kinds():
    with pytest.raises(ValueError, match="edit kind 'teleport' is unknown; use one of "):
        EditOp("teleport", PERSON)
