"""Class maps <-> palette RGB, nearest-neighbour resizing, palette conversion, object instances.

A class map is an (H, W) int64 numpy array of palette ids (see `palettes`). Inputs may be numpy
arrays or torch tensors (CPU or not); outputs are numpy. RGB images are (H, W, 3): uint8 in
0..255, or floats in [0, 1] (ComfyUI's IMAGE convention), which are scaled by 255.

Decoding a generated map, in three steps:

1. Nearest colour: every pixel takes the id of the nearest palette colour (Euclidean RGB
   distance, 0..255 units). Ties, e.g. ADE ids 6 and 48 which share one colour, go to the first
   id in palette order, so decoding is deterministic. Pixels farther than `cutoff` from every
   palette colour become void.
2. Smoothing (radius r, default 3): VAE noise of sigma = 8/255 confuses ADE colours that are
   only 7..20 apart (ceiling/earth, grass/bottle, ...) on a quarter of the pixels, so each pixel
   is decoded again from the mean colour of the pixels in its (2r+1)^2 window whose step-1 class
   is *compatible* with its own (palette colours at most `SMOOTH_COMPAT` = 40 apart; void only
   with void). Edges between distinct colours are kept; the mean only averages noise. A pixel
   whose colour is exactly its step-1 class colour (within 0.5) keeps it, and void stays void,
   so a clean map decodes exactly whatever its neighbours.
3. A k x k majority (mode) filter removes VAE specks: a pixel whose own class has fewer than k
   votes in its window (an isolated pixel or pair for k = 3) takes the window's most voted
   class if that has strictly more votes (edges replicated). Region corners (4 of 9 votes) and
   1-pixel lines (3 of 9, except their end pixels) are therefore kept.

So decode(encode(m)) == m for every map with mode_filter=0, and with the filter for every map
without specks (each pixel has k pixels of its class in its window: regions of 2 x 2 or more),
up to colour twins (ADE 48 reads back as 6).

Instances are connected components of one class, 8-connected by default (diagonal neighbours
join; VAE-decoded edges are ragged), or 4-connected on request. They are found by labelling
horizontal runs and merging overlapping runs of adjacent rows (vectorised, no scipy).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch

from .palettes import Palette, correspondence_table, decode_candidates

log = logging.getLogger(__name__)

DEFAULT_CUTOFF = 60.0  # RGB distance (0..255 units) beyond which a pixel is void
DEFAULT_MODE_FILTER = 3  # window of the majority filter; 0 or 1 turns it off
DEFAULT_SMOOTH = 3  # radius of the colour smoothing window (7 x 7); 0 turns it off
SMOOTH_COMPAT = 40.0  # classes whose colours are at most this far apart are averaged together
_CHUNK = 1 << 16  # pixels per distance block: a (chunk, K) float32 matrix of <= 50 MB


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a numpy array or torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_class_map(class_map: Any, palette: Palette | None = None) -> np.ndarray:
    """Validate and convert to an (H, W) int64 class map; ids must be in the palette if given."""
    arr = as_numpy(class_map)
    if arr.ndim != 2:
        raise ValueError(f"a class map must be (H, W), got shape {tuple(arr.shape)}")
    fractional = arr.size > 0 and not np.issubdtype(arr.dtype, np.integer)
    if fractional and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError("a class map must hold integer class ids, got fractional values")
    arr = arr.astype(np.int64, copy=False)
    if palette is not None and arr.size and (arr.min() < 0 or arr.max() >= palette.num_ids):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise ValueError(
            f"class id {bad} is not in palette {palette.name}; ids run 0..{palette.num_ids - 1}"
        )
    return arr  # (H, W) int64


def as_rgb255(rgb: Any) -> np.ndarray:
    """An (H, W, 3) image as float32 in 0..255 (floats in [0, 1] are scaled by 255)."""
    arr = as_numpy(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"an RGB map must be (H, W, 3), got shape {tuple(arr.shape)}")
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32) * 255.0, 0.0, 255.0)  # (H, W, 3) float32
    return arr.astype(np.float32)  # (H, W, 3) float32


def encode(class_map: Any, palette: Palette) -> np.ndarray:
    """Paint a class map with the palette's colours (void in the void colour)."""
    ids = as_class_map(class_map, palette)
    return palette.color_table()[ids]  # (H, W, 3) uint8


