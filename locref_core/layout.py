"""Layout records: boxes on a canvas, each with a label and an optional reference image.

A layout is a value. Nodes never mutate one; they build a new one with `dataclasses.replace`
or the helpers below. Coordinates are normalised to [0, 1] with (0, 0) the top-left corner,
so a layout survives a change of canvas size. Later boxes are in front of earlier ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

MAX_BOXES = 32  # more instances than SD-1.5 can place legibly at 512 px; keeps masks cheap
MIN_CANVAS, MAX_CANVAS = 64, 8192  # pixels, matching ComfyUI's latent size limits


@dataclass(frozen=True)
class Reference:
    """A reference image for one box: RGB in [0, 1], and an optional foreground mask."""

    image: torch.Tensor  # (3, H, W) float in [0, 1]
    mask: torch.Tensor | None = None  # (H, W) float in [0, 1]; 1 = keep (foreground)

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"reference image must be a (3, H, W) tensor, got {shape}")
        if img.shape[1] < 1 or img.shape[2] < 1:
            raise ValueError(f"reference image is empty: shape {tuple(img.shape)}")
        if self.mask is not None:
            if not isinstance(self.mask, torch.Tensor) or self.mask.ndim != 2:
                raise ValueError("reference mask must be an (H, W) tensor")


@dataclass(frozen=True)
class Box:
    """One instance: a normalised box, its label/prompt text, an optional reference and an
    optional region mask (the instance's shape; the box is then the mask's bounding box)."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str = ""
    reference: Reference | None = None
    region: torch.Tensor | None = None  # (H, W) float in [0, 1] over the whole canvas

    def __post_init__(self) -> None:
        # Internal invariant: parsers validate user input with friendly errors before this.
        if self.region is not None and (not isinstance(self.region, torch.Tensor)
                                        or self.region.ndim != 2):
            raise ValueError("a box region must be an (H, W) mask tensor over the canvas")
        for name in ("x0", "y0", "x1", "y1"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"box {name}={value!r} must be a finite number in [0, 1]")
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(
                f"box ({self.x0}, {self.y0}, {self.x1}, {self.y1}) has zero or negative area"
            )

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Cell edges (x0, y0, x1, y1) on a `width` x `height` grid, x1/y1 exclusive."""
        px0, px1 = pixel_span(self.x0, self.x1, width)
        py0, py1 = pixel_span(self.y0, self.y1, height)
        return px0, py0, px1, py1


def pixel_span(a: float, b: float, size: int) -> tuple[int, int]:
    """Cells [i0, i1) of a grid of `size` whose centres fall in [a, b); never empty."""
    i0 = int(math.floor(a * size + 0.5))
    i1 = int(math.floor(b * size + 0.5))
    i0 = min(max(i0, 0), size - 1)
    i1 = min(max(i1, i0 + 1), size)
    return i0, i1


@dataclass(frozen=True)
class Layout:
    """A canvas (pixels) and its ordered boxes; index 0 is at the back."""

    width: int
    height: int
    boxes: tuple[Box, ...] = ()

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"canvas {name} must be an integer, got {value!r}")
            if not MIN_CANVAS <= value <= MAX_CANVAS:
                raise ValueError(
                    f"canvas {name}={value} is out of range; use {MIN_CANVAS}..{MAX_CANVAS} pixels"
                )
        if not isinstance(self.boxes, tuple):
            object.__setattr__(self, "boxes", tuple(self.boxes))
        if len(self.boxes) > MAX_BOXES:
            raise ValueError(
                f"the layout has {len(self.boxes)} boxes; at most {MAX_BOXES} are supported. "
                "Merge or remove boxes."
            )

    @property
    def labels(self) -> list[str]:
        return [b.label for b in self.boxes]

    def with_reference(self, index: int, reference: Reference) -> Layout:
        """A new layout where box `index` carries `reference`."""
        if not 0 <= index < len(self.boxes):
            raise IndexError(index)
        boxes = list(self.boxes)
        boxes[index] = dataclasses.replace(boxes[index], reference=reference)
        return dataclasses.replace(self, boxes=tuple(boxes))

    def with_canvas(self, width: int, height: int) -> Layout:
        """The same normalised boxes on a canvas of another size."""
        return dataclasses.replace(self, width=width, height=height)


def find_box(layout: Layout, index: int, label: str = "") -> int:
    """Resolve a box by label (case-insensitive, wins when given) or else by 0-based index."""
    label = label.strip()
    if label:
        hits = [i for i, b in enumerate(layout.boxes) if b.label.strip().lower() == label.lower()]
        if not hits:
            known = ", ".join(repr(b.label) for b in layout.boxes) or "none"
            raise ValueError(
                f"no box is labelled {label!r}; the layout's labels are: {known}. "
                "Fix the label, or clear it and choose the box by index."
            )
        if len(hits) > 1:
            raise ValueError(
                f"{len(hits)} boxes are labelled {label!r} (indices {hits}); "
                "give them distinct labels or choose the box by index."
            )
        return hits[0]
    if not layout.boxes:
        raise ValueError("the layout has no boxes; draw or add a box before attaching a reference")
    if not 0 <= index < len(layout.boxes):
        raise ValueError(
            f"box index {index} is out of range: the layout has {len(layout.boxes)} boxes "
            f"(indices 0..{len(layout.boxes) - 1})"
        )
    return index
