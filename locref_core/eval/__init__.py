"""Evaluation: COCO box AP (placement), CLIP-I (appearance), FG-DM object recall.

Host-free like the rest of `locref_core`: detectors and CLIP models are supplied by the caller.
Command line: `python -m locref_core.eval --help`.
"""

from .boxes import COCO_IOU_THRESHOLDS, ImageBoxes, box_ap, iou_matrix
from .clip_i import clip_i, clip_i_for_layout, clip_i_scores, crop_boxes
from .recall import folder_recall, map_recall

__all__ = [
    "COCO_IOU_THRESHOLDS", "ImageBoxes", "box_ap", "clip_i", "clip_i_for_layout",
    "clip_i_scores", "crop_boxes", "folder_recall", "iou_matrix", "map_recall",
]  # fmt: skip
