"""Record self- and cross-attention probabilities of chosen UNet layers (for distillation).

Hook: the host's attn1/attn2 *replace* points (`ModelPatcher.set_model_attn1_replace` /
`set_model_attn2_replace`), which hand over the projected q, k, v of one layer and take the
attention output before `to_out`. The recorder computes that output itself as plain softmax
attention (the same function as the host's, materialised) and keeps the head-averaged
probabilities (B, Lq, Lk) with their autograd graph, so the student's KL reaches the adapter.
Layers without a replace patch keep the host's fused attention.

Memory is bounded by the choice of layers (`SELF_SITES`, `CROSS_SITES`): cross-attention has only
77 keys, so all 16 SD-1.5 sites are recorded; self-attention is quadratic in the query count, so
only the 5 sites at 1/2 of the latent grid are (at 512 px: 32x32 queries, 1024x1024 maps, 4 MB per
sample after the head mean, ~32 MB per sample and layer of per-head probabilities kept for
backward). The official code records the highest-resolution self-attention (32x32 at its 256 px
training); the same 32x32 grid at 512 px is our 1/2-grid layers. The maps are only recorded on
distillation steps (a separate patched clone is used then).
"""

from __future__ import annotations

from typing import Any

import torch

Site = tuple[str, int]
SD15_SITES: tuple[Site, ...] = (
    ("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8),
    ("middle", 0), *(("output", i) for i in range(3, 12)))
SELF_SITES: tuple[Site, ...] = (("input", 4), ("input", 5), ("output", 6), ("output", 7),
                                ("output", 8))  # the 1/2-grid layers (640 ch in SD-1.5)
CROSS_SITES: tuple[Site, ...] = SD15_SITES


class AttentionRecorder:
    """Holds the maps of one forward pass: {(kind, block, number): ((B, Lq, Lk), (h, w))}."""

    def __init__(self) -> None:
        self.maps: dict[tuple[str, str, int], tuple[torch.Tensor, tuple[int, int]]] = {}

    def __deepcopy__(self, memo: dict) -> AttentionRecorder:
        return self  # ModelPatcher.clone deep-copies model_options; the recorder is shared

    def install(self, patcher: Any, self_sites: tuple[Site, ...] = SELF_SITES,
                cross_sites: tuple[Site, ...] = CROSS_SITES) -> Any:
        """Install on `patcher` (call on a clone); returns it."""
        for block, number in self_sites:
            patcher.set_model_attn1_replace(_RecordingAttention(self, "self"), block, number, 0)
        for block, number in cross_sites:
            patcher.set_model_attn2_replace(_RecordingAttention(self, "cross"), block, number, 0)
        return patcher

    def take(self, kind: str) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """The recorded maps of one kind ("self" or "cross") in site order, and their grids;
        forgets them."""
        keys = sorted((k for k in self.maps if k[0] == kind), key=_site_order)
        maps = [self.maps.pop(k) for k in keys]
        return [m for m, _ in maps], [g for _, g in maps]

    def clear(self) -> None:
        self.maps.clear()


def _site_order(key: tuple[str, str, int]) -> int:
    return SD15_SITES.index((key[1], key[2]))


class _RecordingAttention:
    """A replace patch: fn(q, k, v, extra_options) -> (B, Lq, heads * dim_head)."""

    def __init__(self, recorder: AttentionRecorder, kind: str):
        self.recorder, self.kind = recorder, kind

    def __deepcopy__(self, memo: dict) -> _RecordingAttention:
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 extra_options: dict[str, Any]) -> torch.Tensor:
        heads = int(extra_options["n_heads"])
        b, lq, inner = q.shape
        d = inner // heads
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5  # (B, H, Lq, Lk)
        probs = scores.float().softmax(-1)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, lq, inner)
        h, w = (int(s) for s in extra_options["activations_shape"][-2:])
        block = extra_options["block"]
        self.recorder.maps[(self.kind, block[0], int(block[1]))] = (probs.mean(1), (h, w))
        return out
