"""FG-DM map nodes: SBPC best-of-N selection, decoding an RGB map, palette conversion."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import numpy as np
import torch

from ..locref_core.fgdm.classmap import ClassMap
from ..locref_core.fgdm.maps import DEFAULT_CUTOFF, convert_map, decode, resize_nearest
from ..locref_core.fgdm.palettes import get_palette
from ..locref_core.fgdm.recall import (
    DEFAULT_MIN_AREA,
    Selection,
    parse_object_list,
    required_classes,
    resolve_class,
)
from ..locref_core.fgdm.sbpc import (
    MAX_CANDIDATES,
    candidate_grid,
    candidate_seed,
    check_candidates,
    object_masks,
    score_candidates,
)
from ..locref_core.fgdm.factor_patch import WRAPPER_KEY
from .convert import chw_to_image
from .ui import temp_images
from .validate import PALETTE_NAMES, first, in_list, in_some_palette, refusal
from .warn import shows_warnings, warn

log = logging.getLogger(__name__)

CLASS_MAP = "FGDM_CLASS_MAP"
PALETTES = list(PALETTE_NAMES)
PALETTE_TIP = ("coco183: COCO-stuff 183 classes in the VOC colour map (what FG-DM generates); "
               "ade150: ADE20K 150 classes (what the seg ControlNet control_v11p_sd15_seg "
               "expects).")
# Samplers that draw fresh noise during sampling: a candidate's map then depends on the batch.
STOCHASTIC_SAMPLERS = ("ancestral", "sde", "lcm", "ddpm", "seeds_", "restart")
MIN_AREA_HINT = 0.1  # above this, an all-zero recall is blamed on min_area in the warning


def factor_palette(model) -> str | None:
    """The palette of the FG-DM factor applied to `model` (FGDM Apply Factor), if any."""
    wrappers = comfy.patcher_extension.get_wrappers_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, model.model_options,
        is_model_options=True)
    for wrapper in wrappers:
        cfg = wrapper.adapter.cfg
        if cfg.kind == "seg":
            return cfg.palette
    return None


def map_outputs(class_map: ClassMap, height: int, width: int) -> tuple[ClassMap, torch.Tensor]:
    """The map resized by nearest neighbour, and painted as an IMAGE (1, H, W, 3)."""
    resized = ClassMap(resize_nearest(class_map.ids, height, width), class_map.palette)
    image = torch.from_numpy(resized.rgb().astype(np.float32) / 255.0)[None]
    return resized, image


def _size(default: int, tip: str) -> tuple[str, dict]:
    return ("INT", {"default": default, "min": 64, "max": 2048, "step": 8, "tooltip": tip})


class FGDMSBPCSelect:
    DESCRIPTION = (
        "Sampling-based prompt compliance (FG-DM): sample N low-resolution segmentation maps in "
        "one batch with a model patched by FGDM Apply Factor, decode them, and keep the map whose "
        "required objects are most present (object recall). Candidate i uses seed + i."
    )
    CATEGORY = "LocRef/fgdm"
    RETURN_TYPES = ("IMAGE", CLASS_MAP, "MASK", "FLOAT", "INT", "IMAGE", "LATENT")
    RETURN_NAMES = ("map", "class_map", "object_masks", "recall", "seed", "candidates", "latent")
    OUTPUT_TOOLTIPS = (
        "The chosen map at the output size (nearest), painted in the palette; feeds a seg "
        "ControlNet (convert to ade150 first for control_v11p_sd15_seg).",
        "The chosen map as class ids, for FGDM Mask Edit / Palette Convert / Map To Layout.",
        "One mask per required object, in order, at the output size (one empty mask if no "
        "object is required).",
        "Object recall of the chosen map: present / required.",
        "The seed of the chosen map (sampling it alone reproduces the map).",
        "All N candidates in a grid, each labelled with its seed and recall; the chosen framed.",
        "The chosen map's latent.",
    )
    FUNCTION = "select"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD-1.5 patched by FGDM Apply Factor (seg)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
                "vae": ("VAE", {"tooltip": "Decodes the candidate maps."}),
                "n": ("INT", {"default": 10, "min": 1, "max": MAX_CANDIDATES,
                              "tooltip": "Number of candidate maps, sampled as one batch."}),
                "steps": ("INT", {"default": 10, "min": 1, "max": 1000,
                                  "tooltip": "Sampling steps per map (few are enough)."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {
                    "default": "euler", "tooltip": "Use a non-ancestral sampler so that the "
                    "chosen seed reproduces its map when sampled alone."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {
                    "default": "normal", "tooltip": "Noise schedule, as in KSampler."}),
                "map_width": _size(256, "Width of the candidate maps (pixels)."),
                "map_height": _size(256, "Height of the candidate maps (pixels)."),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "control_after_generate": True,
                                 "tooltip": "Seed of candidate 0; candidate i uses seed + i."}),
                "objects": ("STRING", {"default": "", "multiline": False, "tooltip":
                            "Required objects, comma-separated (\"person, dog, umbrella\"). "
                            "Empty: the classes named in prompt_text."}),
                "palette": (["auto", *PALETTES], {"tooltip": "Palette the maps are painted in; "
                            "auto = the applied factor's palette. " + PALETTE_TIP}),
                "output_width": _size(512, "Width of the output map and masks."),
                "output_height": _size(512, "Height of the output map and masks."),
            },
            "optional": {
                "prompt_text": ("STRING", {"default": "", "multiline": True, "tooltip":
                                "The prompt as text, to find required objects when 'objects' is "
                                "empty (plurals and simple synonyms are understood)."}),
                "min_area": ("FLOAT", {"default": DEFAULT_MIN_AREA, "min": 0.0, "max": 1.0,
                                       "step": 0.001, "tooltip": "Fraction of the map an object "
                                       "must cover to count as present."}),
                "color_cutoff": ("FLOAT", {"default": DEFAULT_CUTOFF, "min": 1.0, "max": 442.0,
                                           "step": 1.0, "tooltip": "RGB distance (0..255 units) "
                                           "beyond which a pixel matches no class (void)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, objects=None, palette=None):
        """Object names the palette lacks are refused before any model loads (with "auto",
        names that no palette has: the factor's palette is known at run time)."""
        if not objects or not objects.strip():
            return first(in_list(palette, ["auto", *PALETTES], "palette"))
        if palette is None or palette == "auto":
            return in_some_palette(lambda pal: parse_object_list(pal, objects))
        return first(in_list(palette, ["auto", *PALETTES], "palette"),
                     refusal(lambda: parse_object_list(get_palette(palette), objects)))

    @shows_warnings
    def select(self, model, positive, negative, vae, n, steps, cfg, sampler_name, scheduler,
               map_width, map_height, seed, objects, palette, output_width, output_height,
               prompt_text="", min_area=DEFAULT_MIN_AREA, color_cutoff=DEFAULT_CUTOFF):
        n = check_candidates(n)
        ratio = int(vae.spacial_compression_encode())  # 8 for SD-1.5's VAE
        if map_width % ratio or map_height % ratio:
            raise ValueError(f"map size {map_width}x{map_height} must be a multiple of {ratio} "
                             "(the VAE's factor); e.g. 256x256")
        pal = get_palette((factor_palette(model) or "coco183") if palette == "auto" else palette)
        required = required_classes(pal, objects, prompt_text)  # bad names fail before sampling
        if any(s in sampler_name for s in STOCHASTIC_SAMPLERS):
            warn("SBPC: sampler %s adds noise while sampling; the chosen seed will not "
                 "reproduce its map exactly when sampled alone", sampler_name)

        latent = torch.zeros(n, 4, map_height // ratio, map_width // ratio)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        # Each candidate gets its own seed's noise, as if it were sampled alone.
        noise = torch.cat([comfy.sample.prepare_noise(latent[i : i + 1], candidate_seed(seed, i))
                           for i in range(n)])
        callback = latent_preview.prepare_callback(model, steps)
        samples = comfy.sample.sample(
            model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        comfy.model_management.throw_exception_if_processing_interrupted()
        images = vae.decode(samples)
        if images.ndim == 5:  # video VAEs add a time axis; SD's does not
            images = images.reshape(-1, *images.shape[-3:])
        scored = score_candidates(images[..., :3], pal, required, seed, min_area=min_area,
                                  cutoff=color_cutoff)
        sel = scored.selection
        if required and max(sel.recalls) == 0:
            warn_no_recall(sel, min_area)
        chosen = ClassMap(scored.class_maps[sel.index], pal)
        out_map, out_image = map_outputs(chosen, output_height, output_width)
        masks = object_masks(out_map, required)
        if len(masks) == 0:
            masks = np.zeros((1, output_height, output_width), dtype=bool)
        grid = chw_to_image(candidate_grid(scored.class_maps, pal, sel.recalls, scored.seeds,
                                           sel.index))
        summary = ", ".join(f"{o.name} {o.area:.1%}" for o in sel.objects) or "no object required"
        log.info("SBPC: chose candidate %d (seed %d), recall %.2f (%s); recalls %s", sel.index,
                 sel.seed, sel.recall, summary, [round(r, 2) for r in sel.recalls])
        result = (out_image, out_map, torch.from_numpy(masks.astype(np.float32)),
                  float(sel.recall), int(sel.seed), grid,
                  {"samples": samples[sel.index : sel.index + 1].clone()})
        return {"ui": {"images": temp_images(grid, "sbpc")}, "result": result}


def warn_no_recall(sel: Selection, min_area: float) -> None:
    """Every candidate scored 0, so the choice says little: say which was kept, why, and what to
    try (select_best's tie-break: the most area of required classes, then the lowest seed)."""
    hint = (f" min_area {min_area:g} asks every object to cover {min_area:.0%} of the map; lower "
            f"it (default {DEFAULT_MIN_AREA:g})." if min_area > MIN_AREA_HINT else
            " Try more candidates, another seed, or check the factor and the object names.")
    area = sum(o.area for o in sel.objects)
    why = (f"its required classes cover the most area ({area:.1%}, under min_area)" if area > 0
           else "none has any pixel of a required class, so the lowest seed")
    warn("SBPC: no candidate map has any required object (recall 0 in all %d); candidate %d "
         "(seed %d) was kept because %s, and the selection means nothing.%s", len(sel.recalls),
         sel.index, sel.seed, why, hint)


class FGDMDecodeMap:
    DESCRIPTION = (
        "Turn an RGB segmentation map (e.g. a VAE-decoded FG-DM sample, or a map you painted) into "
        "class ids: nearest palette colour within a cutoff, then a small mode filter against VAE "
        "specks."
    )
    CATEGORY = "LocRef/fgdm"
    RETURN_TYPES = (CLASS_MAP, "IMAGE")
    RETURN_NAMES = ("class_map", "map")
    OUTPUT_TOOLTIPS = ("The class ids.", "The map repainted with the exact palette colours.")
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "An RGB map painted in the palette."}),
            "palette": (PALETTES, {"tooltip": PALETTE_TIP}),
            "batch_index": ("INT", {"default": 0, "min": 0, "max": 4095,
                                    "tooltip": "Which image of the batch to decode."}),
            "color_cutoff": ("FLOAT", {"default": DEFAULT_CUTOFF, "min": 1.0, "max": 442.0,
                                       "step": 1.0, "tooltip": "RGB distance beyond which a "
                                       "pixel is void."}),
            "mode_filter": ([3, 5, 1], {"tooltip": "Mode-filter window against specks; 1 = off."}),
        }}

    @shows_warnings
    def decode(self, image, palette, batch_index, color_cutoff, mode_filter):
        if not 0 <= batch_index < image.shape[0]:
            raise ValueError(f"batch_index {batch_index} is out of range: the image batch has "
                             f"{image.shape[0]} image(s); use 0..{image.shape[0] - 1}")
        pal = get_palette(palette)
        ids = decode(image[batch_index, ..., :3], pal, cutoff=color_cutoff,
                     mode_filter=int(mode_filter))
        class_map = ClassMap(ids, pal)
        return (class_map, map_outputs(class_map, class_map.height, class_map.width)[1])


