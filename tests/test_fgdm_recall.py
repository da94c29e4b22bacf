"""Class names, prompt matching, object recall and SBPC selection on hand-made maps."""

import logging

import numpy as np
import pytest

from locref_core.fgdm.palettes import ADE20K, COCO_STUFF
from locref_core.fgdm.recall import (
    compute_recall,
    lookup_class,
    match_prompt,
    parse_object_list,
    required_classes,
    resolve_class,
    select_best,
)

PERSON, CAR, DOG, CAT = 1, 3, 18, 17
SKY, GRASS, ROAD = 157, 124, 149
DINING_TABLE, TRAFFIC_LIGHT, TABLE = 67, 10, 165


def names(palette, ids):
    return [palette.name_of(i) for i in ids]


# ----------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, expected",
    [("person", PERSON), ("Person", PERSON), ("a man", PERSON), ("women", PERSON),
     ("people", PERSON), ("two dogs", DOG), ("puppies", DOG), ("3 cars", CAR),
     ("automobile", CAR), ("sky", SKY), ("sky-other", SKY), ("sky_other", SKY),
     ("dining table", DINING_TABLE), ("dining tables", DINING_TABLE), ("table", TABLE),
     ("traffic light", TRAFFIC_LIGHT), ("traffic lights", TRAFFIC_LIGHT),
     ("sofa", 63), ("buses", 6), ("benches", 15), ("ponies", 19), ("knives", 49),
     ("mirror", 133), ("sidewalk", 140)],
)  # fmt: skip
def test_lookup_coco_stuff(name, expected):
    assert lookup_class(COCO_STUFF, name) == expected, COCO_STUFF.name_of(expected)


@pytest.mark.parametrize(
    "name, expected",
    [("person", "person"), ("a woman", "person"), ("traffic light", "traffic light"),
     ("dining table", "table"), ("coffee table", "coffee table"), ("couch", "sofa"),
     ("two dogs", "animal"), ("pizza", "food"), ("sky", "sky"), ("skyscraper", "skyscraper")],
)  # fmt: skip
def test_lookup_ade20k(name, expected):
    assert ADE20K.name_of(lookup_class(ADE20K, name)) == expected


def test_lookup_misses_return_none():
    for miss in ("", "a", "the two", "xyzzy", "cell phone tower"):
        assert lookup_class(COCO_STUFF, miss) is None, miss
    assert lookup_class(ADE20K, "cell phone") is None  # no ADE counterpart


def test_resolve_class_ids_names_and_errors(caplog):
    assert resolve_class(COCO_STUFF, 18) == 18 and resolve_class(COCO_STUFF, np.int64(3)) == 3
    assert resolve_class(COCO_STUFF, "dog") == DOG
    with pytest.raises(ValueError, match="object id 183 is not in palette coco183; use 0..182"):
        resolve_class(COCO_STUFF, 183)
    with pytest.raises(ValueError, match="unknown object 'persn' .* did you mean 'person'"):
        resolve_class(COCO_STUFF, "persn")
    with pytest.raises(ValueError, match="unknown object 'xyzzy'.*use a class name"):
        resolve_class(COCO_STUFF, "xyzzy")
    with caplog.at_level(logging.WARNING):
        assert resolve_class(COCO_STUFF, "hat") == 26  # exists but is never labelled
    assert "never labelled" in caplog.text


# ----------------------------------------------------------------------- prompts and lists


def test_match_prompt_plurals_synonyms_and_multiword_names():
    prompt = "Two dogs and a man next to a dining table under a traffic light"
    assert match_prompt(COCO_STUFF, prompt) == (DOG, PERSON, DINING_TABLE, TRAFFIC_LIGHT)
    ade = match_prompt(ADE20K, prompt)
    assert names(ADE20K, ade) == ["animal", "person", "table", "traffic light"]


def test_match_prompt_prefers_the_longest_name_and_drops_duplicates():
    assert names(ADE20K, match_prompt(ADE20K, "a coffee table, a table")) == [
        "coffee table",
        "table",
    ]
    assert match_prompt(COCO_STUFF, "a dog, another dog and dogs") == (DOG,)
    assert match_prompt(COCO_STUFF, "a beautiful photograph, highly detailed") == ()


def test_parse_object_list_and_unknown_names():
    assert parse_object_list(COCO_STUFF, "person, two dogs; the sky\nperson") == (PERSON, DOG, SKY)
    assert parse_object_list(COCO_STUFF, ["car", " dog ", "", 124]) == (CAR, DOG, GRASS)
    with pytest.raises(ValueError, match="unknown object 'umbrela'.*did you mean 'umbrella'"):
        parse_object_list(COCO_STUFF, "person, umbrela")
    with pytest.raises(ValueError, match="unknown object 'dining tabel'.*'dining table'"):
        parse_object_list(COCO_STUFF, "dining tabel")


