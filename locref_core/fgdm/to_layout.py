"""From a class map to a LocRef layout: one labelled box per object of the map.

Each object -- an instance (8-connected component, `maps.instances`) of a class, or with
per_instance=False the union of all pixels of a class -- becomes a box around its pixels,
normalised and pixel-exact: x0 = min column / W, x1 = (max column + 1) / W (rows likewise, on the
map's own H x W; the layout's canvas size is separate). Void is never an object. `objects`
restricts the classes (ids or names); an object covering less than `min_area` of the map (its
pixels, not its box) is skipped. Beyond `max_boxes` objects the largest (by pixels) are kept and
a warning is logged.

Order: a Layout paints later boxes in front, so boxes are sorted by box area, largest first:
big regions (sky, road, a table) sit behind the smaller objects inside them. Ties: more
pixels first, then lower class id, then instance order.

Labels: the class name, with COCO-stuff's "-other"/"-stuff" suffix dropped ("sky-other" ->
"sky"); `recall.resolve_class` reads every label back as its class.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..layout import MAX_BOXES, Box, Layout
from .maps import as_class_map, instances
from .palettes import Palette
from .recall import DEFAULT_MIN_AREA, resolve_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Object:
    """One object of the map: class, instance (0 = whole class), pixel count, pixel bbox."""

    class_id: int
    instance: int
    pixels: int
    bbox: tuple[int, int, int, int]  # y0, y1, x0, x1, ends exclusive

    @property
    def box_area(self) -> int:
        y0, y1, x0, x1 = self.bbox
        return (y1 - y0) * (x1 - x0)


def map_to_layout(
    class_map: Any,
    palette: Palette,
    *,
    width: int,
    height: int,
    objects: Sequence[int | str] | None = None,
    per_instance: bool = True,
    min_area: float = DEFAULT_MIN_AREA,
    max_boxes: int = MAX_BOXES,
) -> Layout:
    """A layout of width x height with one box per object of the map, big boxes behind."""
    if not 0.0 <= min_area <= 1.0:
        raise ValueError(f"min_area is a fraction of the map in [0, 1], got {min_area!r}")
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, int):
        raise ValueError(f"max_boxes must be an integer in 1..{MAX_BOXES}, got {max_boxes!r}")
    if not 1 <= max_boxes <= MAX_BOXES:
        raise ValueError(f"max_boxes must be in 1..{MAX_BOXES} (a layout's limit), got {max_boxes}")
    ids = as_class_map(class_map, palette)  # (H, W) int64
    h, w = ids.shape
    present = np.flatnonzero(np.bincount(ids.ravel(), minlength=palette.num_ids))
    wanted = [int(c) for c in present if c != palette.void_id]
    if objects is not None:
        chosen = {resolve_class(palette, o) for o in objects}
        wanted = [c for c in wanted if c in chosen]
    found = [o for c in wanted for o in _objects_of(ids, c, per_instance)]
    found = [o for o in found if o.pixels >= min_area * ids.size]
    if len(found) > max_boxes:
        log.warning(
            "the map has %d objects above min_area; keeping the %d largest", len(found), max_boxes
        )
        found = sorted(found, key=lambda o: (-o.pixels, o.class_id, o.instance))[:max_boxes]
    found.sort(key=lambda o: (-o.box_area, -o.pixels, o.class_id, o.instance))
    boxes = []
    for o in found:
        y0, y1, x0, x1 = o.bbox
        boxes.append(Box(x0 / w, y0 / h, x1 / w, y1 / h, label=class_label(palette, o.class_id)))
    return Layout(width, height, tuple(boxes))


def class_label(palette: Palette, class_id: int) -> str:
    """The class name for a box label, without COCO-stuff's "-other"/"-stuff" suffix."""
    return re.sub(r"-(other|stuff)$", "", palette.name_of(class_id))


def _objects_of(ids: np.ndarray, class_id: int, per_instance: bool) -> list[_Object]:
    """The instances of one class (or its union), with pixel counts and bounding boxes."""
    if not per_instance:
        labels = (ids == class_id).astype(np.int32)
        count = 1
    else:
        labels, areas = instances(ids, class_id)  # (H, W) int32, (n,)
        count = len(areas)
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs].astype(np.int64) - 1  # (P,) 0-based object index
    ymin, xmin = np.full(count, ids.shape[0]), np.full(count, ids.shape[1])  # (n,) each
    ymax, xmax = np.full(count, -1), np.full(count, -1)
    np.minimum.at(ymin, lab, ys)
    np.minimum.at(xmin, lab, xs)
    np.maximum.at(ymax, lab, ys)
    np.maximum.at(xmax, lab, xs)
    pixels = np.bincount(lab, minlength=count)
    return [
        _Object(
            class_id,
            k + 1 if per_instance else 0,
            int(pixels[k]),
            (int(ymin[k]), int(ymax[k]) + 1, int(xmin[k]), int(xmax[k]) + 1),
        )
        for k in range(count)
    ]
