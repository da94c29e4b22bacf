"""COCO loading and validation, polygon/RLE masks, and the synthetic shapes dataset."""

import filecmp
import json
import math

import numpy as np
import pytest
from PIL import Image

from locref_core.data import (
    CocoAnnotation,
    DataError,
    instance_mask,
    load_coco,
    make_synthetic_coco,
    polygon_mask,
    rle_decode,
    rle_encode,
)
from locref_core.data.coco import rle_counts_from_string, rle_counts_to_string
from locref_core.data.synthetic import BACKGROUND_CLASS, COLOURS, SHAPE_CLASSES, VOID
from locref_core.fgdm.palettes import COCO_STUFF


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), n_images=8, seed=3)


def copy_set(paths, tmp_path):
    """A writable copy of the synthetic set: (images dir, instances dict, write function)."""
    data = json.loads(paths["instances"].read_text())
    images = tmp_path / "images"
    images.mkdir()
    for f in paths["images"].iterdir():
        (images / f.name).write_bytes(f.read_bytes())
    target = tmp_path / "instances_bad.json"

    def write(d):
        target.write_text(json.dumps(d))
        return target

    return images, data, write


# ------------------------------------------------------------------------------ synthetic set


def test_synthetic_set_loads_and_masks_match_pixels(synth):
    coco = load_coco(synth["images"], synth["instances"], synth["captions"])
    assert len(coco.images) == 8
    assert coco.categories == {COCO_STUFF.names.index(c): s for s, c in SHAPE_CLASSES.items()}
    for img in coco.images:
        assert len(img.captions) == 2 and 1 <= len(img.annotations) <= 3
        pixels = np.asarray(Image.open(coco.image_path(img)).convert("RGB"))
        background = pixels[0, 0]
        union = np.zeros((img.height, img.width), dtype=bool)
        for ann in img.annotations:
            mask = instance_mask(ann, img.height, img.width)
            assert mask.sum() == ann.area > 0
            colours = np.unique(pixels[mask], axis=0)
            assert len(colours) == 1 and (colours[0] != background).any()  # one solid colour
            name = {v: k for k, v in COLOURS.items()}[tuple(int(c) for c in colours[0])]
            assert f"{name} {coco.categories[ann.category_id]}" in img.captions[0]
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann.bbox
            assert x - 1 <= xs.min() <= xs.max() <= x + w
            assert y - 1 <= ys.min() <= ys.max() <= y + h
            union |= mask
        assert np.array_equal(union, (pixels != background).any(axis=2))  # nothing else drawn


def test_synthetic_labels_are_coco_stuff_ids_minus_one(synth):
    coco = load_coco(synth["images"], synth["instances"])
    for img in coco.images:
        label = np.asarray(Image.open(synth["labels"] / img.file_name))
        assert label.dtype == np.uint8 and label.shape == (img.height, img.width)
        assert (label[0] == VOID).all() and (label[:, -1] == VOID).all()
        inner = label[1:-1, 1:-1]
        expected = np.full(inner.shape, COCO_STUFF.names.index(BACKGROUND_CLASS) - 1)
        for ann in img.annotations:
            expected[instance_mask(ann, img.height, img.width)[1:-1, 1:-1]] = ann.category_id - 1
        assert np.array_equal(inner, expected)