def test_required_classes_explicit_list_wins_over_prompt(caplog):
    assert required_classes(COCO_STUFF, "car", "a dog and a cat") == (CAR,)
    assert required_classes(COCO_STUFF, "", "a dog and a cat") == (DOG, CAT)
    assert required_classes(COCO_STUFF, [], "a man") == (PERSON,)
    with pytest.raises(ValueError, match="unknown object 'unicorn'"):
        required_classes(COCO_STUFF, "unicorn", "a dog")
    with caplog.at_level(logging.WARNING):
        assert required_classes(COCO_STUFF, "", "an abstract painting") == ()
    assert "names no coco183 class" in caplog.text


# ----------------------------------------------------------------------- recall


def hand_map():
    """100 x 100: grass, 1 % person (10 x 10), 0.4 % dog (4 x 10), 0.5 % car (5 x 10)."""
    m = np.full((100, 100), GRASS)
    m[10:20, 10:20] = PERSON
    m[50:54, 50:60] = DOG
    m[80:85, 0:10] = CAR
    return m


def test_recall_counts_classes_above_min_area():
    report = compute_recall(hand_map(), [PERSON, DOG, CAR, CAT], COCO_STUFF)
    assert [(o.name, o.area, o.present) for o in report.objects] == [
        ("person", 0.01, True),
        ("dog", 0.004, False),
        ("car", 0.005, True),
        ("cat", 0.0, False),
    ]
    assert report.recall == 0.5
    assert compute_recall(hand_map(), [PERSON, DOG], COCO_STUFF, min_area=0.004).recall == 1.0
    assert compute_recall(hand_map(), [PERSON, DOG], COCO_STUFF, min_area=0.0041).recall == 0.5
    assert compute_recall(hand_map(), [CAT], COCO_STUFF, min_area=0.0).recall == 0.0
    assert compute_recall(hand_map(), [], COCO_STUFF).recall == 1.0
    assert report.required_area == pytest.approx(0.019)


def test_recall_counts_ade_skyscraper_as_its_colour_twin_road():
    m = np.full((10, 10), 6)  # decoded maps only ever report road for that colour
    report = compute_recall(m, [48], ADE20K)
    assert report.recall == 1.0 and report.objects[0].name == "skyscraper"


def test_recall_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_area is a fraction"):
        compute_recall(hand_map(), [PERSON], COCO_STUFF, min_area=5)
    with pytest.raises(ValueError, match=r"required class ids \[200\].*use 0..182"):
        compute_recall(hand_map(), [200], COCO_STUFF)
    with pytest.raises(ValueError, match="not in palette ade150"):
        compute_recall(np.full((4, 4), 151), [1], ADE20K)


# ----------------------------------------------------------------------- SBPC selection


def with_objects(**areas):
    """A 100 x 100 grass map with the given classes covering `rows` full rows each."""
    m = np.full((100, 100), GRASS)
    row = 0
    for cls, rows in areas.items():
        m[row : row + rows] = {"person": PERSON, "dog": DOG, "car": CAR}[cls]
        row += rows
    return m


def test_select_best_picks_the_highest_recall():
    maps = [with_objects(person=5), with_objects(person=5, dog=5), with_objects(dog=1)]
    pick = select_best(maps, [PERSON, DOG], COCO_STUFF, seeds=[10, 11, 12])
    assert (pick.index, pick.seed, pick.recall) == (1, 11, 1.0)
    assert pick.recalls == (0.5, 1.0, 0.5)
    assert [o.name for o in pick.objects] == ["person", "dog"]


def test_select_best_tie_goes_to_larger_required_area():
    # Same recall; the later candidate with the higher seed covers more of the required classes.
    maps = [with_objects(person=2, dog=2, car=30), with_objects(person=6, dog=3)]
    pick = select_best(maps, [PERSON, DOG], COCO_STUFF, seeds=[1, 99])
    assert pick.recalls == (1.0, 1.0) and (pick.index, pick.seed) == (1, 99)


def test_select_best_then_lower_seed_then_lower_index():
    maps = [with_objects(person=4), with_objects(person=4), with_objects(person=4)]
    assert select_best(maps, [PERSON], COCO_STUFF, seeds=[7, 3, 5]).index == 1
    assert select_best(maps, [PERSON], COCO_STUFF, seeds=[4, 4, 4]).index == 0
    assert select_best(maps, [PERSON], COCO_STUFF).seed == 0  # seeds default to the indices


def test_select_best_rejects_bad_input():
    with pytest.raises(ValueError, match="no candidate maps"):
        select_best([], [PERSON], COCO_STUFF)
    with pytest.raises(ValueError, match="2 candidate maps but 1 seeds"):
        select_best([hand_map(), hand_map()], [PERSON], COCO_STUFF, seeds=[3])
