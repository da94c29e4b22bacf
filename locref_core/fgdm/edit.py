"""Editing a class map: move, resize into a box, flip, delete, paste and recolor objects.

Operations come as a versioned JSON document, a bare list of operations, or either already
parsed (validated up-front by `parse_operations`, run in order by `apply_operations`):

    {"version": 1, "operations": [
      {"op": "move", "object": "dog", "instance": 1, "dx": 0.25, "dy": 0},
      {"op": "move_to_box", "object": "person", "box": [0.1, 0.2, 0.5, 0.9]},
      {"op": "flip", "object": "car"},
      {"op": "delete", "object": "tree", "fill": "background"},
      {"op": "paste", "source": 0, "object": "cat", "box": 1, "keep_aspect": true},
      {"op": "recolor", "object": "grass", "to": "sand"}]}

Objects: "object" is a class name (resolved as `recall.resolve_class` does: synonyms, plurals)
or an integer palette id. "instance" (optional) picks one connected component of that class,
counted from 1 in `maps.instances` order (8-connected, area descending, ties in raster order of
the first pixel); without it (or null) the operation takes every pixel of the class. Each
operation runs on the result of the previous one, so instances are counted afresh for each.

Surrounding background of an object: the most common class among its ring pixels -- the pixels
outside the object that are 8-adjacent to it (the 3 x 3 dilation of its mask minus the mask) --
not counting pixels of the object's own class (its other instances); ties go to the lower id;
void when no other class touches it. It is measured on the map as the operation finds it and
fills the pixels an object vacates (move, move_to_box, flip) or leaves (delete, the default
"fill": "background"; "fill": "void" paints void instead).

Geometry: a box is [x0, y0, x1, y1] normalised to [0, 1] ((0, 0) top-left, x1 > x0, y1 > y0) or
an integer index into the `boxes` argument (the pack's box widget or a LocRef layout, same
form). It covers the pixels whose centres fall inside it (`layout.pixel_span`), at least one.
move_to_box (alias resize) and paste map the object's bounding box onto the box's pixels by
nearest-neighbour sampling of its mask: pixel centres when enlarging (every row and column is
used), evenly spaced from the first to the last row/column when shrinking (the bounding box's
edges are kept; a 1-pixel-high or -wide result takes the union along that axis). With
"keep_aspect": false it fills the box; with true (default) it is scaled by the largest factor
that fits (sizes rounded) and centred (odd slack puts the extra pixel after). "move" shifts by
"dx", "dy" in fractions of the map's width/height, or pixels with "units": "px", rounded to whole
pixels; pixels moved past the edge are dropped. "flip" mirrors the object left-right inside its
own bounding box, so flipping twice restores a map where one class surrounds the object. Moved,
resized, flipped and pasted objects are painted over whatever they land on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..layout import pixel_span
from .maps import as_class_map, instances
from .palettes import Palette
from .recall import resolve_class

log = logging.getLogger(__name__)

OPS_VERSION = 1
OP_KINDS = ("move", "move_to_box", "flip", "delete", "paste", "recolor")
_ALIASES = {"resize": "move_to_box"}
_COMMON_KEYS = ("op", "object", "instance")
_KEYS = {
    "move": ("dx", "dy", "units"),
    "move_to_box": ("box", "keep_aspect"),
    "flip": (),
    "delete": ("fill",),
    "paste": ("source", "box", "keep_aspect"),
    "recolor": ("to",),
}
_UNITS = {"fraction": "fraction", "normalized": "fraction", "normalised": "fraction",
          "px": "px", "pixels": "px"}  # fmt: skip
_EXAMPLE = '{"version": 1, "operations": [{"op": "move", "object": "dog", "dx": 0.1, "dy": 0}]}'

Rect = tuple[int, int, int, int]  # y0, y1, x0, x1 in pixels, ends exclusive


@dataclass(frozen=True)
class EditOp:
    """One validated edit: its kind, the class it acts on, and that kind's parameters."""

    kind: str  # one of OP_KINDS
    class_id: int  # palette id of the object
    instance: int | None = None  # 1-based instance of the class; None = every pixel of it
    dx: float = 0.0  # move: shift right, in fractions of the width (pixels if units == "px")
    dy: float = 0.0  # move: shift down, in fractions of the height (pixels if units == "px")
    units: str = "fraction"  # move: "fraction" or "px"
    box: tuple[float, float, float, float] | int | None = None  # move_to_box, paste
    keep_aspect: bool = True  # move_to_box, paste
    fill: str = "background"  # delete: "background" or "void"
    source: int = 0  # paste: index into source_maps
    to: int | None = None  # recolor: the new class id

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise ValueError(f"edit kind {self.kind!r} is unknown; use one of {OP_KINDS}")
        if self.kind in ("move_to_box", "paste") and self.box is None:
            raise ValueError(f"a {self.kind} edit needs a box: (x0, y0, x1, y1) or an index")
        if self.kind == "recolor" and self.to is None:
            raise ValueError("a recolor edit needs `to`, the new class id")


