"""LocRef training samples (LocRef-Diffusion, arXiv 2411.15252): image, caption, up to K boxes
with reference crops, the composite image (Layout-net input) and the instance-foreground mask of
the weighted loss.

Geometry: the image's shorter side is resized to S and the centre S x S kept (crop first, then
resize, so nothing is resampled twice). Boxes follow the crop; a box cut by the crop is clipped
and one with less than a pixel left is dropped. Of the instances left (crowd regions excluded,
and those whose clipped box covers less than `min_box_frac` of the crop), the K largest by
clipped box area are kept, ties by annotation id; slot 0 is the largest and is at the back of
the composite.

References come from the ORIGINAL image (so an object cut by the centre crop is still whole in
its reference): the box region, background greyed with the instance mask when there is one,
padded to a grey square (`composite.square_reference`) and resized to R x R. With augment=True
each reference is flipped (p = 0.5), its crop box scaled by a factor in [0.9, 1.1] about its
centre, and its brightness, contrast and saturation each scaled by a factor in [0.9, 1.1]; the
random numbers come from a torch.Generator seeded by (seed, index, epoch), so an item is the same
every time it is read in an epoch (`set_epoch`, as with DistributedSampler; epoch 0 by default).
The composite is the pack's own `composite.composite_image` of a `Layout` whose boxes carry those
(augmented) crops and masks, stretched into their boxes on the 0.5 grey canvas.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..composite import NEUTRAL, composite_image, resize_image, square_reference
from ..fgdm.maps import resize_nearest
from ..layout import MAX_BOXES, MIN_CANVAS, Box, Layout, Reference
from .coco import CocoAnnotation, CocoImage, CocoSet, DataError, instance_mask

log = logging.getLogger(__name__)

JITTER = 0.1  # scale, brightness, contrast and saturation factors are drawn from 1 +- JITTER
_LUMA = torch.tensor([0.299, 0.587, 0.114])[:, None, None]  # (3, 1, 1) ITU-R 601 grey


def item_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (stable across processes and Python runs)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def load_rgb(path, expected_wh: tuple[int, int] | None = None, entry: str = "") -> torch.Tensor:
    """An image file as (3, H, W) float in [0, 1]; DataError if unreadable or the wrong size."""
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except (OSError, ValueError) as exc:
        raise DataError(f"image file {path}{entry} cannot be read ({exc}); replace it or "
                        "remove its entry") from exc
    h, w = pixels.shape[:2]
    if expected_wh is not None and (w, h) != expected_wh:
        raise DataError(f"image file {path}{entry} is {w}x{h} but the annotations say "
                        f"{expected_wh[0]}x{expected_wh[1]}; the boxes would be wrong. Fix the "
                        "file or its width/height")
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)


def centre_square(h: int, w: int) -> tuple[int, int, int]:
    """The centred square crop (x offset, y offset, side) of an h x w image."""
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side


def crop_edges(bbox: tuple[float, float, float, float], scale: float, width: int,
               height: int) -> tuple[int, int, int, int]:
    """Pixel edges (x0, y0, x1, y1) of a reference's crop: the COCO box (x, y, w, h) scaled by
    `scale` about its centre, rounded outwards, clipped to the image, at least one pixel."""
    x, y, w, h = bbox
    cx, cy, w, h = x + w / 2, y + h / 2, w * scale, h * scale
    x0 = min(max(math.floor(cx - w / 2), 0), width - 1)
    y0 = min(max(math.floor(cy - h / 2), 0), height - 1)
    x1 = min(max(math.ceil(cx + w / 2), x0 + 1), width)
    y1 = min(max(math.ceil(cy + h / 2), y0 + 1), height)
    return x0, y0, x1, y1


def colour_jitter(image: torch.Tensor, brightness: float, contrast: float,
                  saturation: float) -> torch.Tensor:
    """Scale brightness, then contrast about the mean grey, then saturation about each grey."""
    out = image * brightness
    mean = (out * _LUMA).sum(0).mean()
    out = (out - mean) * contrast + mean
    grey = (out * _LUMA).sum(0, keepdim=True)  # (1, h, w)
    return (grey + (out - grey) * saturation).clamp(0.0, 1.0)  # (3, h, w)


@dataclass(frozen=True)
class _Pick:
    ann: CocoAnnotation
    box: tuple[float, float, float, float]  # normalised x0, y0, x1, y1 in the centre crop


class LocRefDataset(torch.utils.data.Dataset):
    """COCO images as LocRef samples (see the module docstring); len = images with an instance."""

    def __init__(self, coco: CocoSet, size: int = 512, max_instances: int = 4,
                 ref_size: int = 224, augment: bool = True, seed: int = 0,
                 min_box_frac: float = 0.0) -> None:
        if not MIN_CANVAS <= size <= 8192:
            raise ValueError(f"size={size}: the composite canvas must be {MIN_CANVAS}..8192 px")
        if not 1 <= max_instances <= MAX_BOXES:
            raise ValueError(f"max_instances={max_instances} must be in 1..{MAX_BOXES}")
        if ref_size < 1:
            raise ValueError(f"ref_size={ref_size} must be a positive size (224 for CLIP)")
        if not 0.0 <= min_box_frac < 1.0:
            raise ValueError(f"min_box_frac={min_box_frac} must be in [0, 1)")
        self.coco, self.size, self.max_instances = coco, size, max_instances
        self.ref_size, self.augment, self.seed = ref_size, augment, seed
        self.min_box_frac = min_box_frac
        self.epoch = 0
        self.images: tuple[CocoImage, ...] = tuple(
            img for img in coco.images if any(not a.iscrowd for a in img.annotations))
        if not self.images:
            raise DataError(f"no image in {coco.images_dir} has an instance annotation "
                            "(crowd regions excluded); LocRef needs boxes to train on")
        skipped = len(coco.images) - len(self.images)
        if skipped:
            log.info("LocRefDataset: %d of %d images have no instance and are skipped",
                     skipped, len(coco.images))

    def set_epoch(self, epoch: int) -> None:
        """Vary captions and augmentation per epoch (call it once per epoch, on every rank)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def _picks(self, img: CocoImage, ox: int, oy: int, side: int) -> list[_Pick]:
        picks = []
        for ann in img.annotations:
            if ann.iscrowd:
                continue
            x, y, w, h = ann.bbox
            x0, x1 = (min(max((v - ox) / side, 0.0), 1.0) for v in (x, x + w))
            y0, y1 = (min(max((v - oy) / side, 0.0), 1.0) for v in (y, y + h))
            visible = (x1 - x0) * self.size >= 1 and (y1 - y0) * self.size >= 1
            if visible and (x1 - x0) * (y1 - y0) >= self.min_box_frac:
                picks.append(_Pick(ann, (x0, y0, x1, y1)))
        picks.sort(key=lambda p: (-(p.box[2] - p.box[0]) * (p.box[3] - p.box[1]), p.ann.id))
        return picks[: self.max_instances]

    def _reference(self, pixels: torch.Tensor, mask: np.ndarray | None,
                   bbox: tuple[float, float, float, float], gen: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An instance's (augmented) crop (3, h, w) from the original image and its mask crop."""
        u = torch.rand(5, generator=gen).tolist() if gen is not None else [1.0, 0.5, 0.5, 0.5, 0.5]
        _, H, W = pixels.shape
        x0, y0, x1, y1 = crop_edges(bbox, 1.0 + JITTER * (2 * u[1] - 1), W, H)
        crop = pixels[:, y0:y1, x0:x1]  # (3, h, w)
        crop_mask = None if mask is None else torch.from_numpy(mask[y0:y1, x0:x1]).float()
        if u[0] < 0.5:
            crop = crop.flip(-1)
            crop_mask = None if crop_mask is None else crop_mask.flip(-1)
        if gen is not None:
            b, c, s = (1.0 + JITTER * (2 * v - 1) for v in u[2:])
            crop = colour_jitter(crop, b, c, s)
        return crop, crop_mask

    def __getitem__(self, index: int) -> dict:
        img = self.images[index]
        path = self.coco.image_path(img)
        pixels = load_rgb(path, (img.width, img.height), f" (image id {img.id})")  # (3, H, W)
        _, H, W = pixels.shape
        S, K, R = self.size, self.max_instances, self.ref_size
        ox, oy, side = centre_square(H, W)
        picks = self._picks(img, ox, oy, side)
        gen = torch.Generator().manual_seed(item_seed(self.seed, index, self.epoch)) \
            if self.augment else None

        boxes = torch.zeros(K, 4)  # (K, 4) x0, y0, x1, y1
        valid = torch.zeros(K, dtype=torch.bool)  # (K,)
        references = torch.full((K, 3, R, R), NEUTRAL)  # (K, 3, R, R); blank slots are grey
        fg = np.zeros((S, S), dtype=bool)  # (S, S)
        layout_boxes, labels = [], []
        for k, pick in enumerate(picks):
            mask = instance_mask(pick.ann, H, W)  # (H, W) bool or None
            if mask is not None and not mask.any():
                log.debug("annotation id %d has an empty mask; using its box", pick.ann.id)
                mask = None
            crop, crop_mask = self._reference(pixels, mask, pick.ann.bbox, gen)
            references[k] = resize_image(square_reference(crop, crop_mask), R, R)
            label = self.coco.categories[pick.ann.category_id]
            box = Box(*pick.box, label=label, reference=Reference(crop, crop_mask))
            if mask is None:
                bx0, by0, bx1, by1 = box.to_pixels(S, S)
                fg[by0:by1, bx0:bx1] = True
            else:
                square = mask[oy:oy + side, ox:ox + side].astype(np.uint8)
                fg |= resize_nearest(square, S, S) > 0
            boxes[k] = torch.tensor(pick.box)
            valid[k] = True
            layout_boxes.append(box)
            labels.append(label)

        layout = Layout(S, S, tuple(layout_boxes))
        image = resize_image(pixels[:, oy:oy + side, ox:ox + side], S, S)  # (3, S, S)
        return {
            "image": image * 2.0 - 1.0,  # (3, S, S) in [-1, 1]
            "caption": self._caption(img, index),
            "boxes": boxes,
            "valid": valid,
            "labels": labels,
            "references": references,
            "composite": composite_image(layout, fit="stretch"),  # (3, S, S) in [0, 1]
            "fg_mask": torch.from_numpy(fg).float(),  # (S, S) in {0, 1}
            "image_id": img.id,
        }

    def _caption(self, img: CocoImage, index: int) -> str:
        if len(img.captions) <= 1:
            return img.captions[0] if img.captions else ""
        pick = np.random.default_rng(item_seed(self.seed, index, self.epoch, 1))
        return img.captions[int(pick.integers(len(img.captions)))]


def collate_locref(items: list[dict]) -> dict:
    """Batch LocRef items: tensors stacked; captions, labels and ids as lists."""
    if not items:
        raise ValueError("collate_locref needs at least one item")
    return {key: torch.stack([it[key] for it in items]) if isinstance(items[0][key], torch.Tensor)
            else [it[key] for it in items] for key in items[0]}
