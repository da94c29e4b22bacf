"""Layout nodes: build a layout from boxes, attach references, preview it."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from ..locref_core.composite import composite_image, shrink_to
from ..locref_core.layout import MAX_BOXES, Layout, Reference, find_box
from ..locref_core.layout_json import bounding_boxes_to_boxes, parse_layout_json
from ..locref_core.masks import add_region_box, with_region
from ..locref_core.preview import render_preview, tensor_to_pil
from .convert import chw_to_image, image_to_chw, mask_to_hw
from .validate import refusal
from .warn import shows_warnings, warn

log = logging.getLogger(__name__)

LAYOUT = "LOCREF_LAYOUT"
MAX_REFERENCE_SIDE = 2048  # plenty for CLIP (224 px) and any box; bounds memory for huge inputs
THUMB_SIDE = 128  # reference thumbnails sent to the box canvas after a run
MIN_REFERENCE_SIDE = 32  # smaller references are mostly upscaling blur by CLIP's 224 px
DEFAULT_BOXES_JSON = '{"version": 1, "boxes": []}'
MAX_CANVAS = 8192


class LocRefBoxes:
    DESCRIPTION = (
        "A layout: boxes on a canvas, each with a label. Draw boxes on the canvas (or edit the "
        "JSON); coordinates are stored normalised, so changing the size keeps the layout. Later "
        "boxes are in front."
    )
    CATEGORY = "LocRef/layout"
    RETURN_TYPES = (LAYOUT,)
    RETURN_NAMES = ("layout",)
    OUTPUT_TOOLTIPS = ("The layout: canvas size and ordered boxes with labels.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"min": 64, "max": MAX_CANVAS, "step": 8}
        return {
            "required": {
                "width": ("INT", {"default": 512, **size,
                                  "tooltip": "Canvas width in pixels; match your latent size."}),
                "height": ("INT", {"default": 512, **size,
                                   "tooltip": "Canvas height in pixels; match your latent size."}),
                "boxes_json": ("STRING", {
                    "default": DEFAULT_BOXES_JSON, "multiline": True,
                    "tooltip": (
                        'Boxes as JSON: {"version": 1, "boxes": [{"x0": 0.1, "y0": 0.2, '
                        '"x1": 0.5, "y1": 0.9, "label": "a red car"}]} with coordinates in 0..1 '
                        f"(top-left origin); at most {MAX_BOXES} boxes. Normally written by the "
                        "box canvas."
                    ),
                }),
            },
            "optional": {
                "bounding_boxes": ("BOUNDING_BOX", {
                    "tooltip": "Optional boxes from another node ([{x, y, width, height, "
                               "metadata}] in canvas pixels); they are added in front of the "
                               "drawn boxes.",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, boxes_json=None):
        """Refuse JSON that no canvas makes valid, when the prompt is queued (a bare box list in
        pixels is checked on the largest canvas; the run checks it on the real one)."""
        if boxes_json is None:
            return True
        return refusal(lambda: parse_layout_json(boxes_json, MAX_CANVAS, MAX_CANVAS, warn=False))

    @shows_warnings
    def build(self, width, height, boxes_json, bounding_boxes=None):
        layout = parse_layout_json(boxes_json, width, height)
        if bounding_boxes is not None:
            extra = bounding_boxes_to_boxes(bounding_boxes, width, height)
            layout = Layout(width, height, layout.boxes + tuple(extra))
        log.debug("LocRef Boxes: %d boxes on %dx%d", len(layout.boxes), width, height)
        return (layout,)


class LocRefReference:
    DESCRIPTION = (
        "Attach a reference image (and optionally a foreground mask) to one box of a layout. "
        "Chain one per box. The reference decides what the object in that box looks like."
    )
    CATEGORY = "LocRef/layout"
    RETURN_TYPES = (LAYOUT,)
    RETURN_NAMES = ("layout",)
    OUTPUT_TOOLTIPS = ("The same layout with the reference attached to the chosen box.",)
    FUNCTION = "attach"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "layout": (LAYOUT, {"tooltip": "The layout to add a reference to."}),
                "image": ("IMAGE", {
                    "tooltip": "The reference image; the first of a batch is used."}),
                "box_index": ("INT", {"default": 0, "min": 0, "max": MAX_BOXES - 1,
                                      "tooltip": "Which box (0 = first drawn). Ignored when a "
                                                 "label is given."}),
                "label": ("STRING", {"default": "",
                                     "tooltip": "Choose the box by its label instead "
                                                "(case-insensitive). Leave empty to use the "
                                                "index."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional foreground mask of the reference "
                                             "(1 = keep); the background is removed before "
                                             "pasting."}),
                "invert_mask": ("BOOLEAN", {"default": False,
                                            "tooltip": "Invert the mask. Load Image's mask is 1 on "
                                                       "transparent pixels, so turn this on for a "
                                                       "cut-out PNG."}),
            },
        }

    @shows_warnings
    def attach(self, layout, image, box_index, label, mask=None, invert_mask=False):
        if not isinstance(layout, Layout):
            raise ValueError("layout input must come from a LocRef Boxes node")
        index = find_box(layout, box_index, label)
        if image.shape[0] > 1:
            warn("LocRef Reference: a batch of %d images was given; using the first",
                 image.shape[0])
        ref_image = image_to_chw(image[:1])[0].cpu()
        check_reference_size(ref_image.shape[1], ref_image.shape[2], mask)
        if max(ref_image.shape[-2:]) > MAX_REFERENCE_SIDE:
            log.info("LocRef Reference: reference %dx%d downscaled to at most %d px",
                     ref_image.shape[2], ref_image.shape[1], MAX_REFERENCE_SIDE)
            ref_image = shrink_to(ref_image, MAX_REFERENCE_SIDE)
        ref_mask = None
        if mask is not None:
            ref_mask = shrink_to(mask_to_hw(mask).cpu()[None], MAX_REFERENCE_SIDE)[0]
            ref_mask = 1.0 - ref_mask if invert_mask else ref_mask
        reference = Reference(ref_image, ref_mask)
        return (layout.with_reference(index, reference),)


def check_reference_size(h: int, w: int, mask) -> None:
    """Warn about a tiny reference (upscaled for CLIP) and a mask of another size (stretched)."""
    if min(h, w) < MIN_REFERENCE_SIDE:
        warn("LocRef Reference: the reference is %dx%d; it is upscaled to CLIP's 224 px and "
             "carries almost no detail. Give a reference of at least %d px on each side.",
             w, h, MIN_REFERENCE_SIDE)
    if mask is not None:
        mh, mw = mask_to_hw(mask).shape
        if (mh, mw) != (h, w):
            warn("LocRef Reference: the mask is %dx%d but the image is %dx%d; the mask is "
                 "stretched to the image. Use the mask of this image (e.g. Load Image's MASK).",
                 mw, mh, w, h)


class LocRefRegionMask:
    DESCRIPTION = (
        "Give one box of a layout the shape of a MASK: its text and reference then act on the "
        "mask's pixels instead of the whole rectangle, and the box becomes the mask's bounding "
        "box (what the preview and the evaluation show). Or add the mask as a new box."
    )
    CATEGORY = "LocRef/layout"
    RETURN_TYPES = (LAYOUT,)
    RETURN_NAMES = ("layout",)
    OUTPUT_TOOLTIPS = ("The same layout with the chosen (or new) box shaped by the mask.",)
    FUNCTION = "shape"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "layout": (LAYOUT, {"tooltip": "The layout whose box gets a shape."}),
                "mask": ("MASK", {"tooltip": "The region (1 = inside) over the whole canvas; "
                                             "another size is resized to the canvas. The first "
                                             "of a batch is used."}),
                "box_index": ("INT", {"default": 0, "min": 0, "max": MAX_BOXES - 1,
                                      "tooltip": "Which box (0 = first drawn). Ignored when a "
                                                 "label is given or a new box is added."}),
                "label": ("STRING", {"default": "",
                                     "tooltip": "Choose the box by its label (case-insensitive); "
                                                "with add_new_box, the new box's label (its "
                                                "text)."}),
            },
            "optional": {
                "add_new_box": ("BOOLEAN", {"default": False,
                                            "tooltip": "Add the mask as a new box, in front, "
                                                       "labelled with label, instead of shaping "
                                                       "an existing box."}),
                "invert_mask": ("BOOLEAN", {"default": False,
                                            "tooltip": "Invert the mask first (Load Image's mask "
                                                       "is 1 on transparent pixels)."}),
            },
        }

    @shows_warnings
    def shape(self, layout, mask, box_index, label, add_new_box=False, invert_mask=False):
        if not isinstance(layout, Layout):
            raise ValueError("layout input must come from a LocRef Boxes node")
        region = mask_to_hw(mask).cpu()
        region = 1.0 - region if invert_mask else region
        if add_new_box:
            if len(layout.boxes) >= MAX_BOXES:
                raise ValueError(f"the layout already has {MAX_BOXES} boxes, the most supported; "
                                 "shape an existing box instead of adding one")
            shaped, stretched = add_region_box(layout, region, label.strip())
        else:
            shaped, stretched = with_region(layout, find_box(layout, box_index, label), region)
        if stretched:
            warn("LocRef Region Mask: the mask is %dx%d but the canvas is %dx%d; it was resized "
                 "to the canvas (stretched). Make the mask at the canvas size.",
                 region.shape[1], region.shape[0], layout.width, layout.height)
        return (shaped,)


class LocRefLayoutPreview:
    DESCRIPTION = (
        "Draw a layout as an image: the composite of the references in their boxes, with every "
        "box outlined in its own colour and labelled with its index and label."
    )
    CATEGORY = "LocRef/layout"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("preview",)
    OUTPUT_TOOLTIPS = ("The preview at canvas size, for Preview Image or Save Image.",)
    FUNCTION = "preview"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "layout": (LAYOUT, {"tooltip": "The layout to draw."}),
            },
            "optional": {
                "show_labels": ("BOOLEAN", {"default": True,
                                            "tooltip": "Write each box's index and label."}),
                "fit": (["contain", "stretch"], {"default": "contain",
                                                 "tooltip": "contain: keep each reference's aspect "
                                                            "ratio, centred in its box; stretch: "
                                                            "fill the box."}),
            },
        }

    @shows_warnings
    def preview(self, layout, show_labels=True, fit="contain"):
        if not isinstance(layout, Layout):
            raise ValueError("layout input must come from a LocRef Boxes node")
        base = composite_image(layout, fit=fit)
        preview = chw_to_image(render_preview(layout, base, show_labels=show_labels))
        # `locref_thumbs` (one entry per box, None without a reference) is read by the box
        # canvas in web/box_canvas.js, which draws each thumbnail inside its box.
        return {"ui": {"locref_thumbs": save_thumbnails(layout)}, "result": (preview,)}


def save_thumbnails(layout: Layout) -> list[dict[str, Any] | None]:
    """Save each box's reference as a small PNG in the host's temp folder (for /view)."""
    import folder_paths  # noqa: PLC0415 - the host's module; only present inside ComfyUI

    records: list[dict[str, Any] | None] = []
    folder = os.path.join(folder_paths.get_temp_directory(), "locref")
    for i, box in enumerate(layout.boxes):
        if box.reference is None:
            records.append(None)
            continue
        image = tensor_to_pil(shrink_to(box.reference.image, THUMB_SIDE))
        if box.reference.mask is not None:
            mask = shrink_to(box.reference.mask[None], THUMB_SIDE)[0]
            image.putalpha(tensor_to_pil(mask.expand(3, -1, -1)).convert("L").resize(image.size))
        os.makedirs(folder, exist_ok=True)
        name = f"thumb_{uuid.uuid4().hex[:12]}_{i}.png"
        image.save(os.path.join(folder, name), compress_level=1)
        records.append({"filename": name, "subfolder": "locref", "type": "temp"})
    return records


NODE_CLASS_MAPPINGS = {
    "LocRefBoxes": LocRefBoxes,
    "LocRefReference": LocRefReference,
    "LocRefRegionMask": LocRefRegionMask,
    "LocRefLayoutPreview": LocRefLayoutPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LocRefBoxes": "LocRef Boxes",
    "LocRefReference": "LocRef Reference",
    "LocRefRegionMask": "LocRef Region Mask",
    "LocRefLayoutPreview": "LocRef Layout Preview",
}
