"""Class maps <-> palette RGB, noise robustness, nearest resizing, conversion and instances."""

from collections import deque

import numpy as np
import pytest
import torch

from locref_core.fgdm.maps import (
    as_class_map,
    class_fractions,
    convert_map,
    decode,
    encode,
    instances,
    label_components,
    majority_filter,
    nearest_ids,
    resize_nearest,
)
from locref_core.fgdm.palettes import ADE20K, COCO_STUFF
from locref_core.fgdm.recall import resolve_class

PALETTES = [ADE20K, COCO_STUFF]


def decodable_ids(palette):
    """Every id a decoded map can report (colour twins read back as their first id)."""
    return np.array([k for k in range(palette.num_ids) if palette.canonical_id(k) == k])


def blocky(palette, rng, blocks=(8, 12), size=8):
    """A map of size x size blocks, each a random decodable id (void included)."""
    grid = rng.choice(decodable_ids(palette), blocks)
    return np.kron(grid, np.ones((size, size), dtype=np.int64))  # (8 * size, 12 * size)


def scene(palette, names, size=128, block=8, seed=0):
    """A realistic block-aligned scene: a top band, a bottom band, then objects on top."""
    rng = np.random.default_rng(seed)
    ids = [resolve_class(palette, n) for n in names]
    g = size // block
    grid = np.full((g, g), ids[0])
    grid[g // 2 :] = ids[1]
    grid[: g // 6] = ids[2]
    for k in ids[3:]:
        h, w = rng.integers(2, g // 3, 2)
        y, x = rng.integers(0, g - h), rng.integers(0, g - w)
        grid[y : y + h, x : x + w] = k
    return np.kron(grid, np.ones((block, block), dtype=np.int64))


def add_noise(class_map, palette, sigma, seed):
    rgb = encode(class_map, palette).astype(np.float32) / 255.0  # ComfyUI IMAGE: [0, 1]
    return rgb + np.random.default_rng(seed).normal(0.0, sigma, rgb.shape).astype(np.float32)


# ----------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("palette", PALETTES, ids=lambda p: p.name)
def test_encode_paints_palette_colours(palette):
    ids = np.array([[0, 1], [palette.void_id, 2]])
    rgb = encode(ids, palette)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == palette.colors[1] and tuple(rgb[1, 1]) == palette.colors[2]
    assert tuple(rgb[1, 0]) == palette.void_color


@pytest.mark.parametrize("palette", PALETTES, ids=lambda p: p.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_inverts_encode_on_blocky_maps(palette, seed):
    m = blocky(palette, np.random.default_rng(seed))
    assert len(np.unique(m)) > 40  # many classes side by side, void included
    rgb = encode(m, palette)
    assert np.array_equal(decode(rgb, palette), m)  # uint8 0..255
    assert np.array_equal(decode(rgb.astype(np.float32) / 255.0, palette), m)  # floats 0..1
    assert np.array_equal(decode(torch.from_numpy(rgb.astype(np.float32) / 255.0), palette), m)


@pytest.mark.parametrize("palette", PALETTES, ids=lambda p: p.name)
def test_decode_inverts_encode_per_pixel_without_the_mode_filter(palette):
    m = np.random.default_rng(3).choice(decodable_ids(palette), (40, 56))  # every pixel a speck
    assert np.array_equal(decode(encode(m, palette), palette, mode_filter=0), m)
    assert np.array_equal(decode(encode(m, palette), palette, mode_filter=0, smooth=0), m)


def test_colour_twin_decodes_to_the_first_id():
    m = np.full((6, 6), 48)  # ADE skyscraper, painted like road
    assert np.all(decode(encode(m, ADE20K), ADE20K) == 6)


OUTDOOR = {
    ADE20K: ["building", "road", "sky", "tree", "person", "car", "sidewalk", "signboard"],
    COCO_STUFF: ["building", "road", "sky", "tree", "person", "car", "pavement", "stop sign"],
}
INDOOR = {
    ADE20K: ["wall", "floor", "ceiling", "bed", "windowpane", "person", "table", "chair", "lamp",
             "curtain", "cabinet"],
    COCO_STUFF: ["wall", "floor", "ceiling", "bed", "window", "person", "dining table", "chair",
                 "light", "curtain", "cabinet"],
}  # fmt: skip


@pytest.mark.parametrize("palette", PALETTES, ids=lambda p: p.name)
@pytest.mark.parametrize("names", [OUTDOOR, INDOOR], ids=["outdoor", "indoor"])
def test_decode_survives_vae_like_noise(palette, names):
    m = scene(palette, names[palette], seed=0)
    assert len(np.unique(m)) >= 7
    for seed in range(2):
        rgb = add_noise(m, palette, 8 / 255, seed)
        accuracy = float((decode(rgb, palette) == m).mean())
        assert accuracy >= 0.99, (palette.name, seed, accuracy)


def test_smoothing_is_what_makes_dense_ade_colours_survive_noise():
    # ceiling/earth are 10 apart, table/rug 10.4: per-pixel nearest colour fails on ~1 in 4.
    m = scene(ADE20K, INDOOR[ADE20K], seed=0)
    rgb = add_noise(m, ADE20K, 8 / 255, 0)
    assert (decode(rgb, ADE20K, smooth=0) == m).mean() < 0.97
    assert (decode(rgb, ADE20K) == m).mean() >= 0.99


@pytest.mark.parametrize("palette", PALETTES, ids=lambda p: p.name)
def test_far_off_colours_become_void(palette):
    colors = palette.color_table().astype(np.float32)
    probe = np.array([176.0, 112.0, 240.0] if palette is ADE20K else [144.0, 240.0, 240.0])
    assert np.sqrt(((colors - probe) ** 2).sum(1)).min() > 65  # far from every palette colour
    rgb = encode(np.full((5, 7), 1), palette)
    rgb[1:4, 2:5] = probe.astype(np.uint8)
    out = decode(rgb, palette)
    assert np.all(out[1:4, 2:5] == palette.void_id) and out[0, 0] == 1
    assert np.all(nearest_ids(probe[None], palette, 60.0) == palette.void_id)


def test_cutoff_decides_between_class_and_void():
    pixel = np.array([[0.0, 0.0, 20.0]])  # 20 from COCO person (0, 0, 0), 44 from the next
    assert nearest_ids(pixel, COCO_STUFF, 60.0)[0] == 1
    assert nearest_ids(pixel, COCO_STUFF, 21.0)[0] == 1
    assert nearest_ids(pixel, COCO_STUFF, 19.0)[0] == 0


def test_fgdm_void_label_182_colour_decodes_to_void():
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:] = (0, 224, 192)
    assert np.all(decode(rgb, COCO_STUFF) == 0)


def test_decode_rejects_bad_arguments():
    rgb = encode(np.zeros((4, 4), dtype=np.int64), ADE20K)
    with pytest.raises(ValueError, match="cutoff must be a positive RGB distance"):
        decode(rgb, ADE20K, cutoff=0)
    with pytest.raises(ValueError, match="smooth is a window radius"):
        decode(rgb, ADE20K, smooth=-1)
    with pytest.raises(ValueError, match=r"must be \(H, W, 3\), got shape \(4, 4\)"):
        decode(rgb[..., 0], ADE20K)
    with pytest.raises(ValueError, match="mode filter size must be 3 or 5"):
        decode(rgb, ADE20K, mode_filter=4)


# ----------------------------------------------------------------------- majority filter


def test_majority_filter_removes_specks_keeps_corners_and_lines():
    m = np.zeros((9, 9), dtype=np.int64)
    m[2, 2] = 5  # isolated speck
    m[6:8, 6:8] = 7  # 2 x 2 block: its corners have 4 votes
    m[4, 4:8] = 3  # a 1-pixel line: interior pixels have 3 votes, the end pixels 2
    out = majority_filter(m)
    assert out[2, 2] == 0
    assert np.all(out[6:8, 6:8] == 7)
    assert np.all(out[4, 5:7] == 3)
    assert np.array_equal(majority_filter(m[:, :3] * 0 + 4), np.full((9, 3), 4))
    with pytest.raises(ValueError, match="3 or 5"):
        majority_filter(m, 2)


# ----------------------------------------------------------------------- resizing


@pytest.mark.parametrize("size", [(31, 47), (23, 37), (64, 96), (97, 131), (200, 151)])
def test_resize_nearest_keeps_the_class_set_and_invents_nothing(size):
    rng = np.random.default_rng(sum(size))
    m = blocky(COCO_STUFF, rng, blocks=(6, 9), size=11)  # (66, 99), blocks of 11 px
    out = resize_nearest(m, *size)
    assert out.shape == size and out.dtype == np.int64
    assert set(np.unique(out)) == set(np.unique(m))


def test_resize_nearest_never_blends_and_is_exact_for_integer_factors():
    m = np.random.default_rng(5).integers(0, 183, (7, 5))
    assert np.array_equal(resize_nearest(m, 21, 10), np.kron(m, np.ones((3, 2), dtype=np.int64)))
    assert np.array_equal(resize_nearest(m, 7, 5), m)
    assert set(np.unique(resize_nearest(m, 3, 2))) <= set(np.unique(m))
    assert np.array_equal(resize_nearest(resize_nearest(m, 28, 20), 7, 5), m)
    with pytest.raises(ValueError, match="at least 1x1"):
        resize_nearest(m, 0, 4)


# ----------------------------------------------------------------------- conversion


def test_convert_coco_to_ade_and_back():
    names = ["person", "car", "sky-other", "cell phone"]
    m = np.array([[COCO_STUFF.names.index(n) for n in names], [0, 1, 3, 157]])
    ade = convert_map(m, COCO_STUFF, ADE20K)
    person, car, sky = (ADE20K.names.index(n) for n in ("person", "car", "sky"))
    assert ade.tolist() == [[person, car, sky, 150], [150, person, car, sky]]
    back = convert_map(ade, ADE20K, COCO_STUFF)
    assert back.tolist() == [[1, 3, 157, 0], [0, 1, 3, 157]]  # unmatched and void -> void
    assert convert_map(m, COCO_STUFF, ADE20K, fallback=0)[0, 3] == 0
    with pytest.raises(ValueError, match="class id 183 is not in palette coco183"):
        convert_map(np.array([[183]]), COCO_STUFF, ADE20K)


def test_class_fractions_sum_to_one():
    m = np.array([[1, 1, 2, 2], [1, 1, 1, 0]])
    fr = class_fractions(m, 4)
    assert fr.tolist() == [1 / 8, 5 / 8, 2 / 8, 0.0]


def test_as_class_map_validates():
    assert as_class_map(torch.tensor([[1.0, 2.0]])).dtype == np.int64
    with pytest.raises(ValueError, match=r"must be \(H, W\)"):
        as_class_map(np.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="fractional"):
        as_class_map(np.array([[0.5]]))
    with pytest.raises(ValueError, match="class id -1 is not in palette ade150; ids run 0..150"):
        as_class_map(np.array([[-1, 3]]), ADE20K)


# ----------------------------------------------------------------------- components


def bfs_components(mask, connectivity):
    """Reference labelling (breadth-first), labels in raster order of the first pixel."""
    h, w = mask.shape
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    labels = np.zeros((h, w), dtype=np.int32)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        n += 1
        labels[y, x] = n
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for dy, dx in steps:
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = n
                    queue.append((ny, nx))
    return labels, n


def test_diagonal_touch_joins_only_with_8_connectivity():
    mask = np.array([[1, 0, 0],
                     [0, 1, 0],
                     [0, 0, 1]], dtype=bool)  # fmt: skip
    assert label_components(mask, 4)[1] == 3
    labels, n = label_components(mask, 8)
    assert n == 1 and np.all(labels[mask] == 1)


def test_u_shape_merges_runs_that_meet_below():
    mask = np.array([[1, 0, 0, 1, 0, 1],
                     [1, 0, 0, 1, 0, 1],
                     [1, 1, 1, 1, 0, 1]], dtype=bool)  # fmt: skip
    labels, n = label_components(mask, 4)
    assert n == 2
    assert np.all(labels[:, :4][mask[:, :4]] == 1) and np.all(labels[:, 5] == 2)
    empty, count = label_components(np.zeros((3, 3), dtype=bool))
    assert count == 0 and not empty.any()
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        label_components(mask, 6)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", range(4))
def test_components_match_a_breadth_first_reference(connectivity, seed):
    mask = np.random.default_rng(seed).random((23, 31)) < 0.45
    labels, n = label_components(mask, connectivity)
    ref, ref_n = bfs_components(mask, connectivity)
    assert n == ref_n and np.array_equal(labels, ref)


def test_instances_are_ordered_by_area_then_raster_order():
    m = np.zeros((8, 10), dtype=np.int64)
    m[0, 0] = 4  # area 1, first in raster order
    m[1:3, 6:8] = 4  # area 4
    m[5:8, 1:4] = 4  # area 9
    m[5:7, 8:10] = 4  # area 4, after the other area-4 one in raster order
    m[4, 4] = 2  # another class
    labels, areas = instances(m, 4)
    assert areas.tolist() == [9, 4, 4, 1]
    assert labels[6, 2] == 1 and labels[1, 6] == 2 and labels[5, 8] == 3 and labels[0, 0] == 4
    assert labels[4, 4] == 0 and labels.dtype == np.int32
    # 4-connectivity splits a diagonal pair that 8-connectivity keeps together.
    d = np.zeros((4, 4), dtype=np.int64)
    d[0, 0] = d[1, 1] = 1
    assert len(instances(d, 1, connectivity=8)[1]) == 1
    assert instances(d, 1, connectivity=4)[1].tolist() == [1, 1]
    assert len(instances(d, 9)[1]) == 0


def test_components_of_a_mask_that_is_not_2d_are_refused():
    with pytest.raises(ValueError, match=r"a mask must be \(H, W\), got shape \(2, 2, 2\)"):
        label_components(np.zeros((2, 2, 2), bool))
