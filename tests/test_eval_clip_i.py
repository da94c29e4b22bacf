"""CLIP-I with a toy encoder whose embedding is the mean colour, so cosines are known."""

import math

import numpy as np
import pytest
import torch

from locref_core.eval.clip_i import clip_i, clip_i_for_layout, clip_i_scores, crop_boxes
from locref_core.layout import Box, Layout, Reference

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
YELLOW, CYAN = (1.0, 1.0, 0.0), (0.0, 1.0, 1.0)


def solid(color, h=8, w=8):
    return torch.tensor(color, dtype=torch.float32).view(3, 1, 1).expand(3, h, w).clone()


def mean_colour(batch):
    assert batch.ndim == 4 and batch.shape[1:] == (3, 224, 224)  # resized to CLIP's input
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0
    return batch.mean(dim=(2, 3))  # (B, 3)


def test_crop_boxes_cuts_the_box_cells():
    image = torch.arange(3 * 10 * 20, dtype=torch.float32).view(3, 10, 20)
    crops = crop_boxes(image, [[0.0, 0.0, 0.5, 0.5], Box(0.25, 0.5, 1.0, 1.0)])
    assert torch.equal(crops[0], image[:, :5, :10])
    assert torch.equal(crops[1], image[:, 5:, 5:])
    tiny = crop_boxes(image, np.array([[0.0, 0.0, 0.01, 0.01]]))[0]  # never empty
    assert tiny.shape == (3, 1, 1)


@pytest.mark.parametrize("box", [[0.5, 0, 0.4, 1], [0, 0, 20, 10], [-0.1, 0, 0.5, 0.5]])
def test_crop_boxes_rejects_boxes_that_are_not_normalised_xyxy(box):
    with pytest.raises(ValueError, match="normalised"):
        crop_boxes(torch.zeros(3, 8, 8), [box])


def test_identical_crops_and_references_give_one():
    crops = [solid(RED), torch.rand(3, 20, 13), solid((0.2, 0.5, 0.9), 5, 30)]
    assert clip_i(crops, [c.clone() for c in crops], mean_colour) == pytest.approx(1.0, abs=1e-6)


def test_known_cosines():
    # mean colours: red . yellow = 1 / (1 * sqrt 2); red . green = 0; blue . cyan = 1 / sqrt 2
    scores = clip_i_scores([solid(RED), solid(RED), solid(BLUE)],
                           [solid(YELLOW, 30, 10), solid(GREEN), solid(CYAN)], mean_colour)
    np.testing.assert_allclose(scores, [1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)], atol=1e-6)
    assert clip_i([solid(RED), solid(RED)], [solid(YELLOW), solid(GREEN)], mean_colour) == \
        pytest.approx(0.5 / math.sqrt(2), abs=1e-6)


def test_numpy_embeddings_and_batches_larger_than_one_chunk():
    crops = [solid(RED)] * 40  # more than one encoder batch of 32
    calls = []

    def encode(batch):
        calls.append(len(batch))
        return batch.mean(dim=(2, 3)).numpy()

    assert clip_i(crops, [solid(YELLOW)] * 40, encode) == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert calls == [32, 8, 32, 8]


def test_clip_i_for_layout_pairs_each_box_with_its_reference_and_skips_the_rest():
    image = torch.zeros(3, 64, 64)
    image[0, :, :32] = 1.0  # left half red
    image[2, :, 32:] = 1.0  # right half blue
    layout = Layout(64, 64, (
        Box(0.0, 0.0, 0.5, 1.0, "left", Reference(solid(RED, 16, 16))),
        Box(0.5, 0.0, 1.0, 1.0, "right", Reference(solid(CYAN))),
        Box(0.0, 0.0, 1.0, 1.0, "no reference"),
    ))  # fmt: skip
    assert clip_i_for_layout(image, layout, mean_colour) == pytest.approx(
        (1.0 + 1 / math.sqrt(2)) / 2, abs=1e-6)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="reference"):
        clip_i_for_layout(torch.zeros(3, 64, 64), Layout(64, 64, (Box(0, 0, 1, 1),)), mean_colour)
    with pytest.raises(ValueError, match="one each"):
        clip_i([solid(RED)], [], mean_colour)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        clip_i([solid(RED)], [solid(RED)], lambda b: b.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="at least one"):
        clip_i([], [], mean_colour)
    with pytest.raises(ValueError, match=r"image must be a \(3, H, W\) tensor, got \(8, 8, 3\)"):
        crop_boxes(torch.zeros(8, 8, 3), [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"image must be a \(3, H, W\) tensor, got ndarray"):
        crop_boxes(np.zeros((3, 8, 8)), [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="2 crops but 1 references; give one each"):
        clip_i_scores([solid(RED), solid(RED)], [solid(RED)], mean_colour)
    assert clip_i_scores([], [], mean_colour).shape == (0,)
