"""Object recall of a class map against the objects a prompt asks for, and SBPC selection.

Names: class names are matched case-insensitively with "-" and "_" read as spaces. A COCO-stuff
"X-other"/"X-stuff" class also answers to plain "X" ("sky", "wall", "mirror"), in preference to
an unannotated COCO thing of that name (see `palettes.COCO_STUFF_UNUSED_IDS`). A plural falls
back to its singular (dogs, buses, benches, ponies, knives; irregular people/men/women/children),
and a few synonyms map to palette names (man/woman/child -> person, automobile -> car, puppy ->
dog, sofa <-> couch, ...), each tried only if the palette has the target. Leading articles and
counts ("a", "the", "two", "3") are dropped. A name the palette lacks but the other built-in
palette has is carried over by the COCO-stuff <-> ADE20K correspondence table
(`palettes.COCO_TO_ADE`): on ADE20K "dog" is "animal", "pizza" is "food"; on COCO-stuff
"sidewalk" is "pavement".

From a prompt, words are scanned left to right taking the longest name (up to 4 words) that
resolves, so "coffee table" is one object, not "table"; words that name no class are ignored.
An explicit list ("person, dog, umbrella") must resolve entirely: an unknown name raises
ValueError with close class names. Recall is per class (a prompt's "two dogs" asks for dog).
Prompt matching is literal: "a light blue car" also asks for "light", "orange cat" for "orange"
on COCO-stuff; give an explicit list when that matters.

An object is present when its class covers at least `min_area` of the image (default 0.5 %).
Recall = present / required (1.0 when nothing is required). SBPC keeps the candidate with the
highest recall; ties go to the larger total area of the required classes, then the lower seed,
then the lower index.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .maps import as_class_map
from .palettes import ADE20K, COCO_STUFF, Palette, correspondence_table

log = logging.getLogger(__name__)

DEFAULT_MIN_AREA = 0.005  # fraction of the image an object must cover to count as present
_MAX_WORDS = 4

_PERSON = ("person",)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "people": _PERSON, "man": _PERSON, "woman": _PERSON, "child": _PERSON, "boy": _PERSON,
    "girl": _PERSON, "kid": _PERSON, "guy": _PERSON, "lady": _PERSON, "baby": _PERSON,
    "human": _PERSON, "player": _PERSON, "pedestrian": _PERSON, "rider": _PERSON,
    "automobile": ("car",), "auto": ("car",), "puppy": ("dog",), "kitten": ("cat",),
    "kitty": ("cat",), "pony": ("horse",), "lamb": ("sheep",), "calf": ("cow",),
    "bike": ("bicycle",), "motorbike": ("motorcycle", "minibike"), "scooter": ("minibike",),
    "plane": ("airplane",), "aeroplane": ("airplane",), "aircraft": ("airplane",),
    "jet": ("airplane",), "ship": ("ship", "boat"), "sofa": ("sofa", "couch"),
    "couch": ("couch", "sofa"), "tv": ("tv", "television receiver"),
    "television": ("tv", "television receiver"), "table": ("table", "dining table"),
    "dining table": ("dining table", "table"), "ocean": ("sea",), "lawn": ("grass",),
    "ground": ("ground", "earth"), "street": ("road",), "building": ("building", "house"),
    "window": ("window", "windowpane"), "carpet": ("carpet", "rug"),
    "phone": ("cell phone",), "cellphone": ("cell phone",), "ball": ("ball", "sports ball"),
    "glasses": ("eye glasses", "glass"), "cloud": ("clouds", "sky"), "fridge": ("refrigerator",),
    "teddy": ("teddy bear",), "doughnut": ("donut",), "hotdog": ("hot dog",),
    "bag": ("bag", "handbag"), "picture": ("painting",), "stone": ("stone", "rock"),
    "lamp": ("lamp", "light"), "computer": ("computer", "laptop"),
}  # fmt: skip
_IRREGULAR = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife", "leaves": "leaf",
    "shelves": "shelf", "wolves": "wolf", "calves": "calf", "sheep": "sheep", "skis": "skis",
}  # fmt: skip


_LEADING = frozenset(
    ("a", "an", "the", "some", "several", "many", "few", "one", "two", "three", "four", "five",
     "six", "seven", "eight", "nine", "ten")
)  # fmt: skip


def normalize_name(name: str) -> str:
    """Lower case, '-'/'_' as spaces, single spaces."""
    return " ".join(re.sub(r"[-_]", " ", str(name).lower()).split())


@functools.lru_cache(maxsize=8)
def name_index(palette: Palette) -> dict[str, int]:
    """Normalised name -> id, including "X" for "X-other"/"X-stuff" (preferred to unused ids)."""
    index: dict[str, int] = {}
    unused = [(i, n) for i, n in enumerate(palette.names) if i in palette.unused_ids]
    for i, n in enumerate(palette.names):
        if i != palette.void_id and i not in palette.unused_ids:
            index.setdefault(normalize_name(n), i)
    for i, n in enumerate(palette.names):
        base = re.sub(r"[-_](other|stuff)$", "", n)
        if base != n and i not in palette.unused_ids:
            index.setdefault(normalize_name(base), i)
    for i, n in unused:
        index.setdefault(normalize_name(n), i)
    return index


def _singulars(word: str) -> list[str]:
    """Candidate singular forms of a (last) word, most specific first."""
    out = [_IRREGULAR[word]] if word in _IRREGULAR else []
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("ves") and len(word) > 4:
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])
    return out


def _strip_leading(phrase: str) -> str:
    """Drop leading articles and counts: "two dogs" -> "dogs", "a man" -> "man"."""
    words = phrase.split()
    while words and (words[0] in _LEADING or words[0].isdigit()):
        words = words[1:]
    return " ".join(words)


def _forms(name: str) -> list[str]:
    """The phrase and its singular forms (last word), leading articles and counts dropped."""
    phrase = _strip_leading(normalize_name(name))
    if not phrase:
        return []
    head, _, last = phrase.rpartition(" ")
    return [phrase] + [f"{head} {s}".strip() for s in _singulars(last)]


def _lookup_direct(palette: Palette, forms: list[str]) -> int | None:
    """Id of the first form that is a class name or a synonym of one, or None."""
    index = name_index(palette)
    for form in forms:
        if form in index:
            return index[form]
        for target in SYNONYMS.get(form, ()):
            if normalize_name(target) in index:
                return index[normalize_name(target)]
    return None


def lookup_class(palette: Palette, name: str) -> int | None:
    """Id for a class name (exact, synonym, singular, or the other built-in palette's), or None."""
    forms = _forms(name)
    found = _lookup_direct(palette, forms)
    if found is not None:
        return found
    other = _other_builtin(palette)
    if other is None:
        return None
    there = _lookup_direct(other, forms)
    if there is None:
        return None
    here = int(correspondence_table(other, palette)[there])
    return None if here == palette.void_id else here


def _other_builtin(palette: Palette) -> Palette | None:
    """COCO-stuff for ADE20K and back; None for any other palette."""
    if palette.name == ADE20K.name and palette.names == ADE20K.names:
        return COCO_STUFF
    if palette.name == COCO_STUFF.name and palette.names == COCO_STUFF.names:
        return ADE20K
    return None


def resolve_class(palette: Palette, name: str | int, what: str = "object") -> int:
    """Id for a class name or id; ValueError naming close class names when unknown."""
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if not 0 <= int(name) < palette.num_ids:
            raise ValueError(
                f"{what} id {name} is not in palette {palette.name}; use 0..{palette.num_ids - 1}"
            )
        return int(name)
    found = lookup_class(palette, str(name)) if str(name).strip() else None
    if found is None:
        raise ValueError(
            f"unknown {what} {name!r} for palette {palette.name}; "
            + suggest_names(palette, str(name))
        )
    if found in palette.unused_ids:
        log.warning(
            "class %r (id %d) is never labelled in %s maps; recall for it will be 0",
            palette.names[found],
            found,
            palette.name,
        )
    return found


def suggest_names(palette: Palette, name: str) -> str:
    """A hint naming the palette's closest class names (difflib) to a misspelt name."""
    vocab = [
        v
        for v in sorted(set(name_index(palette)) | set(SYNONYMS))
        if lookup_class(palette, v) is not None
    ]
    close = difflib.get_close_matches(normalize_name(name), vocab, n=4, cutoff=0.6)
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}?"
    return f"use a class name of palette {palette.name}, e.g. 'person', 'car', 'tree'"


