"""The shapes-world detector and appearance metric on hand-drawn and generated shapes images.

Shapes are painted as `data.synthetic` paints them: a polygon inscribed in the box (x, y, s, s)
(an apex-up triangle, a 24-gon disc) rasterised by `coco.polygon_mask`, in a world colour on a
world background. "Degraded" = a 3x3 binomial blur, then Gaussian noise of std 0.05, clamped.
"""

import json
import math
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from locref_core.data.coco import polygon_mask
from locref_core.data.synthetic import BACKGROUNDS, COLOURS, make_synthetic_coco
from locref_core.eval.boxes import box_ap
from locref_core.eval.shapes import (
    SHAPES,
    Detection,
    appearance_scores,
    classify_patch,
    detect_file,
    detect_shapes,
    label_components,
    reference_identity,
    summarise,
    to_image_boxes,
)

LIGHT, DARK, BEIGE, SAGE = BACKGROUNDS


def polygon(shape, x, y, s):
    if shape == "square":
        return [x, y, x + s, y, x + s, y + s, x, y + s]
    if shape == "triangle":
        return [x, y + s, x + s, y + s, x + s / 2, y]
    angles = 2 * math.pi * np.arange(24) / 24
    return np.stack([x + s / 2 + s / 2 * np.cos(angles), y + s / 2 + s / 2 * np.sin(angles)],
                    1).reshape(-1).tolist()