def test_synthetic_set_is_deterministic_for_a_seed(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", n_images=5, seed=7)
    b = make_synthetic_coco(tmp_path / "b", n_images=5, seed=7)
    c = make_synthetic_coco(tmp_path / "c", n_images=5, seed=8)
    files = ["annotations/instances_train.json", "annotations/captions_train.json"]
    files += [f"images/{i:06d}.png" for i in range(1, 6)] + [f"labels/{i:06d}.png" for i in (1, 5)]
    for f in files:
        assert filecmp.cmp(a["root"] / f, b["root"] / f, shallow=False), f
    assert a["instances"].read_text() != c["instances"].read_text()


# -------------------------------------------------------------------------------- polygons


def test_square_polygon_covers_exactly_its_pixels():
    mask = polygon_mask([[10, 10, 30, 10, 30, 30, 10, 30]], 40, 50)
    expected = np.zeros((40, 50), dtype=bool)
    expected[10:30, 10:30] = True
    assert np.array_equal(mask, expected)  # area 400, the polygon's own area


def test_triangle_disc_and_multi_part_areas():
    tri = polygon_mask([[0, 0, 40, 0, 0, 40]], 64, 64)
    assert abs(int(tri.sum()) - 800) <= 24  # 40 * 40 / 2, up to the diagonal's pixels
    assert tri[1, 1] and not tri[38, 38]
    n, r = 64, 20
    disc = [v for k in range(n) for v in (32 + r * math.cos(2 * math.pi * k / n),
                                            32 + r * math.sin(2 * math.pi * k / n))]
    assert abs(int(polygon_mask([disc], 64, 64).sum()) - math.pi * r * r) < 0.02 * math.pi * r * r
    two = polygon_mask([[0, 0, 4, 0, 4, 4, 0, 4], [10, 10, 13, 10, 13, 12, 10, 12]], 20, 20)
    assert two.sum() == 16 + 6


def test_polygon_partly_outside_the_image_is_clipped():
    mask = polygon_mask([[-5, -5, 10, -5, 10, 10, -5, 10]], 8, 8)
    assert mask.all()
    assert not polygon_mask([[20, 20, 30, 20, 30, 30]], 8, 8).any()


# ------------------------------------------------------------------------------------- RLE


def test_uncompressed_rle_is_column_major_and_starts_with_zeros():
    mask = rle_decode({"size": [3, 4], "counts": [1, 2, 3, 6]})
    expected = np.array([[0, 0, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1]], dtype=bool)
    assert np.array_equal(mask, expected) and mask.sum() == 8


@pytest.mark.parametrize(
    ("string", "counts"),
    [("04<", [0, 4, 12]), ("233N", [2, 3, 3, 1]), ("T3", [100]), ("0T3", [0, 100])],
)
def test_compressed_rle_strings_by_hand(string, counts):
    assert rle_counts_from_string(string) == counts
    assert rle_counts_to_string(counts) == string


def test_compressed_rle_masks_by_hand():
    first_column = rle_decode({"size": [4, 4], "counts": "04<"})
    assert first_column[:, 0].all() and first_column.sum() == 4
    mask = rle_decode({"size": [3, 3], "counts": "233N"})  # a negative delta: sign extension
    assert np.array_equal(mask, np.array([[0, 1, 0], [0, 1, 0], [1, 0, 1]], dtype=bool))
    assert rle_decode({"size": [10, 10], "counts": "0T3"}).all()


def test_rle_round_trip_on_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 7), (31, 17), (64, 64)]:
        mask = rng.random(shape) < 0.3
        mask[:, : shape[1] // 2] |= rng.random((shape[0], shape[1] // 2)) < 0.9  # long runs
        for compress in (True, False):
            assert np.array_equal(rle_decode(rle_encode(mask, compress)), mask)


def test_instance_mask_dispatch_and_errors():
    poly = CocoAnnotation(1, 1, (0, 0, 4, 4), [[0, 0, 4, 0, 4, 4, 0, 4]], 16.0)
    assert instance_mask(poly, 8, 8).sum() == 16
    rle = CocoAnnotation(2, 1, (0, 0, 1, 4), {"size": [4, 4], "counts": "04<"}, 4.0)
    assert instance_mask(rle, 4, 4).sum() == 4
    assert instance_mask(CocoAnnotation(3, 1, (0, 0, 1, 1)), 4, 4) is None
    with pytest.raises(DataError, match="annotation id 2.*4x4"):
        instance_mask(rle, 5, 4)
    bad = CocoAnnotation(4, 1, (0, 0, 1, 1), {"size": [4, 4], "counts": [3, 2]}, 2.0)
    with pytest.raises(DataError, match="annotation id 4.*sum to 5"):
        instance_mask(bad, 4, 4)


# -------------------------------------------------------------------------------- bad data


def test_missing_image_file_names_the_file_and_image_id(synth, tmp_path):
    images, data, write = copy_set(synth, tmp_path)
    (images / "000003.png").unlink()
    with pytest.raises(DataError, match=r"000003\.png \(image id 3 in .*instances_bad\.json\)"):
        load_coco(images, write(data))
    assert load_coco(images, write(data), check_files=False).images[2].id == 3


def test_box_outside_the_image_names_the_annotation(synth, tmp_path):
    images, data, write = copy_set(synth, tmp_path)
    ann = data["annotations"][1]
    ann["bbox"] = [50.0, 10.0, 20.0, 10.0]  # x + w = 70 > 64 + 1
    entry = rf"annotation id {ann['id']} \(image id {ann['image_id']}"
    pattern = rf"instances_bad\.json: {entry}.*outside"
    with pytest.raises(DataError, match=pattern):
        load_coco(images, write(data))
    ann["bbox"] = [44.5, 10.0, 20.0, 10.0]  # 0.5 px past the edge: within the tolerance
    load_coco(images, write(data))
    ann["bbox"] = [10.0, 10.0, 0.0, 10.0]
    with pytest.raises(DataError, match=rf"annotation id {ann['id']} .*non-positive"):
        load_coco(images, write(data))


def test_empty_annotation_files(synth, tmp_path):
    images, data, write = copy_set(synth, tmp_path)
    with pytest.raises(DataError, match=r"instances_bad\.json: .*no annotations"):
        load_coco(images, write({**data, "annotations": []}))
    with pytest.raises(DataError, match=r"instances_bad\.json: .*no images"):
        load_coco(images, write({**data, "images": [], "annotations": []}))
    path = write(data)
    path.write_text("")
    with pytest.raises(DataError, match=r"instances_bad\.json is not valid JSON"):
        load_coco(images, path)
    with pytest.raises(DataError, match=r"nowhere\.json does not exist"):
        load_coco(images, tmp_path / "nowhere.json")


def test_unknown_category_and_duplicate_ids(synth, tmp_path):
    images, data, write = copy_set(synth, tmp_path)
    data["annotations"][0]["category_id"] = 999
    message = r"annotation id 1 \(image id 1\) has unknown category id 999"
    with pytest.raises(DataError, match=message):
        load_coco(images, write(data))
    data["annotations"][0]["category_id"] = data["categories"][0]["id"]
    data["annotations"][1]["id"] = data["annotations"][0]["id"]
    with pytest.raises(DataError, match="annotation id 1 is listed twice"):
        load_coco(images, write(data))
    data["annotations"][1]["id"] = 1000
    data["images"][1]["id"] = data["images"][0]["id"]
    with pytest.raises(DataError, match=r"image id 1 is listed twice.*000002\.png"):
        load_coco(images, write(data))


def _set_first(key, **fields):
    return lambda d: d[key][0].update(fields)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(images=None), r"'images' must be a list of entries, got NoneType; is "
                                      r"this a COCO-format file\?"),
    (lambda d: d["categories"][0].pop("name"), r"category entry .* needs 'id' and 'name'"),
    (lambda d: d["categories"].append(dict(d["categories"][0], name="twin")),
     r"category id \d+ is listed twice \('.*' and 'twin'\)"),
    (lambda d: d.update(categories=[]), r"'categories' is empty; list the object classes as"),
    (_set_first("categories", id="seven"), r"category '.*' has id 'seven'; ids must be integers"),
    (lambda d: d["images"][0].pop("width"), r"image entry .* needs 'id', 'file_name', 'width'"),
    (_set_first("images", height=0), r"image id 1 \('000001.png'\) has size 64x0; width and "
                                     r"height must be positive integers"),
    (lambda d: d["annotations"][0].pop("bbox"), r"annotation entry .* needs 'id', 'image_id', "
                                                r"'category_id' and 'bbox'"),
    (_set_first("annotations", image_id=999), r"annotation id 1 refers to image id 999, which is "
                                              r"not in 'images'"),
    (_set_first("annotations", bbox=[1, 2, 3]), r"annotation id 1 \(image id 1\) has bbox "
                                                r"\[1, 2, 3\]; use \[x, y, width, height\]"),
    (_set_first("annotations", segmentation=[[0, 0, 4, 0]]),
     r"annotation id 1 has a polygon that is not a flat list of at least 3 x, y pairs"),
    (_set_first("annotations", segmentation={"counts": [4]}),
     r"annotation id 1 has an RLE segmentation without 'size'"),
    (_set_first("annotations", segmentation={"size": [32, 32], "counts": [4]}),
     r"annotation id 1 has an RLE mask of size \[32, 32\] but its image is 64x64"),
    (_set_first("annotations", segmentation="0 4"),
     r"annotation id 1 has segmentation of type str; use polygons \(list\) or RLE \(dict\)"),
])  # fmt: skip
def test_malformed_entries_name_the_entry_and_the_fix(synth, tmp_path, mutate, message):
    """What a hand-made or half-converted COCO file gets: the first bad entry, named."""
    images, data, write = copy_set(synth, tmp_path)
    assert (data["images"][0]["id"], data["annotations"][0]["id"]) == (1, 1)
    mutate(data)
    with pytest.raises(DataError, match=r"instances_bad\.json: " + message):
        load_coco(images, write(data))


