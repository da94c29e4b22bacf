"""The one place where ComfyUI's IMAGE/MASK layouts meet the core's (C, H, W) tensors."""

from __future__ import annotations

import torch


def image_to_chw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) to (B, 3, H, W) float; alpha dropped, grey expanded."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE of shape (B, H, W, C), got {tuple(image.shape)}")
    chw = image.permute(0, 3, 1, 2).float()
    if chw.shape[1] == 1:
        chw = chw.expand(-1, 3, -1, -1)
    return chw[:, :3].contiguous()


def chw_to_image(chw: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) or (3, H, W) to a ComfyUI IMAGE (B, H, W, 3)."""
    if chw.ndim == 3:
        chw = chw[None]
    return chw.permute(0, 2, 3, 1).contiguous().float()


def mask_to_hw(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI MASK (B, H, W) or (H, W) to the first mask (H, W) float."""
    if mask.ndim == 3:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"expected a MASK of shape (B, H, W), got {tuple(mask.shape)}")
    return mask.float()
