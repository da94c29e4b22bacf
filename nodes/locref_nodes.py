"""LocRef generation nodes: load an adapter, apply LocRef to a model."""

from __future__ import annotations

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

log = logging.getLogger(__name__)

ADAPTER = "LOCREF_ADAPTER"
IPADAPTER_PREFIX = "ipadapter/"
WEIGHT_EXTENSIONS = (".safetensors", ".sft")


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


class LocRefApply:
    DESCRIPTION = (
        "Patch the model so that each box's reference decides what appears inside that box "
        "(LocRef-Diffusion): instance-region cross-attention plus a composite-image path, at all "
        "16 SD-1.5 cross-attention layers. Needs a layout with references, an adapter and the "
        "CLIP vision model the adapter was trained with (ViT-H for ip-adapter_sd15)."
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
            "adapter": (ADAPTER, {"tooltip": "From LocRef Adapter Loader."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "Encodes the references (ViT-H/14 for "
                                                       "IP-Adapter SD-1.5 files)."}),
            "layout": ("LOCREF_LAYOUT", {"tooltip": "Boxes with references (LocRef Reference)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                   "tooltip": "How much of the LocRef change to apply; 0 = the "
                                              "unpatched model, 1 = the paper."}),
            "text_in_boxes": ("FLOAT", {"default": 0.0, **pct,
                                        "tooltip": "Text attention kept inside boxes: 0 = the paper "
                                                   "(references only), 1 = text and references "
                                                   "(IP-Adapter-like)."}),
            "start_percent": ("FLOAT", {"default": 0.0, **pct,
                                        "tooltip": "Start applying at this fraction of sampling."}),
            "end_percent": ("FLOAT", {"default": 1.0, **pct,
                                      "tooltip": "Stop applying at this fraction of sampling."}),
        }}

    def apply(self, model, adapter, clip_vision, layout, strength, text_in_boxes,
              start_percent, end_percent):
        if not isinstance(layout, Layout):
            raise ValueError("layout input must come from a LocRef Boxes / LocRef Reference node")
        if start_percent > end_percent:
            raise ValueError(f"start_percent {start_percent} is after end_percent {end_percent}; "
                             "swap them")
        with_refs = [b for b in layout.boxes if b.reference is not None]
        m = model.clone()
        if not with_refs or strength == 0:
            log.warning("LocRef Apply: %s; the model is returned unpatched",
                        "strength is 0" if strength == 0 else
                        "no box has a reference (attach one with LocRef Reference)")
            return (m,)
        state = self.build_state(m, adapter, clip_vision, layout, with_refs,
                                 strength, text_in_boxes, start_percent, end_percent)
        install(m, state)
        return (m,)

    @staticmethod
    def build_state(m, adapter, clip_vision, layout, with_refs, strength, text_in_boxes,
                    start_percent, end_percent) -> LocRefState:
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
        sampling = m.get_model_object("model_sampling")
        settings = PatchSettings(strength, text_in_boxes,
                                 float(sampling.percent_to_sigma(start_percent)),
                                 float(sampling.percent_to_sigma(end_percent)))
        comfy.model_management.throw_exception_if_processing_interrupted()
        return LocRefState(adapter, layout, ri_tokens, ci_tokens, settings,
                           m.get_model_object("diffusion_model"))


NODE_CLASS_MAPPINGS = {"LocRefAdapterLoader": LocRefAdapterLoader, "LocRefApply": LocRefApply}
NODE_DISPLAY_NAME_MAPPINGS = {"LocRefAdapterLoader": "LocRef Adapter Loader",
                              "LocRefApply": "LocRef Apply"}
