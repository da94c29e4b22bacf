"""A plain detector and an appearance metric for the synthetic shapes world (`data.synthetic`).

No learning: every pixel is unmixed against the image's background and the 8 world colours, same-
colour pixels are grouped into connected components, and each component's shape is read off
three features of its pixels. Used to score images that small diffusion models trained on the
shapes world generate: placement (box AP through `boxes.box_ap`) and appearance (does each box
hold its reference's colour and shape, or another box's -- attribute leakage).

Pixel colours. The background `b` is the per-channel median of the image's 2-pixel frame,
leaving out pixels near a world colour. For each world colour `c` a pixel `p` is written as the
blend `b + alpha * (c - b)` with `alpha` clipped to [0, 1] plus a residual `|p - b - alpha (c -
b)|`. Among the colours with `alpha >= 0.25` and residual <= `max_distance` (0-255 RGB units)
it takes the one of lowest cost `residual + RIM_WEIGHT * (1 - alpha) * |c - b|`, and is that
colour when its `alpha >= 0.5` (at least half object, the rasteriser's own rule), background
otherwise. For a sharp image this is "the nearest world colour within the cutoff"; in a blurred
one a blended rim goes to its own shape, not to another colour the blend is near (red on beige
blurs into orange-ish pixels), and the second term keeps a noisy pure colour off a neighbour's
blend line (purple lies near the dark-to-magenta line).

Shape features. A component's mask is cleaned first (`span_fill`: every row and column filled
between its outermost pixels, closing noise holes; then, from 10 x 10 pixels on, `majority_3x3`
cutting one-pixel spurs).
With w x h its bounding box and each row's span from its leftmost to its rightmost pixel:
  fill   = sum of row spans / (w * h)                  square 1, disc pi/4, triangle 1/2
  taper  = (mean span of the rows at depth 65-85% - that at 15-35%) / w      0, 0, 1/2
  aspect = log(w / h)                                  0 for all three
The taper tells the apex-up triangle from the rest without looking at its apex, which blur rounds
away first; blur and noise round a square's corners, so squares drift towards discs first.
The shape is the nearest prototype in units of `FEATURE_SCALE`; `fit = exp(-d^2 / 2)` of that
distance d, so an off-world blob (a streak, an apex-down triangle) gets a low fit. A detection's
score is `fit * colour_fit`, where colour_fit is the mean of `1 - residual / max_distance` over
its pixels (floored at 1e-6, so the score is in (0, 1]). Its box and area are those of the raw
component: box = (leftmost, topmost, rightmost + 1, bottommost + 1) pixel edges / image size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.synthetic import COLOURS, SHAPE_CLASSES
from ..layout import pixel_span
from .boxes import ImageBoxes

log = logging.getLogger(__name__)

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = tuple(SHAPE_CLASSES)  # square, disc, triangle
_PALETTE = np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float64)  # (K, 3)
PROTOTYPES: dict[str, tuple[float, float, float]] = {  # (fill, taper, log aspect)
    "square": (1.0, 0.0, 0.0), "disc": (math.pi / 4, 0.0, 0.0), "triangle": (0.5, 0.5, 0.0),
}  # fmt: skip
FEATURE_SCALE = np.array([0.1, 0.1, 0.15])  # one unit of distance, per feature
TAPER_BANDS = (0.15, 0.35)  # rows at these depths (and mirrored) give the taper
MAX_DISTANCE = 80.0  # RGB 0-255; world colours are >= 71 apart, backgrounds >= 130 from them
MIN_AREA = 0.004  # of the image; the generator's smallest shape covers ~2%
MIN_PATCH_AREA = 0.05  # of a box, for classify_patch
RIM_WEIGHT = 0.15  # colour cost = residual + RIM_WEIGHT * (1 - alpha) * |colour - background|
SPUR_MIN_SIDE = 10  # pixels; components at least this wide and tall get `majority_3x3`
FRAME = 2  # pixels of border used to estimate the background
LABEL_BY = ("colour_shape", "shape")


@dataclass(frozen=True)
class Detection:
    """One detected shape: normalised xyxy box (pixel edges / size), names, score, area share."""

    box: tuple[float, float, float, float]
    colour: str
    shape: str
    score: float  # (0, 1]
    area: float  # pixels / image pixels

    def label(self, label_by: str = "colour_shape") -> str:
        """ "red square" (label_by "colour_shape") or "square" (label_by "shape")."""
        if label_by not in LABEL_BY:
            raise ValueError(f"label_by={label_by!r} must be one of {LABEL_BY}")
        return f"{self.colour} {self.shape}" if label_by == "colour_shape" else self.shape


@dataclass(frozen=True)
class BoxAppearance:
    """What one box of a generated image holds, compared with its reference (colour, shape)."""

    box: tuple[float, float, float, float]
    reference: tuple[str, str]
    colour: str | None
    shape: str | None
    confidence: float
    colour_match: bool
    shape_match: bool
    match: bool  # colour and shape both equal the box's own reference
    leak: bool  # not its own reference, but another box's (colour and shape)


# ------------------------------------------------------------------ inputs


def as_rgb(image: Any) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) or a float tensor (3, H, W) in [0, 1] as float64 0-255."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be RGB uint8 (H, W, 3), got {image.dtype} of shape "
                             f"{image.shape}; convert with np.asarray(pil.convert('RGB')) or "
                             "(x * 255).round().astype(np.uint8)")
        rgb = image.astype(np.float64)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"image tensor must be float (3, H, W) in [0, 1], got {image.dtype} "
                             f"of shape {tuple(image.shape)}; a ComfyUI IMAGE [B, H, W, C] needs "
                             "image[i].permute(2, 0, 1)")
        rgb = image.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy() * 255.0
        lo, hi = (float(rgb.min()), float(rgb.max())) if rgb.size else (0.0, 0.0)
        if not np.isfinite(rgb).all() or lo < -0.26 or hi > 255.26:
            raise ValueError(f"image tensor values must be finite and in [0, 1], got range "
                             f"[{lo / 255:.3g}, {hi / 255:.3g}]; clamp it (x.clamp(0, 1)) or "
                             "rescale [-1, 1] / [0, 255] images first")
        rgb = np.clip(rgb, 0.0, 255.0)
    else:
        raise TypeError(f"image must be a numpy uint8 (H, W, 3) array or a torch (3, H, W) "
                        f"tensor, got {type(image).__name__}; convert a PIL image with "
                        "np.asarray(pil.convert('RGB'))")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"image is empty ({rgb.shape[0]} x {rgb.shape[1]} pixels)")
    return rgb  # (H, W, 3) float64 0-255


def _check_options(max_distance: float, min_area: float) -> None:
    if not max_distance > 0:
        raise ValueError(f"max_distance={max_distance} must be > 0 (RGB 0-255 units, e.g. 80)")
    if not 0 <= min_area < 1:
        raise ValueError(f"min_area={min_area} must be a fraction in [0, 1), e.g. {MIN_AREA}")


# ------------------------------------------------------------------ pixels


def estimate_background(rgb: np.ndarray, max_distance: float = MAX_DISTANCE) -> np.ndarray:
    """Median colour of the frame pixels that are not a world colour (else of any such pixel)."""
    h, w, _ = rgb.shape
    frame = np.zeros((h, w), dtype=bool)
    frame[:FRAME], frame[-FRAME:], frame[:, :FRAME], frame[:, -FRAME:] = True, True, True, True
    nearest = np.sqrt(((rgb[..., None, :] - _PALETTE) ** 2).sum(-1)).min(-1)  # (H, W)
    plain = nearest > max_distance  # not a world colour
    for where in (frame & plain, plain):
        if where.sum() >= min(8, where.size):
            return np.median(rgb[where], axis=0)  # (3,)
    return np.array([235.0, 235.0, 235.0])  # an all-object crop: any background will do


def _background(rgb: np.ndarray, background: Sequence[float] | None, max_distance: float
                ) -> np.ndarray:
    """The given background colour (3,), checked, or the estimate from the image."""
    if background is None:
        return estimate_background(rgb, max_distance)
    bg = np.asarray(background, dtype=np.float64).reshape(-1)
    if bg.shape != (3,) or not np.isfinite(bg).all():
        raise ValueError(f"background={background!r} must be an RGB triple in 0-255, e.g. "
                         "(235, 235, 235), or None to estimate it from the image's frame")
    return bg


def colour_map(rgb: np.ndarray, background: np.ndarray, max_distance: float = MAX_DISTANCE
               ) -> tuple[np.ndarray, np.ndarray]:
    """Unmix each pixel against background -> colour: (colour index or -1, residual), (H, W)."""
    p = rgb - background  # (H, W, 3)
    d = _PALETTE - background  # (K, 3)
    dd = np.maximum((d**2).sum(-1), 1e-9)  # (K,)
    pd = p @ d.T  # (H, W, K)
    alpha = np.clip(pd / dd, 0.0, 1.0)
    resid = np.sqrt(np.clip((p**2).sum(-1, keepdims=True) - 2 * alpha * pd + alpha**2 * dd,
                            0.0, None))  # (H, W, K)
    ok = (alpha >= 0.25) & (resid <= max_distance)  # (H, W, K) plausible blends
    cost = resid + RIM_WEIGHT * (1.0 - alpha) * np.sqrt(dd)  # (H, W, K)
    best = np.where(ok, cost, np.inf).argmin(-1)[..., None]  # (H, W, 1)
    solid = np.take_along_axis(alpha, best, -1)[..., 0] >= 0.5  # at least half object
    classes = np.where(ok.any(-1) & solid, best[..., 0], -1)  # (H, W)
    return classes, np.take_along_axis(resid, best, -1)[..., 0]  # (H, W) x 2


def label_components(classes: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of equal non-negative classes (H, W): (labels, -1 = none; count).

    Min-label propagation with pointer jumping, all in numpy: each round every pixel takes the
    smallest label among its same-class neighbours, then the label of the pixel its label names.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity} must be 4 or 8")
    h, w = classes.shape
    fg = classes >= 0
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)] if connectivity == 8 else []
    padded = np.pad(classes, 1, constant_values=-1)
    same = [(padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == classes) & fg for dy, dx in steps]
    none = h * w
    lab = np.where(fg, np.arange(h * w).reshape(h, w), none)  # (H, W) a pixel index per pixel
    idx = np.flatnonzero(fg)
    while True:
        pad = np.pad(lab, 1, constant_values=none)
        new = lab
        for (dy, dx), s in zip(steps, same):
            new = np.where(s, np.minimum(new, pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]), new)
        flat = new.reshape(-1).copy()
        for _ in range(2):
            flat[idx] = flat[flat[idx]]  # a label is a pixel of the same component
        new = flat.reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.full((h, w), -1, dtype=np.int64)
    roots, out[fg] = np.unique(lab[fg], return_inverse=True)
    return out, len(roots)


# ------------------------------------------------------------------ shapes


def shape_features(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(fill, taper, log aspect) of a component from its row-major pixel rows and columns (N,)."""
    rows, starts = np.unique(ys, return_index=True)  # ys is sorted (np.nonzero order)
    spans = np.maximum.reduceat(xs, starts) - np.minimum.reduceat(xs, starts) + 1  # (R,)
    w = float(xs.max() - xs.min() + 1)
    h = float(rows[-1] - rows[0] + 1)
    depth = (rows + 0.5 - rows[0]) / h  # (R,) row centres, 0 top .. 1 bottom
    upper = spans[(depth >= TAPER_BANDS[0]) & (depth <= TAPER_BANDS[1])]
    lower = spans[(depth >= 1 - TAPER_BANDS[1]) & (depth <= 1 - TAPER_BANDS[0])]
    taper = (lower.mean() - upper.mean()) / w if len(upper) and len(lower) else 0.0
    return np.array([spans.sum() / (w * h), taper, math.log(w / h)])  # (3,)


