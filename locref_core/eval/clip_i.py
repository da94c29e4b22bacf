"""CLIP-I (LocRef-Diffusion's appearance metric): cosine similarity of CLIP image embeddings
between each box's crop of the generated image and that box's reference image.

The caller supplies `encode`: a callable mapping a (B, 3, S, S) float32 CPU tensor in [0, 1] to
(B, D) embeddings (a tensor or an array). It does its own CLIP normalisation (mean/std) and moves
the batch to its device; nothing is downloaded here. Crops and references are both resized
(stretched, bilinear with antialiasing) to `size` x `size` (224, CLIP's input) so that one batch
holds them. References are used as given (a reference mask is not applied).

Wrapping a CLIP model, in a file of your own (this package imports neither library):

    # my_clip.py -- open_clip
    import open_clip, torch
    def make_encoder():
        model, _, _ = open_clip.create_model_and_transforms(
            "ViT-H-14", pretrained="laion2b_s32b_b79k")
        model = model.eval().cuda()
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1).cuda()
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1).cuda()
        return lambda x: model.encode_image((x.cuda() - mean) / std)

    # my_host_clip.py -- ComfyUI's CLIP vision model (run with the host root on sys.path)
    import comfy.clip_vision
    def make_encoder():
        cv = comfy.clip_vision.load("models/clip_vision/CLIP-ViT-H-14.safetensors")
        return lambda x: cv.encode_image(x.permute(0, 2, 3, 1)).image_embeds  # IMAGE is BHWC

then `python -m locref_core.eval clip-i --layouts DIR --encoder my_clip.py:make_encoder`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..composite import resize_image
from ..layout import Box, Layout, pixel_span

Encoder = Callable[[torch.Tensor], Any]  # (B, 3, S, S) float [0, 1] -> (B, D)
CLIP_SIZE = 224
BATCH = 32


def crop_boxes(image: torch.Tensor, boxes: Sequence[Box] | Sequence[Sequence[float]] | np.ndarray
               ) -> list[torch.Tensor]:
    """Crops (3, h, w) of a (3, H, W) image at normalised xyxy boxes (Box or 4 numbers each)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) tensor, got {shape}")
    _, h, w = image.shape
    crops = []
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = (box.x0, box.y0, box.x1, box.y1) if isinstance(box, Box) else box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"box {i} ({x0}, {y0}, {x1}, {y1}) must be normalised xyxy in [0, 1] "
                             "with x0 < x1 and y0 < y1; divide pixel boxes by the image size")
        px0, px1 = pixel_span(float(x0), float(x1), w)  # same cells as the layout's masks
        py0, py1 = pixel_span(float(y0), float(y1), h)
        crops.append(image[:, py0:py1, px0:px1])  # (3, h, w)
    return crops


def _embed(images: Sequence[torch.Tensor], encode: Encoder, size: int) -> torch.Tensor:
    """Resize to size x size, encode in batches, L2-normalise: (N, D) float32."""
    out = []
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        batch = torch.stack([resize_image(im.float(), size, size) for im in chunk])  # (B, 3, S, S)
        with torch.no_grad():
            emb = torch.as_tensor(encode(batch)).detach().float().cpu()  # (B, D)
        if emb.ndim != 2 or emb.shape[0] != batch.shape[0]:
            raise ValueError(f"encode must return (B, D) embeddings for a batch of "
                             f"{batch.shape[0]}, got shape {tuple(emb.shape)}; return e.g. "
                             "CLIP's image_embeds")
        out.append(emb)
    return F.normalize(torch.cat(out), dim=-1)  # (N, D)


def clip_i_scores(crops: Sequence[torch.Tensor], references: Sequence[torch.Tensor],
                  encode: Encoder, size: int = CLIP_SIZE) -> np.ndarray:
    """Cosine similarity of each crop with its reference: (N,) float64."""
    if len(crops) != len(references):
        raise ValueError(f"{len(crops)} crops but {len(references)} references; give one each")
    if len(crops) == 0:
        return np.zeros(0)
    a, b = _embed(list(crops), encode, size), _embed(list(references), encode, size)
    return (a * b).sum(-1).double().numpy()  # (N,)


def clip_i(crops: Sequence[torch.Tensor], references: Sequence[torch.Tensor], encode: Encoder,
           size: int = CLIP_SIZE) -> float:
    """Mean cosine similarity between each crop and its reference (CLIP-I)."""
    if len(crops) == 0:
        raise ValueError("no crop/reference pairs to score; give at least one box with a reference")
    return float(clip_i_scores(crops, references, encode, size).mean())


def layout_pairs(
    image: torch.Tensor, layout: Layout
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Crops, references and box indices of the layout's boxes that carry a reference."""
    index = [i for i, b in enumerate(layout.boxes) if b.reference is not None]
    crops = crop_boxes(image, [layout.boxes[i] for i in index])
    refs = [layout.boxes[i].reference.image for i in index]  # type: ignore[union-attr]
    return crops, refs, index


def clip_i_for_layout(image: torch.Tensor, layout: Layout, encode: Encoder,
                      size: int = CLIP_SIZE) -> float:
    """CLIP-I of one generated (3, H, W) image: boxes with a reference, crop vs reference."""
    crops, refs, _ = layout_pairs(image, layout)
    if not crops:
        raise ValueError("no box of the layout has a reference image; attach references first")
    return clip_i(crops, refs, encode, size)