# ---------------------------------------------------------------- parsing


def parse_operations(spec: str | dict | list, palette: Palette) -> tuple[EditOp, ...]:
    """Validate an edit document (JSON text, dict or list) into typed operations."""
    items = _operation_list(spec)
    return tuple(_parse_one(raw, pos, palette) for pos, raw in enumerate(items, 1))


def _operation_list(spec: Any) -> list[Any]:
    """The raw operation list of a document, after the JSON and version checks."""
    if isinstance(spec, str):
        if not spec.strip():
            return []
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"edit operations are not valid JSON ({err.msg} at line {err.lineno}, column "
                f"{err.colno}); fix the text, e.g. {_EXAMPLE}"
            ) from None
    if isinstance(spec, Mapping):
        extra = sorted(set(spec) - {"version", "operations"})
        if extra:
            raise ValueError(f"edit document has unknown keys {extra}; write it as {_EXAMPLE}")
        version = spec.get("version", OPS_VERSION)
        if version != OPS_VERSION or isinstance(version, bool):
            raise ValueError(
                f"edit document has version {version!r}; this pack reads version {OPS_VERSION}. "
                "Update the pack, or rewrite the operations for version 1."
            )
        spec = spec.get("operations")
        if spec is None:
            raise ValueError(f'edit document has no "operations" list; write it as {_EXAMPLE}')
    if not isinstance(spec, (list, tuple)):
        raise ValueError(
            f"edit operations must be a list (or {_EXAMPLE}), got {type(spec).__name__}"
        )
    return list(spec)