def span_fill(mask: np.ndarray) -> np.ndarray:
    """Each row and each column filled between its outermost set pixels, intersected: (H, W).

    Closes the holes noise leaves inside a convex shape (spurs stay; `majority_3x3` cuts them).
    """

    def rows(m: np.ndarray) -> np.ndarray:
        cols = np.arange(m.shape[1])
        first = m.argmax(1)[:, None]  # (H, 1)
        last = m.shape[1] - 1 - m[:, ::-1].argmax(1)[:, None]
        return (cols >= first) & (cols <= last) & m.any(1)[:, None]

    return rows(mask) & rows(mask.T).T


def majority_3x3(mask: np.ndarray) -> np.ndarray:
    """Pixels with at least 5 of their 3x3 neighbourhood set (cuts spurs, and corners): (H, W)."""
    h, w = mask.shape
    padded = np.pad(mask, 1).astype(np.int32)
    count = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return count >= 5


def classify_shape(features: np.ndarray) -> tuple[str, float]:
    """Nearest shape prototype and its fit exp(-d^2 / 2), d in units of FEATURE_SCALE."""
    dist = {s: float(np.linalg.norm((features - p) / FEATURE_SCALE))
            for s, p in PROTOTYPES.items()}
    shape = min(dist, key=dist.get)
    return shape, math.exp(-0.5 * dist[shape] ** 2)


