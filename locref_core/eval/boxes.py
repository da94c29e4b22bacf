"""COCO-style box AP (LocRef-Diffusion's placement metric: a detector run on generated images).

Rules, as pycocotools' `COCOeval` for `iouType="bbox"`:

* IoU of xyxy boxes with continuous areas, (x1 - x0) * (y1 - y0), no "+1"; pixels or
  normalised coordinates, as long as ground truth and detections use the same units.
* Per image and class, detections are sorted by descending score (stable) and only the first
  `max_dets` (100) are kept -- pycocotools counts maxDets per image *within each category*.
* Greedy matching per IoU threshold: each detection, best score first, takes the unmatched
  ground-truth box of its class with the highest IoU >= threshold (ties: the later box, as
  pycocotools); each ground-truth box is matched at most once; unmatched detections are false
  positives. An IoU equal to a threshold matches (with a 1e-9 tolerance for float noise, so a
  hand-made IoU of 0.6 counts at the threshold 0.6).
* Per class and threshold: detections of all images ranked by score, precision made monotone
  (each precision is the maximum of the precisions at higher recall), and AP = the mean of the
  interpolated precision at the 101 recall points 0, 0.01, ..., 1 (0 beyond the highest recall).
* A class with ground truth but no detection has AP 0; a class with detections but no ground
  truth is left out of every mean. "AP" is the mean over thresholds (0.50:0.05:0.95) and
  classes; "AP50" and "AP75" the mean over classes at one threshold.

Differences from pycocotools: no crowd regions (`iscrowd`) and no ignored boxes, no area ranges
(small / medium / large), a single maxDets, no average recall; labels are any hashable value
(strings from layout labels, or detector ids) rather than registered category ids; and
detections for an image without ground truth are an error instead of an assertion.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # 0.50, 0.55, ..., 0.95 (pycocotools' iouThrs)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # pycocotools' recThrs
MAX_DETS = 100
IOU_TOLERANCE = 1e-9


@dataclass(frozen=True)
class ImageBoxes:
    """Boxes of one image: xyxy, a label per box, and scores (detections only)."""

    boxes: np.ndarray  # (N, 4) float64 xyxy
    labels: tuple[Hashable, ...]  # (N,)
    scores: np.ndarray | None = None  # (N,) float64; None for ground truth


def as_image_boxes(value: Any, what: str, need_scores: bool) -> ImageBoxes:
    """Validate an ImageBoxes or a mapping {boxes, labels[, scores]}; errors name `what`."""
    if isinstance(value, ImageBoxes):
        boxes, labels, scores = value.boxes, value.labels, value.scores
    elif isinstance(value, Mapping):
        keys = ("boxes", "labels", "scores") if need_scores else ("boxes", "labels")
        missing = [k for k in keys if k not in value]
        if missing:
            raise ValueError(f"{what} is missing {', '.join(missing)}; give boxes (N, 4) xyxy, "
                             "labels (N,)" + (" and scores (N,)" if need_scores else ""))
        boxes, labels, scores = value["boxes"], value["labels"], value.get("scores")
    else:
        raise ValueError(
            f"{what} must be a mapping with boxes and labels, got {type(value).__name__}"
        )
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what}: boxes must be (N, 4) xyxy, got shape {tuple(boxes.shape)}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{what}: boxes hold a non-finite coordinate; fix or drop that box")
    bad = np.nonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0]
    if len(bad):
        raise ValueError(f"{what}: box {int(bad[0])} {boxes[bad[0]].tolist()} has x1 < x0 or "
                         "y1 < y0; boxes are (x0, y0, x1, y1), not (x, y, w, h)")
    labels = tuple(labels.tolist() if isinstance(labels, np.ndarray) else labels)
    if len(labels) != len(boxes):
        raise ValueError(f"{what}: {len(boxes)} boxes but {len(labels)} labels; give one each")
    if need_scores:
        if scores is None:
            raise ValueError(f"{what} has no scores; detections need a score per box")
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"{what}: {len(boxes)} boxes but {len(scores)} scores; give one each")
        if not np.isfinite(scores).all():
            raise ValueError(f"{what}: scores must be finite numbers")
    else:
        scores = None
    return ImageBoxes(boxes, labels, scores)


def iou_matrix(a: Any, b: Any) -> np.ndarray:
    """IoU of every box in `a` (N, 4) with every box in `b` (M, 4), xyxy."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # (N,)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # (M,)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)  # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)  # (N, M)


