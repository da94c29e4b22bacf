"""Scoring shapes-world images against held-out layouts (no host: the world's own images)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from locref_core.composite import resize_image, square_reference
from locref_core.data import LocRefDataset, load_coco
from locref_core.data.synthetic import make_synthetic_coco
from locref_core.world.evaluate import (bootstrap, load_heldout, objects_found, ratio_interval,
                                       score_image, summary)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    paths = make_synthetic_coco(tmp_path_factory.mktemp("heldout"), n_images=12, size=64,
                                seed=5, max_objects=3)
    files = sorted(paths["images"].glob("*.png"))
    images = [torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1).float() / 255
              for f in files]
    return load_heldout(paths), images


def test_layouts_objects_and_references(heldout, tmp_path):
    items, _ = heldout
    assert len(items) == 12
    paths = make_synthetic_coco(tmp_path, n_images=12, size=64, seed=5, max_objects=3)
    first = load_heldout(paths, limit=5)  # the first layouts only, the same as in the whole set
    assert [it.caption for it in first] == [it.caption for it in items[:5]]
    assert all(torch.equal(a, b) for x, y in zip(first, items) for a, b in
               zip(x.references, y.references))
    for item in items:
        assert len(item.boxes) == len(item.objects) == len(item.references) >= 1
        assert all(0 <= v <= 1 for box in item.boxes for v in box)
        for (x0, y0, x1, y1), ref, mask in zip(item.boxes, item.references, item.masks):
            # the box's own pixels (edges rounded outwards) and the object's mask there
            assert ref.shape == (3, *mask.shape)
            assert mask.shape == (math.ceil(y1 * 64) - math.floor(y0 * 64),
                                  math.ceil(x1 * 64) - math.floor(x0 * 64))
            assert 0.4 < mask.mean() <= 1.0 and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert item.caption.startswith(f"a{'n' if item.objects[0][0][0] in 'aeiou' else ''} "
                                       f"{item.label(0)}")


def test_the_world_images_themselves_score_perfectly(heldout):
    items, images = heldout
    result = summary([score_image(im, it) for im, it in zip(images, items)])
    assert result["AP50"] == 1.0 and result["appearance"] == 1.0
    assert result["recall"] == 1.0 and result["leakage"] == 0.0


def test_swapped_objects_leak_and_empty_images_recall_nothing(heldout):
    items, images = heldout
    i = next(k for k, it in enumerate(items) if len(it.boxes) >= 2)
    item, image = items[i], images[i].clone()
    (a0, b0, a1, b1), (c0, d0, c1, d1) = ((round(v * 64) for v in box) for box in item.boxes[:2])
    first, second = image[:, b0:b1, a0:a1].clone(), image[:, d0:d1, c0:c1].clone()
    bg = image[:, 0, 0][:, None, None]
    image[:, b0:b1, a0:a1], image[:, d0:d1, c0:c1] = bg, bg
    # paste each object into the other's box (resized): both boxes now hold the other reference
    resize = lambda t, h, w: torch.nn.functional.interpolate(t[None], (h, w), mode="nearest")[0]  # noqa: E731
    image[:, b0:b1, a0:a1] = resize(second, b1 - b0, a1 - a0)
    image[:, d0:d1, c0:c1] = resize(first, d1 - d0, c1 - c0)
    scored = score_image(image, item)
    assert item.objects[0] != item.objects[1]  # the world gives each object its own colour
    assert scored["leak"] >= 2 and scored["match"] <= len(item.boxes) - 2
    blank = score_image(torch.full_like(images[i], 0.9), item)
    assert blank["recalled"] == 0 and blank["match"] == 0


def test_bootstrap_interval_contains_the_value(heldout):
    items, images = heldout
    scores = [score_image(im, it) for im, it in zip(images, items)]
    scores[0] = score_image(torch.full_like(images[0], 0.9), items[0])  # one failure
    for name, (value, low, high) in bootstrap(scores, rounds=50).items():
        assert low <= value <= high or np.isclose(value, high), name


def test_bootstrap_gives_what_matching_every_resample_anew_gives(heldout):
    """The boxes are matched once and each round re-ranks; the same numbers as box_ap on each
    resample as its own set of images (positions renumbered, repeats as separate images)."""
    items, images = heldout
    scores = [score_image(im, it) for im, it in zip(images, items)]
    rng = np.random.default_rng(3)
    for i in (0, 4, 7):  # shifted, rescored and emptied images: misses and false positives
        shifted = images[i].roll(int(rng.integers(3, 9)), dims=-1)
        scores[i] = score_image(shifted if i != 7 else torch.full_like(images[i], 0.9), items[i])
    for k in (2, 5):  # a detection with another label and a lower score: a ranked false positive
        d = scores[k]["detections"]
        scores[k]["detections"] = type(d)(np.concatenate([d.boxes, d.boxes[:1] + 0.01]),
                                          d.labels + ("no such label",),
                                          np.concatenate([d.scores, d.scores[:1] * 0.5]))
    rounds, seed = 30, 11
    got = bootstrap(scores, rounds=rounds, seed=seed)
    draws_rng = np.random.default_rng(seed)
    draws = [summary([scores[i] for i in draws_rng.integers(0, len(scores), len(scores))])
             for _ in range(rounds)]
    for name, (value, low, high) in got.items():
        values = [d[name] for d in draws]
        assert value == summary(scores)[name]
        assert (low, high) == (np.percentile(values, 2.5), np.percentile(values, 97.5)), name
    assert len({d["AP"] for d in draws}) > 1  # the resamples differ, so the check can fail


def test_shape_recall_counts_each_object_once(heldout):
    items, images = heldout
    for item, image in zip(items, images):
        s = score_image(image, item)
        assert s["shapes_recalled"] == s["objects"] == len(item.objects)
    item = next(it for it in items if len(it.objects) >= 2)
    blank = torch.full((3, 64, 64), 0.92)  # background only: nothing to recall
    assert score_image(blank, item)["shapes_recalled"] == 0


def test_ratio_interval_is_the_pooled_ratio_with_a_bootstrap_interval():
    value, low, high = ratio_interval([1, 2, 0, 3], [2, 2, 2, 4], rounds=300, seed=1)
    assert value == pytest.approx(6 / 10)
    assert 0.0 <= low <= value <= high <= 1.0 and low < high
    assert ratio_interval([2, 2], [2, 2], rounds=50) == (1.0, 1.0, 1.0)
    assert ratio_interval([0, 0], [0, 0], rounds=10) == (0.0, 0.0, 0.0)  # nothing to recall


def test_references_are_the_ones_the_locref_trainer_cuts(tmp_path):
    """A held-out reference with its mask, squared as LocRef Apply squares it, is exactly a
    reference the LocRef trainer's dataset makes of the same image (no augmentation)."""
    paths = make_synthetic_coco(tmp_path, n_images=6, size=64, seed=7, max_objects=4)
    items = load_heldout(paths)
    data = LocRefDataset(load_coco(paths["images"], paths["instances"], paths["captions"]),
                         size=64, max_instances=4, ref_size=32, augment=False)
    assert len(data) == len(items)
    for item, sample in zip(items, (data[i] for i in range(len(data)))):
        ours = [resize_image(square_reference(r, m), 32, 32)
                for r, m in zip(item.references, item.masks)]
        theirs = [sample["references"][k] for k in range(int(sample["valid"].sum()))]
        assert len(ours) == len(theirs)
        for ref in theirs:
            assert any(torch.equal(ref, o) for o in ours)


