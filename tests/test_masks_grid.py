import pytest
import torch

from locref_core.grid import SD15_SITE_LEVEL, SD15_SITES, downsampled, token_grid
from locref_core.layout import Box, Layout
from locref_core.masks import box_masks, layout_masks

# Latent sizes (image / 8) of 512x768, 576x1024, 1024x576 and an odd-sized 520x776 image.
LATENTS = [(64, 96), (72, 128), (128, 72), (65, 97)]
BOXES = (Box(0.1, 0.2, 0.55, 0.9, "a"), Box(0.31, 0.0, 1.0, 0.37, "b"),
         Box(0.45, 0.45, 0.52, 0.53, "tiny"))


def grids():
    for lh, lw in LATENTS:
        for level in range(4):
            yield downsampled(lh, level), downsampled(lw, level)


def test_sd15_has_sixteen_sites_with_middle_once():
    assert len(SD15_SITES) == 16 and len(set(SD15_SITES)) == 16
    assert ("middle", 0) in SD15_SITES and SD15_SITE_LEVEL[("middle", 0)] == 3


def test_ceil_halving_matches_sd_downsampling():
    assert [downsampled(72, k) for k in range(4)] == [72, 36, 18, 9]
    assert [downsampled(65, k) for k in range(4)] == [65, 33, 17, 9]


@pytest.mark.parametrize("latent", LATENTS)
def test_token_grid_from_token_count(latent):
    for level in range(4):
        h, w = downsampled(latent[0], level), downsampled(latent[1], level)
        assert token_grid(tokens=h * w, latent_hw=latent) == (h, w)


def test_token_grid_prefers_activations_shape_and_checks_it():
    assert token_grid([2, 320, 9, 16], tokens=144) == (9, 16)
    with pytest.raises(ValueError, match="144 cells"):
        token_grid([2, 320, 9, 16], tokens=145)


def test_token_grid_for_an_unknown_downsampler_and_when_it_cannot_tell():
    """A grid no halving of the latent gives (a downsampler that floors 63 to 21): the
    factorisation with the latent's aspect; a count it cannot factor so, or no latent: errors."""
    assert token_grid(tokens=21 * 42, latent_hw=(63, 126)) == (21, 42)
    with pytest.raises(ValueError, match=r"cannot infer a token grid for 997 tokens from latent "
                                         r"\(64, 64\)"):
        token_grid(tokens=997, latent_hw=(64, 64))
    with pytest.raises(ValueError, match="token_grid needs activations_shape, or tokens and "
                                         "latent_hw"):
        token_grid(tokens=64)


@pytest.mark.parametrize("h, w", sorted(set(grids())))
def test_mask_edges_within_one_cell(h, w):
    masks = box_masks(Layout(512, 512, BOXES), h, w)
    assert masks.shape == (3, h, w)
    for box, mask in zip(BOXES, masks):
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        assert len(rows) >= 1 and len(cols) >= 1
        # Each edge of the mask lies within one cell of the box's exact edge.
        assert abs(rows[0].item() - box.y0 * h) <= 1 and abs(rows[-1].item() + 1 - box.y1 * h) <= 1
        assert abs(cols[0].item() - box.x0 * w) <= 1 and abs(cols[-1].item() + 1 - box.x1 * w) <= 1
        # A box's mask is a filled rectangle: its area is rows x cols.
        assert mask.sum().item() == len(rows) * len(cols)
        exact = box.area * h * w
        assert abs(mask.sum().item() - exact) <= (box.width * w + box.height * h + 1)


def test_foreground_and_background_masks():
    layout = Layout(512, 512, BOXES[:2])
    masks, fm, bm = layout_masks(layout, 9, 16)
    assert torch.equal(fm, (masks.sum(0) > 0).float())
    assert torch.equal(fm + bm, torch.ones(9, 16))
    empty_masks, empty_fm, empty_bm = layout_masks(Layout(512, 512), 9, 16)
    assert empty_masks.shape == (0, 9, 16) and empty_fm.sum() == 0 and empty_bm.sum() == 144


def test_whole_canvas_box_covers_every_cell():
    masks = box_masks(Layout(512, 512, (Box(0, 0, 1, 1),)), 9, 17)
    assert masks.sum().item() == 9 * 17
