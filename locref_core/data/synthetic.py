"""A tiny COCO-format dataset of coloured shapes, for tests and smoke runs of the trainers.

Each image is a plain background with 1..max_objects non-overlapping shapes (squares, discs,
triangles), every shape in a colour no other shape of that image has. The files follow COCO
and COCO-stuff exactly, so the same loaders read them as the real datasets:

    root/images/000001.png ...                   RGB images
    root/annotations/instances_train.json        boxes (xywh) + polygon segmentations
    root/annotations/captions_train.json         two captions per image ("a red square and a
                                                 blue disc", then the objects in reverse order)
    root/labels/000001.png ...                   COCO-stuff label maps: pixel = id - 1, 255 = void

Shape categories carry real COCO-stuff ids (`SHAPE_CLASSES`), so a label map decodes with the
pack's COCO-stuff palette: square = "tv", disc = "sports ball", triangle = "kite", and the
background is the stuff class "wall-other"; the one-pixel frame of every label map is void.
Shapes are painted with the same rasteriser that decodes their polygons (`coco.polygon_mask`),
so an image's coloured pixels are exactly its instance masks.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..fgdm.palettes import COCO_STUFF
from .coco import polygon_mask

log = logging.getLogger(__name__)

# shape name -> COCO-stuff class whose id the category uses (label maps decode to that name)
SHAPE_CLASSES: dict[str, str] = {"square": "tv", "disc": "sports ball", "triangle": "kite"}
BACKGROUND_CLASS = "wall-other"
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 200, 30), "magenta": (200, 40, 200), "cyan": (30, 190, 200),
    "orange": (240, 130, 20), "purple": (110, 40, 160),
}  # fmt: skip
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (235, 235, 235), (45, 45, 45), (215, 200, 170), (175, 210, 175),
)  # never mid grey: the composite canvas is 0.5 grey
VOID = 255
DISC_VERTICES = 24


def coco_stuff_id(name: str) -> int:
    """Official COCO-stuff id of a class name (1..182)."""
    return COCO_STUFF.names.index(name)


def _shape_polygon(shape: str, x: int, y: int, s: int) -> list[float]:
    """Flat polygon (x0, y0, x1, y1, ...) of a shape inscribed in the box (x, y, s, s)."""
    if shape == "square":
        return [x, y, x + s, y, x + s, y + s, x, y + s]
    if shape == "triangle":
        return [x, y + s, x + s, y + s, x + s / 2, y]
    cx, cy, r = x + s / 2, y + s / 2, s / 2
    pts = []
    for k in range(DISC_VERTICES):  # a multiple of 4: the extreme points sit on the box
        a = 2 * math.pi * k / DISC_VERTICES
        pts += [round(cx + r * math.cos(a), 3), round(cy + r * math.sin(a), 3)]
    return pts


def _place(rng: np.random.Generator, size: int, n: int) -> list[tuple[int, int, int]]:
    """Up to n non-overlapping square boxes (x, y, side) with a 1-pixel gap, by rejection."""
    boxes: list[tuple[int, int, int]] = []
    lo, hi = max(4, size // 5), max(5, (2 * size) // 5)
    for _ in range(50 * n):
        if len(boxes) == n:
            break
        s = int(rng.integers(lo, hi + 1))
        x, y = (int(v) for v in rng.integers(1, size - s, 2))
        if all(x + s + 1 <= bx or bx + bs + 1 <= x or y + s + 1 <= by or by + bs + 1 <= y
               for bx, by, bs in boxes):
            boxes.append((x, y, s))
    return boxes


def phrase(objects: list[tuple[str, str]]) -> str:
    """The world's caption of (colour, shape) objects: "a red square, an orange disc and ..."."""
    words = [f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"
             for colour, shape in objects]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def synthetic_paths(root: str | Path) -> dict[str, Path]:
    """Where `make_synthetic_coco` writes under `root` (images, labels, instances, captions)."""
    root = Path(root)
    return {"root": root, "images": root / "images", "labels": root / "labels",
            "instances": root / "annotations" / "instances_train.json",
            "captions": root / "annotations" / "captions_train.json"}


def make_synthetic_coco(root: str | Path, n_images: int = 12, size: int = 64, seed: int = 0,
                        max_objects: int = 3) -> dict[str, Path]:
    """Write the shapes dataset under `root`; returns its paths (deterministic for a seed)."""
    if n_images < 1 or not 1 <= max_objects <= len(COLOURS):
        raise ValueError(f"n_images={n_images} must be >= 1 and max_objects={max_objects} in "
                         f"1..{len(COLOURS)} (one distinct colour per object)")
    if size < 16:
        raise ValueError(f"size={size} is too small for shapes; use 16 pixels or more")
    paths = synthetic_paths(root)
    for key in ("images", "labels"):
        paths[key].mkdir(parents=True, exist_ok=True)
    paths["instances"].parent.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    shapes, colour_names = list(SHAPE_CLASSES), list(COLOURS)
    categories = [{"id": coco_stuff_id(SHAPE_CLASSES[s]), "name": s,
                   "supercategory": "shape", "coco_stuff_name": SHAPE_CLASSES[s]} for s in shapes]
    cat_id = {c["name"]: c["id"] for c in categories}
    background_value = coco_stuff_id(BACKGROUND_CLASS) - 1
    images, annotations, captions = [], [], []
    for i in range(1, n_images + 1):
        name = f"{i:06d}.png"
        boxes = _place(rng, size, int(rng.integers(1, max_objects + 1)))
        colours = rng.choice(len(colour_names), size=len(boxes), replace=False)
        pixels = np.empty((size, size, 3), dtype=np.uint8)
        pixels[:] = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        label = np.full((size, size), background_value, dtype=np.uint8)
        objects = []
        for (x, y, s), c in zip(boxes, colours):
            shape = shapes[int(rng.integers(len(shapes)))]
            poly = _shape_polygon(shape, x, y, s)
            mask = polygon_mask([poly], size, size)  # (H, W) bool
            pixels[mask] = COLOURS[colour_names[c]]
            label[mask] = cat_id[shape] - 1
            xs, ys = poly[0::2], poly[1::2]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": cat_id[shape],
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "segmentation": [poly], "area": int(mask.sum()), "iscrowd": 0,
            })
            objects.append((colour_names[c], shape))
        label[[0, -1], :] = VOID  # an unlabeled frame, as COCO-stuff has void pixels
        label[:, [0, -1]] = VOID
        Image.fromarray(pixels, "RGB").save(paths["images"] / name)
        Image.fromarray(label, "L").save(paths["labels"] / name)
        images.append({"id": i, "file_name": name, "width": size, "height": size})
        for text in (phrase(objects), "a picture of " + phrase(objects[::-1])):
            captions.append({"id": len(captions) + 1, "image_id": i, "caption": text})

    info = {"description": f"synthetic shapes, seed {seed}", "version": "1.0"}
    paths["instances"].write_text(json.dumps(
        {"info": info, "images": images, "annotations": annotations, "categories": categories}))
    paths["captions"].write_text(json.dumps(
        {"info": info, "images": images, "annotations": captions}))
    log.info("wrote %d synthetic images with %d objects to %s", n_images, len(annotations), root)
    return paths
