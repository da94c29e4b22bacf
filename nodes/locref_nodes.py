"""LocRef generation nodes: load an adapter, apply LocRef to a model."""

from __future__ import annotations

import functools
import logging
import os

import torch

import comfy.model_management
import folder_paths

from ..locref_core.composite import composite_image, square_reference
from ..locref_core.layout import Layout
from ..locref_core.patch import LocRefState, PatchSettings, install
from ..locref_core.weights import describe, load_adapter
from .convert import chw_to_image
from .validate import first, in_range
from .warn import executing, shows_warnings, warn

log = logging.getLogger(__name__)

ADAPTER = "LOCREF_ADAPTER"
IPADAPTER_PREFIX = "ipadapter/"
WEIGHT_EXTENSIONS = (".safetensors", ".sft")
REGION_TEXT_DEFAULT = 0.8  # mostly the box's own text inside it, a little of the global prompt


def _register_folder(name: str) -> None:
    path = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(name, path)
    else:
        folder_paths.folder_names_and_paths[name] = ([path], set(WEIGHT_EXTENSIONS))


_register_folder("locref")
_register_folder("ipadapter")


def adapter_files() -> list[str]:
    """LocRef files, then IP-Adapter files (prefixed) that users already have."""
    own = [f for f in folder_paths.get_filename_list("locref") if f.endswith(WEIGHT_EXTENSIONS)]
    ip = [IPADAPTER_PREFIX + f for f in folder_paths.get_filename_list("ipadapter")
          if f.endswith(WEIGHT_EXTENSIONS) and "sd15" in f.lower()]
    return own + ip


class LocRefAdapterLoader:
    DESCRIPTION = (
        "Load a LocRef adapter (models/locref) or an IP-Adapter SD-1.5 file (models/ipadapter, "
        "e.g. ip-adapter_sd15.safetensors), which works as a stand-in until you train LocRef "
        "weights. Only .safetensors files are loaded."
    )
    CATEGORY = "LocRef/loaders"
    RETURN_TYPES = (ADAPTER,)
    RETURN_NAMES = ("adapter",)
    OUTPUT_TOOLTIPS = ("The Appearance-net and per-layer reference projections.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"adapter_name": (adapter_files(), {
            "tooltip": "Files from models/locref, and SD-1.5 IP-Adapter files from "
                       "models/ipadapter (listed as ipadapter/...)."})}}

    @shows_warnings
    def load(self, adapter_name):
        if adapter_name.startswith(IPADAPTER_PREFIX) and not folder_paths.get_full_path(
                "locref", adapter_name):
            path = folder_paths.get_full_path("ipadapter", adapter_name[len(IPADAPTER_PREFIX):])
        else:
            path = folder_paths.get_full_path("locref", adapter_name)
        if path is None:
            raise ValueError(f"adapter file {adapter_name!r} was not found in models/locref or "
                             "models/ipadapter; put it there and refresh the node list")
        adapter = load_adapter(path).eval()
        log.info("LocRef: loaded %s: %s", adapter_name, describe(adapter))
        return (adapter,)


@torch.no_grad()  # the server runs nodes in inference mode; scripts that call a node may not
def encode(clip_vision, images: torch.Tensor, crop: bool) -> torch.Tensor:
    """CLIP image embeddings (B, E) of (B, 3, H, W) images in [0, 1]."""
    return clip_vision.encode_image(chw_to_image(images), crop=crop)["image_embeds"].float().cpu()


def box_name(index: int, label: str) -> str:
    text = label.strip()
    return f"box {index} ({text[:40] + '...' if len(text) > 40 else text!r})" if text \
        else f"box {index}"


def boxes_have(names: list[str]) -> str:
    """'box 0 ('a') has' / 'box 0 ('a'), box 1 ('b') have': error messages that read right."""
    return ", ".join(names) + (" has" if len(names) == 1 else " have")


