"""SBPC (sampling-based prompt compliance, FG-DM): score N candidate maps, pick one, show them.

The node samples the N maps as one batch on the host and decodes them with the VAE; everything
after that is here: RGB -> class ids (nearest palette colour + mode filter), recall of the
required objects, the pick (`recall.select_best`: recall, then required area, then lower seed),
one mask per required object, and a preview grid of all candidates labelled with their recall.

Candidate i is sampled from seed `candidate_seed(seed, i)` = seed + i (mod 2^64), with its own
noise, so sampling that seed alone with a non-ancestral sampler gives the same map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..preview import _font, _ink, pil_to_tensor
from .classmap import ClassMap
from .maps import DEFAULT_CUTOFF, DEFAULT_MODE_FILTER, decode, encode
from .palettes import Palette
from .recall import DEFAULT_MIN_AREA, Selection, select_best

MAX_CANDIDATES = 64  # one batch of 64 maps at 256 px is ~1.3 GB of activations at fp32
SEED_SPACE = 1 << 64  # ComfyUI seeds are unsigned 64-bit
CHOSEN_COLOUR = (255, 200, 0)


def check_candidates(n: int) -> int:
    """N for SBPC: 1..MAX_CANDIDATES, else a ValueError that says so."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_CANDIDATES:
        raise ValueError(f"N = {n!r} candidates: sample between 1 and {MAX_CANDIDATES} maps "
                         "(10 is the paper's setting)")
    return int(n)


def candidate_seed(seed: int, index: int) -> int:
    """Seed of candidate `index` when the first candidate uses `seed`."""
    return (int(seed) + int(index)) % SEED_SPACE


@dataclass(frozen=True)
class Scored:
    """Every candidate's class map and the SBPC selection among them."""

    class_maps: tuple[np.ndarray, ...]
    seeds: tuple[int, ...]
    selection: Selection


def score_candidates(
    images: Any,
    palette: Palette,
    required: Sequence[int],
    seed: int,
    min_area: float = DEFAULT_MIN_AREA,
    cutoff: float = DEFAULT_CUTOFF,
    mode_filter: int = DEFAULT_MODE_FILTER,
) -> Scored:
    """Decode N RGB maps (N, H, W, 3) in [0, 1] to class ids and pick the best by recall."""
    batch = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else images
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"candidate maps must be (N, H, W, 3), got {tuple(batch.shape)}")
    maps = tuple(decode(img, palette, cutoff=cutoff, mode_filter=mode_filter) for img in batch)
    seeds = tuple(candidate_seed(seed, i) for i in range(len(maps)))
    selection = select_best(maps, required, palette, seeds=seeds, min_area=min_area)
    return Scored(maps, seeds, selection)


def object_masks(class_map: ClassMap, required: Sequence[int]) -> np.ndarray:
    """One mask per required object (in order), True where the map shows that class."""
    canonical = [class_map.palette.canonical_id(int(c)) for c in required]
    if not canonical:
        return np.zeros((0, class_map.height, class_map.width), dtype=bool)
    return np.stack([class_map.ids == c for c in canonical])  # (K, H, W) bool


def candidate_grid(
    class_maps: Sequence[np.ndarray],
    palette: Palette,
    recalls: Sequence[float],
    seeds: Sequence[int],
    chosen: int,
    tile: int = 160,
) -> torch.Tensor:
    """All candidates in a near-square grid, each labelled "seed: recall", the chosen framed."""
    if not class_maps:
        raise ValueError("no candidate maps to show")
    n = len(class_maps)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h0, w0 = class_maps[0].shape
    th, tw = ((tile, max(1, round(tile * w0 / h0))) if h0 >= w0
              else (max(1, round(tile * h0 / w0)), tile))
    gap = 4
    sheet = Image.new("RGB", (cols * (tw + gap) + gap, rows * (th + gap) + gap), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = _font(max(10, tile // 12))
    for i, ids in enumerate(class_maps):
        x, y = gap + (i % cols) * (tw + gap), gap + (i // cols) * (th + gap)
        cell = Image.fromarray(encode(ids, palette), "RGB").resize((tw, th), Image.NEAREST)
        sheet.paste(cell, (x, y))
        text = f"{i}: seed {seeds[i]}  recall {recalls[i]:.2f}"
        colour = CHOSEN_COLOUR if i == chosen else (0, 0, 0)
        box = draw.textbbox((x + 3, y + 2), text, font=font)
        draw.rectangle((x, y, min(box[2] + 3, x + tw - 1), box[3] + 2), fill=colour)
        draw.text((x + 3, y + 2), text, fill=_ink(colour), font=font)
        if i == chosen:
            draw.rectangle((x - 2, y - 2, x + tw + 1, y + th + 1), outline=CHOSEN_COLOUR, width=3)
    return pil_to_tensor(sheet)  # (3, H, W) float
