"""The world base's flip augmentation (no host): a flipped row is the flipped image's latent."""

import pytest
import torch

from locref_core.world.base import flipped_rows


def test_flipped_rows_take_the_mirrored_images_latents_not_the_latents_flipped():
    # latents that are not mirror-symmetric, and "mirrored" latents that are no flip of them
    # (a learned encoder's are not): a flipped row must be the mirrored one, exactly
    latents = torch.arange(3 * 4 * 2 * 3, dtype=torch.float32).reshape(3, 4, 2, 3)
    mirrored = -100.0 - latents
    idx, flip = torch.tensor([2, 0, 2, 1]), torch.tensor([True, False, False, True])
    rows = flipped_rows(latents, mirrored, idx, flip)
    assert rows.shape == (4, 4, 2, 3)
    for r, (i, f) in enumerate(zip(idx.tolist(), flip.tolist())):
        assert torch.equal(rows[r], mirrored[i] if f else latents[i])
    assert not torch.equal(rows[0], latents[2].flip(-1))


def test_without_mirrored_latents_no_row_is_flipped():
    latents = torch.randn(5, 4, 3, 3)
    idx = torch.tensor([4, 1, 1])
    rows = flipped_rows(latents, None, idx, torch.tensor([True, True, False]))
    assert torch.equal(rows, latents[idx])


def test_mirrored_latents_of_other_images_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"mirrored latents \(2, 4, 3, 3\).*images.flip\(-1\)"):
        flipped_rows(torch.zeros(5, 4, 3, 3), torch.zeros(2, 4, 3, 3), torch.tensor([0]),
                     torch.tensor([True]))