def _parse_one(raw: Any, pos: int, palette: Palette) -> EditOp:
    """One operation dict -> EditOp; errors name its position and kind."""
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"operation {pos}: expected an object like "
            f'{{"op": "move", "object": "dog", "dx": 0.1}}, got {raw!r}'
        )
    given = raw.get("op")
    kind = _ALIASES.get(str(given).strip().lower(), str(given).strip().lower())
    where = f"operation {pos}" if given is None else f"operation {pos} ({given})"
    if kind not in OP_KINDS or given is None:
        what = 'no "op"' if given is None else f"unknown op {given!r}"
        raise ValueError(
            f'{where}: {what}; use one of "move", "move_to_box" (or "resize"), "flip", '
            '"delete", "paste", "recolor"'
        )
    allowed = _COMMON_KEYS + _KEYS[kind]
    extra = sorted(set(raw) - set(allowed))
    if extra:
        raise ValueError(f"{where}: unknown keys {extra}; {kind} takes {list(allowed)}")
    try:
        return _build(kind, raw, palette)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _build(kind: str, raw: Mapping, palette: Palette) -> EditOp:
    """Typed fields of one operation; ValueError without the position prefix."""
    if "object" not in raw:
        raise ValueError('give "object": a class name such as "dog" or a palette id')
    fields: dict[str, Any] = {"kind": kind, "class_id": _class(raw["object"], palette)}
    if raw.get("instance") is not None:
        fields["instance"] = _integer(raw["instance"], "instance", minimum=1)
    if kind == "move":
        if "dx" not in raw and "dy" not in raw:
            raise ValueError('give "dx" and/or "dy" (fractions of the map width/height)')
        fields["dx"] = _number(raw.get("dx", 0.0), "dx")
        fields["dy"] = _number(raw.get("dy", 0.0), "dy")
        units = str(raw.get("units", "fraction")).strip().lower()
        if units not in _UNITS:
            raise ValueError(f'"units" is {raw.get("units")!r}; use "fraction" (default) or "px"')
        fields["units"] = _UNITS[units]
    if kind in ("move_to_box", "paste"):
        if "box" not in raw:
            raise ValueError('give "box": [x0, y0, x1, y1] in [0, 1], or a box index (0, 1, ...)')
        fields["box"] = _box(raw["box"])
        keep = raw.get("keep_aspect", True)
        if not isinstance(keep, bool):
            raise ValueError(f'"keep_aspect" must be true or false, got {keep!r}')
        fields["keep_aspect"] = keep
    if kind == "delete":
        fill = raw.get("fill", "background")
        if fill not in ("background", "void"):
            raise ValueError(f'"fill" is {fill!r}; use "background" (default) or "void"')
        fields["fill"] = fill
    if kind == "paste":
        fields["source"] = _integer(raw.get("source", 0), "source", minimum=0)
    if kind == "recolor":
        if "to" not in raw:
            raise ValueError('give "to": the new class name or palette id')
        fields["to"] = _class(raw["to"], palette, what="target class")
    return EditOp(**fields)


def _class(value: Any, palette: Palette, what: str = "object") -> int:
    """A class id from a name or an integer id (suggestions come from resolve_class)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{what} must be a class name or a palette id, got {value!r}")
    return resolve_class(palette, value, what=what)


def _integer(value: Any, name: str, minimum: int) -> int:
    """An integer >= minimum (integral floats accepted)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'"{name}" must be an integer >= {minimum}, got {value!r}')
    return value


def _number(value: Any, name: str) -> float:
    """A finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'"{name}" must be a finite number, got {value!r}')
    return float(value)


def _box(value: Any) -> tuple[float, float, float, float] | int:
    """A box index (int >= 0) or a validated normalised [x0, y0, x1, y1]."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _integer(value, "box", minimum=0)
    return check_box(value, '"box"')


