"""A folder of generated images and their layouts, detections files and user callables.

Folder layout (one layout JSON, the pack's version-1 format, per generated image):

    out/img_0001.png        the generated image (.png, .jpg, .jpeg or .webp)
    out/img_0001.json       its layout: {"version": 1, "boxes": [{"x0", "y0", "x1", "y1",
                            "label", "reference": "refs/dog.png"}]}   (reference: CLIP-I only)
    out/img_0001_ref0.png   box 0's reference when the box has no "reference" key (optional;
                            files named *_ref<number>.* are never taken for generated images)

Boxes are normalised to the image (or in pixels with `"units": "pixels"`, see `layout_json`); a
box's label text is its class for box AP. A "reference" path is relative to the JSON's folder.
Labels are compared after `strip().lower()`, and a label map renames either side.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from ..layout import Layout, Reference
from ..layout_json import parse_layout_json
from ..preview import pil_to_tensor
from .boxes import ImageBoxes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REF_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_REF_NAME = re.compile(r"_ref\d+$")  # img_0001_ref0.png is a reference, not a generated image


def norm_label(label: Any, label_map: Mapping[str, str] | None = None) -> str:
    """A label as compared: stripped, lower case, then renamed by the label map."""
    key = str(label).strip().lower()
    return label_map.get(key, key) if label_map else key


def parse_label_map(spec: str) -> dict[str, str]:
    """A label map from a JSON file ({"1": "person"}) or inline text "1=person, 18=dog"."""
    if not spec:
        return {}
    path = pathlib.Path(spec)
    if spec.strip().endswith(".json") or path.is_file():
        data = read_json(path, 'a label map like {"1": "person", "a red car": "car"}')
        if not isinstance(data, Mapping):
            raise ValueError(f"label map {path} must be a JSON object {{from: to}}")
        pairs = list(data.items())
    else:
        pairs = []
        for item in filter(str.strip, re.split(r"[,;\n]", spec)):
            if "=" not in item:
                raise ValueError(f"label map entry {item.strip()!r} needs the form from=to, "
                                 "e.g. --label-map '1=person, 18=dog'")
            pairs.append(tuple(item.split("=", 1)))
    return {norm_label(k): norm_label(v) for k, v in pairs}


def read_json(path: pathlib.Path, expected: str) -> Any:
    """Decoded JSON of a file; ValueError naming the file and what it should hold."""
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; give the path of {expected}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                         f"{err.colno}); it should hold {expected}") from None


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
    """The generated images of a folder, sorted by name; ValueError when there are none."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"layouts folder {folder} does not exist; give the folder that holds "
                         "img_0001.png + img_0001.json pairs")
    images = sorted(p for p in folder.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and not _REF_NAME.search(p.stem))
    if not images:
        raise ValueError(f"layouts folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}); "
                         "save each generated image next to its layout JSON")
    return images


def image_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) of an image file."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def load_image(path: pathlib.Path) -> Any:
    """An image file as a (3, H, W) float tensor in [0, 1]."""
    try:
        with Image.open(path) as im:
            return pil_to_tensor(im)  # (3, H, W)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def load_layout(image_path: pathlib.Path) -> tuple[Layout, Any]:
    """The layout of a generated image (its `<stem>.json`) on the image's canvas, and raw JSON."""
    json_path = image_path.with_suffix(".json")
    if not json_path.is_file():
        raise ValueError(f"image {image_path.name} has no layout {json_path}; save its layout "
                         "JSON (the widget's boxes_json) there, or move the image out")
    width, height = image_size(image_path)
    text = json_path.read_text(encoding="utf-8")
    try:
        layout = parse_layout_json(text, width, height)
        return layout, json.loads(text)
    except ValueError as err:
        raise ValueError(f"layout {json_path}: {err}") from None


def ground_truth(images: list[pathlib.Path], label_map: Mapping[str, str] | None = None
                 ) -> dict[str, ImageBoxes]:
    """Ground-truth boxes in pixels of each image from its layout; label text = class."""
    out = {}
    for path in images:
        layout, _ = load_layout(path)
        scale = np.array([layout.width, layout.height] * 2, dtype=np.float64)
        boxes = np.array([[b.x0, b.y0, b.x1, b.y1] for b in layout.boxes]).reshape(-1, 4) * scale
        out[path.name] = ImageBoxes(boxes, tuple(norm_label(b.label, label_map)
                                                 for b in layout.boxes))
    return out


def image_index(images: list[pathlib.Path]) -> dict[Any, str]:
    """Names a detection may use for an image (file name, stem, trailing number) -> file name."""
    index: dict[Any, str] = {}
    numbers: dict[int, list[str]] = {}
    for p in images:
        index[p.name] = index[p.stem] = p.name
        if m := re.search(r"(\d+)$", p.stem):
            numbers.setdefault(int(m[1]), []).append(p.name)
    index.update({n: names[0] for n, names in numbers.items() if len(names) == 1})
    return index


