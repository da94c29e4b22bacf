"""Palette tables (ADE20K-150, COCO-stuff-183), the VOC bitget colours, and class correspondence."""

import numpy as np
import pytest

from locref_core.fgdm.palettes import (
    ADE20K,
    COCO_STUFF,
    COCO_TO_ADE,
    Palette,
    correspondence_table,
    decode_candidates,
    get_palette,
    voc_bitget_color,
)


def test_ade20k_has_150_classes_plus_black_void():
    assert len(ADE20K.names) == len(ADE20K.colors) == 150
    assert ADE20K.void_id == 150 and ADE20K.num_ids == 151
    assert ADE20K.name_of(150) == "unknown" and ADE20K.void_color == (0, 0, 0)
    assert all(name and name == name.strip() for name in ADE20K.names)
    assert len(set(ADE20K.names)) == 150
    table = ADE20K.color_table()
    assert table.shape == (151, 3) and table.dtype == np.uint8
    assert tuple(table[150]) == (0, 0, 0)
    assert (0, 0, 0) not in ADE20K.colors


def test_coco_stuff_has_183_ids_with_white_unlabeled_void():
    assert len(COCO_STUFF.names) == len(COCO_STUFF.colors) == 183
    assert COCO_STUFF.num_ids == 183 and COCO_STUFF.void_id == 0
    assert COCO_STUFF.names[0] == "unlabeled" and COCO_STUFF.void_color == (255, 255, 255)
    assert tuple(COCO_STUFF.color_table()[0]) == (255, 255, 255)
    assert len(set(COCO_STUFF.names)) == 183
    assert COCO_STUFF.unused_ids == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
    assert [COCO_STUFF.names[i] for i in (12, 45, 91)] == ["street sign", "plate", "hair brush"]


def test_ade_ids_6_and_48_share_one_colour_and_nothing_else_does():
    assert ADE20K.colors[6] == ADE20K.colors[48] == (140, 140, 140)
    assert (ADE20K.names[6], ADE20K.names[48]) == ("road", "skyscraper")
    assert len(set(ADE20K.colors)) == 149
    assert ADE20K.canonical_id(48) == 6 and ADE20K.canonical_id(6) == 6
    assert ADE20K.canonical_id(12) == 12 and ADE20K.canonical_id(150) == 150


@pytest.mark.parametrize(
    "class_id, name, color",
    [(0, "wall", (120, 120, 120)), (2, "sky", (6, 230, 230)), (4, "tree", (4, 200, 3)),
     (12, "person", (150, 5, 61)), (20, "car", (0, 102, 200)),
     (136, "traffic light", (41, 0, 255)), (149, "flag", (92, 0, 255))],
)  # fmt: skip
def test_ade_spot_checks(class_id, name, color):
    assert ADE20K.names[class_id] == name and ADE20K.colors[class_id] == color


def test_voc_bitget_known_colours():
    # PASCAL VOC: background, aeroplane, bicycle, bird, car, cat, person, the 255 boundary.
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0),
                7: (128, 128, 128), 8: (64, 0, 0), 15: (192, 128, 128),
                255: (224, 224, 192)}  # fmt: skip
    assert {i: voc_bitget_color(i) for i in expected} == expected


def test_coco_stuff_colours_are_voc_of_id_minus_one():
    assert COCO_STUFF.names[1] == "person" and COCO_STUFF.colors[1] == voc_bitget_color(0)
    assert COCO_STUFF.colors[1] == (0, 0, 0)
    assert all(COCO_STUFF.colors[k] == voc_bitget_color(k - 1) for k in range(1, 183))
    assert len(set(COCO_STUFF.colors)) == 183  # distinct, and no class is painted white
    spots = {3: ("car", (0, 128, 0)), 18: ("dog", (128, 64, 0)),
             157: ("sky-other", (64, 96, 128)), 182: ("wood", (128, 96, 192))}  # fmt: skip
    assert {k: (COCO_STUFF.names[k], COCO_STUFF.colors[k]) for k in spots} == spots


