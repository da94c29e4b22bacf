"""LocRef samples: shapes, centre crop and boxes, references in their boxes, masks, determinism."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from locref_core.composite import NEUTRAL
from locref_core.data import (
    DataError,
    LocRefDataset,
    collate_locref,
    instance_mask,
    load_coco,
    make_synthetic_coco,
)
from locref_core.data.locref_dataset import colour_jitter
from locref_core.layout import Box

RED, BLUE, GREEN, YELLOW = (230, 20, 20), (20, 40, 230), (20, 200, 40), (240, 220, 10)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    paths = make_synthetic_coco(tmp_path_factory.mktemp("synth"), n_images=10, seed=1)
    return load_coco(paths["images"], paths["instances"], paths["captions"])


def rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def hand_made(tmp_path, objects, width=128, height=64, json_size=None):
    """One image of solid rectangles on white: objects = [(id, rgb, (x, y, w, h), has_mask)]."""
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    anns = []
    for aid, rgb, (x, y, w, h), has_mask in objects:
        pixels[y:y + h, x:x + w] = rgb
        anns.append({"id": aid, "image_id": 1, "category_id": aid, "bbox": [x, y, w, h],
                     **({"segmentation": rect(x, y, w, h)} if has_mask else {})})
    (tmp_path / "img").mkdir()
    Image.fromarray(pixels).save(tmp_path / "img" / "a.png")
    w, h = json_size or (width, height)
    data = {"images": [{"id": 1, "file_name": "a.png", "width": w, "height": h}],
            "annotations": anns,
            "categories": [{"id": o[0], "name": f"obj{o[0]}"} for o in objects]}
    (tmp_path / "inst.json").write_text(json.dumps(data))
    return load_coco(tmp_path / "img", tmp_path / "inst.json"), torch.from_numpy(pixels)


# A 128 x 64 image: the centre crop keeps x in [32, 96). Object 3 is cropped away, 2 is cut.
OBJECTS = [
    (1, RED, (40, 10, 20, 20), True),  # inside: 400 px
    (2, BLUE, (80, 20, 30, 30), True),  # cut at x = 96: 16 x 30 = 480 px visible
    (3, GREEN, (2, 5, 18, 20), True),  # outside the crop
    (4, YELLOW, (60, 40, 10, 20), False),  # no mask: 200 px
]


def near(image, rgb, tol=0.03):
    """(H, W) bool: pixels of a (3, H, W) [0, 1] image within tol of an RGB 0..255 colour."""
    target = torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255
    return ((image - target).abs() <= tol).all(0)


def test_item_and_batch_shapes(coco):
    ds = LocRefDataset(coco, size=64, max_instances=4, ref_size=32)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["boxes"].shape == (4, 4) and item["valid"].shape == (4,)
    assert item["valid"].dtype == torch.bool
    assert item["references"].shape == (4, 3, 32, 32)
    assert 0 <= item["references"].min() and item["references"].max() <= 1
    assert item["composite"].shape == (3, 64, 64) and item["fg_mask"].shape == (64, 64)
    assert set(item["fg_mask"].unique().tolist()) <= {0.0, 1.0}
    n = int(item["valid"].sum())
    assert len(item["labels"]) == n >= 1 and (item["boxes"][n:] == 0).all()
    assert item["caption"] in coco.images[0].captions
    batch = collate_locref([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 64, 64) and batch["boxes"].shape == (3, 4, 4)
    assert batch["references"].shape == (3, 4, 3, 32, 32) and batch["fg_mask"].shape == (3, 64, 64)
    assert batch["valid"].shape == (3, 4) and batch["composite"].shape == (3, 3, 64, 64)
    assert len(batch["caption"]) == 3 and all(isinstance(c, str) for c in batch["caption"])
    assert [len(labels) for labels in batch["labels"]] == batch["valid"].sum(1).tolist()


def test_centre_crop_clips_and_drops_boxes_and_orders_by_size(tmp_path):
    cs, pixels = hand_made(tmp_path, OBJECTS)
    item = LocRefDataset(cs, size=64, max_instances=4, ref_size=16, augment=False)[0]
    assert item["labels"] == ["obj2", "obj1", "obj4"]  # largest visible box first; 3 dropped
    expected = torch.tensor([[48, 20, 64, 50], [8, 10, 28, 30], [28, 40, 38, 60], [0] * 4]) / 64
    assert torch.allclose(item["boxes"], expected)
    assert item["valid"].tolist() == [True, True, True, False]
    crop = pixels[:, 32:96].permute(2, 0, 1).float() / 255  # the centre 64 x 64
    assert torch.equal(item["image"], crop * 2 - 1)
    # the cut object's reference is its whole crop from the original image, not the clipped part
    assert near(item["references"][0], BLUE).all()
    assert near(item["composite"][:, 20:50, 48:64], BLUE).all()
    fewer = LocRefDataset(cs, size=64, max_instances=2, augment=False)[0]
    assert fewer["labels"] == ["obj2", "obj1"] and fewer["valid"].tolist() == [True, True]
    big = LocRefDataset(cs, size=64, augment=False, min_box_frac=0.1)[0]  # 410 px of 4096
    assert big["labels"] == ["obj2"]


def test_equal_sizes_tie_by_annotation_id(tmp_path):
    objects = [(7, RED, (40, 10, 10, 10), True), (5, BLUE, (60, 30, 10, 10), True)]
    cs, _ = hand_made(tmp_path, objects)
    assert LocRefDataset(cs, size=64, augment=False)[0]["labels"] == ["obj5", "obj7"]


def test_fg_mask_is_the_union_of_masks_and_boxes_without_mask(tmp_path):
    cs, _ = hand_made(tmp_path, OBJECTS)
    item = LocRefDataset(cs, size=64, augment=False)[0]
    expected = torch.zeros(64, 64)
    expected[10:30, 8:28] = 1  # obj1's mask, crop coordinates
    expected[20:50, 48:64] = 1  # obj2's mask, clipped
    expected[40:60, 28:38] = 1  # obj4's box (no mask)
    assert torch.equal(item["fg_mask"], expected)


def test_fg_mask_equals_union_of_synthetic_masks(coco):
    for size in (64, 128):
        ds = LocRefDataset(coco, size=size, max_instances=4, ref_size=16, augment=True)
        for i, img in enumerate(ds.images):
            union = np.zeros((img.height, img.width), dtype=bool)
            for ann in img.annotations:  # at most 3 objects: all are picked
                union |= instance_mask(ann, img.height, img.width)
            union = np.kron(union, np.ones((size // 64, size // 64), dtype=bool))
            assert np.array_equal(ds[i]["fg_mask"].numpy() > 0, union), (size, i)


def test_each_reference_appears_in_the_composite_only_inside_its_box(coco):
    ds = LocRefDataset(coco, size=64, max_instances=4, ref_size=32, augment=False)
    checked = 0
    for i, img in enumerate(ds.images):
        item = ds[i]
        original = (item["image"] + 1) / 2
        for k in range(int(item["valid"].sum())):
            x0, y0, x1, y1 = item["boxes"][k].tolist()
            px0, py0, px1, py1 = Box(x0, y0, x1, y1).to_pixels(64, 64)
            colour = original[:, (py0 + py1) // 2, (px0 + px1) // 2]  # each object's own colour
            rgb = tuple(round(float(c) * 255) for c in colour)
            hits = near(item["composite"], rgb)
            inside = torch.zeros_like(hits)
            inside[py0:py1, px0:px1] = True
            assert hits.any() and not (hits & ~inside).any(), (i, k)
            assert near(item["references"][k], rgb).any()
            for j in range(int(item["valid"].sum())):  # and not in another instance's reference
                if j != k:
                    assert not near(item["references"][j], rgb).any(), (i, k, j)
            checked += 1
        outside = item["fg_mask"] == 0
        assert (item["composite"][:, outside] - NEUTRAL).abs().max() < 1e-6  # background: grey
    assert checked >= 15


def test_reference_background_is_greyed_with_the_mask(coco):
    ds = LocRefDataset(coco, size=64, ref_size=32, augment=False)
    found = 0
    for i, img in enumerate(ds.images):
        item = ds[i]
        for k, label in enumerate(item["labels"]):
            if label == "disc":  # the bounding square's corners are outside the disc
                corners = item["references"][k][:, [0, 0, -1, -1], [0, -1, 0, -1]]
                assert (corners - NEUTRAL).abs().max() < 1e-4
                found += 1
    assert found


def test_items_are_reproducible_and_vary_with_seed_and_epoch(coco):
    a = LocRefDataset(coco, size=64, ref_size=32, seed=5)
    b = LocRefDataset(coco, size=64, ref_size=32, seed=5)
    other = LocRefDataset(coco, size=64, ref_size=32, seed=6)
    plain = LocRefDataset(coco, size=64, ref_size=32, augment=False)
    tensors = ("references", "composite", "boxes", "fg_mask", "image")
    differs_seed = differs_plain = 0
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert all(torch.equal(x[t], y[t]) for t in tensors) and x["caption"] == y["caption"]
        differs_seed += not torch.equal(x["references"], other[i]["references"])
        differs_plain += not torch.equal(x["references"], plain[i]["references"])
        assert torch.equal(x["fg_mask"], plain[i]["fg_mask"])  # the target is never augmented
        assert torch.equal(x["image"], plain[i]["image"])
    assert differs_seed == len(a) and differs_plain == len(a)
    before = a[0]["references"]
    a.set_epoch(1)
    assert not torch.equal(a[0]["references"], before)


def test_augmentation_differs_between_indices_of_the_same_image(tmp_path):
    cs, _ = hand_made(tmp_path, OBJECTS)
    twice = dataclasses.replace(cs, images=(cs.images[0], dataclasses.replace(cs.images[0], id=2)))
    ds = LocRefDataset(twice, size=64, ref_size=16, seed=0)
    assert not torch.equal(ds[0]["references"], ds[1]["references"])


def test_captions_are_chosen_per_seed_index_and_epoch(coco):
    ds = LocRefDataset(coco, size=64, ref_size=16, augment=False)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        first = ds[0]["caption"]
        assert first == ds[0]["caption"]
        seen.add(first)
    assert seen == set(coco.images[0].captions)  # both captions of the image come up


def test_colour_jitter():
    x = torch.rand(3, 8, 8)
    assert torch.allclose(colour_jitter(x, 1.0, 1.0, 1.0), x, atol=1e-6)
    grey = colour_jitter(x, 1.0, 1.0, 0.0)
    assert torch.allclose(grey[0], grey[1], atol=1e-6)
    assert torch.allclose(grey[1], grey[2], atol=1e-6)
    assert torch.allclose(colour_jitter(x * 0.5, 1.1, 1.0, 1.0), x * 0.55, atol=1e-6)


def test_image_errors_name_the_file(tmp_path):
    cs, _ = hand_made(tmp_path, OBJECTS[:1], json_size=(100, 64))
    message = r"a\.png \(image id 1\) is 128x64 but the annotations say 100x64"
    with pytest.raises(DataError, match=message):
        LocRefDataset(cs, size=64)[0]
    (tmp_path / "img" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"a\.png \(image id 1\) cannot be read"):
        LocRefDataset(cs, size=64)[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 32}, r"size=32: the composite canvas must be \d+\.\.8192 px"),
    ({"max_instances": 0}, r"max_instances=0 must be in 1\.\.\d+"),
    ({"max_instances": 33}, r"max_instances=33 must be in 1\.\.\d+"),
    ({"ref_size": 0}, r"ref_size=0 must be a positive size \(224 for CLIP\)"),
    ({"min_box_frac": 1.0}, r"min_box_frac=1\.0 must be in \[0, 1\)"),
])
def test_bad_arguments_are_refused(coco, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocRefDataset(coco, **kwargs)


def test_a_set_of_crowd_regions_only_has_nothing_to_train_on(tmp_path):
    cs, _ = hand_made(tmp_path, OBJECTS[:2])
    crowd = dataclasses.replace(cs, images=tuple(
        dataclasses.replace(img, annotations=tuple(dataclasses.replace(a, iscrowd=True)
                                                   for a in img.annotations))
        for img in cs.images))
    with pytest.raises(DataError, match=r"no image in .*img has an instance annotation \(crowd "
                                        r"regions excluded\); LocRef needs boxes"):
        LocRefDataset(crowd, size=64)
    with pytest.raises(ValueError, match="collate_locref needs at least one item"):
        collate_locref([])
