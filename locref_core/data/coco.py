"""COCO-format annotations: load and validate `instances_*.json` / `captions_*.json`, decode masks.

`load_coco` reads the files once and checks everything a training run would trip over later
(missing or unreadable JSON, an empty dataset, image files missing on disk, boxes outside their
image or with no area, unknown category ids, duplicate ids) *before* it returns, so a trainer
stops before its first step with a `DataError` that names the file, the entry and the fix.

Masks: a polygon segmentation is rasterised with PIL's ImageDraw at 4x resolution and
downsampled, a pixel being inside when at least half of it is covered. So pixel (i, j), which
covers [j, j + 1) x [i, i + 1) in COCO's continuous coordinates, is in the mask of the square
polygon (10, 10)-(30, 30) exactly for i, j in 10..29 (area 400, the polygon's own area). RLE
masks (uncompressed `counts` lists or COCO's compressed strings) are decoded here, without
pycocotools: runs alternate 0s and 1s, starting with 0s, in column-major order.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

BOX_TOLERANCE = 1.0  # pixels a box may reach past the image edge (COCO boxes are float-rounded)
SUPERSAMPLE = 4  # polygon rasterisation resolution factor (area-coverage >= 1/2 per pixel)


class DataError(ValueError):
    """Bad training data: the message names the file, the entry and how to fix it."""


@dataclass(frozen=True)
class CocoAnnotation:
    """One object instance: COCO xywh box in pixels and its optional segmentation."""

    id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, width, height in pixels
    segmentation: Any | None = None  # polygons [[x0, y0, x1, y1, ...], ...] or RLE, as in the file
    area: float = 0.0  # the file's area (mask area in COCO), else the box area
    iscrowd: bool = False  # a crowd region (RLE over many objects), not one instance


@dataclass(frozen=True)
class CocoImage:
    """One image: its file (relative to the images folder), size, captions and instances."""

    id: int
    file_name: str
    width: int
    height: int
    captions: tuple[str, ...] = ()
    annotations: tuple[CocoAnnotation, ...] = ()  # sorted by annotation id


@dataclass(frozen=True)
class CocoSet:
    """A validated COCO dataset: images (in file order) and category names by id."""

    images_dir: Path
    images: tuple[CocoImage, ...]
    categories: dict[int, str]

    def image_path(self, image: CocoImage) -> Path:
        return self.images_dir / image.file_name


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file or raise a DataError naming it (missing, unreadable, not JSON)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist; check the path (COCO names it "
                        f"e.g. annotations/instances_train2017.json)")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} file {path} is not valid JSON (line {exc.lineno}, column "
                        f"{exc.colno}: {exc.msg}); re-download or regenerate it") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} file {path} cannot be read ({exc}); check its permissions "
                        "and that it is a UTF-8 JSON file") from exc


def _is_int(value: Any) -> bool:
    """True for an int, or a float with an integral finite value (JSON writers emit 3.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or (math.isfinite(value) and value == int(value))


def _int_id(value: Any, path: Path, entry: str) -> int:
    if not _is_int(value):
        raise DataError(f"{path}: {entry} has id {value!r}; ids must be integers")
    return int(value)


def _list_field(data: Any, key: str, path: Path, required: bool = True) -> list:
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level must be a JSON object with 'images', "
                        f"'annotations' and 'categories', got {type(data).__name__}")
    value = data.get(key, None if required else [])
    if not isinstance(value, list):
        raise DataError(f"{path}: '{key}' must be a list of entries, got "
                        f"{type(value).__name__}; is this a COCO-format file?")
    return value


def _parse_categories(data: Any, path: Path) -> dict[int, str]:
    categories: dict[int, str] = {}
    for entry in _list_field(data, "categories", path):
        if not isinstance(entry, dict) or "id" not in entry or "name" not in entry:
            raise DataError(f"{path}: category entry {entry!r} needs 'id' and 'name'")
        cid = _int_id(entry["id"], path, f"category {entry.get('name')!r}")
        if cid in categories:
            raise DataError(f"{path}: category id {cid} is listed twice ({categories[cid]!r} "
                            f"and {entry['name']!r}); give every category a distinct id")
        categories[cid] = str(entry["name"])
    if not categories:
        raise DataError(f"{path}: 'categories' is empty; list the object classes as "
                        '{"id": 1, "name": "person"}')
    return categories


def _parse_images(data: Any, path: Path) -> dict[int, dict]:
    images: dict[int, dict] = {}
    for entry in _list_field(data, "images", path):
        if not isinstance(entry, dict) or not {"id", "file_name", "width", "height"} <= set(entry):
            raise DataError(f"{path}: image entry {entry!r} needs 'id', 'file_name', 'width' "
                            "and 'height'")
        iid = _int_id(entry["id"], path, f"image {entry['file_name']!r}")
        if iid in images:
            raise DataError(f"{path}: image id {iid} is listed twice ({images[iid]['file_name']!r}"
                            f" and {entry['file_name']!r}); image ids must be unique")
        w, h = entry["width"], entry["height"]
        if not all(_is_int(v) and v >= 1 for v in (w, h)):
            raise DataError(f"{path}: image id {iid} ({entry['file_name']!r}) has size "
                            f"{w!r}x{h!r}; width and height must be positive integers")
        images[iid] = {"file_name": str(entry["file_name"]), "width": int(w), "height": int(h)}
    if not images:
        raise DataError(f"{path}: the dataset has no images ('images' is empty); point "
                        "instances_json at a non-empty COCO annotation file")
    return images