def parse_object_list(palette: Palette, objects: str | Sequence[str]) -> tuple[int, ...]:
    """Ids for an explicit list ("person, dog; umbrella" or a sequence); duplicates dropped."""
    items = re.split(r"[,;\n]", objects) if isinstance(objects, str) else list(objects)
    items = [item.strip() if isinstance(item, str) else item for item in items]
    ids = [resolve_class(palette, item) for item in items if str(item).strip()]
    return tuple(dict.fromkeys(ids))


def match_prompt(palette: Palette, prompt: str) -> tuple[int, ...]:
    """Ids of the palette classes a prompt mentions (longest phrase first, in prompt order)."""
    words = re.findall(r"[a-z]+", str(prompt).lower())
    found: list[int] = []
    i = 0
    while i < len(words):
        for n in range(min(_MAX_WORDS, len(words) - i), 0, -1):
            hit = lookup_class(palette, " ".join(words[i : i + n]))
            if hit is not None:
                found.append(hit)
                i += n
                break
        else:
            i += 1
    return tuple(dict.fromkeys(c for c in found if c != palette.void_id))


def required_classes(
    palette: Palette, objects: str | Sequence[str] = "", prompt: str = ""
) -> tuple[int, ...]:
    """The required ids: the explicit list when non-empty, else those matched in the prompt."""
    has_list = bool(objects.strip()) if isinstance(objects, str) else bool(objects)
    if has_list:
        return parse_object_list(palette, objects)
    ids = match_prompt(palette, prompt)
    if not ids:
        log.warning("the prompt names no %s class; every candidate gets recall 1", palette.name)
    return ids


