"""Segmentation palettes for FG-DM maps: ADE20K-150 and COCO-stuff-183, and conversion between them.

A class map is an (H, W) int64 array of class ids; a palette says which RGB colour each id is
painted with and which id stands for "void" (unlabeled, or a pixel no palette colour explains).

* ``ADE20K`` -- what the seg ControlNet ``control_v11p_sd15_seg`` was trained on: ids 0..149 are
  the 150 ADE20K classes in mmseg order (``reduce_zero_label``: ADE's raw "other" 0 is dropped).
  Void is id 150 ("unknown"), painted black, which is not an ADE colour (the nearest, earth
  (80, 50, 50), is ~107 away). Ids 6 (road) and 48 (skyscraper) share (140, 140, 140); decoding
  gives the first id, 6, so 48 never comes out of a decoded map, and recall counts a requested
  skyscraper as its colour twin road (see ``canonical_id``).
* ``COCO_STUFF`` -- what FG-DM generates: 183 ids indexed by the official COCO-stuff id, 0 =
  unlabeled (void), 1..91 things, 92..182 stuff. The 11 COCO thing ids that have no segmentation
  annotations (street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender,
  hair brush) keep their id, name and colour so numbering has no gaps, but FG-DM never learned
  them (``unused_ids``); name look-up prefers the annotated "-stuff"/"-other" class instead.
  Colours: FG-DM colours the COCO-stuff label PNGs, whose pixel value is ``id - 1`` (255 =
  void), with the PASCAL-VOC "bitget" colour map, so id k >= 1 is painted
  ``voc_bitget_color(k - 1)`` (person = black) and void is painted white. Its COCO data loader
  also rewrites void 255 to 182 before colouring, so trained maps may show void as
  ``voc_bitget_color(182)`` = (0, 224, 192): decoding maps that colour to void as well.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

RGB = tuple[int, int, int]

# Source: github lllyasviel/ControlNet-v1-1-nightly, annotator/uniformer/mmseg/datasets/ade.py
# (ADE20KDataset.CLASSES, the annotator behind control_v11p_sd15_seg; same list as
# open-mmlab/mmsegmentation mmseg/datasets/ade.py). "bed " is stripped of its trailing space.
ADE20K_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
ADE20K_COLORS: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),  # 0-4
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),  # 5-9
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),  # 10-14
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),  # 15-19
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),  # 20-24
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),  # 25-29
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),  # 30-34
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),  # 35-39
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),  # 40-44
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),  # 45-49
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),  # 50-54
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),  # 55-59
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),  # 60-64
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),  # 65-69
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),  # 70-74
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),  # 75-79
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),  # 80-84
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),  # 85-89
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),  # 90-94
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),  # 95-99
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),  # 100-104
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),  # 105-109
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),  # 110-114
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),  # 115-119
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),  # 120-124
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),  # 125-129
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),  # 130-134
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),  # 135-139
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),  # 140-144
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),  # 145-149
)  # fmt: skip

# Source: github nightrome/cocostuff, labels.txt (id: name, 0..182; identical names in
# DeepakSridhar/fgdm scripts/coco_class_dict.py, which numbers "unlabeled" 183 instead of 0).
COCO_STUFF_NAMES: tuple[str, ...] = (
    "unlabeled", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet", "door", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
    "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone",
    "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other",
    "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper",
    "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops",
    "window-blind", "window-other", "wood",
)  # fmt: skip

# ADE20K has no void class; painted black, which no ADE class uses.
ADE20K_VOID_ID = 150
ADE20K_VOID_COLOR: RGB = (0, 0, 0)

COCO_STUFF_VOID_ID = 0  # "unlabeled"
COCO_STUFF_VOID_COLOR: RGB = (255, 255, 255)
# COCO thing ids without segmentation annotations (nightrome/cocostuff README, "Labels").
COCO_STUFF_UNUSED_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91})


def voc_bitget_color(index: int) -> RGB:
    """PASCAL-VOC colour of label `index` (bits 0/1/2, 3/4/5, ... go to R/G/B from the MSB)."""
    r = g = b = 0
    for shift in range(8):
        r |= ((index >> (3 * shift)) & 1) << (7 - shift)
        g |= ((index >> (3 * shift + 1)) & 1) << (7 - shift)
        b |= ((index >> (3 * shift + 2)) & 1) << (7 - shift)
    return (r, g, b)


@dataclass(frozen=True)
class Palette:
    """Class names and colours by id, the void id, and extra colours that decode to an id."""

    name: str
    names: tuple[str, ...]  # name of id i, for i < len(names)
    colors: tuple[RGB, ...]  # colour of id i, same length as names
    void_id: int  # id of "void"; may be len(names) (a colour-only id outside the class list)
    void_color: RGB
    extra_colors: tuple[tuple[RGB, int], ...] = ()  # (colour, id) also decoded, after the main ones
    unused_ids: frozenset[int] = field(default_factory=frozenset)  # ids the model never learned

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colors):
            raise ValueError(
                f"palette {self.name}: {len(self.names)} names but {len(self.colors)} colours"
            )
        if not 0 <= self.void_id <= len(self.names):
            raise ValueError(f"palette {self.name}: void id {self.void_id} is out of range")

    @property
    def num_ids(self) -> int:
        """Number of valid ids, void included (ids are 0..num_ids-1)."""
        return max(len(self.names), self.void_id + 1)

    def name_of(self, class_id: int) -> str:
        """Name of an id; the void id outside the class list is called "unknown"."""
        if 0 <= class_id < len(self.names):
            return self.names[class_id]
        if class_id == self.void_id:
            return "unknown"
        raise ValueError(
            f"class id {class_id} is not in palette {self.name}; use 0..{self.num_ids - 1}"
        )

    def canonical_id(self, class_id: int) -> int:
        """The id a decoded map reports for `class_id` (the first id with the same colour)."""
        return int(_canonical_table(self)[class_id])

    def color_table(self) -> np.ndarray:
        """Colour of every id, void included."""  # (num_ids, 3) uint8
        return _color_table(self).copy()


@functools.lru_cache(maxsize=8)
def _color_table(palette: Palette) -> np.ndarray:
    table = np.zeros((palette.num_ids, 3), dtype=np.uint8)
    table[: len(palette.colors)] = np.asarray(palette.colors, dtype=np.uint8)
    table[palette.void_id] = palette.void_color
    table.flags.writeable = False
    return table  # (num_ids, 3) uint8


@functools.lru_cache(maxsize=8)
def _canonical_table(palette: Palette) -> np.ndarray:
    table = np.arange(palette.num_ids, dtype=np.int64)
    first: dict[RGB, int] = {}
    for class_id, color in enumerate(palette.colors):
        table[class_id] = first.setdefault(color, class_id)
    table.flags.writeable = False
    return table  # (num_ids,) int64


def decode_candidates(palette: Palette) -> tuple[np.ndarray, np.ndarray]:
    """Colours a decoder compares against and the id each stands for, in priority order."""
    colors = [*palette.colors]
    ids = list(range(len(palette.colors)))
    if palette.void_id >= len(palette.colors):
        colors.append(palette.void_color)
        ids.append(palette.void_id)
    for color, class_id in palette.extra_colors:
        colors.append(color)
        ids.append(class_id)
    return np.asarray(colors, dtype=np.float32), np.asarray(ids, dtype=np.int64)  # (K, 3), (K,)


ADE20K = Palette("ade150", ADE20K_NAMES, ADE20K_COLORS, ADE20K_VOID_ID, ADE20K_VOID_COLOR)
COCO_STUFF = Palette(
    "coco183",
    COCO_STUFF_NAMES,
    (COCO_STUFF_VOID_COLOR, *(voc_bitget_color(i - 1) for i in range(1, 183))),
    COCO_STUFF_VOID_ID,
    COCO_STUFF_VOID_COLOR,
    extra_colors=((voc_bitget_color(182), COCO_STUFF_VOID_ID),),
    unused_ids=COCO_STUFF_UNUSED_IDS,
)

_PALETTE_ALIASES = {
    "ade150": ADE20K, "ade20k": ADE20K, "ade": ADE20K, "ade20k-150": ADE20K,
    "coco183": COCO_STUFF, "coco-stuff": COCO_STUFF, "cocostuff": COCO_STUFF, "coco": COCO_STUFF,
    "coco-stuff-183": COCO_STUFF, "fgdm": COCO_STUFF,
}  # fmt: skip


def get_palette(name: str | Palette) -> Palette:
    """Palette by name ("ade150" / "coco183", or an alias); a Palette is returned as is."""
    if isinstance(name, Palette):
        return name
    key = str(name).strip().lower().replace("_", "-")
    if key not in _PALETTE_ALIASES:
        raise ValueError(
            f"unknown palette {name!r}; use 'ade150' (seg ControlNet) or 'coco183' (FG-DM)"
        )
    return _PALETTE_ALIASES[key]


# COCO-stuff name -> ADE20K name, for the classes that clearly correspond (same object or stuff,
# or an ADE class that is its category: animals -> "animal", foods -> "food"). Several COCO
# classes may map to one ADE class; going back, the FIRST COCO class listed for an ADE class is
# the one used (so annotated "-stuff"/"-other" classes come before their unannotated twins).
# ADE "animal" is not mapped back (no single COCO animal is its match). Every class not listed
# maps to the target palette's void, unless convert is given another fallback id.
COCO_TO_ADE: tuple[tuple[str, str], ...] = (
    ("person", "person"), ("bicycle", "bicycle"), ("car", "car"), ("motorcycle", "minibike"),
    ("airplane", "airplane"), ("bus", "bus"), ("truck", "truck"), ("boat", "boat"),
    ("traffic light", "traffic light"), ("stop sign", "signboard"), ("street sign", "signboard"),
    ("bench", "bench"), ("bird", "animal"), ("cat", "animal"), ("dog", "animal"),
    ("horse", "animal"), ("sheep", "animal"), ("cow", "animal"), ("elephant", "animal"),
    ("bear", "animal"), ("zebra", "animal"), ("giraffe", "animal"), ("handbag", "bag"),
    ("backpack", "bag"), ("sports ball", "ball"), ("bottle", "bottle"), ("wine glass", "glass"),
    ("plate", "plate"), ("food-other", "food"), ("banana", "food"), ("apple", "food"),
    ("sandwich", "food"), ("orange", "food"), ("broccoli", "food"), ("carrot", "food"),
    ("hot dog", "food"), ("pizza", "food"), ("donut", "food"), ("cake", "food"), ("fruit", "food"),
    ("vegetable", "food"), ("salad", "food"), ("chair", "chair"), ("couch", "sofa"),
    ("plant-other", "plant"), ("potted plant", "plant"), ("bush", "plant"), ("bed", "bed"),
    ("mirror-stuff", "mirror"), ("mirror", "mirror"), ("dining table", "table"), ("table", "table"),
    ("window-other", "windowpane"), ("window", "windowpane"), ("window-blind", "blind"),
    ("desk-stuff", "desk"), ("desk", "desk"), ("door-stuff", "door"), ("door", "door"),
    ("toilet", "toilet"), ("tv", "television receiver"), ("laptop", "computer"),
    ("microwave", "microwave"), ("oven", "oven"), ("sink", "sink"),
    ("refrigerator", "refrigerator"),
    ("book", "book"), ("clock", "clock"), ("vase", "vase"), ("teddy bear", "plaything"),
    ("blanket", "blanket"), ("bridge", "bridge"), ("building-other", "building"),
    ("cabinet", "cabinet"), ("cupboard", "cabinet"), ("rug", "rug"), ("carpet", "rug"),
    ("ceiling-other", "ceiling"), ("ceiling-tile", "ceiling"), ("clothes", "apparel"),
    ("sky-other", "sky"), ("clouds", "sky"), ("counter", "counter"), ("curtain", "curtain"),
    ("ground-other", "earth"), ("dirt", "earth"), ("fence", "fence"), ("floor-other", "floor"),
    ("floor-marble", "floor"), ("floor-stone", "floor"), ("floor-tile", "floor"),
    ("floor-wood", "floor"), ("flower", "flower"), ("grass", "grass"), ("hill", "hill"),
    ("house", "house"), ("light", "light"), ("mountain", "mountain"), ("pavement", "sidewalk"),
    ("pillow", "pillow"), ("playingfield", "field"), ("railing", "railing"), ("river", "river"),
    ("road", "road"), ("rock", "rock"), ("stone", "rock"), ("sand", "sand"), ("sea", "sea"),
    ("shelf", "shelf"), ("skyscraper", "skyscraper"), ("stairs", "stairs"), ("tent", "tent"),
    ("towel", "towel"), ("tree", "tree"), ("wall-other", "wall"), ("wall-brick", "wall"),
    ("wall-concrete", "wall"), ("wall-panel", "wall"), ("wall-stone", "wall"),
    ("wall-tile", "wall"),
    ("wall-wood", "wall"), ("water-other", "water"),
)  # fmt: skip
_NOT_MAPPED_BACK = frozenset({"animal"})


@functools.lru_cache(maxsize=8)
def correspondence_table(src: Palette, dst: Palette, fallback: int | None = None) -> np.ndarray:
    """Id lookup table src -> dst (void -> void; unmatched -> `fallback`, default dst's void)."""
    fill = dst.void_id if fallback is None else fallback
    if not 0 <= fill < dst.num_ids:
        raise ValueError(
            f"fallback id {fill} is not in palette {dst.name}; use 0..{dst.num_ids - 1}"
        )
    if src == dst:
        table = np.arange(src.num_ids, dtype=np.int64)
    else:
        table = np.full(src.num_ids, fill, dtype=np.int64)
        table[src.void_id] = dst.void_id
        for src_id, dst_id in _pairs_between(src, dst):
            table[src_id] = dst_id
    table.flags.writeable = False
    return table  # (src.num_ids,) int64


def _pairs_between(src: Palette, dst: Palette) -> list[tuple[int, int]]:
    """(src id, dst id) for corresponding classes; first listed wins in each direction."""
    coco = {n: i for i, n in enumerate(COCO_STUFF.names)}
    ade = {n: i for i, n in enumerate(ADE20K.names)}
    if src.name == COCO_STUFF.name and dst.name == ADE20K.name:
        return [(coco[c], ade[a]) for c, a in COCO_TO_ADE]
    if src.name == ADE20K.name and dst.name == COCO_STUFF.name:
        back: dict[int, int] = {}
        for c, a in COCO_TO_ADE:
            if a not in _NOT_MAPPED_BACK:
                back.setdefault(ade[a], coco[c])
        return sorted(back.items())
    raise ValueError(f"no correspondence between palettes {src.name!r} and {dst.name!r}")
