"""Random-weight SD-1.5 models built with the host's own ComfyUI classes.

* :func:`make_sd15_checkpoint` writes a full-size checkpoint in the original LDM
  key layout, produced by the host's own save path
  (``BaseModel.state_dict_for_saving``), so key names and shapes are exactly what
  ``CheckpointLoaderSimple`` expects.
* :func:`build_tiny_sd15_model` builds a narrow (``model_channels=32``) SD-1.5
  UNet with the same block structure, wrapped in a ``ModelPatcher``.
* :func:`apply_patched_model` calls such a model the way ``comfy.samplers`` does.

torch and ComfyUI are imported inside the functions (after
:func:`harness_env.ensure_comfy_importable`), never at module import time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from harness_env import cache_dir, comfyui_version, ensure_comfy_importable

LOG = logging.getLogger(__name__)

#: Bump when the checkpoint generator changes; it is part of the cached file name.
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_SEED = 1234
TINY_MODEL_CHANNELS = 32

#: The 16 cross-attention sites of SD-1.5, in execution order.
SD15_ATTN2_BLOCKS: list[tuple[str, int]] = (
    [("input", i) for i in (1, 2, 4, 5, 7, 8)]
    + [("middle", 0)]
    + [("output", i) for i in range(3, 12)]
)

# Standard LDM SD-1.x first-stage (VAE) architecture.
_SD_VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
    "dropout": 0.0,
}


def sd15_unet_config(model_channels: int = 320, dtype: Any = None) -> dict[str, Any]:
    """SD-1.5 UNet hyper-parameters, normalised by the host's ``convert_config``."""
    ensure_comfy_importable()
    import torch
    from comfy.model_detection import convert_config

    from locref_core.train.host import sd15_ldm_unet_config

    return convert_config(sd15_ldm_unet_config(model_channels,
                                               torch.float32 if dtype is None else dtype))


def reinit_parameters(module: Any) -> int:
    """Re-initialise every parameter of ``module`` (ComfyUI ops skip init).

    Parameters are first filled with NaN; each standard layer then gets its torch
    base-class ``reset_parameters``; anything left (custom parameters) gets
    N(0, 0.02).  Returns the number of such leftover tensors.  Raises if any
    parameter ends up non-finite.
    """
    import torch

    base_classes = (
        torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
        torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding,
    )
    with torch.no_grad():
        for param in module.parameters():
            param.fill_(float("nan"))
        for sub in module.modules():
            for cls in base_classes:
                if isinstance(sub, cls):
                    cls.reset_parameters(sub)
                    break
        leftovers = 0
        for name, param in module.named_parameters():
            if torch.isnan(param).all():
                LOG.debug("initialising custom parameter %s with N(0, 0.02)", name)
                param.normal_(0.0, 0.02)
                leftovers += 1
            if not torch.isfinite(param).all():
                raise RuntimeError(f"parameter {name} is not finite after re-initialisation")
    return leftovers


def _random_sd15_base_model(model_channels: int) -> Any:
    """Host ``BaseModel`` for the SD15 config, fp32, freshly re-initialised."""
    import torch
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(sd15_unet_config(model_channels))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    reinit_parameters(model.diffusion_model)
    return model.eval()


