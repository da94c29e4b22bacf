"""FG-DM map editing nodes: edit a class map before the image is made; map objects -> layout."""

from __future__ import annotations

import logging

import torch

from ..locref_core.fgdm.classmap import ClassMap
from ..locref_core.fgdm.edit import apply_operations, parse_operations
from ..locref_core.fgdm.recall import DEFAULT_MIN_AREA, parse_object_list
from ..locref_core.fgdm.to_layout import map_to_layout
from ..locref_core.layout import Layout
from ..locref_core.preview import render_preview
from .convert import chw_to_image
from .fgdm_map_nodes import CLASS_MAP, map_outputs
from .layout_nodes import LAYOUT
from .ui import temp_images
from .validate import in_some_palette
from .warn import shows_warnings, warn

log = logging.getLogger(__name__)

DEFAULT_OPERATIONS = '{"version": 1, "operations": []}'
OPERATIONS_TIP = (
    'A JSON list of edits, applied in order: {"version": 1, "operations": [{"op": "move", '
    '"object": "dog", "dx": 0.2, "dy": 0}, {"op": "move_to_box", "object": "person", '
    '"instance": 1, "box": 0}, {"op": "flip", "object": "car"}, {"op": "delete", "object": '
    '"umbrella", "fill": "background"}, {"op": "paste", "object": "cat", "source": 0, "box": '
    '[0.6, 0.5, 0.95, 0.95]}, {"op": "recolor", "object": "dog", "to": "cat"}]}. "box" is '
    "[x0, y0, x1, y1] in 0..1 or the index of a box of target_boxes; \"instance\" counts "
    "objects of that class from the largest (1)."
)


def side_by_side(before: torch.Tensor, after: torch.Tensor, gap: int = 8) -> torch.Tensor:
    """Two IMAGEs (1, H, W, 3) next to each other with a grey gap: the before/after preview."""
    h, w = before.shape[1:3]
    sheet = torch.full((1, h, 2 * w + gap, 3), 0.5)
    sheet[:, :, :w], sheet[:, :, w + gap :] = before, after
    return sheet


class FGDMMaskEdit:
    DESCRIPTION = (
        "Edit a segmentation class map before the image is made: move, resize into a box, flip, "
        "delete, paste from another map, or recolour objects. Target boxes can be drawn on a "
        "LocRef Boxes node wired to target_boxes (after a run its canvas shows this map)."
    )
    CATEGORY = "LocRef/fgdm"
    RETURN_TYPES = (CLASS_MAP, "IMAGE", "IMAGE")
    RETURN_NAMES = ("class_map", "map", "preview")
    OUTPUT_TOOLTIPS = ("The edited class map.", "The edited map painted in its palette (feeds a "
                       "seg ControlNet).", "Before (left) and after (right).")
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "class_map": (CLASS_MAP, {"tooltip": "From SBPC Select, Decode Map, Palette "
                                          "Convert or another Mask Edit."}),
                "operations": ("STRING", {"default": DEFAULT_OPERATIONS, "multiline": True,
                                          "tooltip": OPERATIONS_TIP}),
                "if_missing": (["skip", "error"], {"tooltip": "An operation whose object is not "
                               "in the map: skip it (logged; maps from other seeds may lack it) "
                               "or stop with an error."}),
            },
            "optional": {
                "target_boxes": (LAYOUT, {"tooltip": "Boxes (e.g. drawn on LocRef Boxes) that "
                                          "operations name by index in \"box\"."}),
                "source_map": (CLASS_MAP, {"tooltip": "The map \"paste\" copies objects from "
                                           "(source 0)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, operations=None):
        """The JSON, the op names and the object names, before anything runs (class names are
        checked against both palettes: the map's is known at run time)."""
        return True if operations is None else in_some_palette(
            lambda pal: parse_operations(operations, pal))

    @shows_warnings
    def edit(self, class_map, operations, if_missing="skip", target_boxes=None, source_map=None):
        pal = class_map.palette
        ops = parse_operations(operations, pal)
        boxes = () if target_boxes is None else tuple(
            (b.x0, b.y0, b.x1, b.y1) for b in _as_layout(target_boxes).boxes)
        sources = ()
        if source_map is not None:
            if source_map.palette != pal:
                raise ValueError(f"source_map is in palette {source_map.palette.name} but the map "
                                 f"is in {pal.name}; convert it with FGDM Palette Convert first")
            sources = (source_map.ids,)
        edited = ClassMap(apply_operations(class_map.ids, ops, pal, boxes=boxes,
                                           source_maps=sources, missing=if_missing), pal)
        log.info("FG-DM: applied %d map edit(s)", len(ops))
        before = map_outputs(class_map, class_map.height, class_map.width)[1]
        after = map_outputs(edited, edited.height, edited.width)[1]
        preview = side_by_side(before, after)
        # images[0] (the map before editing) becomes the background of an upstream box canvas.
        ui = {"images": temp_images(before, "map") + temp_images(preview, "edit")}
        return {"ui": ui, "result": (edited, after, preview)}


class FGDMMapToLayout:
    DESCRIPTION = (
        "Turn the objects of a class map into a LocRef layout: one box per object (bounding box, "
        "class name as label), so LocRef Reference can give the objects FG-DM placed a look."
    )
    CATEGORY = "LocRef/fgdm"
    RETURN_TYPES = (LAYOUT, "IMAGE")
    RETURN_NAMES = ("layout", "preview")
    OUTPUT_TOOLTIPS = ("Boxes in front-to-back order of size (large objects at the back).",
                       "The boxes drawn over the map.")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "class_map": (CLASS_MAP, {"tooltip": "From SBPC Select or Mask Edit."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                                  "tooltip": "Canvas width of the layout (the image to make)."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                                   "tooltip": "Canvas height of the layout."}),
                "objects": ("STRING", {"default": "", "tooltip": "Only these classes, comma-"
                                       "separated; empty = every class except void."}),
                "per_instance": ("BOOLEAN", {"default": True, "tooltip": "One box per connected "
                                             "object; off = one box per class."}),
                "min_area": ("FLOAT", {"default": DEFAULT_MIN_AREA, "min": 0.0, "max": 1.0,
                                       "step": 0.001, "tooltip": "Skip objects smaller than this "
                                       "fraction of the map."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, objects=None):
        if not objects or not objects.strip():
            return True
        return in_some_palette(lambda pal: parse_object_list(pal, objects))

    @shows_warnings
    def convert(self, class_map, width, height, objects, per_instance, min_area):
        pal = class_map.palette
        only = parse_object_list(pal, objects) if objects.strip() else None
        layout = map_to_layout(class_map.ids, pal, width=width, height=height, objects=only,
                               per_instance=per_instance, min_area=min_area)
        if not layout.boxes:
            warn("FG-DM: the map has no object above min_area %.3f; the layout is empty", min_area)
        resized = map_outputs(class_map, height, width)[1]
        preview = render_preview(layout, resized[0].permute(2, 0, 1))
        return (layout, chw_to_image(preview))


def _as_layout(value) -> Layout:
    """The target_boxes input, checked."""
    if not isinstance(value, Layout):
        raise ValueError("target_boxes must come from a LocRef Boxes or FGDM Map To Layout node")
    return value


NODE_CLASS_MAPPINGS = {"FGDMMaskEdit": FGDMMaskEdit, "FGDMMapToLayout": FGDMMapToLayout}
NODE_DISPLAY_NAME_MAPPINGS = {"FGDMMaskEdit": "FGDM Mask Edit",
                              "FGDMMapToLayout": "FGDM Map To Layout"}