def _smoothed(labels: np.ndarray, k: int, ys: np.ndarray, xs: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of component k, holes filled and spurs cut (raw if that empties it)."""
    y0, x0 = max(int(ys.min()) - 1, 0), max(int(xs.min()) - 1, 0)
    window = labels[y0:int(ys.max()) + 2, x0:int(xs.max()) + 2] == k  # (h + 2, w + 2) at most
    mask = span_fill(window)
    if min(window.shape) - 2 >= SPUR_MIN_SIDE:  # smaller: a corner pixel is too much of a shape
        mask = majority_3x3(mask)
    sy, sx = np.nonzero(mask)
    return (sy + y0, sx + x0) if len(sy) else (ys, xs)


def _detections(rgb: np.ndarray, background: np.ndarray, max_distance: float, min_area: float,
                connectivity: int) -> list[Detection]:
    """Every component of at least min_area of the image, classified, best score first."""
    h, w, _ = rgb.shape
    classes, resid = colour_map(rgb, background, max_distance)  # (H, W) x 2
    labels, n = label_components(classes, connectivity)
    sizes = np.bincount(labels[labels >= 0], minlength=n)  # (n,)
    found = []
    for k in np.flatnonzero(sizes >= max(1.0, min_area * h * w)):
        ys, xs = np.nonzero(labels == k)
        shape, fit = classify_shape(shape_features(*_smoothed(labels, k, ys, xs)))
        colour_fit = float(np.mean(1.0 - resid[ys, xs] / max_distance))
        box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
        found.append(Detection(tuple(float(v) for v in box), COLOUR_NAMES[classes[ys[0], xs[0]]],
                               shape, float(np.clip(fit * colour_fit, 1e-6, 1.0)),
                               len(ys) / (h * w)))
    return sorted(found, key=lambda d: -d.score)


def detect_shapes(image: Any, max_distance: float = MAX_DISTANCE, min_area: float = MIN_AREA,
                  connectivity: int = 8, background: Sequence[float] | None = None
                  ) -> list[Detection]:
    """Detect the shapes of an image (uint8 (H, W, 3) or float (3, H, W)), best score first.

    `background` (RGB 0-255) overrides the estimate from the image's frame.
    """
    _check_options(max_distance, min_area)
    rgb = as_rgb(image)
    found = _detections(rgb, _background(rgb, background, max_distance), max_distance, min_area,
                        connectivity)
    log.debug("%d shapes in a %dx%d image", len(found), rgb.shape[1], rgb.shape[0])
    return found


def to_image_boxes(detections: Sequence[Detection], label_by: str = "colour_shape",
                   width: float = 1.0, height: float = 1.0) -> ImageBoxes:
    """Detections as `box_ap` input; boxes scaled by (width, height): 1, 1 keeps them normalised."""
    labels = tuple(d.label(label_by) for d in detections)
    if label_by not in LABEL_BY:  # also when there is no detection to ask
        raise ValueError(f"label_by={label_by!r} must be one of {LABEL_BY}")
    scale = np.array([width, height, width, height], dtype=np.float64)
    boxes = np.array([d.box for d in detections], dtype=np.float64).reshape(-1, 4) * scale
    return ImageBoxes(boxes, labels, np.array([d.score for d in detections], dtype=np.float64))


def detect_file(path: str, label_by: str = "colour_shape") -> list[dict[str, Any]]:
    """COCO results [{"bbox": [x, y, w, h] pixels, "score", "label"}] of an image file.

    Fits `python -m locref_core.eval boxes --detector locref_core.eval.shapes:detect_file`.
    """
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
    h, w, _ = rgb.shape
    return [{"bbox": [d.box[0] * w, d.box[1] * h, (d.box[2] - d.box[0]) * w,
                      (d.box[3] - d.box[1]) * h], "score": d.score, "label": d.label(label_by)}
            for d in detect_shapes(rgb)]


# ------------------------------------------------------------------ appearance


def _classify(rgb: np.ndarray, background: np.ndarray, max_distance: float, min_area: float
              ) -> tuple[str | None, str | None, float]:
    """classify_patch on a checked (h, w, 3) float patch and a known background."""
    found = _detections(rgb, background, max_distance, min_area, 8)
    if not found:
        return None, None, 0.0
    totals: dict[str, float] = {}
    for d in found:
        totals[d.colour] = totals.get(d.colour, 0.0) + d.area
    colour = max(totals, key=totals.get)
    best = max((d for d in found if d.colour == colour), key=lambda d: d.area)
    return colour, best.shape, best.score


def classify_patch(image: Any, max_distance: float = MAX_DISTANCE,
                   min_area: float = MIN_PATCH_AREA, background: Sequence[float] | None = None,
                   ) -> tuple[str | None, str | None, float]:
    """(colour, shape, confidence) of the object a patch holds, or (None, None, 0.0).

    The colour with the most pixels in components of at least `min_area` of the patch, and the
    shape of its largest component; confidence = that component's detection score. Give the
    full image's `background` (RGB 0-255) when the patch is a tight crop: its frame may be all
    object.
    """
    _check_options(max_distance, min_area)
    rgb = as_rgb(image)
    return _classify(rgb, _background(rgb, background, max_distance), max_distance, min_area)


def reference_identity(reference_image: Any, max_distance: float = MAX_DISTANCE
                       ) -> tuple[str, str]:
    """(colour, shape) of a reference image's object; ValueError when it holds none."""
    colour, shape, _ = classify_patch(reference_image, max_distance)
    if colour is None or shape is None:
        raise ValueError("the reference image holds no shape of the shapes world (no world colour "
                         f"region of {MIN_PATCH_AREA:.0%} of the image or more within "
                         f"{max_distance} RGB units); give the (colour, shape) pair instead")
    return colour, shape


def _check_boxes(boxes: Any, references: Sequence[Any]) -> list[tuple[float, ...]]:
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
    for i, (x0, y0, x1, y1) in enumerate(arr.tolist()):
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"box {i} ({x0}, {y0}, {x1}, {y1}) must be normalised xyxy in [0, 1] "
                             "with x0 < x1 and y0 < y1; divide pixel boxes by the image size")
    if len(references) != len(arr):
        raise ValueError(f"{len(arr)} boxes but {len(references)} references; give one "
                         "(colour, shape) pair per box (reference_identity(image) makes one)")
    for i, ref in enumerate(references):
        ok = (isinstance(ref, (tuple, list)) and len(ref) == 2 and ref[0] in COLOURS
              and ref[1] in SHAPES)
        if not ok:
            raise ValueError(f"reference {i} {ref!r} must be a (colour, shape) pair with colour "
                             f"in {COLOUR_NAMES} and shape in {SHAPES}")
    return [tuple(b) for b in arr.tolist()]


