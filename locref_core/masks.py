"""Box masks on an attention token grid: one per box, their union (FM) and complement (BM).

A box is a rectangle unless it carries a `region` mask; then its cells are the region's, on
the same grid. `token_grid` (grid.py) says which grid a layer has; this module only fills it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .layout import Box, Layout

MAX_REGION_SIDE = 1024  # a region is stored at canvas aspect, at most this many cells a side


def region_cells(region: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A region mask (H, W) on an h x w grid (h, w): a cell is in when at least half of its area
    is (area resampling); a region too thin for that keeps its best-covered cell."""
    cover = F.interpolate(region[None, None].float(), size=(h, w), mode="area")[0, 0]  # (h, w)
    cells = (cover >= 0.5).float()
    if not cells.any():
        cells.view(-1)[cover.flatten().argmax()] = 1.0
    return cells


def box_masks(layout: Layout, h: int, w: int) -> torch.Tensor:
    """Binary masks (N, h, w): a cell is in a box when its centre is (or in its region, for a
    box with a region mask); every box gets >= 1 cell."""
    masks = torch.zeros(len(layout.boxes), h, w)
    for i, box in enumerate(layout.boxes):
        if box.region is not None:
            masks[i] = region_cells(box.region, h, w)
            continue
        x0, y0, x1, y1 = box.to_pixels(w, h)
        masks[i, y0:y1, x0:x1] = 1.0
    return masks  # (N, h, w)


def foreground_mask(masks: torch.Tensor) -> torch.Tensor:
    """FM, the union of the box masks (h, w); all zeros for an empty layout."""
    if masks.shape[0] == 0:
        return torch.zeros(masks.shape[1:])
    return masks.amax(dim=0)


def layout_masks(layout: Layout, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-box masks (N, h, w), foreground FM (h, w), background BM = 1 - FM (h, w))."""
    masks = box_masks(layout, h, w)
    fm = foreground_mask(masks)
    return masks, fm, 1.0 - fm


def fit_region(mask: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, bool]:
    """A user mask (H, W) at the canvas's aspect, at most MAX_REGION_SIDE a side, in [0, 1];
    and whether its own aspect differed from the canvas's (it was stretched)."""
    mask = mask.float().clamp(0.0, 1.0)
    scale = min(1.0, MAX_REGION_SIDE / max(width, height))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    mh, mw = mask.shape
    stretched = abs(mw / mh - width / height) > 0.01 * (width / height)
    if tuple(mask.shape) != size:
        mask = F.interpolate(mask[None, None], size=size, mode="bilinear",
                             align_corners=False, antialias=True)[0, 0].clamp(0.0, 1.0)
    return mask, stretched


def region_bounds(region: torch.Tensor, threshold: float = 0.5
                  ) -> tuple[float, float, float, float] | None:
    """Normalised bounding box (x0, y0, x1, y1) of the cells >= threshold; None when empty."""
    ys, xs = (region >= threshold).nonzero(as_tuple=True)
    if ys.numel() == 0:
        return None
    h, w = region.shape
    return (int(xs.min()) / w, int(ys.min()) / h, (int(xs.max()) + 1) / w, (int(ys.max()) + 1) / h)


def with_region(layout: Layout, index: int, mask: torch.Tensor) -> tuple[Layout, bool]:
    """A new layout where box `index` takes the shape of `mask` (H, W, any size: resized to the
    canvas) and its box becomes the mask's bounding box; and whether the mask was stretched.
    An empty mask is refused with the box named."""
    box = layout.boxes[index]
    region, stretched = fit_region(mask, layout.width, layout.height)
    bounds = region_bounds(region)
    if bounds is None:
        name = f"box {index} ({box.label!r})" if box.label else f"box {index}"
        raise ValueError(f"the region mask for {name} is empty (no pixel >= 0.5); draw the "
                         "region in the mask, invert it if it is the background, or remove the "
                         "mask to use the box")
    boxes = list(layout.boxes)
    boxes[index] = dataclasses.replace(box, x0=bounds[0], y0=bounds[1], x1=bounds[2],
                                       y1=bounds[3], region=region)
    return dataclasses.replace(layout, boxes=tuple(boxes)), stretched


def add_region_box(layout: Layout, mask: torch.Tensor, label: str) -> tuple[Layout, bool]:
    """A new layout with one more box, in front, shaped by `mask` and labelled `label`."""
    placeholder = Box(0.0, 0.0, 1.0, 1.0, label)
    grown = dataclasses.replace(layout, boxes=layout.boxes + (placeholder,))
    return with_region(grown, len(grown.boxes) - 1, mask)