def make_sd15_checkpoint(path: Path | str, seed: int = CHECKPOINT_SEED) -> Path:
    """Write a random-weight, full-size SD-1.5 checkpoint (fp16 safetensors) to ``path``.

    Built from the host's ``SD15`` model config, ``SD1ClipModel`` and
    ``AutoencoderKL`` and flattened through ``BaseModel.state_dict_for_saving``,
    i.e. the same path ComfyUI's CheckpointSave uses.  Written atomically.
    """
    ensure_comfy_importable()
    import torch
    import comfy.sd1_clip
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _random_sd15_base_model(320)
        clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
        reinit_parameters(clip)
        vae = AutoencoderKL(ddconfig=dict(_SD_VAE_DDCONFIG), embed_dim=4)
        reinit_parameters(vae)
    state = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    del model, clip, vae
    state = {
        key: (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
        for key, t in state.items()
    }
    metadata = {"generator": f"comfyui-locref tests v{CHECKPOINT_FORMAT_VERSION}",
                "seed": str(seed), "comfyui": comfyui_version()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        comfy.utils.save_torch_file(state, str(tmp), metadata=metadata)
        tmp.chmod(0o644)  # safetensors creates 0600; let other users share the cache
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    LOG.info("wrote random SD-1.5 checkpoint %s (%d tensors)", path, len(state))
    return path


def cached_checkpoint() -> Path:
    """Return the cached random SD-1.5 checkpoint, generating it on first use."""
    name = (f"sd15-random-v{CHECKPOINT_FORMAT_VERSION}-seed{CHECKPOINT_SEED}"
            f"-comfyui{comfyui_version()}.safetensors")
    path = cache_dir() / name
    if not path.is_file():
        LOG.info("generating %s (one-off, takes a minute)", path)
        make_sd15_checkpoint(path)
    return path


def build_tiny_sd15_model(model_channels: int = TINY_MODEL_CHANNELS, seed: int = 0) -> Any:
    """Return a ``ModelPatcher`` around a narrow random SD-1.5 ``BaseModel`` (CPU, fp32).

    Same block structure as SD-1.5 (context_dim 768, 8 heads, channel_mult
    (1,2,4,4), 2 res blocks, attention at 4/2/1, depth 1), so the 16 attn2 sites,
    ``block`` ids and ``transformer_index`` values match the real model.
    """
    ensure_comfy_importable()
    import torch
    import comfy.model_patcher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _random_sd15_base_model(model_channels)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def apply_patched_model(
    patcher: Any,
    x: Any,
    sigma: Any,
    context: Any,
    cond_or_uncond: list[int] | None = None,
) -> Any:
    """Run ``patcher``'s model once, passing ``transformer_options`` like the host does.

    Mirrors ``comfy.samplers._calc_cond_batch``: the patcher's
    ``model_options["transformer_options"]`` (where ``set_model_attn2_patch`` etc.
    put their patches) is merged into a fresh dict, ``cond_or_uncond``/``uuids``/
    ``sigmas`` are added, and ``BaseModel.apply_model`` is called with
    ``c_crossattn=context``.  The model is loaded with its weight patches first.
    ``sigma`` is a 1-D tensor with one entry per batch item; ``cond_or_uncond``
    has one entry per equal-sized chunk of the batch (0 = cond, 1 = uncond), as
    in the sampler (default ``[0]``: the whole batch is cond).  Returns the
    denoised prediction.
    """
    import torch
    import comfy.model_management
    import comfy.patcher_extension

    if cond_or_uncond is None:
        cond_or_uncond = [0]
    comfy.model_management.load_models_gpu([patcher])
    options = comfy.patcher_extension.merge_nested_dicts(
        {}, patcher.model_options.get("transformer_options", {}), copy_dict1=False
    )
    options["cond_or_uncond"] = list(cond_or_uncond)
    options["uuids"] = [None] * len(cond_or_uncond)
    options["sigmas"] = sigma
    with torch.no_grad():
        return patcher.model.apply_model(
            x, sigma, c_crossattn=context, transformer_options=options
        )


def record_attn2_sites(patcher: Any, latent_h: int, latent_w: int, batch: int = 1,
                       seed: int = 0) -> list[dict[str, Any]]:
    """Run ``patcher`` once on a random latent with a recording attn2 patch.

    The patch is installed on a clone (``patcher`` itself is untouched).  Returns
    one record per attn2 call, in call order: ``block``, ``transformer_index``,
    ``activations_shape`` ([b, c, h, w]), ``original_shape``, ``cond_or_uncond``,
    ``n_heads``, ``dim_head`` and ``tokens`` (sequence length of the query).
    """
    import torch

    records: list[dict[str, Any]] = []

    def recorder(n: Any, context: Any, value: Any, extra: dict[str, Any]) -> tuple[Any, Any, Any]:
        records.append({
            "block": tuple(extra["block"]),
            "transformer_index": int(extra["transformer_index"]),
            "activations_shape": [int(v) for v in extra["activations_shape"]],
            "original_shape": [int(v) for v in extra["original_shape"]],
            "cond_or_uncond": list(extra["cond_or_uncond"]),
            "n_heads": int(extra["n_heads"]),
            "dim_head": int(extra["dim_head"]),
            "tokens": int(n.shape[1]),
        })
        return n, context, value

    model = patcher.clone()
    model.set_model_attn2_patch(recorder)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent_h, latent_w, generator=gen)
    context = torch.randn(batch, 77, 768, generator=gen)
    apply_patched_model(model, x, torch.full((batch,), 1.0), context)
    return records