def test_a_file_that_is_not_an_object_or_not_text_is_named(synth, tmp_path):
    images, data, write = copy_set(synth, tmp_path)
    with pytest.raises(DataError, match=r"the top level must be a JSON object with 'images', "
                                        r"'annotations' and 'categories', got list"):
        load_coco(images, write([data]))
    path = write(data)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match=r"instances file .* cannot be read .*UTF-8 JSON file"):
        load_coco(images, path)
    with pytest.raises(DataError, match=r"images folder .*nowhere does not exist; pass the "
                                        r"folder that holds the images listed in"):
        load_coco(tmp_path / "nowhere", write(data))


def test_caption_files_with_bad_entries_or_some_other_images(synth, tmp_path, caplog):
    images, data, write = copy_set(synth, tmp_path)
    caps = tmp_path / "captions_bad.json"
    caps.write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    with pytest.raises(DataError, match=r"caption entry \{'image_id': 1\} needs 'image_id' and "
                                        r"'caption'"):
        load_coco(images, write(data), caps)
    caps.write_text(json.dumps({"annotations": [{"id": 5, "image_id": 1, "caption": 3}]}))
    with pytest.raises(DataError, match=r"caption 5 of image id 1 is not a string"):
        load_coco(images, write(data), caps)
    caps.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": " a red disc "},
                                                {"image_id": 999, "caption": "a cat"}]}))
    with caplog.at_level("WARNING"):
        coco = load_coco(images, write(data), caps)
    assert "1 captions refer to images not in the instances file; ignored" in caplog.text
    assert coco.images[0].captions == ("a red disc",)  # stripped


def test_captions_from_another_split_are_refused(synth, tmp_path):
    images, data, write = copy_set(synth, tmp_path)
    caps = tmp_path / "captions_val.json"
    caps.write_text(json.dumps({"annotations": [{"image_id": 999, "caption": "a cat"}]}))
    with pytest.raises(DataError, match=r"captions_val\.json: none of its captions"):
        load_coco(images, write(data), caps)


@pytest.mark.parametrize("n_images, max_objects", [(0, 3), (4, 0), (4, len(COLOURS) + 1)])
def test_the_shapes_world_refuses_sizes_it_cannot_draw(tmp_path, n_images, max_objects):
    with pytest.raises(ValueError, match=f"n_images={n_images} must be >= 1 and max_objects="
                                         f"{max_objects} in 1..{len(COLOURS)} \\(one distinct "
                                         "colour per object\\)"):
        make_synthetic_coco(tmp_path, n_images=n_images, max_objects=max_objects)