def match_image(
    gt_boxes: np.ndarray, det_boxes: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """Greedy COCO matching of score-sorted detections to ground truth: true positives (T, D)."""
    ious = iou_matrix(det_boxes, gt_boxes)  # (D, G)
    tp = np.zeros((len(thresholds), len(det_boxes)), dtype=bool)
    for ti, t in enumerate(thresholds):
        taken = np.zeros(len(gt_boxes), dtype=bool)
        for di in range(len(det_boxes)):
            cand = np.where(taken | (ious[di] < t - IOU_TOLERANCE), -1.0, ious[di])  # (G,)
            if len(cand) == 0 or cand.max() < 0:
                continue
            best = len(cand) - 1 - int(np.argmax(cand[::-1]))  # the later box among equal IoUs
            taken[best] = True
            tp[ti, di] = True
    return tp  # (T, D) bool


def average_precision(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> np.ndarray:
    """101-point interpolated AP per threshold from ranked true positives (T, D) and scores (D,)."""
    if tp.shape[1] == 0:
        return np.zeros(tp.shape[0])
    order = np.argsort(-scores, kind="mergesort")  # stable, as pycocotools
    tp_sum = np.cumsum(tp[:, order], axis=1, dtype=np.float64)  # (T, D)
    fp_sum = np.cumsum(~tp[:, order], axis=1, dtype=np.float64)
    out = np.zeros(tp.shape[0])
    for ti in range(tp.shape[0]):
        recall = tp_sum[ti] / num_gt  # (D,) non-decreasing
        precision = tp_sum[ti] / (tp_sum[ti] + fp_sum[ti])  # (D,)
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone envelope
        idx = np.searchsorted(recall, RECALL_POINTS, side="left")  # (101,)
        valid = idx < len(precision)
        out[ti] = np.where(valid, precision[np.minimum(idx, len(precision) - 1)], 0.0).mean()
    return out  # (T,)


def _by_class(record: ImageBoxes, label: Hashable) -> np.ndarray:
    keep = [i for i, lab in enumerate(record.labels) if lab == label]
    return np.asarray(keep, dtype=np.int64)


@dataclass(frozen=True)
class Matches:
    """Every image's detections matched to its ground truth, per label (`match_boxes`), so AP
    over any list of those images (a bootstrap resample) needs no matching again."""

    thresholds: np.ndarray  # (T,)
    gt_labels: dict[Hashable, tuple[Hashable, ...]]  # image id -> its ground-truth labels
    # image id -> label -> (scores (D,), true positives (T, D), ground-truth boxes of the label)
    per_label: dict[Hashable, dict[Hashable, tuple[np.ndarray, np.ndarray, int]]]


def match_boxes(
    ground_truth: Mapping[Hashable, Any],
    detections: Mapping[Hashable, Any],
    iou_thresholds: Sequence[float] | np.ndarray = COCO_IOU_THRESHOLDS,
    max_dets: int = MAX_DETS,
) -> Matches:
    """Validate and match every image once: the first half of `box_ap`."""
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if len(thresholds) == 0 or not ((thresholds > 0) & (thresholds <= 1)).all():
        raise ValueError(f"iou_thresholds must be numbers in (0, 1], got {thresholds.tolist()}")
    if max_dets < 1:
        raise ValueError(f"max_dets must be at least 1, got {max_dets}")
    unknown = [k for k in detections if k not in ground_truth]
    if unknown:
        raise ValueError(f"detections name images without ground truth: {unknown[:5]!r}; "
                         "use the ground truth's image ids")
    gts = {k: as_image_boxes(v, f"ground truth of image {k!r}", False)
           for k, v in ground_truth.items()}
    dets = {k: as_image_boxes(v, f"detections of image {k!r}", True)
            for k, v in detections.items()}
    per_label: dict[Hashable, dict[Hashable, tuple[np.ndarray, np.ndarray, int]]] = {}
    for image_id, gt in gts.items():
        det = dets.get(image_id)
        entries = per_label[image_id] = {}
        for label in dict.fromkeys(gt.labels + (det.labels if det is not None else ())):
            g = gt.boxes[_by_class(gt, label)]  # (G, 4)
            if det is None:
                entries[label] = (np.zeros(0), np.zeros((len(thresholds), 0), bool), len(g))
                continue
            sel = _by_class(det, label)
            order = sel[np.argsort(-det.scores[sel], kind="mergesort")][:max_dets]  # (D,)
            entries[label] = (det.scores[order], match_image(g, det.boxes[order], thresholds),
                              len(g))
    return Matches(thresholds, {k: g.labels for k, g in gts.items()}, per_label)


def ap_from_matches(matches: Matches, image_ids: Sequence[Hashable] | None = None
                    ) -> dict[str, Any]:
    """`box_ap`'s result over `image_ids` (default: every image; an id may repeat, as in a
    bootstrap resample, and then counts as another image with the same boxes)."""
    ids = list(matches.gt_labels) if image_ids is None else list(image_ids)
    thresholds = matches.thresholds
    classes = list(dict.fromkeys(lab for i in ids for lab in matches.gt_labels[i]))
    if not classes:
        raise ValueError("the ground truth has no boxes, so AP is undefined; check the layouts")
    per_class: dict[Hashable, dict[str, Any]] = {}
    ap_table = np.zeros((len(classes), len(thresholds)))  # (K, T)
    for ki, label in enumerate(classes):
        all_scores, all_tp, num_gt, num_det = [], [], 0, 0
        for image_id in ids:
            entry = matches.per_label[image_id].get(label)
            if entry is None:  # neither ground truth nor detections of this label
                continue
            scores, tp, gt_count = entry
            all_scores.append(scores)
            all_tp.append(tp)
            num_gt += gt_count
            num_det += len(scores)
        scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
        tp = np.concatenate(all_tp, axis=1) if all_tp else np.zeros((len(thresholds), 0), bool)
        ap_table[ki] = average_precision(scores, tp, num_gt)
        per_class[label] = {
            "AP": float(ap_table[ki].mean()),
            "AP50": _at(ap_table[ki], thresholds, 0.5),
            "AP75": _at(ap_table[ki], thresholds, 0.75),
            "num_gt": num_gt,
            "num_det": num_det,
        }
    return {
        "AP": float(ap_table.mean()),
        "AP50": _at(ap_table.mean(axis=0), thresholds, 0.5),
        "AP75": _at(ap_table.mean(axis=0), thresholds, 0.75),
        "per_class": per_class,
        "num_images": len(ids),
        "num_classes": len(classes),
        "iou_thresholds": [float(t) for t in thresholds],
    }


def box_ap(
    ground_truth: Mapping[Hashable, Any],
    detections: Mapping[Hashable, Any],
    iou_thresholds: Sequence[float] | np.ndarray = COCO_IOU_THRESHOLDS,
    max_dets: int = MAX_DETS,
) -> dict[str, Any]:
    """COCO box AP: {"AP", "AP50", "AP75", "per_class", "num_images", "num_classes"}.

    `ground_truth` and `detections` map an image id to ImageBoxes (or a mapping with boxes,
    labels, and for detections scores). "AP50"/"AP75" are None when that threshold is not in
    `iou_thresholds`; "per_class" maps a label to its AP, AP50, AP75 and counts.
    """
    return ap_from_matches(match_boxes(ground_truth, detections, iou_thresholds, max_dets))


def _at(values: np.ndarray, thresholds: np.ndarray, t: float) -> float | None:
    """The value at threshold `t` (within float noise), or None when `t` was not evaluated."""
    hit = np.nonzero(np.abs(thresholds - t) < 1e-6)[0]
    return float(values[hit[0]]) if len(hit) else None