def test_world_class_share_tells_a_label_map_from_an_image(tmp_path):
    from locref_core.data.factor_dataset import FactorDataset
    from locref_core.world.evaluate import world_class_share

    paths = make_synthetic_coco(tmp_path, n_images=6, size=64, seed=5, max_objects=3)
    maps = FactorDataset(paths["images"], paths["labels"], captions_json=paths["captions"],
                         kind="seg", palette="coco183", size=64)
    frame = 1 - 62 * 62 / 64 ** 2  # every label map's void one-pixel frame
    for i in range(len(maps)):
        label_map = ((maps[i]["condition"] + 1) / 2).permute(1, 2, 0).numpy()
        image = ((maps[i]["image"] + 1) / 2).permute(1, 2, 0).numpy()
        assert world_class_share(label_map) == pytest.approx(1 - frame)
        # measured on these six: 0.0 each
        assert world_class_share(image) < 0.1


def test_objects_found_counts_both_and_shape_at_most_as_asked():
    asked = [("red", "disc"), ("blue", "disc"), ("red", "square")]
    found = [("red", "disc"), ("green", "disc"), ("red", "disc"), ("red", "triangle")]
    # colour + shape: the red disc only; shape: two discs asked, three found (two count), no
    # square found
    assert objects_found(asked, found) == (1, 2)
    assert objects_found(asked, []) == (0, 0)