def _check_segmentation(seg: Any, path: Path, aid: int, height: int, width: int) -> None:
    if isinstance(seg, list):
        for poly in seg:
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(isinstance(v, (int, float)) for v in poly)):
                raise DataError(f"{path}: annotation id {aid} has a polygon that is not a flat "
                                "list of at least 3 x, y pairs; fix or remove its segmentation")
    elif isinstance(seg, dict):
        size = seg.get("size")
        if (not isinstance(size, list) or len(size) != 2
                or not isinstance(seg.get("counts"), (list, str))):
            raise DataError(f"{path}: annotation id {aid} has an RLE segmentation without "
                            "'size': [h, w] and 'counts' (list or string)")
        if not all(_is_int(v) for v in size) or [int(v) for v in size] != [height, width]:
            raise DataError(f"{path}: annotation id {aid} has an RLE mask of size {size} but "
                            f"its image is {height}x{width} (h x w); fix the mask or the image")
    else:
        raise DataError(f"{path}: annotation id {aid} has segmentation of type "
                        f"{type(seg).__name__}; use polygons (list) or RLE (dict)")


def _parse_annotation(entry: Any, path: Path, images: dict[int, dict],
                      categories: dict[int, str]) -> tuple[int, CocoAnnotation]:
    if not isinstance(entry, dict) or not {"id", "image_id", "category_id", "bbox"} <= set(entry):
        raise DataError(f"{path}: annotation entry {entry!r} needs 'id', 'image_id', "
                        "'category_id' and 'bbox'")
    aid = _int_id(entry["id"], path, "an annotation")
    iid = _int_id(entry["image_id"], path, f"annotation id {aid}'s image")
    if iid not in images:
        raise DataError(f"{path}: annotation id {aid} refers to image id {iid}, which is not "
                        "in 'images'; add the image or remove the annotation")
    cid = entry["category_id"]
    if cid not in categories:
        known = ", ".join(str(k) for k in sorted(categories)[:20])
        raise DataError(f"{path}: annotation id {aid} (image id {iid}) has unknown category id "
                        f"{cid!r}; the file's categories are {known}. Add the category or fix "
                        "the annotation")
    img = images[iid]
    bbox = entry["bbox"]
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        raise DataError(f"{path}: annotation id {aid} (image id {iid}) has bbox {bbox!r}; "
                        "use [x, y, width, height] in pixels")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise DataError(f"{path}: annotation id {aid} (image id {iid}, {img['file_name']!r}) "
                        f"has bbox {bbox!r} with non-positive size; fix or remove it")
    W, H, tol = img["width"], img["height"], BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
        raise DataError(f"{path}: annotation id {aid} (image id {iid}, {img['file_name']!r}) "
                        f"has bbox {bbox!r} outside the {W}x{H} image; boxes are [x, y, width, "
                        "height] in pixels of that image. Fix the box or the image size")
    seg = entry.get("segmentation") or None
    if seg is not None:
        _check_segmentation(seg, path, aid, H, W)
    area = entry.get("area")
    area = float(area) if isinstance(area, (int, float)) and area > 0 else w * h
    ann = CocoAnnotation(aid, int(cid), (x, y, w, h), seg, area, bool(entry.get("iscrowd", 0)))
    return iid, ann


def _load_captions(path: Path, images: dict[int, dict]) -> dict[int, list[str]]:
    data = read_json(path, "captions")
    captions: dict[int, list[str]] = {}
    unknown = 0
    for entry in _list_field(data, "annotations", path):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise DataError(f"{path}: caption entry {entry!r} needs 'image_id' and 'caption'")
        if not isinstance(entry["caption"], str):
            raise DataError(f"{path}: caption {entry.get('id')!r} of image id "
                            f"{entry['image_id']!r} is not a string")
        iid = entry["image_id"]
        if iid not in images:
            unknown += 1
            continue
        captions.setdefault(iid, []).append(entry["caption"].strip())
    if unknown and not captions:
        raise DataError(f"{path}: none of its captions refers to an image of the instances "
                        "file; are the two files from the same split (train/val)?")
    if unknown:
        log.warning("%s: %d captions refer to images not in the instances file; ignored",
                    path, unknown)
    return captions