def decode(
    rgb: Any,
    palette: Palette,
    cutoff: float = DEFAULT_CUTOFF,
    mode_filter: int = DEFAULT_MODE_FILTER,
    smooth: int = DEFAULT_SMOOTH,
) -> np.ndarray:
    """Class ids of an RGB map: nearest palette colour, noise smoothing, majority filter."""
    if not cutoff > 0:
        raise ValueError(f"cutoff must be a positive RGB distance (e.g. 60), got {cutoff!r}")
    if not 0 <= smooth <= 8:
        raise ValueError(f"smooth is a window radius in 0..8 (0 = off, default 3), got {smooth!r}")
    img = as_rgb255(rgb)
    h, w, _ = img.shape
    ids = nearest_ids(img.reshape(-1, 3), palette, cutoff).reshape(h, w)
    if smooth > 0:
        ids = smooth_ids(img, ids, palette, cutoff, smooth)
    return majority_filter(ids, mode_filter) if mode_filter > 1 else ids  # (H, W) int64


@functools.lru_cache(maxsize=8)
def _compatible(palette: Palette) -> np.ndarray:
    table = palette.color_table().astype(np.float32)
    dist = np.sqrt(((table[:, None] - table[None]) ** 2).sum(-1))  # (K, K)
    ok = dist <= SMOOTH_COMPAT
    ok[palette.void_id, :] = False
    ok[:, palette.void_id] = False
    ok[palette.void_id, palette.void_id] = True
    flat = ok.astype(np.float32).ravel()
    flat.flags.writeable = False
    return flat  # (K * K,) float32: weight of a class-j neighbour for a class-i pixel at i*K + j


def smooth_ids(
    img: np.ndarray, ids: np.ndarray, palette: Palette, cutoff: float, radius: int
) -> np.ndarray:
    """Re-decode each pixel from the mean colour of its window's colour-compatible pixels."""
    h, w, _ = img.shape  # img: (H, W, 3) float32 in 0..255; ids: (H, W) int64 nearest ids
    weights = _compatible(palette)
    ones = np.ones((h, w, 1), dtype=np.float32)
    padded = np.pad(
        np.concatenate([img, ones], axis=-1), ((radius,) * 2, (radius,) * 2, (0, 0)), mode="edge"
    )  # (H + 2r, W + 2r, 4): colour and a count channel
    pad_ids = np.pad(ids, radius, mode="edge")
    row = ids * palette.num_ids  # (H, W) int64
    total = np.zeros((h, w, 4), dtype=np.float32)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            weight = weights[row + pad_ids[dy : dy + h, dx : dx + w]]  # (H, W)
            total += padded[dy : dy + h, dx : dx + w] * weight[..., None]
    mean = total[..., :3] / total[..., 3:]  # count >= 1: a pixel is compatible with itself
    again = nearest_ids(mean.reshape(-1, 3), palette, cutoff).reshape(h, w)
    exact = np.abs(img - palette.color_table()[ids]).max(axis=-1) < 0.5
    keep = exact | (ids == palette.void_id)
    return np.where(keep, ids, again)  # (H, W) int64


def nearest_ids(pixels: np.ndarray, palette: Palette, cutoff: float) -> np.ndarray:
    """Id of the nearest candidate colour per pixel, void beyond `cutoff`; first id wins ties."""
    colors_np, ids_np = decode_candidates(palette)
    colors, ids = torch.from_numpy(colors_np), torch.from_numpy(ids_np)  # (K, 3), (K,)
    c2 = (colors**2).sum(dim=1)
    flat = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    out = torch.empty(len(flat), dtype=torch.int64)
    for start in range(0, len(flat), _CHUNK):
        block = flat[start : start + _CHUNK]
        partial = torch.addmm(c2, block, colors.T, alpha=-2.0)  # |c|^2 - 2 x.c, (n, K)
        low, best = partial.min(dim=1)  # torch returns the first index among equal minima
        near = low + (block**2).sum(dim=1) <= cutoff * cutoff
        out[start : start + len(block)] = torch.where(near, ids[best], palette.void_id)
    return out.numpy()  # (N,) int64


