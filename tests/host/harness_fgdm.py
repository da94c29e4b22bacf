"""Random-weight files for FG-DM workflows, cached next to the checkpoint: a full-size SD-1.5
seg factor adapter (the pack's safetensors format) and a seg ControlNet in the original
``control_v11p_sd15_seg.pth`` key layout (``control_model.*``), plus an in-process VAE."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from harness_env import atomic_write, cache_dir, ensure_comfy_importable
from harness_models import reinit_parameters, sd15_unet_config

LOG = logging.getLogger(__name__)
FORMAT_VERSION = 1
FACTOR_NAME = "fgdm_seg_random.safetensors"
CONTROLNET_NAME = "control_v11p_sd15_seg_random.safetensors"


def cached_factor(scale: float = 0.02) -> Path:
    """A full-size seg factor adapter (SD-1.5 widths, timestep-conditioned) with small weights."""
    path = cache_dir() / f"fgdm-seg-random-v{FORMAT_VERSION}.safetensors"
    if path.is_file():
        return path
    import torch

    from locref_core.fgdm.adapter import FactorAdapter, FactorConfig
    from locref_core.fgdm.weights import save_factor

    LOG.info("generating %s (one-off)", path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        adapter = FactorAdapter(FactorConfig())
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_(0.0, scale)
    return atomic_write(path, lambda tmp: save_factor(adapter.half(), str(tmp)))


def cached_seg_controlnet() -> Path:
    """A random SD-1.5 ControlNet (fp16) keyed like the original control_v11p_sd15_seg.pth."""
    path = cache_dir() / f"controlnet-sd15-random-v{FORMAT_VERSION}.safetensors"
    if path.is_file():
        return path
    ensure_comfy_importable()
    import comfy.cldm.cldm
    import comfy.ops
    import torch
    from safetensors.torch import save_file

    LOG.info("generating %s (one-off)", path)
    config = dict(sd15_unet_config())
    config.pop("out_channels")
    config["hint_channels"] = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(13)
        model = comfy.cldm.cldm.ControlNet(**config, device="cpu",
                                           operations=comfy.ops.disable_weight_init)
        reinit_parameters(model)
    state = {f"control_model.{k}": v.to(torch.float16).contiguous()
             for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def install_fgdm_models(base_dir: Path) -> None:
    """Link the factor and the ControlNet into a server's models/fgdm and models/controlnet."""
    for folder, name, source in (("fgdm", FACTOR_NAME, cached_factor()),
                                 ("controlnet", CONTROLNET_NAME, cached_seg_controlnet())):
        link = Path(base_dir) / "models" / folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(source)


def random_vae(seed: int = 3) -> Any:
    """The host's SD VAE (standard shape) with small random weights, in-process."""
    ensure_comfy_importable()
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "attn_resolutions": [], "dropout": 0.0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        reinit_parameters(model)
    return comfy.sd.VAE(sd=model.state_dict())