def appearance_scores(image: Any, boxes: Any, references: Sequence[tuple[str, str]],
                      max_distance: float = MAX_DISTANCE, min_area: float = MIN_PATCH_AREA
                      ) -> list[BoxAppearance]:
    """Per box: crop, classify, compare with its own reference and the other boxes' ones."""
    _check_options(max_distance, min_area)
    rgb = as_rgb(image)
    checked = _check_boxes(boxes, references)
    refs = [(str(r[0]), str(r[1])) for r in references]
    bg = estimate_background(rgb, max_distance)  # of the full image: a crop may be all object
    h, w, _ = rgb.shape
    out = []
    for i, box in enumerate(checked):
        (x0, x1), (y0, y1) = pixel_span(box[0], box[2], w), pixel_span(box[1], box[3], h)
        colour, shape, conf = _classify(rgb[y0:y1, x0:x1], bg, max_distance, min_area)
        own = refs[i]
        match = (colour, shape) == own
        others = {r for j, r in enumerate(refs) if j != i}
        out.append(BoxAppearance(box, own, colour, shape, conf, colour == own[0],
                                 shape == own[1], match, not match and (colour, shape) in others))
    return out


def summarise(results: Sequence[BoxAppearance]) -> dict[str, float | int]:
    """Shares of boxes that match their reference, leak another's, match colour, match shape."""
    n = len(results)
    if n == 0:
        raise ValueError("no boxes to summarise; give the appearance_scores of at least one box")
    share = {k: sum(getattr(r, k) for r in results) / n
             for k in ("match", "leak", "colour_match", "shape_match")}
    return {"boxes": n, **share}
