"""Training data: COCO-format loading and validation, LocRef and FG-DM factor datasets, and a
tiny synthetic COCO-format dataset of coloured shapes for tests. Host-free (no ComfyUI)."""

from .coco import (
    CocoAnnotation,
    CocoImage,
    CocoSet,
    DataError,
    instance_mask,
    load_coco,
    polygon_mask,
    rle_decode,
    rle_encode,
)
from .factor_dataset import FactorDataset, collate_factor
from .locref_dataset import LocRefDataset, collate_locref
from .synthetic import make_synthetic_coco

__all__ = [
    "CocoAnnotation", "CocoImage", "CocoSet", "DataError", "FactorDataset", "LocRefDataset",
    "collate_factor", "collate_locref", "instance_mask", "load_coco", "make_synthetic_coco",
    "polygon_mask", "rle_decode", "rle_encode",
]  # fmt: skip
