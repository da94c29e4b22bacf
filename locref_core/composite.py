"""The Layout-net's composite image (CI): every reference pasted into its box on a blank canvas."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .layout import Box, Layout

Fit = Literal["contain", "stretch"]
NEUTRAL = 0.5  # mid grey: the blank canvas the references are pasted on


def resize_image(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a (C, H, W) image to (C, h, w)."""
    if tuple(image.shape[-2:]) == (h, w):
        return image
    out = F.interpolate(image[None].float(), size=(h, w), mode="bilinear",
                        align_corners=False, antialias=True)
    return out[0].clamp(0.0, 1.0)


def shrink_to(image: torch.Tensor, max_side: int) -> torch.Tensor:
    """Downscale a (C, H, W) image so its longer side is at most `max_side` (aspect kept)."""
    h, w = image.shape[-2:]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    return resize_image(image, max(1, round(h * scale)), max(1, round(w * scale)))


def placement(box: Box, ref_hw: tuple[int, int], width: int, height: int,
              fit: Fit) -> tuple[int, int, int, int]:
    """Where a reference of size ref_hw lands in `box`: pixel (x, y, w, h) on the canvas."""
    bx0, by0, bx1, by1 = box.to_pixels(width, height)
    bw, bh = bx1 - bx0, by1 - by0
    if fit == "stretch":
        return bx0, by0, bw, bh
    if fit != "contain":
        raise ValueError(f"fit must be 'contain' or 'stretch', got {fit!r}")
    rh, rw = ref_hw
    scale = min(bw / rw, bh / rh)
    w = min(bw, max(1, round(rw * scale)))
    h = min(bh, max(1, round(rh * scale)))
    return bx0 + (bw - w) // 2, by0 + (bh - h) // 2, w, h


def composite_image(layout: Layout, width: int | None = None, height: int | None = None,
                    fit: Fit = "contain", background: float = NEUTRAL) -> torch.Tensor:
    """LocRef composite image (3, H, W): references resized into their boxes, back to front.

    A reference's optional mask keeps only its foreground; boxes without a reference stay blank.
    """
    width = width or layout.width
    height = height or layout.height
    canvas = torch.full((3, height, width), float(background))
    for box in layout.boxes:  # index 0 first: later boxes paint over earlier ones
        ref = box.reference
        if ref is None:
            continue
        x, y, w, h = placement(box, tuple(ref.image.shape[-2:]), width, height, fit)
        patch = resize_image(ref.image, h, w)
        region = canvas[:, y:y + h, x:x + w]
        if ref.mask is None:
            region.copy_(patch)
        else:
            alpha = resize_image(ref.mask[None], h, w)  # (1, h, w)
            region.copy_(region * (1 - alpha) + patch * alpha)
    return canvas  # (3, H, W)


def square_reference(image: torch.Tensor, mask: torch.Tensor | None = None,
                     background: float = NEUTRAL) -> torch.Tensor:
    """A reference ready for the CLIP image encoder: background greyed by the mask (if any) and
    padded, centred, to a square so no part of the object is cropped. (3, H, W) -> (3, S, S)."""
    if mask is not None:
        alpha = resize_image(mask[None], image.shape[-2], image.shape[-1])  # (1, H, W)
        image = image * alpha + background * (1 - alpha)
    _, h, w = image.shape
    side = max(h, w)
    out = torch.full((3, side, side), float(background), dtype=image.dtype)
    y, x = (side - h) // 2, (side - w) // 2
    out[:, y:y + h, x:x + w] = image
    return out
