"""Scoring generated shapes-world images against held-out layouts: placement (box AP with the
world's detector), appearance (does each box hold its reference's colour and shape), leakage (a
box holding another box's reference) and object recall of the caption, each with a bootstrap
95 % interval over layouts.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.coco import polygon_mask
from ..data.locref_dataset import crop_edges
from ..data.synthetic import BACKGROUND_CLASS, COLOURS, SHAPE_CLASSES, coco_stuff_id
from ..eval.boxes import ImageBoxes, Matches, ap_from_matches, match_boxes
from ..eval.shapes import appearance_scores, detect_shapes, to_image_boxes
from ..fgdm.maps import decode
from ..fgdm.palettes import COCO_STUFF

OBJECT = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPE_CLASSES)})\b")


@dataclass(frozen=True)
class HeldOut:
    """One held-out layout: its caption, boxes (normalised xyxy), each box's (colour, shape) and
    reference: the object's box cut from the held-out image (3, h, w) in [0, 1] with its instance
    mask (h, w) in {0, 1}, as the LocRef trainer cuts its references (and as a user gives LocRef
    Reference an image and its MASK)."""

    caption: str
    boxes: tuple[tuple[float, float, float, float], ...]
    objects: tuple[tuple[str, str], ...]
    references: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...]

    def label(self, i: int) -> str:
        return f"{self.objects[i][0]} {self.objects[i][1]}"


def load_heldout(paths: dict[str, Path], limit: int | None = None) -> list[HeldOut]:
    """Layouts of a `make_synthetic_coco` set: the first caption names the objects in box order;
    the first `limit` images' only, when given."""
    inst = json.loads(Path(paths["instances"]).read_text())
    caps = json.loads(Path(paths["captions"]).read_text())["annotations"]
    first: dict[int, str] = {}
    for c in caps:
        first.setdefault(c["image_id"], c["caption"])
    anns: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    items = []
    for im in inst["images"][:limit]:
        w, h = im["width"], im["height"]
        pixels = np.asarray(Image.open(Path(paths["images"]) / im["file_name"]).convert("RGB"))
        objects = tuple(OBJECT.findall(first[im["id"]]))
        boxes, refs, masks = [], [], []
        for a in anns.get(im["id"], []):
            x, y, bw, bh = a["bbox"]
            boxes.append((x / w, y / h, (x + bw) / w, (y + bh) / h))
            ref, mask = _reference(pixels, a)
            refs.append(ref)
            masks.append(mask)
        if len(objects) != len(boxes):
            raise ValueError(f"image {im['file_name']}: caption {first[im['id']]!r} names "
                             f"{len(objects)} objects but it has {len(boxes)} boxes")
        items.append(HeldOut(first[im["id"]], tuple(boxes), objects, tuple(refs), tuple(masks)))
    return items