def load_coco(images_dir: str | Path, instances_json: str | Path,
              captions_json: str | Path | None = None, *, check_files: bool = True) -> CocoSet:
    """Load and validate a COCO-format dataset; raise DataError naming the first bad entry."""
    images_dir, path = Path(images_dir), Path(instances_json)
    data = read_json(path, "instances")
    categories = _parse_categories(data, path)
    images = _parse_images(data, path)
    anns: dict[int, list[CocoAnnotation]] = {}
    seen: set[int] = set()
    for entry in _list_field(data, "annotations", path):
        iid, ann = _parse_annotation(entry, path, images, categories)
        if ann.id in seen:
            raise DataError(f"{path}: annotation id {ann.id} is listed twice; annotation ids "
                            "must be unique")
        seen.add(ann.id)
        anns.setdefault(iid, []).append(ann)
    if not seen:
        raise DataError(f"{path}: the file has no annotations ('annotations' is empty), so "
                        "there is nothing to train on; use an instances file with boxes")
    if check_files:
        if not images_dir.is_dir():
            raise DataError(f"images folder {images_dir} does not exist; pass the folder that "
                            f"holds the images listed in {path}")
        missing = [(iid, img["file_name"]) for iid, img in images.items()
                   if not (images_dir / img["file_name"]).is_file()]
        if missing:
            iid, name = missing[0]
            raise DataError(f"image file {images_dir / name} (image id {iid} in {path}) does not "
                            f"exist; {len(missing)} of {len(images)} images are missing. Fix "
                            "images_dir or remove those entries")
    captions = _load_captions(Path(captions_json), images) if captions_json else {}
    records = tuple(
        CocoImage(iid, img["file_name"], img["width"], img["height"],
                  tuple(captions.get(iid, ())),
                  tuple(sorted(anns.get(iid, ()), key=lambda a: a.id)))
        for iid, img in images.items()
    )
    log.info("loaded %s: %d images, %d annotations, %d categories", path, len(records),
             len(seen), len(categories))
    return CocoSet(images_dir, records, categories)


# ----------------------------------------------------------------------------------- masks


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (flat x, y lists, pixels) to an (H, W) bool mask (union)."""
    f = SUPERSAMPLE
    mask = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)  # (P, 2) x, y
        x0 = int(np.clip(np.floor(pts[:, 0].min()), 0, width))
        y0 = int(np.clip(np.floor(pts[:, 1].min()), 0, height))
        x1 = int(np.clip(np.ceil(pts[:, 0].max()) + 1, 0, width))
        y1 = int(np.clip(np.ceil(pts[:, 1].max()) + 1, 0, height))
        if x1 <= x0 or y1 <= y0:
            continue  # entirely outside the image
        big = Image.new("L", ((x1 - x0) * f, (y1 - y0) * f), 0)
        local = np.floor((pts - (x0, y0)) * f).astype(np.int64)  # sub-pixel vertex corners
        ImageDraw.Draw(big).polygon([tuple(p) for p in local.tolist()], fill=1)
        cover = np.asarray(big).reshape(y1 - y0, f, x1 - x0, f).sum(axis=(1, 3))
        mask[y0:y1, x0:x1] |= cover * 2 >= f * f
    return mask  # (H, W) bool


def rle_counts_from_string(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools `rleFrString`) to run lengths."""
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign-extend
        if len(counts) > 2:
            x += counts[-2]  # counts after the second are deltas to the run two back
        counts.append(x)
    return counts


def rle_counts_to_string(counts: list[int]) -> str:
    """Encode run lengths as COCO's compressed RLE string (pycocotools `rleToString`)."""
    out = []
    for i, x in enumerate(counts):
        x = int(x) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | (0x20 if more else 0)) + 48))
    return "".join(out)


def rle_decode(rle: dict, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode an RLE dict {"size": [h, w], "counts": list | str} to an (h, w) bool mask."""
    h, w = (int(v) for v in rle["size"])
    if height is not None and (h, w) != (height, width):
        raise DataError(f"RLE size {h}x{w} does not match its image's {height}x{width}")
    counts = rle["counts"]
    counts = rle_counts_from_string(counts) if isinstance(counts, (str, bytes)) else counts
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise DataError(f"RLE counts sum to {int(counts.sum())} (or contain a negative run); "
                        f"a {h}x{w} mask needs {h * w}")
    values = np.arange(len(counts)) % 2 == 1  # runs of 0s, 1s, 0s, ...
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()  # column-major -> (H, W) bool


def rle_encode(mask: np.ndarray, compress: bool = True) -> dict:
    """Encode an (H, W) bool mask as COCO RLE (compressed string or uncompressed list)."""
    m = np.asarray(mask, dtype=bool)
    flat = m.T.reshape(-1)  # column-major, as COCO stores it
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]  # runs start with 0s
    return {"size": [int(m.shape[0]), int(m.shape[1])],
            "counts": rle_counts_to_string(counts) if compress else counts}


def instance_mask(ann: CocoAnnotation, height: int, width: int) -> np.ndarray | None:
    """(H, W) bool mask of an annotation's segmentation (polygons or RLE); None without one."""
    seg = ann.segmentation
    if not seg:
        return None
    try:
        if isinstance(seg, dict):
            return rle_decode(seg, height, width)
        return polygon_mask(seg, height, width)
    except DataError as exc:
        raise DataError(f"annotation id {ann.id}: {exc}; fix its segmentation") from exc
