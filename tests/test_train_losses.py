"""Training losses: LocRef's weighted epsilon MSE, FG-DM's attention-distillation KL and the v
weight of an epsilon error."""

import math

import pytest
import torch

from locref_core.train.losses import (
    attention_kl,
    latent_weight_mask,
    mean_attention_map,
    resize_query_grid,
    v_error_weight,
    weighted_eps_mse,
)


def test_weighted_mse_on_a_4x4_latent_by_hand():
    # 32x32 pixel mask, foreground in pixel columns 0..19: latent columns 0 and 1 are fully
    # foreground, column 2 is half (pixels 16..19 of 16..23), column 3 background.
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :20] = 1
    target = torch.arange(1.0, 5.0).view(1, 1, 4, 1).expand(1, 1, 4, 4)  # row r holds r + 1
    pred = torch.zeros(1, 1, 4, 4)
    # weights per column: 2.3, 2.3, 0.3 + 2.0 * 0.5 = 1.3, 0.3; errors per row: 1, 4, 9, 16
    # mean over the 16 elements = mean(w) * mean(err) = (6.2 / 4) * (30 / 4) = 1.55 * 7.5
    assert weighted_eps_mse(pred, target, mask).item() == pytest.approx(11.625)
    w = latent_weight_mask(mask, (4, 4))
    assert w[0, 0, 0].tolist() == pytest.approx([2.3, 2.3, 1.3, 0.3])


def test_weights_flags_and_plain_mse():
    mask = torch.ones(2, 16, 16)
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    assert weighted_eps_mse(pred, target, mask, w_fg=5.0).item() == pytest.approx(5.0)
    assert weighted_eps_mse(pred, target, 1 - mask, w_bg=0.5).item() == pytest.approx(0.5)
    assert weighted_eps_mse(pred, target, None).item() == pytest.approx(1.0)
    latent_mask = torch.zeros(2, 1, 2, 2)  # already on the latent grid: used as is
    assert weighted_eps_mse(pred, target, latent_mask).item() == pytest.approx(0.3)


def test_weighted_mse_rejects_bad_shapes():
    with pytest.raises(ValueError, match="differ"):
        weighted_eps_mse(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3), None)
    with pytest.raises(ValueError, match="fg_mask must be"):
        weighted_eps_mse(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.zeros(16))
    with pytest.raises(ValueError, match="fg_mask has 3 rows, pred has 2"):
        weighted_eps_mse(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), torch.ones(3, 16, 16))


def rows(*r):
    return torch.tensor(r, dtype=torch.float32)


def test_kl_is_zero_for_identical_maps():
    maps = torch.rand(2, 3, 16, 7).softmax(-1)
    assert attention_kl(maps, maps.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert attention_kl([maps, maps], [maps, maps], size=(2, 2)).item() == pytest.approx(0.0,
                                                                                         abs=1e-7)


def test_kl_after_resizing_the_query_grid_by_hand():
    # a 2x2 query grid over 2 keys, resized to 1x1: the single row is the mean of the 4 rows
    teacher = rows([1, 0], [1, 0], [0, 1], [0, 1])[None]  # mean [0.5, 0.5]
    student = rows([0.5, 0.5], [0, 1], [0, 1], [0.5, 0.5])[None]  # mean [0.25, 0.75]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5 ln(4/3)
    assert attention_kl(teacher, student, size=(1, 1)).item() == pytest.approx(expected, rel=1e-5)


def test_kl_per_row_without_resizing_by_hand():
    teacher = rows([0.5, 0.5], [0.9, 0.1])[None]  # a 1x2 grid
    student = rows([0.25, 0.75], [0.5, 0.5])[None]
    kl0 = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    kl1 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    got = attention_kl(teacher, student, grids=[(1, 2)]).item()
    assert got == pytest.approx((kl0 + kl1) / 2, rel=1e-5)


def test_layers_of_different_grids_are_resized_then_averaged():
    big_t, big_s = torch.rand(1, 4, 3).softmax(-1), torch.rand(1, 4, 3).softmax(-1)  # 2x2
    small_t, small_s = torch.rand(1, 1, 3).softmax(-1), torch.rand(1, 1, 3).softmax(-1)  # 1x1
    p = (big_t + small_t.expand(1, 4, 3)) / 2  # the 1x1 layer upsampled to 2x2 is constant
    q = (big_s + small_s.expand(1, 4, 3)) / 2
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    got = attention_kl([big_t, small_t], [big_s, small_s])  # default size: the largest grid
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_resized_rows_stay_distributions_and_grad_reaches_the_student_only():
    maps = torch.rand(2, 8, 6, 5).softmax(-1)  # (B, heads, 2x3 grid, 5 keys)
    for size in [(4, 6), (1, 2), (3, 3)]:
        out = resize_query_grid(maps, (2, 3), size)
        assert out.shape == (2, 8, size[0] * size[1], 5)
        assert torch.allclose(out.sum(-1), torch.ones(()), atol=1e-5)
    teacher = torch.rand(1, 4, 3).softmax(-1).requires_grad_()
    logits = torch.randn(1, 4, 3, requires_grad=True)
    attention_kl(teacher, logits.softmax(-1)).backward()
    assert teacher.grad is None and logits.grad.abs().sum() > 0


def test_kl_errors_name_the_problem():
    with pytest.raises(ValueError, match="not a square grid"):
        attention_kl(torch.ones(1, 6, 2) / 2, torch.ones(1, 6, 2) / 2)
    with pytest.raises(ValueError, match="differ"):
        attention_kl(torch.ones(1, 4, 2), torch.ones(1, 4, 3))
    with pytest.raises(ValueError, match="same non-zero number"):
        attention_kl([torch.ones(1, 4, 2)], [])
    with pytest.raises(ValueError, match=r"maps have 6 query positions, grid \(2, 2\) has 4"):
        resize_query_grid(torch.ones(1, 6, 2), (2, 2), (4, 4))
    with pytest.raises(ValueError, match="no attention maps to average"):
        mean_attention_map([], (2, 2))
    with pytest.raises(ValueError, match="2 maps but 1 grids"):
        mean_attention_map([torch.ones(1, 4, 2), torch.ones(1, 4, 2)], (2, 2), grids=[(2, 2)])


def test_v_error_weight_is_v_error_over_eps_error():
    """An epsilon prediction's v error, in the unit-variance input scale, squared, is its
    epsilon error squared times v_error_weight(sigma), row by row."""
    g = torch.Generator().manual_seed(3)
    x0, eps, eps_hat = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    sigma = torch.tensor([0.03, 1.0, 14.6])
    s = sigma[:, None, None, None]
    x_t = x0 + s * eps
    x0_hat = x_t - s * eps_hat
    v = (eps - s * x0) / (1 + s**2).sqrt()
    v_hat = (eps_hat - s * x0_hat) / (1 + s**2).sqrt()
    v_err = (v_hat - v).square().mean(dim=(1, 2, 3))
    eps_err = (eps_hat - eps).square().mean(dim=(1, 2, 3))
    assert torch.allclose(v_err, eps_err * v_error_weight(sigma), rtol=1e-4)
    assert not torch.allclose(v_err, eps_err, rtol=1e-2)  # it is not 1 away from sigma 0
