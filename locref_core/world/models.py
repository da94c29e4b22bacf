"""The world's base model: the host's SD-1.5 UNet, CLIP text model and AutoencoderKL at tiny
configs, built from a `WorldConfig`, saved and loaded as one safetensors file (config in the
metadata), so every later stage starts from the same frozen base.

The VAE downsamples by 4 (64 px images give 16 x 16 latents, enough cells for boxes of a few
latent pixels); the UNet keeps SD-1.5's block layout, so its 16 cross-attention sites are the
ones the LocRef patch expects; the text encoder is SD-1.5's CLIP-L at one layer, random and
frozen (the UNet learns to read it, as SD-1.5's UNet learned to read a frozen CLIP).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..train.host import SD15Parts, build_tiny_sd15, freeze, reinit

FORMAT = "locref-shapes-world-base"
PREDICTIONS = {"eps": "EPS", "v": "V_PREDICTION"}  # -> the host's ModelType


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world's base model."""

    size: int = 64  # image side, pixels
    unet_channels: int = 32  # SD-1.5 UNet model_channels (SD-1.5: 320)
    head_channels: int = 32  # width of an attention head (SD-1.5: 8 heads of 40..160)
    vae_channels: int = 32  # AutoencoderKL ch (GroupNorm: a multiple of 32)
    vae_mult: tuple[int, ...] = (1, 2, 2)  # len - 1 downsamplings: /4
    latent_scale: float = 1.0  # latent_format scale factor (1 / std of the VAE's latents)
    seed: int = 0
    # What the UNet predicts: "eps" (SD-1.5's, what the pack's trainers assume, and every base
    # saved before this field existed) or "v" (SD-2's; the benchmark's --prediction v)
    prediction: str = "eps"
    # GroupNorm groups in every UNet norm (SD-1.5: 32 over 320 to 1280 channels, 10 to 40 a
    # group). At 32 channels, 32 groups normalise each channel on its own, its spatial mean
    # included, up to the output layer, so the UNet can hardly set the per-channel mean of what
    # it predicts; 4 groups give 8 to 32 channels a group, SD-1.5's proportions.
    unet_norm_groups: int = 32

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"WorldConfig.prediction {self.prediction!r}: use one of "
                             f"{sorted(PREDICTIONS)}")
        if self.unet_norm_groups < 1 or self.unet_channels % self.unet_norm_groups:
            raise ValueError(f"WorldConfig.unet_norm_groups {self.unet_norm_groups} must divide "
                             f"unet_channels {self.unet_channels} (every UNet width is a multiple "
                             "of it); try 32, 8 or 4")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.vae_mult) - 1)

    def ddconfig(self) -> dict[str, Any]:
        return {"double_z": True, "z_channels": 4, "resolution": self.size, "in_channels": 3,
                "out_ch": 3, "ch": self.vae_channels, "ch_mult": list(self.vae_mult),
                "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorldConfig:
        data = json.loads(text)
        data["vae_mult"] = tuple(data["vae_mult"])
        data.setdefault("prediction", "eps")  # saved before v-prediction existed
        data.setdefault("unet_norm_groups", 32)  # saved before the groups were a setting
        return cls(**data)


def build_world(host: SimpleNamespace, cfg: WorldConfig) -> SD15Parts:
    """Random base parts: the tiny SD-1.5 UNet and 1-layer CLIP of `build_tiny_sd15`, and a
    /4 AutoencoderKL wrapped in the host's VAE class (what VAEEncode/VAEDecode call)."""
    # SD-1.5's 8 heads would be 4 channels wide here; heads of 32 channels cost a third
    heads = {"num_heads": -1, "num_head_channels": cfg.head_channels}
    parts = build_tiny_sd15(host, model_channels=cfg.unet_channels, seed=cfg.seed,
                            unet_overrides=heads)
    set_norm_groups(parts.unet, cfg.unet_norm_groups)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        ae = host.autoencoder.AutoencoderKL(ddconfig=cfg.ddconfig(), embed_dim=4)
        reinit(ae)
    parts.vae = host_vae(host, cfg, ae.state_dict())
    set_prediction(host, parts, cfg.prediction)
    set_latent_scale(parts, cfg.latent_scale)
    return parts


def set_norm_groups(module: torch.nn.Module, groups: int) -> None:
    """Every GroupNorm of `module` (the host builds them with 32 groups) normalises in `groups`
    groups instead: the same weights, another normalisation. 32 changes nothing."""
    for norm in module.modules():
        if isinstance(norm, torch.nn.GroupNorm):
            if norm.num_channels % groups:
                raise ValueError(f"{groups} GroupNorm groups do not divide a norm of "
                                 f"{norm.num_channels} channels")
            norm.num_groups = groups


def norm_groups(module: torch.nn.Module) -> int:
    """The groups of `module`'s GroupNorms (one number: `set_norm_groups` sets them all)."""
    found = {m.num_groups for m in module.modules() if isinstance(m, torch.nn.GroupNorm)}
    if len(found) != 1:
        raise ValueError(f"the module's GroupNorms use {sorted(found)} groups, not one number")
    return found.pop()


def set_prediction(host: SimpleNamespace, parts: SD15Parts, prediction: str) -> None:
    """The base model's parameterisation, as the host builds it for a checkpoint of that type
    (its ModelType and the matching model_sampling). This model was built here, not given."""
    model = parts.patcher.model
    model.model_type = getattr(host.model_base.ModelType, PREDICTIONS[prediction])
    model.model_sampling = host.model_base.model_sampling(model.model_config, model.model_type)


def host_vae(host: SimpleNamespace, cfg: WorldConfig, state: dict[str, torch.Tensor]) -> Any:
    """The host's VAE object around an AutoencoderKL of `cfg` with weights `state`."""
    vae = host.sd.VAE(sd=state, dtype=torch.float32,
                      config={"params": {"ddconfig": cfg.ddconfig(), "embed_dim": 4}})
    vae.downscale_ratio = vae.upscale_ratio = cfg.downscale
    freeze(vae.first_stage_model)
    return vae


def set_latent_scale(parts: SD15Parts, scale: float) -> None:
    """The factor between the VAE's latents and the sampler's (SD-1.5: 0.18215)."""
    parts.patcher.model.latent_format.scale_factor = float(scale)


def save_world(path: str, parts: SD15Parts, cfg: WorldConfig, meta: dict[str, str]) -> None:
    """UNet, VAE and text encoder in one safetensors file, the config in its metadata."""
    tensors = {}
    for prefix, module in (("unet.", parts.unet), ("vae.", parts.vae.first_stage_model),
                           ("clip.", parts.clip.cond_stage_model)):
        for k, v in module.state_dict().items():
            tensors[prefix + k] = v.detach().float().contiguous().cpu()
    save_file(tensors, path, metadata={"format": FORMAT, "config": cfg.to_json(), **meta})


def load_world(host: SimpleNamespace, path: str) -> tuple[SD15Parts, WorldConfig]:
    """A base saved by `save_world`, frozen; strict: every key present, none left over."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a shapes-world base (format {meta.get('format')!r})")
    cfg = WorldConfig.from_json(meta["config"])
    tensors = load_file(path)
    parts = build_world(host, cfg)
    parts.vae = host_vae(host, cfg, _strip(tensors, "vae."))
    for prefix, module in (("unet.", parts.unet), ("clip.", parts.clip.cond_stage_model)):
        module.load_state_dict(_strip(tensors, prefix), strict=True)
    set_latent_scale(parts, cfg.latent_scale)
    return parts, cfg


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