def majority_filter(class_map: Any, size: int = 3) -> np.ndarray:
    """k x k mode filter for specks: a pixel whose class has fewer than k votes in its window
    takes the window's majority class if that has strictly more votes (corners and lines stay)."""
    if size not in (3, 5):
        raise ValueError(f"mode filter size must be 3 or 5 (or 0/1 for none), got {size!r}")
    ids = as_class_map(class_map)
    h, w = ids.shape
    padded = np.pad(ids, size // 2, mode="edge")
    shifts = np.stack(
        [padded[dy : dy + h, dx : dx + w] for dy in range(size) for dx in range(size)]
    )  # (size * size, H, W)
    counts = np.zeros(shifts.shape, dtype=np.int8)  # votes for the class in each window slot
    for j in range(len(shifts)):
        counts[j] = (shifts == shifts[j]).sum(axis=0, dtype=np.int8)
    best = np.argmax(counts, axis=0)[None]
    best_ids = np.take_along_axis(shifts, best, axis=0)[0]
    own = counts[(size * size) // 2]
    speck = (own < size) & (counts.max(axis=0) > own)
    return np.where(speck, best_ids, ids)  # (H, W) int64


def resize_nearest(class_map: Any, height: int, width: int) -> np.ndarray:
    """Resize a class map by nearest neighbour (pixel-centre sampling); never blends ids."""
    ids = as_class_map(class_map)
    if height < 1 or width < 1:
        raise ValueError(f"target size must be at least 1x1, got {height}x{width}")
    h, w = ids.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return ids[rows[:, None], cols[None, :]]  # (height, width) int64


def convert_map(
    class_map: Any, src: Palette, dst: Palette, fallback: int | None = None
) -> np.ndarray:
    """Re-express a class map in another palette via the name correspondence table."""
    ids = as_class_map(class_map, src)
    return correspondence_table(src, dst, fallback)[ids]  # (H, W) int64


def class_fractions(class_map: Any, num_ids: int) -> np.ndarray:
    """Fraction of the image covered by each id 0..num_ids-1."""
    ids = as_class_map(class_map)
    counts = np.bincount(ids.ravel(), minlength=num_ids)[:num_ids]
    return counts / max(ids.size, 1)  # (num_ids,) float64


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True in raster order: row, first column, end column (exclusive)."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    return rows, starts, ends  # (R,) each, int64


def _run_edges(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int, adj: int):
    """Pairs (a, b) of runs in consecutive rows that touch (adj=1 adds diagonal contact)."""
    k = width + 2
    start_key, end_key = rows * k + starts, rows * k + ends
    below = np.nonzero(rows > 0)[0]
    prev = (rows[below] - 1) * k
    lo = np.searchsorted(end_key, prev + starts[below] - adj, side="right")
    hi = np.searchsorted(start_key, prev + ends[below] + adj, side="left")
    count = np.maximum(hi - lo, 0)
    b = np.repeat(below, count)
    offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return np.repeat(lo, count) + offsets, b  # (E,), (E,)


def _merge(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (smallest member) of each of n nodes joined by edges a-b (min-label hooking)."""
    label = np.arange(n)
    while True:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        while True:  # pointer jumping to the roots
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return label  # (n,) int64
        label = new


def label_components(mask: Any, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask: labels 1..n in raster order of first pixel."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    m = as_numpy(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {tuple(m.shape)}")
    labels = np.zeros(m.shape, dtype=np.int32)
    rows, starts, ends = _runs(m)
    if len(rows) == 0:
        return labels, 0
    a, b = _run_edges(rows, starts, ends, m.shape[1], 1 if connectivity == 8 else 0)
    roots = _merge(len(rows), a, b)
    _, comp = np.unique(roots, return_inverse=True)  # roots are first runs: raster order
    labels.flat[np.flatnonzero(m)] = np.repeat(comp.astype(np.int32) + 1, ends - starts)
    return labels, int(comp.max()) + 1  # (H, W) int32, n


def instances(
    class_map: Any, class_id: int, connectivity: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Instances of a class, labelled 1..n by area descending (ties: raster order of 1st pixel)."""
    ids = as_class_map(class_map)
    raster, n = label_components(ids == class_id, connectivity)
    areas = np.bincount(raster.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-areas, kind="stable")  # stable keeps raster order among equal areas
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    return relabel[raster], areas[order]  # (H, W) int32 (0 = not this class), (n,) int64
