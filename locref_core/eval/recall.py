"""Object recall of FG-DM segmentation maps over a folder (FG-DM's prompt-compliance metric).

Each map is a palette RGB image (PNG: lossless, so colours survive) decoded with
`fgdm.maps.decode` and scored with `fgdm.recall.compute_recall`: recall = required objects that
cover at least `min_area` of the map / required objects. The required objects of a map are an
explicit list shared by all maps, or come from a prompts JSON file keyed by the map's file name
or stem, whose value is a prompt (objects matched in it) or a list of object names:

    {"img_0001.png": "a man walking a dog in a park", "img_0002": ["person", "umbrella"]}
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..fgdm.maps import decode
from ..fgdm.palettes import Palette, get_palette
from ..fgdm.recall import DEFAULT_MIN_AREA, RecallReport, compute_recall, required_classes

log = logging.getLogger(__name__)

MAP_SUFFIXES = (".png",)


def load_rgb(path: pathlib.Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; ValueError naming the file when unreadable."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}; is it a PNG/JPEG file?") from None


def map_recall(rgb: Any, palette: Palette | str, objects: str | Sequence[str] = "",
               prompt: str = "", min_area: float = DEFAULT_MIN_AREA) -> RecallReport:
    """Recall of one palette RGB map (H, W, 3) for an object list, or else a prompt."""
    pal = get_palette(palette)
    required = required_classes(pal, objects, prompt)
    return compute_recall(decode(rgb, pal), required, pal, min_area)


def load_prompts(path: pathlib.Path) -> dict[str, str | list[str]]:
    """A prompts JSON file: {file name or stem: prompt text or list of object names}."""
    try:
        data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"prompts file {path} does not exist; give the path of a JSON file "
                         'like {"img_0001.png": "a dog on grass"}') from None
    except json.JSONDecodeError as err:
        raise ValueError(f"prompts file {path} is not valid JSON ({err.msg} at line "
                         f"{err.lineno}); fix it, e.g. {{\"img_0001.png\": \"a dog\"}}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"prompts file {path} must hold an object {{file name: prompt}}, "
                         f"got {type(data).__name__}")
    for key, value in data.items():
        ok = isinstance(value, str) or (isinstance(value, list)
                                        and all(isinstance(v, str) for v in value))
        if not ok:
            raise ValueError(f"prompts file {path}: entry {key!r} must be a prompt string or a "
                             f"list of object names, got {value!r}")
    return dict(data)


def list_maps(folder: pathlib.Path) -> list[pathlib.Path]:
    """The map images of a folder, sorted by name; ValueError when there are none."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"maps folder {folder} does not exist; give the folder of map PNGs")
    maps = sorted(p for p in folder.iterdir() if p.suffix.lower() in MAP_SUFFIXES)
    if not maps:
        raise ValueError(f"maps folder {folder} holds no .png map; save the maps as PNG there")
    return maps


def folder_recall(folder: pathlib.Path, palette: Palette | str,
                  objects: str | Sequence[str] = "", prompts: Mapping[str, Any] | None = None,
                  min_area: float = DEFAULT_MIN_AREA) -> dict[str, Any]:
    """Recall of every map in a folder: {"recall" (mean), "num_maps", "maps": {name: {...}}}."""
    pal = get_palette(palette)
    has_list = bool(objects.strip()) if isinstance(objects, str) else bool(objects)
    if not has_list and prompts is None:
        raise ValueError("give the required objects (e.g. 'person, dog') or a prompts JSON file")
    per_map: dict[str, dict[str, Any]] = {}
    for path in list_maps(folder):
        wanted: Any = objects
        prompt = ""
        if not has_list:
            entry = prompts.get(path.name, prompts.get(path.stem))  # type: ignore[union-attr]
            if entry is None:
                raise ValueError(f"the prompts file has no entry for map {path.name}; add "
                                 f'"{path.name}": "<its prompt>" or remove the map')
            wanted, prompt = (entry, "") if isinstance(entry, list) else ("", entry)
        try:
            report = map_recall(load_rgb(path), pal, wanted, prompt, min_area)
        except ValueError as err:
            raise ValueError(f"map {path}: {err}") from None
        per_map[path.name] = {
            "recall": report.recall,
            "objects": {o.name: {"area": o.area, "present": o.present} for o in report.objects},
        }
        log.info("%s: recall %.3f", path.name, report.recall)
    return {
        "recall": float(np.mean([m["recall"] for m in per_map.values()])),
        "num_maps": len(per_map),
        "palette": pal.name,
        "min_area": min_area,
        "maps": per_map,
    }