def _reference(pixels: np.ndarray, ann: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The object's box (as `LocRefDataset` cuts a reference without augmentation) and its
    instance mask there: (3, h, w) in [0, 1], (h, w) in {0, 1}."""
    h, w, _ = pixels.shape
    x0, y0, x1, y1 = crop_edges(ann["bbox"], 1.0, w, h)
    mask = polygon_mask(ann["segmentation"], h, w)[y0:y1, x0:x1]
    crop = torch.from_numpy(pixels[y0:y1, x0:x1].copy()).permute(2, 0, 1).float() / 255.0
    return crop, torch.from_numpy(mask.copy()).float()


def world_class_share(rgb: Any) -> float:
    """How much of a generated seg map (H, W, 3) in [0, 1] is a map of this world: the share of
    its pixels that the pack's palette decoding (`fgdm.maps.decode`, COCO-stuff) reads as the
    world's background class or one of its shape classes. A world label map scores all but its
    void one-pixel frame (0.94 at 64 px); an image of the world decodes to whatever COCO-stuff
    colours lie nearest its own and scores near 0. SBPC's recall counts a class wherever its
    colour appears, so a factor that draws images instead of maps still recalls objects."""
    ids = decode(np.asarray(rgb, dtype=np.float32), COCO_STUFF)
    world = [COCO_STUFF.canonical_id(coco_stuff_id(name))
             for name in (BACKGROUND_CLASS, *SHAPE_CLASSES.values())]
    return float(np.isin(ids, world).mean())


def sample_seed(run_seed: int, i: int) -> int:
    """The sampling seed of the i-th image of a set (layout i) in a run of seed `run_seed`: the
    same in every configuration, so rows differ only by what they change."""
    return run_seed * 1000 + i


def objects_found(objects: Sequence[tuple[str, str]],
                  found: Sequence[tuple[str, str]]) -> tuple[int, int]:
    """How many of a caption's (colour, shape) objects an image's detections, as (colour,
    shape), hold: by colour and shape, and by shape alone (per shape, at most as many as the
    caption asks)."""
    pairs, shapes = set(found), Counter(shape for _, shape in found)
    return (sum(o in pairs for o in objects),
            sum(min(n, shapes[s]) for s, n in Counter(o[1] for o in objects).items()))


def score_image(image: torch.Tensor, item: HeldOut) -> dict[str, Any]:
    """One generated image (3, H, W) in [0, 1] against its layout."""
    detections = detect_shapes(image)
    recalled, shapes_recalled = objects_found(item.objects,
                                              [(d.colour, d.shape) for d in detections])
    looks = appearance_scores(image, item.boxes, item.objects)
    return {"detections": to_image_boxes(detections),
            "truth": ImageBoxes(np.array(item.boxes, dtype=np.float64).reshape(-1, 4),
                                tuple(item.label(i) for i in range(len(item.boxes)))),
            "recalled": recalled, "objects": len(item.objects),
            "shapes_recalled": shapes_recalled,
            "match": sum(a.match for a in looks), "leak": sum(a.leak for a in looks),
            "boxes": len(looks)}


def summary(scores: Sequence[dict[str, Any]], matches: Matches | None = None,
            picks: Sequence[int] | None = None) -> dict[str, float]:
    """AP, AP50 (box_ap, labels colour + shape), appearance match, leakage, recall; with
    `matches` (of `scores`, by position) and `picks`, of the layouts at those positions (a
    resample: a position may repeat) without matching their boxes again."""
    if matches is None:
        matches = match_layouts(scores)
    picks = list(range(len(scores))) if picks is None else list(picks)
    ap = ap_from_matches(matches, picks)
    total = lambda key: sum(scores[i][key] for i in picks)  # noqa: E731
    return {"AP": ap["AP"], "AP50": ap["AP50"],
            "appearance": total("match") / max(1, total("boxes")),
            "leakage": total("leak") / max(1, total("boxes")),
            "recall": total("recalled") / max(1, total("objects"))}


def match_layouts(scores: Sequence[dict[str, Any]]) -> Matches:
    """Each layout's detections matched to its boxes once (image id = position)."""
    return match_boxes({i: s["truth"] for i, s in enumerate(scores)},
                       {i: s["detections"] for i, s in enumerate(scores)})


def bootstrap(scores: Sequence[dict[str, Any]], rounds: int = 200, seed: int = 0
              ) -> dict[str, tuple[float, float, float]]:
    """Each metric of `summary` with its 95 % percentile interval over layouts resampled with
    replacement: name -> (value, low, high). The boxes are matched once; each round only
    re-ranks (the same numbers as matching every resample anew, a test checks)."""
    matches = match_layouts(scores)
    point = summary(scores, matches)
    rng = np.random.default_rng(seed)
    draws = [summary(scores, matches, rng.integers(0, len(scores), len(scores)).tolist())
             for _ in range(rounds)]
    return {k: (v, float(np.percentile([d[k] for d in draws], 2.5)),
                float(np.percentile([d[k] for d in draws], 97.5))) for k, v in point.items()}


def ratio_interval(found: Sequence[float], total: Sequence[float], rounds: int = 200,
                   seed: int = 0) -> tuple[float, float, float]:
    """sum(found) / sum(total) over layouts, with its 95 % percentile bootstrap interval (layouts
    resampled with replacement): (value, low, high)."""
    f, t = np.asarray(found, dtype=np.float64), np.asarray(total, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(rounds):
        i = rng.integers(0, len(f), len(f))
        draws.append(f[i].sum() / max(1.0, t[i].sum()))
    return (float(f.sum() / max(1.0, t.sum())), float(np.percentile(draws, 2.5)),
            float(np.percentile(draws, 97.5)))