def draw(items, size=64, background=LIGHT):
    """uint8 (size, size, 3) image with (shape, colour, x, y, s) items painted in order."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = background
    for shape, colour, x, y, s in items:
        image[polygon_mask([polygon(shape, x, y, s)], size, size)] = COLOURS[colour]
    return image


def degrade(image, std=0.05, seed=0):
    """Blur (3x3 binomial) then noise: a float (3, H, W) tensor in [0, 1]."""
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255  # (1, 3, H, W)
    k = torch.tensor([0.25, 0.5, 0.25])
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    t = F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)[0]
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    return (t + std * noise).clamp(0, 1)


def dataset_boxes(tmp_path, n_images=24, size=64, seed=0):
    """Images of a synthetic COCO set, and ground truth in pixels labelled by shape."""
    paths = make_synthetic_coco(tmp_path, n_images=n_images, size=size, seed=seed)
    data = json.loads(paths["instances"].read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    gt = {}
    for im in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        gt[im["file_name"]] = {"boxes": boxes, "labels": [names[a["category_id"]] for a in anns]}
    images = {n: np.asarray(Image.open(paths["images"] / n).convert("RGB")) for n in gt}
    return images, gt


def flood_fill_labels(classes, connectivity):
    """Reference labeling by breadth-first search: a partition of the non-negative pixels."""
    h, w = classes.shape
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)] if connectivity == 8 else []
    out = np.full((h, w), -1)
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if classes[y0, x0] < 0 or out[y0, x0] >= 0:
                continue
            out[y0, x0] = n
            queue = deque([(y0, x0)])
            while queue:
                y, x = queue.popleft()
                for dy, dx in steps:
                    v, u = y + dy, x + dx
                    if (0 <= v < h and 0 <= u < w and out[v, u] < 0
                            and classes[v, u] == classes[y, x]):
                        out[v, u] = n
                        queue.append((v, u))
            n += 1
    return out, n


# ------------------------------------------------------------------ detector


@pytest.mark.parametrize("shape", SHAPES)
def test_every_colour_and_shape_is_found_with_its_box_and_label(shape):
    for background in BACKGROUNDS:
        for colour in COLOURS:
            x, y, s = 9, 14, 21
            found = detect_shapes(draw([(shape, colour, x, y, s)], background=background))
            assert [(d.colour, d.shape) for d in found] == [(colour, shape)], (colour, background)
            box = np.array(found[0].box) * 64
            np.testing.assert_allclose(box, [x, y, x + s, y + s], atol=1.0)  # triangle: apex row
            assert 0 < found[0].score <= 1


def test_detections_on_the_synthetic_dataset_give_box_ap50_of_one(tmp_path):
    images, gt = dataset_boxes(tmp_path)
    dets = {n: to_image_boxes(detect_shapes(im), "shape", 64, 64) for n, im in images.items()}
    result = box_ap(gt, dets)
    assert result["AP50"] == 1.0 and result["AP75"] == 1.0
    assert result["num_classes"] == 3


def test_the_smallest_shapes_of_the_world_are_classified_too(tmp_path):
    # 16-pixel images hold 4-6 pixel shapes: a triangle is then a few rows of pixels
    images, gt = dataset_boxes(tmp_path, size=16, seed=1)
    dets = {n: to_image_boxes(detect_shapes(im), "shape", 16, 16) for n, im in images.items()}
    assert box_ap(gt, dets)["AP50"] == 1.0


def test_blur_and_noise_do_not_break_the_detector(tmp_path):
    images, gt = dataset_boxes(tmp_path, n_images=32, seed=3)
    dets = {n: to_image_boxes(detect_shapes(degrade(im, seed=i)), "shape", 64, 64)
            for i, (n, im) in enumerate(images.items())}
    assert box_ap(gt, dets)["AP50"] == 1.0
    assert sum(len(d.labels) for d in dets.values()) == sum(len(g["labels"]) for g in gt.values())


def rounded(shape, colour, background, side, radius, blur, size=64, supersample=8):
    """A `side`-pixel square with corners rounded to `radius` x side (0.5: a disc), centred,
    drawn at 8x and downsampled (anti-aliased edges), then Gaussian-blurred by `blur` pixels."""
    from PIL import ImageDraw, ImageFilter

    big = Image.new("RGB", (size * supersample,) * 2, background)
    x0 = (size - side) / 2 * supersample
    box = [x0, x0, x0 + side * supersample, x0 + side * supersample]
    if shape == "disc":
        ImageDraw.Draw(big).ellipse(box, fill=COLOURS[colour])
    else:
        ImageDraw.Draw(big).rounded_rectangle(box, radius=radius * side * supersample,
                                              fill=COLOURS[colour])
    small = big.resize((size, size), Image.LANCZOS)
    return np.asarray(small.filter(ImageFilter.GaussianBlur(blur)) if blur else small)


@pytest.mark.parametrize("shape,radius", [("square", 0.0), ("square", 0.15), ("square", 0.3),
                                          ("disc", 0.5)])
def test_squares_with_rounded_corners_are_still_squares(shape, radius):
    # a generator that draws soft squares: corners rounded to 0.3 of the side and edges blurred
    # by 0.7 pixels still read as squares (what a person reads), discs as discs
    for k, colour in enumerate(COLOURS):
        for side in (10, 14, 20, 28):
            for blur in (0.0, 0.7):
                image = rounded(shape, colour, BACKGROUNDS[k % 4], side, radius, blur)
                found = [d.shape for d in detect_shapes(image) if d.colour == colour]
                assert found == [shape], (colour, side, blur)


def test_colours_survive_blur_and_noise_on_every_background():
    # purple/magenta on the dark background and orange/yellow are the closest pairs
    for background in BACKGROUNDS:
        items = [("disc", "purple", 4, 4, 16), ("square", "magenta", 24, 4, 16),
                 ("triangle", "orange", 4, 30, 18), ("square", "yellow", 30, 30, 18)]
        found = detect_shapes(degrade(draw(items, background=background), seed=1))
        assert sorted((d.colour, d.shape) for d in found) == sorted(
            (c, s) for s, c, *_ in items), background


def test_an_empty_image_gives_no_detection():
    for background in BACKGROUNDS:
        assert detect_shapes(draw([], background=background)) == []
        assert detect_shapes(degrade(draw([], background=background))) == []


def test_specks_below_min_area_are_dropped():
    image = draw([("square", "red", 10, 10, 20)])
    image[50:52, 50:52] = COLOURS["blue"]  # 4 pixels: 0.1% of the image
    assert [d.colour for d in detect_shapes(image)] == ["red"]
    assert sorted(d.colour for d in detect_shapes(image, min_area=0.0)) == ["blue", "red"]


def test_array_and_tensor_inputs_give_the_same_detections():
    image = draw([("triangle", "cyan", 5, 5, 30), ("disc", "green", 40, 40, 20)], background=SAGE)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    a, b = detect_shapes(image), detect_shapes(tensor)
    assert [(d.box, d.colour, d.shape, d.area) for d in a] == [
        (d.box, d.colour, d.shape, d.area) for d in b]
    np.testing.assert_allclose([d.score for d in a], [d.score for d in b], rtol=1e-6)


def test_labels_and_scaling_for_box_ap():
    found = [Detection((0.1, 0.2, 0.3, 0.4), "red", "disc", 0.9, 0.01)]
    joint, shape_only = to_image_boxes(found), to_image_boxes(found, "shape", 200, 100)
    assert joint.labels == ("red disc",) and shape_only.labels == ("disc",)
    np.testing.assert_allclose(shape_only.boxes, [[20, 20, 60, 40]])
    np.testing.assert_allclose(joint.scores, [0.9])


def test_detect_file_gives_coco_results_in_pixels(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(draw([("square", "orange", 8, 16, 24)], size=80)).save(path)
    (result,) = detect_file(str(path))
    assert result["label"] == "orange square"
    np.testing.assert_allclose(result["bbox"], [8, 16, 24, 24], atol=1e-9)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_components_equals_a_flood_fill(connectivity):
    rng = np.random.default_rng(connectivity)
    classes = np.where(rng.random((40, 50)) < 0.5, rng.integers(0, 3, (40, 50)), -1)
    labels, n = label_components(classes, connectivity)
    expected, n_expected = flood_fill_labels(classes, connectivity)
    assert n == n_expected
    # the same partition: labels map one-to-one onto the reference labels
    pairs = set(zip(labels[classes >= 0].tolist(), expected[classes >= 0].tolist()))
    assert len(pairs) == n and (labels[classes < 0] == -1).all()


# ------------------------------------------------------------------ patches and appearance


def test_classify_patch_on_a_box_without_an_object():
    image = draw([("disc", "blue", 40, 40, 20)])
    assert classify_patch(image[2:30, 2:30]) == (None, None, 0.0)
    colour, shape, confidence = classify_patch(image[36:64, 36:64])
    assert (colour, shape) == ("blue", "disc") and confidence > 0.5


def test_reference_identity_reads_a_reference_image_and_a_tight_crop():
    assert reference_identity(draw([("triangle", "green", 4, 4, 24)], 32, BEIGE)) == (
        "green", "triangle")
    all_object = np.empty((20, 20, 3), dtype=np.uint8)
    all_object[:] = COLOURS["purple"]  # a crop with no background left in it
    assert reference_identity(all_object) == ("purple", "square")


def test_reference_identity_of_an_empty_image_names_the_fix():
    with pytest.raises(ValueError, match="holds no shape.*pair instead"):
        reference_identity(draw([], 32, DARK))


def test_appearance_match_and_leak():
    # box A (left) should hold a red square but holds B's blue disc: a leak; box B holds its own
    image = draw([("disc", "blue", 4, 20, 24), ("disc", "blue", 36, 20, 24)], background=DARK)
    boxes = [(4 / 64, 20 / 64, 28 / 64, 44 / 64), (36 / 64, 20 / 64, 60 / 64, 44 / 64)]
    a, b = appearance_scores(image, boxes, [("red", "square"), ("blue", "disc")])
    assert (a.colour, a.shape, a.match, a.leak) == ("blue", "disc", False, True)
    assert (a.colour_match, a.shape_match) == (False, False)
    assert (b.match, b.leak, b.colour_match, b.shape_match) == (True, False, True, True)
    assert summarise([a, b]) == {"boxes": 2, "match": 0.5, "leak": 0.5, "colour_match": 0.5,
                                 "shape_match": 0.5}


def test_appearance_reports_colour_and_shape_separately_on_tight_boxes():
    # tight boxes: a square's crop is all object, so the background comes from the full image
    image = degrade(draw([("square", "red", 8, 8, 20), ("disc", "yellow", 36, 36, 20)], 64, BEIGE))
    boxes = [(8 / 64, 8 / 64, 28 / 64, 28 / 64), (36 / 64, 36 / 64, 56 / 64, 56 / 64)]
    a, b = appearance_scores(image, boxes, [("red", "disc"), ("orange", "disc")])
    assert (a.colour, a.shape, a.colour_match, a.shape_match, a.leak) == (
        "red", "square", True, False, False)
    assert (b.colour, b.shape, b.colour_match, b.shape_match, b.leak) == (
        "yellow", "disc", False, True, False)


# ------------------------------------------------------------------ input validation


def test_a_float_array_is_refused_with_its_dtype():
    with pytest.raises(ValueError, match=r"float32 of shape \(8, 8, 3\).*astype\(np.uint8\)"):
        detect_shapes(np.zeros((8, 8, 3), dtype=np.float32))


def test_a_channels_last_tensor_is_refused_with_its_shape():
    with pytest.raises(ValueError, match=r"\(8, 8, 3\).*permute"):
        detect_shapes(torch.zeros(8, 8, 3))


def test_a_tensor_outside_0_1_is_refused_with_its_range():
    with pytest.raises(ValueError, match=r"got range \[255, 255\].*clamp"):
        detect_shapes(torch.full((3, 8, 8), 255.0))


def test_other_image_types_are_refused_by_name():
    with pytest.raises(TypeError, match="got list"):
        detect_shapes([[0, 0, 0]])


def test_bad_options_are_refused_with_their_values():
    image = draw([])
    with pytest.raises(ValueError, match="max_distance=0"):
        detect_shapes(image, max_distance=0)
    with pytest.raises(ValueError, match="min_area=1.5"):
        detect_shapes(image, min_area=1.5)
    with pytest.raises(ValueError, match="connectivity=6"):
        detect_shapes(image, connectivity=6)
    with pytest.raises(ValueError, match=r"background=\(1, 2\)"):
        detect_shapes(image, background=(1, 2))
    with pytest.raises(ValueError, match="label_by='size'"):
        to_image_boxes([], "size")


def test_appearance_refuses_bad_boxes_and_references_by_value():
    image = draw([])
    with pytest.raises(ValueError, match=r"box 0 \(10.0, 0.0, 20.0, 1.0\).*divide pixel"):
        appearance_scores(image, [(10, 0, 20, 1)], [("red", "disc")])
    with pytest.raises(ValueError, match="1 boxes but 2 references"):
        appearance_scores(image, [(0, 0, 1, 1)], [("red", "disc")] * 2)
    with pytest.raises(ValueError, match=r"reference 0 \('pink', 'disc'\)"):
        appearance_scores(image, [(0, 0, 1, 1)], [("pink", "disc")])
    with pytest.raises(ValueError, match="no boxes"):
        summarise([])


def test_the_detectors_options_and_inputs_are_named():
    found = [Detection((0.1, 0.2, 0.3, 0.4), "red", "disc", 0.9, 0.01)]
    with pytest.raises(ValueError, match=r"label_by='size' must be one of"):
        to_image_boxes(found, "size")
    with pytest.raises(ValueError, match=r"image is empty \(0 x 4 pixels\)"):
        detect_shapes(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"background=\(1, 2\) must be an RGB triple in 0-255"):
        detect_shapes(np.zeros((8, 8, 3), np.uint8), background=(1, 2))
