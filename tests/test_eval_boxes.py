"""COCO-style box AP on hand-made cases whose answers are worked out in the comments.

Reminder of the rule: per class and IoU threshold, detections are ranked by score, precision is
made monotone (max over higher recall), and AP is the mean of that precision at the 101 recall
points 0, 0.01, ..., 1, with 0 beyond the highest recall reached. "AP" averages 10 thresholds
0.50, 0.55, ..., 0.95 and the classes.
"""

import numpy as np
import pytest

from locref_core.eval.boxes import COCO_IOU_THRESHOLDS, ImageBoxes, box_ap, iou_matrix

SQUARE = [0.0, 0.0, 10.0, 10.0]


def gt(boxes, labels):
    return ImageBoxes(np.array(boxes, dtype=float).reshape(-1, 4), tuple(labels))


def det(boxes, labels, scores):
    return ImageBoxes(np.array(boxes, dtype=float).reshape(-1, 4), tuple(labels),
                      np.array(scores, dtype=float))


# ------------------------------------------------------------------ IoU


def test_iou_matrix_known_values():
    a = [SQUARE, [0, 0, 2, 2]]
    b = [[0, 0, 10, 6], [5, 0, 15, 10], [20, 20, 30, 30], SQUARE]
    iou = iou_matrix(a, b)
    assert iou.shape == (2, 4)
    # 60 / 100; 50 / (100 + 100 - 50); disjoint; identical
    np.testing.assert_allclose(iou[0], [0.6, 1 / 3, 0.0, 1.0])
    # [0,0,2,2]: 4 / (4 + 60 - 4) with [0,0,10,6], disjoint twice, 4 / 100 inside SQUARE
    np.testing.assert_allclose(iou[1], [4 / 60, 0.0, 0.0, 4 / 100])


def test_iou_matrix_is_symmetric_and_handles_empty_and_degenerate_boxes():
    a = np.array([[1, 2, 7, 9], [0, 0, 3, 3.5]])
    b = np.array([[2, 2, 8, 8], [1, 1, 4, 4], [5, 5, 5, 5]])  # the last box has zero area
    np.testing.assert_allclose(iou_matrix(a, b), iou_matrix(b, a).T)
    assert np.isfinite(iou_matrix(b, b)).all() and iou_matrix(b, b)[2, 2] == 0.0
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 3)


# ------------------------------------------------------------------ AP


def test_perfect_detections_give_one():
    truth = {"a": gt([SQUARE, [20, 20, 40, 50]], ["dog", "cat"]), "b": gt([[5, 5, 9, 9]], ["dog"])}
    found = {"a": det([[20, 20, 40, 50], SQUARE], ["cat", "dog"], [0.3, 0.9]),
             "b": det([[5, 5, 9, 9]], ["dog"], [0.5])}
    r = box_ap(truth, found)
    assert r["AP"] == pytest.approx(1.0) and r["AP50"] == 1.0 and r["AP75"] == 1.0
    assert set(r["per_class"]) == {"dog", "cat"} and r["num_images"] == 2


def test_one_detection_at_iou_0_6():
    # IoU = 60 / 100 = 0.6 exactly. It matches at the thresholds 0.50, 0.55 and 0.60 (IoU equal
    # to the threshold counts), where the one detection is a TP: recall 1 at precision 1, so all
    # 101 recall points read 1 -> AP 1. At 0.65..0.95 it is a FP and recall stays 0 -> AP 0.
    # AP = 3 / 10 = 0.3, AP50 = 1, AP75 = 0.
    r = box_ap({"a": gt([SQUARE], ["dog"])}, {"a": det([[0, 0, 10, 6]], ["dog"], [0.9])})
    assert r["AP50"] == 1.0 and r["AP75"] == 0.0
    assert r["AP"] == pytest.approx(0.3)


def test_iou_equal_to_a_threshold_matches_despite_float_noise():
    # A box of height 3 * 0.7 in a 3 x 3 square: IoU 0.7 on paper, 0.6999999999999998 in
    # floats. Still a TP at 0.50..0.70 (5 of 10 thresholds) -> AP = 0.5.
    box = [0, 0, 3, 3 * 0.7]
    assert iou_matrix([[0, 0, 3, 3]], [box])[0, 0] < 0.7
    r = box_ap({"a": gt([[0, 0, 3, 3]], ["dog"])}, {"a": det([box], ["dog"], [0.9])})
    assert r["AP"] == pytest.approx(0.5)


def test_one_detection_at_iou_0_58():
    # IoU 0.58: a TP at 0.50 and 0.55 only -> AP = 2 / 10.
    r = box_ap({"a": gt([SQUARE], ["dog"])}, {"a": det([[0, 0, 10, 5.8]], ["dog"], [0.9])})
    assert r["AP"] == pytest.approx(0.2) and r["AP50"] == 1.0


