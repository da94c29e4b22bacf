"""Layout, Box, Reference and find_box: which box a node means, and the errors a user sees
when a label or index does not name one (LocRef Add Reference and the region node show them)."""

import pytest
import torch

from locref_core.layout import Box, Layout, Reference, find_box

LAYOUT = Layout(512, 512, (Box(0.0, 0.0, 0.5, 0.5, "a red car"),
                           Box(0.5, 0.5, 1.0, 1.0, "Dog"),
                           Box(0.2, 0.6, 0.4, 0.9, "")))


def test_a_label_names_its_box_whatever_its_case_and_wins_over_the_index():
    assert find_box(LAYOUT, 0, "dog") == 1
    assert find_box(LAYOUT, 2, "  A RED CAR ") == 0
    assert find_box(LAYOUT, 2) == 2
    assert find_box(LAYOUT, 2, "   ") == 2  # a blank label falls back to the index


def test_an_unknown_label_lists_the_labels_there_are():
    with pytest.raises(ValueError) as err:
        find_box(LAYOUT, 0, "cat")
    message = str(err.value)
    assert "no box is labelled 'cat'" in message
    assert "'a red car', 'Dog', ''" in message and "choose the box by index" in message
    with pytest.raises(ValueError, match="the layout's labels are: none"):
        find_box(Layout(512, 512), 0, "cat")


def test_a_label_two_boxes_share_is_refused_with_their_indices():
    twice = Layout(512, 512, LAYOUT.boxes + (Box(0.6, 0.0, 0.9, 0.3, "dog"),))
    with pytest.raises(ValueError, match=r"2 boxes are labelled 'dog' \(indices \[1, 3\]\)"):
        find_box(twice, 0, "dog")
    assert find_box(twice, 3) == 3  # by index they are still apart


@pytest.mark.parametrize("index", [3, -1, 100])
def test_an_index_out_of_range_says_the_range(index):
    with pytest.raises(ValueError, match=rf"box index {index} is out of range: the layout has 3 "
                                         r"boxes \(indices 0\.\.2\)"):
        find_box(LAYOUT, index)


def test_an_empty_layout_asks_for_a_box_first():
    with pytest.raises(ValueError, match="the layout has no boxes; draw or add a box"):
        find_box(Layout(512, 512), 0)


def test_with_reference_returns_a_new_layout_and_leaves_the_old_one():
    ref = Reference(torch.rand(3, 8, 8), torch.ones(8, 8))
    new = LAYOUT.with_reference(1, ref)
    assert new.boxes[1].reference is ref and LAYOUT.boxes[1].reference is None
    assert new.boxes[0] == LAYOUT.boxes[0] and new.boxes[1].label == "Dog"
    with pytest.raises(IndexError):
        LAYOUT.with_reference(3, ref)
    resized = LAYOUT.with_canvas(768, 384)
    assert (resized.width, resized.height, resized.boxes) == (768, 384, LAYOUT.boxes)


@pytest.mark.parametrize("image, mask, needle", [
    (torch.rand(8, 8, 3), None, r"must be a \(3, H, W\) tensor, got \(8, 8, 3\)"),
    ([[0.0]], None, r"must be a \(3, H, W\) tensor, got list"),
    (torch.rand(3, 0, 8), None, r"reference image is empty: shape \(3, 0, 8\)"),
    (torch.rand(3, 8, 8), torch.ones(1, 8, 8), r"reference mask must be an \(H, W\) tensor"),
])
def test_a_reference_that_is_not_an_image_names_its_shape(image, mask, needle):
    with pytest.raises(ValueError, match=needle):
        Reference(image, mask)


@pytest.mark.parametrize("width", [True, 512.0, "512"])
def test_a_canvas_size_must_be_an_integer(width):
    with pytest.raises(ValueError, match=f"canvas width must be an integer, got {width!r}"):
        Layout(width, 512)


@pytest.mark.parametrize("coords, region, needle", [
    ((0.0, 0.0, float("nan"), 0.5), None, r"box x1=nan must be a finite number in \[0, 1\]"),
    ((0.0, -0.1, 0.5, 0.5), None, r"box y0=-0.1 must be a finite number in \[0, 1\]"),
    ((0.5, 0.0, 0.5, 0.5), None, r"box \(0.5, 0.0, 0.5, 0.5\) has zero or negative area"),
    ((0.0, 0.0, 0.5, 0.5), torch.ones(1, 8, 8), "a box region must be an \\(H, W\\) mask tensor"),
])
def test_a_box_outside_the_canvas_or_without_area_is_refused(coords, region, needle):
    with pytest.raises(ValueError, match=needle):
        Box(*coords, "dog", region=region)


def test_canvas_range_and_box_count_are_bounded():
    with pytest.raises(ValueError, match=r"canvas height=1 is out of range; use \d+..\d+ pixels"):
        Layout(512, 1)
    boxes = [Box(0.0, 0.0, 0.5, 0.5, f"b{i}") for i in range(33)]  # a list: kept as a tuple
    with pytest.raises(ValueError, match="the layout has 33 boxes; at most 32 are supported. "
                                         "Merge or remove boxes."):
        Layout(512, 512, boxes)
    assert isinstance(Layout(512, 512, boxes[:32]).boxes, tuple)
