"""LocRef core: host-independent layout, masks, composite and attention math.

Nothing in this package imports ComfyUI; the nodes in `nodes/` wrap it.
"""

from .composite import composite_image
from .grid import SD15_SITES, token_grid
from .layout import MAX_BOXES, Box, Layout, Reference, find_box
from .layout_json import bounding_boxes_to_boxes, layout_to_json, parse_layout_json
from .masks import box_masks, layout_masks
from .preview import render_preview

__version__ = "0.1.0"

__all__ = [
    "MAX_BOXES", "SD15_SITES", "Box", "Layout", "Reference", "bounding_boxes_to_boxes",
    "box_masks", "composite_image", "find_box", "layout_masks", "layout_to_json",
    "parse_layout_json", "render_preview", "token_grid",
]  # fmt: skip