def test_false_positive_ranked_above_a_true_positive():
    # One GT; ranked detections FP (0.9), TP (0.8). Recall [0, 1], precision [0, 1/2], monotone
    # [1/2, 1/2]: every recall point reads 1/2 -> AP = 0.5 at every threshold.
    r = box_ap({"a": gt([SQUARE], ["dog"])},
               {"a": det([[50, 50, 60, 60], SQUARE], ["dog", "dog"], [0.9, 0.8])})
    assert r["AP"] == pytest.approx(0.5) and r["AP50"] == pytest.approx(0.5)


def test_false_positive_between_true_positives_across_images():
    # Two GTs in two images; global ranking TP (0.9, image a), FP (0.8, b), TP (0.7, b).
    # Recall [1/2, 1/2, 1], precision [1, 1/2, 2/3], monotone [1, 2/3, 2/3].
    # Recall points 0.00..0.50 (51 of them) find recall >= r at rank 1 -> 1;
    # points 0.51..1.00 (50) first reach it at rank 3 -> 2/3.  AP = (51 + 50 * 2/3) / 101.
    truth = {"a": gt([SQUARE], ["dog"]), "b": gt([[30, 30, 40, 40]], ["dog"])}
    found = {"a": det([SQUARE], ["dog"], [0.9]),
             "b": det([[0, 50, 10, 60], [30, 30, 40, 40]], ["dog", "dog"], [0.8, 0.7])}
    expected = (51 + 50 * 2 / 3) / 101
    r = box_ap(truth, found)
    assert r["AP"] == pytest.approx(expected) and r["AP50"] == pytest.approx(expected)
    assert expected == pytest.approx(0.834983, abs=1e-6)


def test_missing_detections_limit_recall():
    # Two GTs, one perfect detection: recall 1/2 at precision 1. Points 0..0.50 (51) read 1,
    # points above the reached recall read 0 -> AP = 51 / 101.
    truth = {"a": gt([SQUARE, [20, 20, 30, 30]], ["dog", "dog"])}
    r = box_ap(truth, {"a": det([SQUARE], ["dog"], [0.9])})
    assert r["AP"] == pytest.approx(51 / 101)
    # an image with ground truth but no detection entry at all counts as missed too
    r2 = box_ap({"a": gt([SQUARE], ["dog"]), "b": gt([[20, 20, 30, 30]], ["dog"])},
                {"a": det([SQUARE], ["dog"], [0.9])})
    assert r2["AP"] == pytest.approx(51 / 101)


def test_each_ground_truth_is_matched_at_most_once():
    # Two detections on GT 1 (the second is a duplicate -> FP), GT 2 missed: recall [1/2, 1/2],
    # AP = 51 / 101. Matching a GT twice would reach recall 1 and give AP 1.
    truth = {"a": gt([SQUARE, [20, 20, 30, 30]], ["dog", "dog"])}
    r = box_ap(truth, {"a": det([SQUARE, SQUARE], ["dog", "dog"], [0.9, 0.8])})
    assert r["AP"] == pytest.approx(51 / 101)


def test_greedy_matching_takes_the_highest_iou():
    # GT A = [0,0,10,10], GT B = [0,0,10,5]. Detection 1 (0.9) = [0,0,10,6]: IoU 0.6 with A and
    # 50/60 = 0.833 with B, so it takes B at thresholds <= 0.80 and nothing above. Detection 2
    # (0.8) = A: IoU 1 with A. Thresholds 0.50..0.80 (7): both TP -> AP 1.
    # 0.85, 0.90, 0.95: FP then TP of 2 GTs -> recall [0, 1/2], monotone precision 1/2 up to
    # recall 1/2 -> AP = 51 * 0.5 / 101.  (Taking the first GT above the threshold instead
    # would leave detection 2 with B at IoU 0.5 and lose 0.55..0.80.)
    truth = {"a": gt([SQUARE, [0, 0, 10, 5]], ["dog", "dog"])}
    r = box_ap(truth, {"a": det([[0, 0, 10, 6], SQUARE], ["dog", "dog"], [0.9, 0.8])})
    assert r["AP50"] == 1.0 and r["AP75"] == 1.0
    assert r["AP"] == pytest.approx((7 + 3 * 51 * 0.5 / 101) / 10)