def test_decode_candidates_add_void_and_extra_colours():
    colors, ids = decode_candidates(ADE20K)
    assert colors.shape == (151, 3) and ids[-1] == 150 and tuple(colors[-1]) == (0, 0, 0)
    assert list(ids[:150]) == list(range(150))
    colors, ids = decode_candidates(COCO_STUFF)
    # FG-DM's loader paints void as label 182: that colour also decodes to void.
    assert colors.shape == (184, 3) and ids[-1] == 0
    assert tuple(colors[-1]) == voc_bitget_color(182) == (0, 224, 192)


def test_get_palette_by_name_alias_or_value():
    assert get_palette("ade150") is ADE20K and get_palette("ADE20K") is ADE20K
    assert get_palette("coco183") is COCO_STUFF and get_palette("coco_stuff") is COCO_STUFF
    assert get_palette("fgdm") is COCO_STUFF and get_palette(ADE20K) is ADE20K
    with pytest.raises(ValueError, match="unknown palette 'voc'.*ade150.*coco183"):
        get_palette("voc")


def test_palette_validation_and_name_errors():
    with pytest.raises(ValueError, match="2 names but 1 colours"):
        Palette("bad", ("a", "b"), ((0, 0, 0),), 0, (1, 1, 1))
    with pytest.raises(ValueError, match="void id 5"):
        Palette("bad", ("a",), ((0, 0, 0),), 5, (1, 1, 1))
    with pytest.raises(ValueError, match="class id 151 is not in palette ade150; use 0..150"):
        ADE20K.name_of(151)


def coco(name: str) -> int:
    return COCO_STUFF.names.index(name)


def ade(name: str) -> int:
    return ADE20K.names.index(name)


def test_coco_to_ade_for_corresponding_classes():
    table = correspondence_table(COCO_STUFF, ADE20K)
    assert table.shape == (183,) and table.dtype == np.int64
    assert table[coco("person")] == ade("person") and table[coco("car")] == ade("car")
    assert table[coco("sky-other")] == ade("sky") and table[coco("clouds")] == ade("sky")
    assert table[coco("dog")] == ade("animal") and table[coco("couch")] == ade("sofa")
    assert table[0] == ADE20K.void_id  # void -> void
    for unmatched in ("cell phone", "frisbee", "fog", "snow"):
        assert table[coco(unmatched)] == ADE20K.void_id
    assert not table.flags.writeable  # cached: callers must not change it


def test_ade_to_coco_goes_back_to_the_first_listed_class():
    table = correspondence_table(ADE20K, COCO_STUFF)
    assert table.shape == (151,)
    assert table[ade("person")] == coco("person") and table[ade("car")] == coco("car")
    assert table[ade("sky")] == coco("sky-other")  # not clouds
    assert table[ade("mirror")] == coco("mirror-stuff")  # the annotated twin
    assert table[ade("animal")] == 0 and table[ade("skyscraper")] == coco("skyscraper")
    assert table[ADE20K.void_id] == 0 and table[ade("chandelier")] == 0


def test_round_trip_is_identity_on_the_classes_mapped_back():
    there = correspondence_table(COCO_STUFF, ADE20K)
    back = correspondence_table(ADE20K, COCO_STUFF)
    firsts = {}
    for c, a in COCO_TO_ADE:
        firsts.setdefault(a, c)
    assert len(firsts) > 60
    for a, c in firsts.items():
        if a != "animal":
            assert back[there[coco(c)]] == coco(c), c


def test_correspondence_fallback_and_same_palette():
    table = correspondence_table(COCO_STUFF, ADE20K, fallback=ade("wall"))
    assert table[coco("cell phone")] == ade("wall") and table[0] == ADE20K.void_id
    assert np.array_equal(correspondence_table(ADE20K, ADE20K), np.arange(151))
    with pytest.raises(ValueError, match="fallback id 151 is not in palette ade150"):
        correspondence_table(COCO_STUFF, ADE20K, fallback=151)
    other = Palette("two", ("a", "b"), ((0, 0, 0), (9, 9, 9)), 0, (1, 1, 1))
    with pytest.raises(ValueError, match="no correspondence"):
        correspondence_table(other, ADE20K)
