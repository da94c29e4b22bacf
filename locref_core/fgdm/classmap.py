"""The class-map record FGDM nodes pass to each other: ids and the palette they are in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .maps import as_class_map, encode
from .palettes import Palette


@dataclass(frozen=True)
class ClassMap:
    """A segmentation map as class ids (H, W) int64 in a named palette: what FGDM nodes pass on."""

    ids: np.ndarray
    palette: Palette

    def __post_init__(self) -> None:
        ids = as_class_map(self.ids, self.palette).copy()
        ids.flags.writeable = False
        object.__setattr__(self, "ids", ids)

    @property
    def height(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def rgb(self) -> np.ndarray:
        """The map painted in its palette."""
        return encode(self.ids, self.palette)  # (H, W, 3) uint8
