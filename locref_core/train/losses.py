"""Training losses shared by the LocRef and FG-DM trainers (pure torch, no host).

* `weighted_eps_mse`: LocRef-Diffusion's epsilon MSE, weighted Wf on instance foreground and Wb
  elsewhere (arXiv 2411.15252, Sec. 3.4).
* `v_error_weight`: how much more a v-prediction's squared error weighs than the epsilon error
  it implies, per row (the world's v base and the FG-DM trainer's `--loss-weight v`).
* `attention_kl`: FG-DM's attention-distillation loss, KL(teacher || student) between attention
  probability maps whose query grids are resized to a common size (Sridhar & Vasconcelos, Sec. 3.3;
  official code: DeepakSridhar/fgdm `ldm/models/diffusion/ddpm.py`, `compute_attn_distill_loss`
  and `get_attnmaps`, with `utils/attention_utils.py` `get_token_maps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Grid = tuple[int, int]


def latent_weight_mask(fg_mask: torch.Tensor, size: Grid, w_fg: float = 2.3,
                       w_bg: float = 0.3) -> torch.Tensor:
    """Pixel foreground mask (B, H, W) or (B, 1, H, W) in [0, 1] -> loss weights (B, 1, h, w).

    The mask is brought to the latent grid by *area* averaging (`F.interpolate(mode="area")`,
    i.e. the mean over each 8x8 pixel patch for SD's /8 VAE), so a latent pixel that is a fraction
    f foreground gets the weight w_bg + f * (w_fg - w_bg): w_fg inside, w_bg outside, linear on
    the border. A mask already at the latent size is used as is.
    """
    if fg_mask.ndim == 3:
        fg_mask = fg_mask[:, None]
    if fg_mask.ndim != 4 or fg_mask.shape[1] != 1:
        raise ValueError(f"fg_mask must be (B, H, W) or (B, 1, H, W), got {tuple(fg_mask.shape)}")
    frac = fg_mask.float()
    if tuple(frac.shape[-2:]) != tuple(size):
        frac = F.interpolate(frac, size=tuple(size), mode="area")  # (B, 1, h, w) fg fraction
    return w_bg + (w_fg - w_bg) * frac.clamp(0.0, 1.0)


def weighted_eps_mse(pred: torch.Tensor, target: torch.Tensor, fg_mask: torch.Tensor | None,
                     w_fg: float = 2.3, w_bg: float = 0.3) -> torch.Tensor:
    """LocRef's loss: mean over all elements of w * (pred - target)^2 (not divided by mean w).

    pred, target: (B, C, h, w) predicted and true noise. fg_mask: instance-foreground mask at
    pixel or latent resolution (see `latent_weight_mask`); None weights everything by 1 (plain
    epsilon MSE). The normalisation is the plain mean, so a batch with more foreground has a
    larger loss, as in the paper's per-pixel weighting.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    err = (pred.float() - target.float()) ** 2  # (B, C, h, w)
    if fg_mask is None:
        return err.mean()
    w = latent_weight_mask(fg_mask.to(err.device), pred.shape[-2:], w_fg, w_bg)  # (B, 1, h, w)
    if w.shape[0] != err.shape[0]:
        raise ValueError(f"fg_mask has {w.shape[0]} rows, pred has {err.shape[0]}")
    return (w * err).mean()


def v_error_weight(sigma: torch.Tensor) -> torch.Tensor:
    """1 + sigma^2 per row (B,): with x_t = x0 + sigma * eps, v = (eps - sigma * x0) /
    sqrt(1 + sigma^2) in the unit-variance input scale, and an epsilon model's v error is its
    epsilon error times sqrt(1 + sigma^2), so v's squared error is epsilon's times this."""
    return 1.0 + sigma.square()


def square_grid(tokens: int) -> Grid:
    """The (h, w) of a square query grid with `tokens` positions; ValueError otherwise."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} query positions are not a square grid; pass grids=[(h, w), "
                         "...] for non-square latents")
    return side, side


def resize_query_grid(maps: torch.Tensor, grid: Grid, size: Grid) -> torch.Tensor:
    """(..., h*w, Lk) -> (..., H*W, Lk): bilinear resize of the query grid, keys untouched.

    Each output row is a convex combination of input rows (bilinear weights are non-negative and
    sum to 1, antialiased when shrinking), so rows that are distributions over the keys stay
    distributions. Row-major query order, as in the host's (B, h*w, C) token layout.
    """
    h, w = grid
    if maps.shape[-2] != h * w:
        raise ValueError(f"maps have {maps.shape[-2]} query positions, grid {grid} has {h * w}")
    if (h, w) == tuple(size):
        return maps
    lead, lk = maps.shape[:-2], maps.shape[-1]
    x = maps.reshape(-1, h, w, lk).permute(0, 3, 1, 2)  # (N, Lk, h, w): keys as channels
    shrink = size[0] < h or size[1] < w
    x = F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False,
                      antialias=shrink)
    return x.permute(0, 2, 3, 1).reshape(*lead, size[0] * size[1], lk)


def mean_attention_map(maps: Sequence[torch.Tensor], size: Grid,
                       grids: Sequence[Grid] | None = None) -> torch.Tensor:
    """Average of several layers' maps (..., Lq_i, Lk) after resizing each to `size`.

    The official code averages the layers' maps at one resolution before the KL (get_token_maps).
    """
    if len(maps) == 0:
        raise ValueError("no attention maps to average")
    grids = list(grids) if grids is not None else [square_grid(m.shape[-2]) for m in maps]
    if len(grids) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(grids)} grids")
    resized = [resize_query_grid(m, g, size) for m, g in zip(maps, grids)]
    return torch.stack(resized).mean(0)


def attention_kl(teacher_maps: torch.Tensor | Sequence[torch.Tensor],
                 student_maps: torch.Tensor | Sequence[torch.Tensor],
                 size: Grid | None = None, grids: Sequence[Grid] | None = None,
                 eps: float = 1e-8) -> torch.Tensor:
    """FG-DM attention distillation: KL(teacher || student) of attention probability maps.

    teacher_maps, student_maps: one tensor (..., Lq, Lk) or a list of them (one per layer, same
    Lk), rows summing to 1 over the keys. Teacher and student ran on the same latent, so a layer
    has the same query grid in both; `grids` gives each layer's (h, w) (default: square).
    What is resized (following the official `get_token_maps`): the *query* grid of every map,
    bilinearly, to `size` (default: the largest grid given); the layers are then averaged; keys are
    never resized. The KL is taken per query row, sum_k p_t (log p_t - log q_s), and averaged over
    rows and leading dims. The official code instead flattens each sample's whole map and applies
    a softmax to the probabilities before the KL; a softmax of values in [0, 1] over ~10^6 entries
    is nearly uniform and gives a vanishing signal, so rows are compared as the distributions they
    are. Zero exactly when the resized maps are equal. The teacher is detached.
    """
    teacher = [teacher_maps] if isinstance(teacher_maps, torch.Tensor) else list(teacher_maps)
    student = [student_maps] if isinstance(student_maps, torch.Tensor) else list(student_maps)
    if len(teacher) != len(student) or not teacher:
        raise ValueError(f"need the same non-zero number of teacher and student maps, got "
                         f"{len(teacher)} and {len(student)}")
    for t, s in zip(teacher, student):
        if t.shape != s.shape:
            raise ValueError(f"teacher map {tuple(t.shape)} and student map {tuple(s.shape)} "
                             "differ")
    grids = list(grids) if grids is not None else [square_grid(m.shape[-2]) for m in teacher]
    if size is None:
        size = max(grids, key=lambda g: g[0] * g[1])
    p = mean_attention_map([t.detach() for t in teacher], size, grids)  # (..., H*W, Lk)
    q = mean_attention_map(student, size, grids)
    kl = (p * (p.clamp_min(eps).log() - q.clamp_min(eps).log())).sum(-1)  # (..., H*W)
    return kl.mean()
