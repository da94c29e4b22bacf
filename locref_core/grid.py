"""Where attention happens: SD-1.5's cross-attention sites and the token grid of each layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

# The 16 cross-attention sites of SD-1.5 as ComfyUI names them, in execution order
# (transformer_index 0..15). The middle site is the one other packs register wrongly.
SD15_SITES: tuple[tuple[str, int], ...] = (
    ("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8),
    ("middle", 0),
    ("output", 3), ("output", 4), ("output", 5), ("output", 6), ("output", 7), ("output", 8),
    ("output", 9), ("output", 10), ("output", 11),
)  # fmt: skip

# Downsampling level (latent / 2**level) of each site.
SD15_SITE_LEVEL: dict[tuple[str, int], int] = dict(
    zip(SD15_SITES, (0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0))
)


def downsampled(size: int, level: int) -> int:
    """Size after `level` SD downsamplers (3x3 conv, stride 2, padding 1): ceil-halving."""
    for _ in range(level):
        size = (size - 1) // 2 + 1
    return size


def token_grid(
    activations_shape: Sequence[int] | None = None,
    tokens: int | None = None,
    latent_hw: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The (h, w) token grid of an attention layer.

    The host's `activations_shape` ([b, c, h, w]) is exact and wins. Without it, the grid is the
    ceil-halved latent size whose area equals `tokens`.
    """
    if activations_shape is not None:
        h, w = int(activations_shape[-2]), int(activations_shape[-1])
        if tokens is not None and h * w != tokens:
            raise ValueError(f"activations_shape {tuple(activations_shape)} has {h * w} cells "
                             f"but the layer has {tokens} tokens")
        return h, w
    if tokens is None or latent_hw is None:
        raise ValueError("token_grid needs activations_shape, or tokens and latent_hw")
    lh, lw = latent_hw
    for level in range(8):
        h, w = downsampled(lh, level), downsampled(lw, level)
        if h * w == tokens:
            return h, w
    # Last resort for unknown downsamplers: the aspect-preserving factorisation.
    scale = math.sqrt(lh * lw / tokens)
    h = max(1, round(lh / scale))
    if tokens % h:
        raise ValueError(f"cannot infer a token grid for {tokens} tokens from latent {latent_hw}")
    return h, tokens // h
