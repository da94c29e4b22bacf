"""FG-DM factor samples: an image, its condition (seg / depth / normal / sketch) and a caption.

Images and conditions are paired by file stem (images/000001.jpg <-> labels/000001.png), or by an
explicit `file_map` {image file name: condition file name} (a dict or a JSON file). Both are cut
to the centred square and resized to S x S. Seg conditions are COCO-stuff label PNGs (pixel value
v = COCO-stuff id - 1, 255 = void), the format of the COCO-stuff release and of FG-DM's loader:
ids are resized by nearest neighbour only (`fgdm.maps.resize_nearest`), converted to the target
palette when that is not COCO-stuff (`fgdm.maps.convert_map`), then painted with its colours
(`fgdm.maps.encode`), so the condition is exactly a palette map. Depth, normal and sketch
conditions are read as RGB (a grey depth map is repeated on three channels) and resized
bilinearly. Everything the constructor can check cheaply (folders, pairs, the captions file,
the first pair's files) raises `DataError` before training starts; a file that turns out
unreadable later raises it from `__getitem__`, naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..composite import resize_image
from ..fgdm.maps import convert_map, encode, resize_nearest
from ..fgdm.palettes import COCO_STUFF, get_palette
from .coco import DataError, read_json
from .locref_dataset import centre_square, item_seed, load_rgb

log = logging.getLogger(__name__)

KINDS = ("seg", "depth", "normal", "sketch")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LABEL_VOID = 255  # COCO-stuff label PNGs: 255 = unlabeled


def _list_images(folder: Path, what: str) -> dict[str, Path]:
    """Image files of a folder by stem; DataError if missing, empty or with duplicate stems."""
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist; check the path")
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTS or not path.is_file():
            continue
        if path.stem in by_stem:
            raise DataError(f"{what} folder {folder} has two files with stem {path.stem!r} "
                            f"({by_stem[path.stem].name}, {path.name}); keep one")
        by_stem[path.stem] = path
    if not by_stem:
        raise DataError(f"{what} folder {folder} holds no image files ({', '.join(IMAGE_EXTS)})")
    return by_stem


def _load_file_map(file_map: Mapping[str, str] | str | Path) -> dict[str, str]:
    if isinstance(file_map, (str, Path)):
        path = Path(file_map)
        file_map = read_json(path, "file map")
        if not isinstance(file_map, dict):
            raise DataError(f"file map {path} must be a JSON object "
                            '{"image.jpg": "condition.png", ...}')
    return {str(k): str(v) for k, v in file_map.items()}


def _caption_table(captions_json: str | Path) -> dict[str, list[str]]:
    """COCO captions by image file name and by stem."""
    path = Path(captions_json)
    data = read_json(path, "captions")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: a COCO captions file needs an 'annotations' list")
    names = {img["id"]: img["file_name"] for img in data.get("images", [])
             if isinstance(img, dict) and "id" in img and "file_name" in img}
    table: dict[str, list[str]] = {}
    for entry in data["annotations"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("caption"), str):
            raise DataError(f"{path}: caption entry {entry!r} needs 'image_id' and a string "
                            "'caption'")
        name = names.get(entry.get("image_id"))
        if name is None:
            continue
        for key in (name, Path(name).stem):
            table.setdefault(key, []).append(entry["caption"].strip())
    return table


class FactorDataset(torch.utils.data.Dataset):
    """(image, condition, caption) triples for training an FG-DM condition factor."""

    def __init__(self, images_dir: str | Path, conditions_dir: str | Path,
                 captions_json: str | Path | None = None, kind: str = "seg",
                 palette: str = "coco183", size: int = 512,
                 file_map: Mapping[str, str] | str | Path | None = None, seed: int = 0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not a condition kind; use one of {KINDS}")
        if not 8 <= size <= 8192:
            raise ValueError(f"size={size} must be in 8..8192 pixels (512 for SD-1.5)")
        self.images_dir, self.conditions_dir = Path(images_dir), Path(conditions_dir)
        self.kind, self.palette, self.size, self.seed = kind, get_palette(palette), size, seed
        self.epoch = 0
        self.pairs = self._pair(file_map)
        self.captions = _caption_table(captions_json) if captions_json else {}
        if captions_json:
            hits = sum(1 for im, _ in self.pairs if self._captions_of(im))
            if not hits:
                raise DataError(f"{captions_json}: no caption refers to any image in "
                                f"{self.images_dir}; is it the captions file of this split?")
            if hits < len(self.pairs):
                log.warning("%d of %d images have no caption in %s; they train with ''",
                            len(self.pairs) - hits, len(self.pairs), captions_json)
        _ = self[0]  # fail now, not at step 1, if the first pair is unreadable or malformed
        log.info("FactorDataset: %d %s pairs from %s and %s", len(self.pairs), kind,
                 self.images_dir, self.conditions_dir)

    def _pair(self, file_map) -> list[tuple[Path, Path]]:
        if file_map is not None:
            pairs = []
            for image_name, cond_name in sorted(_load_file_map(file_map).items()):
                image, cond = self.images_dir / image_name, self.conditions_dir / cond_name
                for path, what in ((image, "image"), (cond, "condition")):
                    if not path.is_file():
                        raise DataError(f"{what} file {path} (file map entry {image_name!r}) "
                                        "does not exist; fix the file map or add the file")
                pairs.append((image, cond))
            if not pairs:
                raise DataError("the file map is empty; list {image file: condition file}")
            return pairs
        images = _list_images(self.images_dir, "images")
        conditions = _list_images(self.conditions_dir, "conditions")
        missing = [stem for stem in images if stem not in conditions]
        if missing:
            first = images[missing[0]]
            raise DataError(f"image {first} has no condition file with stem {missing[0]!r} in "
                            f"{self.conditions_dir} ({len(missing)} of {len(images)} images "
                            "unpaired); add the condition, remove the image, or pass a file_map")
        extra = len(conditions) - len(images)
        if extra > 0:
            log.info("%d condition files in %s have no image; ignored", extra, self.conditions_dir)
        return [(images[stem], conditions[stem]) for stem in images]

    def set_epoch(self, epoch: int) -> None:
        """Vary the caption choice per epoch (images with several captions)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def _captions_of(self, image: Path) -> list[str]:
        return self.captions.get(image.name) or self.captions.get(image.stem) or []

    def _seg_condition(self, path: Path, image_hw: tuple[int, int]) -> np.ndarray:
        """Label PNG -> palette RGB (S, S, 3) uint8, through nearest-resized COCO-stuff ids."""
        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise DataError(f"label file {path} is mode {im.mode}; a COCO-stuff label "
                                    "PNG is single-channel with pixel = id - 1 (255 = void). "
                                    "For colour maps use a palette-decoded label instead")
                values = np.asarray(im, dtype=np.int64)  # (H, W)
        except OSError as exc:
            raise DataError(f"label file {path} cannot be read ({exc}); replace it") from exc
        bad = values[(values != LABEL_VOID) & ((values < 0) | (values >= COCO_STUFF.num_ids - 1))]
        if bad.size:
            raise DataError(f"label file {path} has pixel value {int(bad[0])}; COCO-stuff labels "
                            f"are 0..{COCO_STUFF.num_ids - 2} (id - 1) or {LABEL_VOID} (void)")
        ids = np.where(values == LABEL_VOID, COCO_STUFF.void_id, values + 1)  # (H, W) COCO-stuff
        ids = resize_nearest(self._crop(ids, path, image_hw), self.size, self.size)  # (S, S)
        if self.palette.name != COCO_STUFF.name:
            ids = convert_map(ids, COCO_STUFF, self.palette)
        return encode(ids, self.palette)  # (S, S, 3) uint8

    def _crop(self, array, path: Path, image_hw: tuple[int, int]):
        """Centre square of a condition; DataError if its aspect differs from the image's."""
        h, w = array.shape[-2:]
        ih, iw = image_hw
        if abs(h * iw - w * ih) > max(h, w, ih, iw):  # aspect mismatch beyond a pixel
            raise DataError(f"condition {path} is {w}x{h} but its image is {iw}x{ih}; the two "
                            "must show the same view (same aspect ratio)")
        ox, oy, side = centre_square(h, w)
        return array[..., oy:oy + side, ox:ox + side]

    def __getitem__(self, index: int) -> dict:
        image_path, cond_path = self.pairs[index]
        pixels = load_rgb(image_path)  # (3, H, W) in [0, 1]
        hw = tuple(pixels.shape[-2:])
        ox, oy, side = centre_square(*hw)
        image = resize_image(pixels[:, oy:oy + side, ox:ox + side], self.size, self.size)
        if self.kind == "seg":
            rgb = self._seg_condition(cond_path, hw)
            condition = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
        else:
            cond = load_rgb(cond_path, entry=f" (condition of {image_path.name})")
            cond = self._crop(cond, cond_path, hw)  # (3, h, h)
            condition = resize_image(cond, self.size, self.size)
        captions = self._captions_of(image_path)
        caption = captions[0] if captions else ""
        if len(captions) > 1:
            rng = np.random.default_rng(item_seed(self.seed, index, self.epoch, 1))
            caption = captions[int(rng.integers(len(captions)))]
        return {
            "image": image * 2.0 - 1.0,  # (3, S, S) in [-1, 1]
            "condition": condition * 2.0 - 1.0,  # (3, S, S) in [-1, 1]
            "caption": caption,
        }


def collate_factor(items: list[dict]) -> dict:
    """Batch factor items: images and conditions stacked, captions a list."""
    if not items:
        raise ValueError("collate_factor needs at least one item")
    return {
        "image": torch.stack([it["image"] for it in items]),  # (B, 3, S, S)
        "condition": torch.stack([it["condition"] for it in items]),  # (B, 3, S, S)
        "caption": [it["caption"] for it in items],
    }
