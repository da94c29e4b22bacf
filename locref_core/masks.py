"""Box masks on an attention token grid: one per box, their union (FM) and complement (BM)."""

from __future__ import annotations

import torch

from .layout import Layout


def box_masks(layout: Layout, h: int, w: int) -> torch.Tensor:
    """Binary masks (N, h, w): a cell is in a box when its centre is; every box gets >= 1 cell."""
    masks = torch.zeros(len(layout.boxes), h, w)
    for i, box in enumerate(layout.boxes):
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
