"""SBPC scoring: decoding candidate batches, the pick, per-object masks, seeds, the preview grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locref_core.fgdm.classmap import ClassMap
from locref_core.fgdm.maps import encode
from locref_core.fgdm.palettes import get_palette
from locref_core.fgdm.recall import name_index
from locref_core.fgdm.sbpc import (
    MAX_CANDIDATES,
    candidate_grid,
    candidate_seed,
    check_candidates,
    object_masks,
    score_candidates,
)

COCO = get_palette("coco183")
PERSON, DOG, SKY = (name_index(COCO)[n] for n in ("person", "dog", "sky"))


def scene(person=0, dog=0, size=32):
    """Sky, with a person square of side `person` and a dog square of side `dog`."""
    ids = np.full((size, size), SKY, dtype=np.int64)
    ids[2 : 2 + person, 2 : 2 + person] = PERSON
    ids[-2 - dog : size - 2, -2 - dog : size - 2] = DOG
    return ids


def as_batch(maps, noise=0.0, seed=0):
    rgb = np.stack([encode(m, COCO) for m in maps]).astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.clip(rgb + rng.normal(0, noise, rgb.shape), 0, 1).astype(np.float32))


def test_the_candidate_with_most_required_objects_wins_despite_vae_noise():
    maps = [scene(person=8), scene(person=6, dog=6), scene(dog=10), scene()]
    scored = score_candidates(as_batch(maps, noise=8 / 255), COCO, [PERSON, DOG], seed=40)
    assert scored.selection.index == 1 and scored.selection.seed == 41
    assert scored.selection.recalls == (0.5, 1.0, 0.5, 0.0)
    assert scored.seeds == (40, 41, 42, 43)
    for got, want in zip(scored.class_maps, maps, strict=True):
        assert (got == want).mean() >= 0.99


def test_ties_go_to_the_larger_required_area_then_the_lower_seed():
    by_area = score_candidates(as_batch([scene(person=4), scene(person=9)]), COCO, [PERSON], 0)
    assert by_area.selection.index == 1
    same = score_candidates(as_batch([scene(person=5), scene(person=5)]), COCO, [PERSON], 7)
    assert same.selection.index == 0 and same.selection.seed == 7


def test_seeds_wrap_like_comfyui_seeds():
    assert candidate_seed(5, 3) == 8
    assert candidate_seed(2**64 - 1, 2) == 1


@pytest.mark.parametrize("n", [0, -1, MAX_CANDIDATES + 1, 2.5, True])
def test_candidate_count_is_checked(n):
    with pytest.raises(ValueError, match=f"between 1 and {MAX_CANDIDATES}"):
        check_candidates(n)


def test_a_numpy_count_is_a_count():
    assert check_candidates(np.int64(10)) == 10 and type(check_candidates(np.int64(3))) is int


def test_candidates_that_are_not_rgb_images_are_refused_with_their_shape():
    rgba = torch.cat([as_batch([scene(person=8)] * 2), torch.ones(2, 32, 32, 1)], dim=-1)
    with pytest.raises(ValueError, match=r"candidate maps must be \(N, H, W, 3\), got "
                                         r"\(2, 32, 32, 4\)"):
        score_candidates(rgba, COCO, [PERSON], seed=0)
    with pytest.raises(ValueError, match=r"got \(32, 32, 3\)"):
        score_candidates(as_batch([scene(person=8)])[0], COCO, [PERSON], seed=0)
    with pytest.raises(ValueError, match="no candidate maps to show"):
        candidate_grid([], COCO, [], [], 0)


def test_object_masks_follow_the_required_order():
    cm = ClassMap(scene(person=4, dog=3), COCO)
    masks = object_masks(cm, [DOG, PERSON])
    assert masks.shape == (2, 32, 32)
    assert masks[0].sum() == 9 and masks[1].sum() == 16
    assert object_masks(cm, []).shape == (0, 32, 32)


def test_duplicate_colour_classes_mask_as_their_decoded_twin():
    ade = get_palette("ade150")
    road, skyscraper = 6, 48  # same colour: a decoded map only ever says road
    cm = ClassMap(np.full((4, 4), road), ade)
    assert object_masks(cm, [skyscraper]).all()


def test_class_map_is_read_only_and_checked():
    cm = ClassMap(scene(), COCO)
    with pytest.raises(ValueError):
        cm.ids[0, 0] = 1
    with pytest.raises(ValueError, match="not in palette"):
        ClassMap(np.full((2, 2), 999), COCO)


def test_grid_shows_every_candidate_and_frames_the_chosen():
    maps = [scene(person=p) for p in (3, 6, 9, 12, 15)]
    grid = candidate_grid(maps, COCO, [0.0, 1.0, 1.0, 1.0, 1.0], [10, 11, 12, 13, 14], 2, tile=64)
    assert grid.shape == (3, 2 * 68 + 4, 3 * 68 + 4)  # 5 tiles in 3 columns, 4 px gaps
    frame = (grid * 255).round().to(torch.uint8)[:, 4 + 40, 4 + 2 * 68 - 2]  # left edge of tile 2
    assert frame.tolist() == [255, 200, 0]