def _image_key(entry: Mapping[str, Any], index: Mapping[Any, str], where: str) -> str:
    """The image file name a detection refers to (file_name, or image_id as name/stem/number)."""
    ref = entry.get("file_name", entry.get("image_id"))
    if ref is None:
        raise ValueError(f"{where} has neither file_name nor image_id; name the image")
    key = pathlib.Path(ref).name if isinstance(ref, str) else ref
    if isinstance(key, bool) or not isinstance(key, (str, int)) or key not in index:
        raise ValueError(f"{where} refers to image {ref!r}, which is not in the layouts folder "
                         "(an image_id number must match the number of exactly one "
                         "img_<number> file); use the image's file name")
    return index[key]


def parse_detection(entry: Any, where: str, label_map: Mapping[str, str] | None
                    ) -> tuple[list[float], float, str]:
    """One detection {"bbox": [x, y, w, h] pixels, "score", "label"|"category_id"} as xyxy."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be an object with bbox, score and label, got {entry!r}")
    bbox, score = entry.get("bbox"), entry.get("score")
    label = entry.get("label", entry.get("category_id"))
    ok = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    if not ok:
        raise ValueError(f'{where}: "bbox" must be [x, y, width, height] in pixels, got {bbox!r}')
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        raise ValueError(f'{where}: "score" must be a number, got {score!r}')
    if label is None:
        raise ValueError(f'{where} has no "label" or "category_id"; give the detected class')
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise ValueError(f"{where}: bbox width/height are negative ({w}, {h}); COCO boxes are "
                         "[x, y, width, height]")
    return [x, y, x + w, y + h], float(score), norm_label(label, label_map)


def _collect(rows: dict[str, list]) -> dict[str, ImageBoxes]:
    """Rows (xyxy, score, label) per image as ImageBoxes."""
    out = {}
    for name, items in rows.items():
        boxes = np.array([r[0] for r in items], dtype=np.float64).reshape(-1, 4)
        scores = np.array([r[1] for r in items], dtype=np.float64)
        out[name] = ImageBoxes(boxes, tuple(r[2] for r in items), scores)
    return out


def detections_from_json(path: pathlib.Path, images: list[pathlib.Path],
                         label_map: Mapping[str, str] | None = None) -> dict[str, ImageBoxes]:
    """Detections from a COCO results file, grouped by image file name (pixels, xyxy)."""
    data = read_json(path, 'a COCO results list [{"file_name", "bbox", "score", "label"}]')
    if not isinstance(data, list):
        raise ValueError(f"detections file {path} must hold a list of detections (COCO results "
                         f"format), got {type(data).__name__}")
    rows: dict[str, list] = {p.name: [] for p in images}
    index = image_index(images)
    for i, entry in enumerate(data):
        where = f"detections file {path}, entry {i}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be an object, got {entry!r}")
        rows[_image_key(entry, index, where)].append(parse_detection(entry, where, label_map))
    return _collect(rows)


def detections_from_callable(detect: Callable[[str], Any], images: list[pathlib.Path],
                             label_map: Mapping[str, str] | None = None) -> dict[str, ImageBoxes]:
    """Detections from `detect(image_path) -> [{"bbox", "score", "label"}]` for every image."""
    rows: dict[str, list] = {}
    for path in images:
        found = detect(str(path))
        if not isinstance(found, (list, tuple)):
            raise ValueError(f"the detector returned {type(found).__name__} for {path.name}; "
                             'return a list of {"bbox": [x, y, w, h], "score", "label"}')
        rows[path.name] = [parse_detection(d, f"detection {i} of {path.name}", label_map)
                           for i, d in enumerate(found)]
        log.info("%s: %d detections", path.name, len(found))
    return _collect(rows)


def load_callable(spec: str, flag: str) -> Callable[..., Any]:
    """`module:function` or `path/to/file.py:function` -> the function."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{flag} {spec!r} must be module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            file = pathlib.Path(module_name)
            if not file.is_file():
                raise ValueError(f"{flag}: {file} does not exist; give an existing .py file")
            loader = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(loader)  # type: ignore[arg-type]
            loader.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{flag}: cannot import {module_name!r} ({err}); check the name and "
                         "that its folder is on PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{flag}: {module_name!r} has no function {attr!r}")
    return fn


def reference_path(image_path: pathlib.Path, raw: Any, index: int) -> pathlib.Path | None:
    """Box `index`'s reference: its "reference" key (relative to the JSON) or <stem>_ref<i>.*."""
    boxes = raw.get("boxes", []) if isinstance(raw, Mapping) else raw
    box = boxes[index] if isinstance(boxes, list) and index < len(boxes) else {}
    ref = box.get("reference") if isinstance(box, Mapping) else None
    if ref:
        path = image_path.parent / str(ref)
        if not path.is_file():
            raise ValueError(f"box {index} of {image_path.with_suffix('.json')} names reference "
                             f"{ref!r}, but {path} does not exist; fix the path (relative to the "
                             "JSON's folder)")
        return path
    for suffix in REF_SUFFIXES:
        path = image_path.with_name(f"{image_path.stem}_ref{index}{suffix}")
        if path.is_file():
            return path
    return None


def layout_with_references(image_path: pathlib.Path) -> Layout:
    """An image's layout with each box's reference image attached where one is found."""
    layout, raw = load_layout(image_path)
    for i in range(len(layout.boxes)):
        path = reference_path(image_path, raw, i)
        if path is not None:
            layout = layout.with_reference(i, Reference(load_image(path)))
    return layout
