"""Images a node shows on itself after a run (saved in the host's temp folder, served by /view)."""

from __future__ import annotations

import os
import uuid

import folder_paths
import numpy as np
import torch
from PIL import Image


def temp_images(images: torch.Tensor, prefix: str) -> list[dict[str, str]]:
    """Save IMAGE rows (B, H, W, 3) as PNGs in temp/locref; the records for `{"ui": {"images"}}`."""
    folder = os.path.join(folder_paths.get_temp_directory(), "locref")
    os.makedirs(folder, exist_ok=True)
    records = []
    for row in images:
        array = (row[..., :3].clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
        name = f"{prefix}_{uuid.uuid4().hex[:12]}.png"
        Image.fromarray(array, "RGB").save(os.path.join(folder, name), compress_level=1)
        records.append({"filename": name, "subfolder": "locref", "type": "temp"})
    return records