class FGDMPaletteConvert:
    DESCRIPTION = (
        "Re-express a class map in another palette (COCO-stuff 183 <-> ADE20K 150) where classes "
        "correspond; classes without a counterpart become void (or the fallback class). Use it to "
        "feed FG-DM's maps to the ADE20K seg ControlNet."
    )
    CATEGORY = "LocRef/fgdm"
    RETURN_TYPES = (CLASS_MAP, "IMAGE")
    RETURN_NAMES = ("class_map", "map")
    OUTPUT_TOOLTIPS = ("The converted class ids.", "The converted map painted in the target "
                       "palette, e.g. for ControlNet Apply.")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "class_map": (CLASS_MAP, {"tooltip": "From SBPC Select, Decode Map or Mask Edit."}),
                "target_palette": (PALETTES, {"default": "ade150", "tooltip": PALETTE_TIP}),
            },
            "optional": {
                "fallback": ("STRING", {"default": "", "tooltip": "Class (name) of the target "
                             "palette for classes with no counterpart; empty = void."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, target_palette=None, fallback=None):
        known = in_list(target_palette, PALETTES, "target_palette")
        if known or target_palette is None or not fallback or not fallback.strip():
            return first(known)
        return refusal(lambda: resolve_class(get_palette(target_palette), fallback,
                                             "fallback class"))

    @shows_warnings
    def convert(self, class_map, target_palette, fallback=""):
        dst = get_palette(target_palette)
        fill = resolve_class(dst, fallback, "fallback class") if fallback.strip() else None
        ids = convert_map(class_map.ids, class_map.palette, dst, fill)
        out = ClassMap(ids, dst)
        return (out, map_outputs(out, out.height, out.width)[1])


NODE_CLASS_MAPPINGS = {
    "FGDMSBPCSelect": FGDMSBPCSelect,
    "FGDMDecodeMap": FGDMDecodeMap,
    "FGDMPaletteConvert": FGDMPaletteConvert,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FGDMSBPCSelect": "FGDM SBPC Select (best of N maps)",
    "FGDMDecodeMap": "FGDM Decode Map",
    "FGDMPaletteConvert": "FGDM Palette Convert",
}