@torch.no_grad()
def encode_box_texts(clip, layout: Layout) -> list[torch.Tensor | None]:
    """Each box's label as the host's CLIP encodes a prompt: (77 * windows, 768), or None for an
    empty label. Longer prompts use the host's own 77-token windows (logged, box named)."""
    out: list[torch.Tensor | None] = []
    seen: dict[str, torch.Tensor] = {}
    for i, box in enumerate(layout.boxes):
        text = box.label.strip()
        if not text:
            out.append(None)
            continue
        if text not in seen:
            cond = clip.encode_from_tokens(clip.tokenize(text))  # (1, 77 * windows, C)
            seen[text] = cond[0].float().cpu()
            windows = max(1, seen[text].shape[0] // 77)
            if windows > 1:
                warn("LocRef Apply: the text of %s is longer than one 77-token window; it is "
                     "encoded as %d windows (the host's long-prompt handling), which weakens "
                     "each word. Shorten it for a sharper region.", box_name(i, box.label), windows)
        out.append(seen[text])
    return out


class LocRefApply:
    DESCRIPTION = (
        "Patch the model so that each box decides what appears inside it, at all 16 SD-1.5 "
        "cross-attention layers. A box's text (its label on the canvas) steers its region with "
        "nothing but the checkpoint's CLIP (training-free regional prompts); a box's reference "
        "image decides the look (LocRef-Diffusion: instance-region cross-attention plus a "
        "composite-image path), which needs an adapter and the CLIP vision model it was trained "
        "with (ViT-H for ip-adapter_sd15). Text and reference on one box both act."
    )
    CATEGORY = "LocRef/generation"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched copy of the model; the input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        pct = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD-1.5 model."}),
            "layout": ("LOCREF_LAYOUT", {"tooltip": "Boxes from LocRef Boxes, with labels (text "
                                                    "regions) and/or references (LocRef "
                                                    "Reference)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                   "tooltip": "How much the references change the model; 0 = "
                                              "references off, 1 = the paper."}),
            "text_in_boxes": ("FLOAT", {"default": 0.0, **pct,
                                        "tooltip": "Global prompt kept inside reference boxes: "
                                                   "0 = the paper (references only), 1 = text "
                                                   "and references (IP-Adapter-like)."}),
            "start_percent": ("FLOAT", {"default": 0.0, **pct,
                                        "tooltip": "Start applying at this fraction of sampling."}),
            "end_percent": ("FLOAT", {"default": 1.0, **pct,
                                      "tooltip": "Stop applying at this fraction of sampling."}),
        }, "optional": {
            "adapter": (ADAPTER, {"tooltip": "From LocRef Adapter Loader; needed when a box has "
                                             "a reference."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "Encodes the references (ViT-H/14 for "
                                                       "IP-Adapter SD-1.5 files); needed when a "
                                                       "box has a reference."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP (the one your CLIPTextEncode "
                                         "uses): encodes each box's label for its region."}),
            "region_text": ("FLOAT", {"default": REGION_TEXT_DEFAULT, **pct,
                                      "tooltip": "How much each box's own text replaces the "
                                                 "global prompt inside the box: 0 = off, 1 = "
                                                 "only the box's text there. Outside the boxes "
                                                 "and in the negative prompt nothing changes."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent=0.0, end_percent=1.0):
        return first(in_range(start_percent, 0.0, 1.0, "start_percent"),
                     in_range(end_percent, 0.0, 1.0, "end_percent"),
                     percent_order(start_percent, end_percent))

    @shows_warnings
    def apply(self, model, adapter=None, clip_vision=None, layout=None, strength=1.0,
              text_in_boxes=0.0, start_percent=0.0, end_percent=1.0, clip=None,
              region_text=REGION_TEXT_DEFAULT):
        # Positional order as before adapter and clip_vision became optional (scripts call it).
        if not isinstance(layout, Layout):
            raise ValueError("layout input must come from a LocRef Boxes / LocRef Reference node")
        order = percent_order(start_percent, end_percent)
        if order:
            raise ValueError(order)
        with_refs = [b for b in layout.boxes if b.reference is not None] if strength > 0 else []
        if with_refs:
            check_reference_inputs(layout, adapter, clip_vision)
        texts = self.box_texts(layout, clip, region_text,
                               any(b.reference is not None for b in layout.boxes))
        m = model.clone()
        if not with_refs and texts is None:
            warn("LocRef Apply: %s; the model is returned unpatched",
                 "strength is 0 and no box has text (raise strength to use the references)"
                 if strength == 0 and any(b.reference is not None for b in layout.boxes) else
                 "no box has a reference or a label (attach a reference with LocRef "
                 "Reference, or type a label in a box and connect clip)")
            return (m,)
        if strength == 0 and any(b.reference is not None for b in layout.boxes):
            warn("LocRef Apply: strength is 0, so the references are off; only the box texts "
                 "apply. Raise strength to use the references.")
        state = self.build_state(m, adapter, clip_vision, layout, with_refs, strength,
                                 text_in_boxes, start_percent, end_percent, texts, region_text)
        state.warn = functools.partial(warn, node_id=executing()[1])  # warnings while sampling
        install(m, state)
        return (m,)

    @staticmethod
    def box_texts(layout, clip, region_text, has_refs) -> list | None:
        """Per box its text embedding or None; None overall when no text region applies."""
        if region_text <= 0 or not any(b.label.strip() for b in layout.boxes):
            return None
        if clip is None:
            labelled = boxes_have([box_name(i, b.label) for i, b in enumerate(layout.boxes)
                                   if b.label.strip()])
            if not has_refs:
                raise ValueError(
                    f"LocRef Apply: {labelled} text, but no CLIP is connected to encode it. "
                    "Connect the checkpoint's CLIP to the clip input, or set region_text to 0.")
            warn("LocRef Apply: %s text but no CLIP is connected; the references apply, the box "
                 "texts do not (connect the checkpoint's CLIP to clip, or set region_text to 0 "
                 "to silence this)", labelled)
            return None
        return encode_box_texts(clip, layout)

    @staticmethod
    def build_state(m, adapter, clip_vision, layout, with_refs, strength, text_in_boxes,
                    start_percent, end_percent, texts=None,
                    region_text=REGION_TEXT_DEFAULT) -> LocRefState:
        ri_tokens = ci_tokens = None
        if with_refs:
            ri_tokens, ci_tokens = reference_tokens(adapter, clip_vision, layout, with_refs)
        sampling = m.get_model_object("model_sampling")
        settings = PatchSettings(strength, text_in_boxes,
                                 float(sampling.percent_to_sigma(start_percent)),
                                 float(sampling.percent_to_sigma(end_percent)), region_text)
        comfy.model_management.throw_exception_if_processing_interrupted()
        return LocRefState(adapter if with_refs else None, layout, ri_tokens, ci_tokens,
                           settings, m.get_model_object("diffusion_model"), texts)


def percent_order(start: float | None, end: float | None) -> str | None:
    """The error for a start after the end (None when fine or not known yet)."""
    if start is not None and end is not None and start > end:
        return f"start_percent {start} is after end_percent {end}; swap them"
    return None


def check_reference_inputs(layout: Layout, adapter, clip_vision) -> None:
    """A box has a reference: the adapter and CLIP vision inputs must be connected."""
    missing = [name for name, value in (("adapter", adapter), ("clip_vision", clip_vision))
               if value is None]
    if missing:
        boxes = boxes_have([box_name(i, b.label) for i, b in enumerate(layout.boxes)
                            if b.reference is not None])
        raise ValueError(
            f"LocRef Apply: {boxes} a reference image, so {' and '.join(missing)} must be "
            "connected (LocRef Adapter Loader for adapter, CLIP Vision Loader for clip_vision). "
            "Connect them, or remove the LocRef Reference nodes to use box text only.")


def reference_tokens(adapter, clip_vision, layout, with_refs) -> tuple[torch.Tensor, ...]:
    """(RI tokens (N, T, 768), CI tokens (T, 768)) of the boxes with references."""
    refs = [square_reference(b.reference.image, b.reference.mask) for b in with_refs]
    ri_embeds = torch.cat([encode(clip_vision, r[None], crop=True) for r in refs])
    ci_embeds = encode(clip_vision, composite_image(layout)[None], crop=False)
    if ri_embeds.shape[-1] != adapter.cfg.embed_dim:
        raise ValueError(
            f"the CLIP vision model gives {ri_embeds.shape[-1]}-wide image embeddings but the "
            f"adapter expects {adapter.cfg.embed_dim}; load the CLIP vision model the adapter "
            "was trained with (ViT-H/14, e.g. CLIP-ViT-H-14-laion2B-s32B-b79K, for "
            "ip-adapter_sd15)")
    with torch.no_grad():
        ri_tokens = adapter.project(ri_embeds)  # (N, T, 768)
        ci_tokens = adapter.project(ci_embeds)[0]  # (T, 768)
    return ri_tokens, ci_tokens


NODE_CLASS_MAPPINGS = {"LocRefAdapterLoader": LocRefAdapterLoader, "LocRefApply": LocRefApply}
NODE_DISPLAY_NAME_MAPPINGS = {"LocRefAdapterLoader": "LocRef Adapter Loader",
                              "LocRefApply": "LocRef Apply"}
