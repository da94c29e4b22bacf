"""A picture of a layout: the composite image with each box outlined and labelled."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .composite import composite_image
from .layout import Layout
from .masks import region_cells

# Distinct, saturated outline colours (RGB 0..255), cycled by box index.
BOX_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
    (128, 128, 0),
)  # fmt: skip


def box_colour(index: int) -> tuple[int, int, int]:
    return BOX_COLOURS[index % len(BOX_COLOURS)]


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float [0, 1] to an RGB PIL image."""
    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array, "RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to (3, H, W) float [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def render_preview(layout: Layout, background: torch.Tensor | None = None,
                   line_width: int = 0, show_labels: bool = True) -> torch.Tensor:
    """Preview (3, H, W) at canvas size: the composite (or `background`) with boxes on top.

    Box i's outline is drawn in `box_colour(i)` just inside its pixel edges, back to front (a box
    with a region mask also gets the region tinted in that colour); the label sits in a filled
    tag at the box's top-left corner, with its index.
    """
    W, H = layout.width, layout.height
    base = composite_image(layout) if background is None else background
    image = tensor_to_pil(tint_regions(layout, base))
    draw = ImageDraw.Draw(image)
    lw = line_width or max(2, round(min(W, H) / 256))
    font = _font(max(10, round(min(W, H) / 40)))
    for i, box in enumerate(layout.boxes):
        x0, y0, x1, y1 = box.to_pixels(W, H)
        colour = box_colour(i)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=min(lw, x1 - x0, y1 - y0))
        if show_labels:
            text = f"{i}: {box.label}" if box.label else str(i)
            tx0, ty0, tx1, ty1 = draw.textbbox((x0 + lw + 2, y0 + lw + 1), text, font=font)
            draw.rectangle((x0, y0, min(tx1 + 2, x1 - 1), min(ty1 + 2, y1 - 1)), fill=colour)
            draw.text((x0 + lw + 2, y0 + lw + 1), text, fill=_ink(colour), font=font)
    return pil_to_tensor(image)


def tint_regions(layout: Layout, image: torch.Tensor, alpha: float = 0.35) -> torch.Tensor:
    """The image (3, H, W) with each box's region mask (if it has one) tinted in its colour."""
    out = image
    for i, box in enumerate(layout.boxes):
        if box.region is None:
            continue
        inside = region_cells(box.region, *image.shape[-2:])[None]  # (1, H, W)
        colour = torch.tensor(box_colour(i), dtype=image.dtype)[:, None, None] / 255.0
        out = out * (1 - alpha * inside) + colour * (alpha * inside)
    return out


def _ink(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on `colour`."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
