"""LocRef attention math on plain tensors (arXiv 2411.15252, Sec. 3.3).

At one cross-attention layer with queries q (B, Lq, C):
  CIHS = softmax(q K_ci^T) V_ci                   every query attends to the composite's tokens
  RIHS = instance-region attention                a query in box i attends only to RI_i's tokens
  HS'  = HS * BM + (CIHS + RIHS) * FM             the paper's blend; FM = union of boxes

Generalised here by two user weights: `strength` s scales the whole LocRef change and
`text_in_boxes` t keeps part of the text attention inside boxes:
  HS'  = HS * (1 - s (1 - t) FM) + s (CIHS + RIHS) FM
so s = 0 is the unpatched layer and (s, t) = (1, 0) is the paper.

Overlapping boxes: a query covered by several boxes attends jointly (one softmax) to the tokens
of every instance that covers it.

Regional text is the same instance-region attention with another token source: box i's prompt,
projected by the layer's own to_k/to_v (RTHS). With region weight w, inside the text boxes
  HS'  = HS * (1 - w FM_text) + w RTHS
and with both sources, each scales the global text term by its own keep and adds its own term:
  HS'  = HS * (1 - w FM_text) (1 - s (1 - t) FM_ref) + w RTHS + s (CIHS + RIHS) FM_ref
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, C) -> (B, heads, L, C // heads)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def composite_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        heads: int) -> torch.Tensor:
    """CIHS: every query attends to the composite image's tokens. q (B, Lq, C), k/v (B, T, C)."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads),
                                         split_heads(v, heads))  # (B, heads, Lq, d)
    return merge_heads(out)  # (B, Lq, C)


def instance_visibility(masks: torch.Tensor, tokens: int | Sequence[int]) -> torch.Tensor:
    """Which keys each query may see: (Lq, sum T_i) bool from box masks (N, h, w), where
    instance i has `tokens` keys (one count for all, or one per instance)."""
    if not isinstance(tokens, int):
        tokens = torch.as_tensor(list(tokens), dtype=torch.long)
    return masks.flatten(1).t().bool().repeat_interleave(tokens, dim=1)  # (Lq, sum T_i)


def region_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     visible: torch.Tensor, heads: int) -> torch.Tensor:
    """RIHS in one attention call for all instances.

    q (B, Lq, C); k, v (B, N*T, C): every instance's tokens, concatenated; visible (Lq, N*T).
    A query that sees no key (outside every box) gets zeros, never NaN.
    """
    seen = visible.any(dim=1)  # (Lq,)
    # A fully masked row would softmax to NaN: let it see everything, then zero it.
    mask = visible | ~seen[:, None]  # (Lq, N*T)
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads),
                                         split_heads(v, heads), attn_mask=mask)
    return merge_heads(out) * seen[None, :, None].to(q.dtype)  # (B, Lq, C)


def region_attention_loop(q: torch.Tensor, ks: Sequence[torch.Tensor],
                          vs: Sequence[torch.Tensor], masks: torch.Tensor,
                          heads: int) -> torch.Tensor:
    """Reference RIHS: one attention per instance, masked and summed (non-overlapping boxes)."""
    out = torch.zeros_like(q)
    for k, v, m in zip(ks, vs, masks):
        out = out + composite_attention(q, k, v, heads) * m.flatten()[None, :, None].to(q.dtype)
    return out


def locref_blend(hs: torch.Tensor, cihs: torch.Tensor, rihs: torch.Tensor, fm: torch.Tensor,
                 strength: float = 1.0, text_in_boxes: float = 0.0) -> torch.Tensor:
    """HS' = HS * (1 - s (1 - t) FM) + s (CIHS + RIHS) FM, before the output projection."""
    fm = fm.flatten()[None, :, None].to(hs.dtype)  # (1, Lq, 1)
    return hs * (1 - strength * (1 - text_in_boxes) * fm) + strength * (cihs + rihs) * fm


def region_blend_rows(out: torch.Tensor, rows: torch.Tensor,
                      to_out: Callable[[torch.Tensor], torch.Tensor],
                      keep: torch.Tensor | float, add: torch.Tensor) -> torch.Tensor:
    """HS' = HS * keep + add, applied after the layer's affine output projection, on `rows` only.

    out = to_out(HS) (B, Lq, C); keep (B, Lf, 1) or a number; add (B, Lf, C) for the Lf query
    rows `rows`. Since to_out is affine with bias b = to_out(0), to_out(HS') is
    out * keep + (to_out(add) - b * keep) on those rows and out elsewhere, so nothing outside
    the regions is computed. keep = 1 and add = 0 give `out` exactly.
    """
    projected = to_out(add)  # (B, Lf, C)
    bias = to_out(torch.zeros_like(projected[:, :1]))  # (B, 1, C)
    inside = out.index_select(1, rows) * keep + (projected - bias * keep)  # exact when unchanged
    return out.index_copy(1, rows, inside.to(out.dtype))


def locref_blend_rows(out: torch.Tensor, cihs: torch.Tensor, rihs: torch.Tensor,
                      rows: torch.Tensor, to_out: Callable[[torch.Tensor], torch.Tensor],
                      strength: float = 1.0, text_in_boxes: float = 0.0) -> torch.Tensor:
    """`locref_blend` after the output projection on the foreground rows `rows` (binary FM):
    keep = 1 - s (1 - t), add = s (CIHS + RIHS); cihs, rihs (B, Lf, C)."""
    return region_blend_rows(out, rows, to_out, 1 - strength * (1 - text_in_boxes),
                             strength * (cihs + rihs))


def select_rows(cond: torch.Tensor, uncond: torch.Tensor, cond_or_uncond: Sequence[int],
                rows: int) -> torch.Tensor:
    """Per-row context for a CFG batch: chunk j holds `rows` rows of kind cond_or_uncond[j].

    cond, uncond: (T, C) or (1, T, C). Returns (len(cond_or_uncond) * rows, T, C). The chunk order
    is whatever the host used (uncond first in a normal run); nothing here assumes it.
    """
    cond, uncond = cond.reshape(-1, cond.shape[-1]), uncond.reshape(-1, uncond.shape[-1])
    chunks = [(uncond if kind == 1 else cond)[None].expand(rows, -1, -1) for kind in cond_or_uncond]
    return torch.cat(chunks, dim=0)