@dataclass(frozen=True)
class ObjectPresence:
    """One required object in one map: its area fraction and whether it counts as present."""

    name: str
    class_id: int
    area: float
    present: bool


@dataclass(frozen=True)
class RecallReport:
    """Recall of one map: present / required, with each object's presence."""

    recall: float
    objects: tuple[ObjectPresence, ...]

    @property
    def required_area(self) -> float:
        return float(sum(o.area for o in self.objects))


@dataclass(frozen=True)
class Selection:
    """The SBPC pick: candidate index and seed, its recall report, and every candidate's recall."""

    index: int
    seed: int
    recall: float
    objects: tuple[ObjectPresence, ...]
    recalls: tuple[float, ...]


def compute_recall(
    class_map: Any, required: Sequence[int], palette: Palette, min_area: float = DEFAULT_MIN_AREA
) -> RecallReport:
    """Which required classes cover at least `min_area` of the map, and the recall."""
    if not 0.0 <= min_area <= 1.0:
        raise ValueError(f"min_area is a fraction of the image in [0, 1], got {min_area!r}")
    ids = as_class_map(class_map, palette)
    bad = [int(c) for c in required if not 0 <= int(c) < palette.num_ids]
    if bad:
        raise ValueError(
            f"required class ids {bad} are not in palette {palette.name}; "
            f"use 0..{palette.num_ids - 1} (resolve names with resolve_class)"
        )
    counts = np.bincount(ids.ravel(), minlength=palette.num_ids)
    objects = []
    for class_id in dict.fromkeys(int(c) for c in required):
        area = float(counts[palette.canonical_id(class_id)]) / max(ids.size, 1)
        present = area > 0 and area >= min_area
        objects.append(ObjectPresence(palette.name_of(class_id), class_id, area, present))
    recall = sum(o.present for o in objects) / len(objects) if objects else 1.0
    return RecallReport(recall, tuple(objects))


def select_best(
    class_maps: Sequence[Any],
    required: Sequence[int],
    palette: Palette,
    seeds: Sequence[int] | None = None,
    min_area: float = DEFAULT_MIN_AREA,
) -> Selection:
    """SBPC: the candidate with the highest recall; ties -> larger required area, lower seed."""
    if len(class_maps) == 0:
        raise ValueError("no candidate maps to choose from; sample at least one")
    seeds = list(range(len(class_maps))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(class_maps):
        raise ValueError(f"{len(class_maps)} candidate maps but {len(seeds)} seeds; give one each")
    reports = [compute_recall(m, required, palette, min_area) for m in class_maps]
    best = min(
        range(len(reports)),
        key=lambda i: (-reports[i].recall, -reports[i].required_area, seeds[i], i),
    )
    pick = reports[best]
    log.info(
        "SBPC picked candidate %d (seed %d): recall %.3f over %d candidates",
        best,
        seeds[best],
        pick.recall,
        len(reports),
    )
    return Selection(best, seeds[best], pick.recall, pick.objects, tuple(r.recall for r in reports))
