"""FG-DM nodes: load a condition-factor adapter and make SD-1.5 generate that condition."""

from __future__ import annotations

import logging
import os

import comfy.patcher_extension
import folder_paths

from ..locref_core.fgdm.factor_patch import WRAPPER_KEY, FactorWrapper
from ..locref_core.fgdm.weights import load_factor
from .warn import shows_warnings

log = logging.getLogger(__name__)

FACTOR = "FGDM_FACTOR"


def _register_folder(name: str) -> None:
    path = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(name, path)
    else:
        folder_paths.folder_names_and_paths[name] = ([path], {".safetensors", ".sft"})


_register_folder("fgdm")


class FGDMFactorLoader:
    DESCRIPTION = (
        "Load an FG-DM condition-factor adapter (models/fgdm, .safetensors) that makes SD-1.5 "
        "generate a segmentation, depth, normal or sketch map. Convert the official FG-DM "
        "checkpoint with `python -m locref_core.fgdm.convert_official`."
    )
    CATEGORY = "LocRef/fgdm"
    RETURN_TYPES = (FACTOR,)
    RETURN_NAMES = ("factor",)
    OUTPUT_TOOLTIPS = ("The factor adapter and its config (kind, palette).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = [f for f in folder_paths.get_filename_list("fgdm")
                 if f.endswith((".safetensors", ".sft"))]
        return {"required": {"factor_name": (files, {
            "tooltip": "A factor file from models/fgdm."})}}

    @shows_warnings
    def load(self, factor_name):
        path = folder_paths.get_full_path("fgdm", factor_name)
        if path is None:
            raise ValueError(f"factor file {factor_name!r} is not in models/fgdm; put it there and "
                             "refresh the node list")
        adapter = load_factor(path)
        log.info("FG-DM: loaded %s (%s)", factor_name, adapter.cfg.to_json())
        return (adapter,)


class FGDMApplyFactor:
    DESCRIPTION = (
        "Make the model generate the factor's condition (e.g. a segmentation map painted in the "
        "factor's palette) instead of a photo: the adapter sees the noisy latent and the timestep "
        "at every step, for the cond and uncond rows, and its features are added to the UNet "
        "encoder. A ControlNet on the same model keeps working. Decode the result with the VAE."
    )
    CATEGORY = "LocRef/fgdm"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched copy of the model; the input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD-1.5 model."}),
                "factor": (FACTOR, {"tooltip": "From FGDM Factor Loader."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                       "tooltip": "Scale of the adapter features; 0 = unpatched."}),
            },
            "optional": {
                "earlier_factors": ("LATENT", {
                    "tooltip": "For chained factors (e.g. seg -> pose): the latents of the maps "
                               "generated earlier, concatenated to x_t as the adapter expects."}),
            },
        }

    @shows_warnings
    def apply(self, model, factor, strength, earlier_factors=None):
        extra = None if earlier_factors is None else earlier_factors["samples"]
        wrapper = FactorWrapper(factor, strength, extra)
        m = model.clone()
        comfy.patcher_extension.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper,
            m.model_options, is_model_options=True)
        return (m,)


NODE_CLASS_MAPPINGS = {"FGDMFactorLoader": FGDMFactorLoader, "FGDMApplyFactor": FGDMApplyFactor}
NODE_DISPLAY_NAME_MAPPINGS = {"FGDMFactorLoader": "FGDM Factor Loader",
                              "FGDMApplyFactor": "FGDM Apply Factor"}