def check_box(value: Any, what: str = "box") -> tuple[float, float, float, float]:
    """A normalised (x0, y0, x1, y1) in [0, 1] with x1 > x0 and y1 > y0, or ValueError."""
    if all(hasattr(value, k) for k in ("x0", "y0", "x1", "y1")):  # a layout Box
        value = (value.x0, value.y0, value.x1, value.y1)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be [x0, y0, x1, y1] in [0, 1] or a box index, got {value!r}")
    if len(value) != 4 or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        for v in value
    ):
        raise ValueError(f"{what} must be 4 finite numbers [x0, y0, x1, y1], got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if min(x0, y0, x1, y1) < 0.0 or max(x0, y0, x1, y1) > 1.0:
        raise ValueError(
            f"{what} {list(value)} leaves [0, 1]; coordinates are fractions of the map "
            "(0 = left/top, 1 = right/bottom)"
        )
    if not (x1 > x0 and y1 > y0):
        raise ValueError(
            f"{what} {list(value)} is inverted or empty; give [x0, y0, x1, y1] with x0 < x1 "
            "and y0 < y1"
        )
    return (x0, y0, x1, y1)


# ---------------------------------------------------------------- applying


def apply_operations(
    class_map: Any,
    ops: Sequence[EditOp] | str | dict | list,
    palette: Palette,
    *,
    boxes: Sequence[tuple[float, float, float, float]] = (),
    source_maps: Sequence[Any] = (),
    missing: str = "error",
) -> np.ndarray:
    """Run edit operations in order on a copy of the class map and return the new map.

    `missing`: what an operation does when its object (or instance) is not in the map being
    edited: "error" raises, "skip" logs a warning and goes on (maps sampled from many seeds may
    lack an object). A missing object in a paste's source map is always an error.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing={missing!r}: use 'error' or 'skip'")
    current = as_class_map(class_map, palette).copy()  # (H, W) int64, never the input
    if isinstance(ops, EditOp):
        ops = (ops,)
    elif not (isinstance(ops, (list, tuple)) and ops and all(isinstance(o, EditOp) for o in ops)):
        ops = parse_operations(ops, palette)
    rects = [check_box(b, f"boxes[{i}]") for i, b in enumerate(boxes)]
    for pos, op in enumerate(ops, 1):
        try:
            current = _apply_one(current, op, palette, rects, source_maps)
        except MissingObject as err:
            if missing == "error" or err.where != "the map":
                raise ValueError(f"operation {pos} ({op.kind}): {err}") from None
            log.warning("operation %d (%s) skipped: %s", pos, op.kind, err)
        except ValueError as err:
            raise ValueError(f"operation {pos} ({op.kind}): {err}") from None
    return current


def _apply_one(
    ids: np.ndarray, op: EditOp, palette: Palette, boxes: list, source_maps: Sequence[Any]
) -> np.ndarray:
    """One operation on `ids` (owned by the caller, edited in place and returned)."""
    h, w = ids.shape
    if op.kind == "paste":
        if not 0 <= op.source < len(source_maps):
            have = f"indices 0..{len(source_maps) - 1}" if source_maps else "none was given"
            raise ValueError(
                f"source map {op.source} does not exist: {len(source_maps)} source map(s), "
                f'{have}; connect the map or fix "source"'
            )
        src = as_class_map(source_maps[op.source], palette)
        picked = select(src, op.class_id, op.instance, palette, f"source map {op.source}")
        placed = _place(_crop(picked), _target(op.box, boxes, h, w), op.keep_aspect, (h, w))
        ids[placed] = op.class_id
        return ids
    mask = select(ids, op.class_id, op.instance, palette, "the map")
    if op.kind == "recolor":
        ids[mask] = op.to
        return ids
    background = background_class(ids, mask, op.class_id, palette)
    if op.kind == "delete":
        ids[mask] = background if op.fill == "background" else palette.void_id
        return ids
    if op.kind == "move":
        dx = op.dx * w if op.units == "fraction" else op.dx
        dy = op.dy * h if op.units == "fraction" else op.dy
        moved = shift_mask(mask, _round(dy), _round(dx))
        if not moved.any():
            log.warning(
                "move of %s by (%s, %s) puts it entirely off the map; it is removed",
                palette.name_of(op.class_id),
                op.dx,
                op.dy,
            )
    elif op.kind == "flip":
        y0, y1, x0, x1 = _bbox(mask)
        moved = np.zeros_like(mask)
        moved[y0:y1, x0:x1] = mask[y0:y1, x0:x1][:, ::-1]
    else:  # move_to_box
        moved = _place(_crop(mask), _target(op.box, boxes, h, w), op.keep_aspect, (h, w))
    ids[mask] = background
    ids[moved] = op.class_id
    return ids


class MissingObject(ValueError):
    """The object (or instance) an operation names is not in the map `where`."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


def select(
    class_map: np.ndarray, class_id: int, instance: int | None, palette: Palette, where: str
) -> np.ndarray:
    """Mask of a class (or of its 1-based instance); ValueError when absent or out of range."""
    name = f"{palette.name_of(class_id)!r} (id {class_id})"
    mask = class_map == class_id  # (H, W) bool
    if not mask.any():
        present = np.bincount(class_map.ravel(), minlength=palette.num_ids)
        top = [
            palette.name_of(int(c)) for c in np.argsort(-present, kind="stable")[:8] if present[c]
        ]
        raise MissingObject(
            f"there is no {name} in {where}; it has {', '.join(top)}. "
            'Fix "object", or check the palette.',
            where,
        )
    if instance is None:
        return mask
    labels, areas = instances(class_map, class_id)
    if instance > len(areas):
        raise MissingObject(
            f"instance {instance} of {name} does not exist: {where} has {len(areas)} "
            f'instance(s) of it; use 1..{len(areas)}, or omit "instance" for all of them',
            where,
        )
    return labels == instance  # (H, W) bool


def background_class(
    class_map: np.ndarray, mask: np.ndarray, class_id: int, palette: Palette
) -> int:
    """Most common class in the 8-adjacent ring around `mask`, not `class_id`; void if none."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy : dy + h, dx : dx + w]
    ring = grown & ~mask & (class_map != class_id)  # (H, W) bool
    if not ring.any():
        return palette.void_id
    return int(np.argmax(np.bincount(class_map[ring])))  # argmax: lowest id among ties


def shift_mask(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The mask moved by whole pixels; what leaves the map is dropped."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out  # (H, W) bool


def _round(value: float) -> int:
    """Round half away from zero (so a move and its opposite cancel)."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def _bbox(mask: np.ndarray) -> Rect:
    """Bounding rows and columns of a non-empty mask: y0, y1, x0, x1 (ends exclusive)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _crop(mask: np.ndarray) -> np.ndarray:
    """The mask cut to its bounding box."""
    y0, y1, x0, x1 = _bbox(mask)
    return mask[y0:y1, x0:x1]  # (bh, bw) bool


def _target(box: Any, boxes: list, h: int, w: int) -> Rect:
    """Pixel rows and columns of a normalised box or of `boxes[index]` on an h x w map."""
    if isinstance(box, int):
        if not 0 <= box < len(boxes):
            have = f"indices 0..{len(boxes) - 1}" if boxes else "none was given"
            raise ValueError(
                f"box index {box} is out of range: {len(boxes)} box(es), {have}; draw the box "
                "or give [x0, y0, x1, y1]"
            )
        box = boxes[box]
    x0, y0, x1, y1 = box
    px0, px1 = pixel_span(x0, x1, w)
    py0, py1 = pixel_span(y0, y1, h)
    return py0, py1, px0, px1


def _sample(n_out: int, n_in: int) -> np.ndarray:
    """Source indices for nearest-neighbour resampling of n_in cells to n_out cells."""
    i = np.arange(n_out)
    if n_out >= n_in:  # enlarging: pixel centres, every source cell is used
        return np.minimum(((i + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
    return np.floor(i * (n_in - 1) / (n_out - 1) + 0.5).astype(np.int64)  # ends kept


def _resample(crop: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """Nearest-neighbour resize of a cropped mask; a size of 1 takes the union on that axis."""
    ch, cw = crop.shape
    if nh == 1:
        crop, ch = crop.any(axis=0, keepdims=True), 1
    if nw == 1:
        crop, cw = crop.any(axis=1, keepdims=True), 1
    return crop[_sample(nh, ch)[:, None], _sample(nw, cw)[None, :]]  # (nh, nw) bool


def _place(crop: np.ndarray, rect: Rect, keep_aspect: bool, shape: tuple[int, int]) -> np.ndarray:
    """A full-size mask with `crop` resampled into `rect` (stretched, or fitted and centred)."""
    y0, y1, x0, x1 = rect
    th, tw = y1 - y0, x1 - x0
    nh, nw = th, tw
    if keep_aspect:
        scale = min(th / crop.shape[0], tw / crop.shape[1])
        nh = min(th, max(1, math.floor(crop.shape[0] * scale + 0.5)))
        nw = min(tw, max(1, math.floor(crop.shape[1] * scale + 0.5)))
        y0, x0 = y0 + (th - nh) // 2, x0 + (tw - nw) // 2
    out = np.zeros(shape, dtype=bool)
    out[y0 : y0 + nh, x0 : x0 + nw] = _resample(crop, nh, nw)
    return out  # (H, W) bool