def test_two_classes_are_averaged_and_classes_without_ground_truth_excluded():
    # dog: perfect -> 1.  cat: 1 of 2 found -> 51/101.  bird: detections only -> left out.
    truth = {"a": gt([SQUARE, [20, 20, 30, 30], [40, 40, 50, 50]], ["dog", "cat", "cat"])}
    found = {"a": det([SQUARE, [20, 20, 30, 30], [0, 40, 9, 49]], ["dog", "cat", "bird"],
                      [0.9, 0.8, 0.99])}
    r = box_ap(truth, found)
    assert r["per_class"]["dog"]["AP"] == pytest.approx(1.0)
    assert r["per_class"]["cat"]["AP"] == pytest.approx(51 / 101)
    assert r["AP"] == pytest.approx((1 + 51 / 101) / 2) and r["num_classes"] == 2
    assert "bird" not in r["per_class"]
    # a class with ground truth and no detection counts with AP 0
    r2 = box_ap(truth, {"a": det([SQUARE], ["dog"], [0.9])})
    assert r2["AP"] == pytest.approx(0.5) and r2["per_class"]["cat"]["AP"] == 0.0


def test_max_dets_per_image_keeps_the_best_scores():
    # 100 FPs outrank the only TP, which is cut by maxDets=100 -> AP 0. With 101 kept, the TP is
    # rank 101: recall 1 reached at precision 1/101 -> AP = 1/101.
    fps = [[100 + i, 100, 101 + i, 101] for i in range(100)]
    truth = {"a": gt([SQUARE], ["dog"])}
    found = {"a": det(fps + [SQUARE], ["dog"] * 101, [0.9] * 100 + [0.1])}
    assert box_ap(truth, found)["AP"] == 0.0
    assert box_ap(truth, found, max_dets=101)["AP"] == pytest.approx(1 / 101)


def test_normalised_and_pixel_coordinates_agree():
    truth = {"a": gt([[64, 64, 320, 256], [0, 0, 100, 500]], ["dog", "cat"])}
    found = {"a": det([[70, 60, 300, 250], [0, 10, 120, 480]], ["dog", "cat"], [0.9, 0.5])}
    scale = np.array([512, 512, 512, 512.0])
    norm_t = {"a": gt(truth["a"].boxes / scale, ["dog", "cat"])}
    norm_f = {"a": det(found["a"].boxes / scale, ["dog", "cat"], [0.9, 0.5])}
    assert box_ap(truth, found)["AP"] == pytest.approx(box_ap(norm_t, norm_f)["AP"])


def test_thresholds_and_dict_inputs():
    r = box_ap({"a": {"boxes": [SQUARE], "labels": ["dog"]}},
               {"a": {"boxes": [[0, 0, 10, 6]], "labels": ["dog"], "scores": [1.0]}},
               iou_thresholds=[0.5, 0.7])
    assert r["AP"] == pytest.approx(0.5) and r["AP50"] == 1.0 and r["AP75"] is None
    assert len(COCO_IOU_THRESHOLDS) == 10 and COCO_IOU_THRESHOLDS[-1] == pytest.approx(0.95)


@pytest.mark.parametrize(
    "truth, found, match",
    [({"a": gt([[10, 0, 5, 10]], ["dog"])}, {}, r"\(x, y, w, h\)"),
     ({"a": gt([SQUARE], ["dog"])}, {"zz": det([SQUARE], ["dog"], [1])}, "without ground truth"),
     ({"a": gt([], [])}, {}, "no boxes"),
     ({"a": gt([SQUARE], ["dog"])}, {"a": {"boxes": [SQUARE], "labels": ["dog"]}}, "scores"),
     ({"a": gt([SQUARE], ["dog", "cat"])}, {}, "labels"),
     ({"a": gt([SQUARE], ["dog"])}, {"a": gt([SQUARE], ["dog"])}, "no scores"),
     ({"a": [SQUARE]}, {}, "must be a mapping with boxes and labels, got list"),
     ({"a": gt([[0, 0, float("nan"), 10]], ["dog"])}, {},
      "non-finite coordinate; fix or drop that box"),
     ({"a": {"boxes": [[0, 0, 10]], "labels": ["dog"]}}, {},
      r"boxes must be \(N, 4\) xyxy, got shape \(1, 3\)"),
     ({"a": gt([SQUARE], ["dog"])}, {"a": det([SQUARE], ["dog"], [0.9, 0.5])},
      "1 boxes but 2 scores; give one each"),
     ({"a": gt([SQUARE], ["dog"])}, {"a": det([SQUARE], ["dog"], [float("inf")])},
      "scores must be finite numbers")],
)  # fmt: skip
def test_bad_inputs_raise_clear_errors(truth, found, match):
    with pytest.raises(ValueError, match=match):
        box_ap(truth, found)


def test_bad_thresholds_and_max_dets_are_named():
    truth, found = {"a": gt([SQUARE], ["dog"])}, {"a": det([SQUARE], ["dog"], [1.0])}
    with pytest.raises(ValueError, match=r"iou_thresholds must be numbers in \(0, 1\], got "
                                         r"\[0.5, 1.5\]"):
        box_ap(truth, found, iou_thresholds=[0.5, 1.5])
    with pytest.raises(ValueError, match="max_dets must be at least 1, got 0"):
        box_ap(truth, found, max_dets=0)
