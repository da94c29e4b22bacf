"""The world's segmentation ControlNet: FG-DM's image factor (map -> image) is, in the pack's
workflows, an SD-1.5 seg ControlNet; the world has none to download, so one is trained here as
scaffolding, like the base. It is the host's own ControlNet class (`comfy.cldm.cldm.ControlNet`)
at the base UNet's config, initialised as ControlNet is (the UNet's encoder copied, zero
convolutions, a zeroed last hint layer), trained on (palette map, caption) -> image latents with
the base frozen, and used through the host's `comfy.controlnet.ControlNet` wrapper exactly as
ControlNetApplyAdvanced wires it.

The hint goes in as ControlNet expects it: the map upscaled (nearest) to 8 x the latent side, so
the hint block's three stride-2 layers land on the latent grid (a /4 world VAE: 64 px maps, a
16 x 16 latent, a 128 px hint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..train.common import DistEnv, Progress
from ..train.fgdm import LOSS_WEIGHTS, loss_weights
from ..train.host import (SD15Parts, TextCache, encode_text, ensure_loaded, freeze, predict_eps,
                          reinit)
from ..weights import save_whole
from .base import WORLD_CAPTIONS, LoopCheckpoints, autocast, noised, objective, pick_captions
from .models import norm_groups, set_norm_groups

log = logging.getLogger(__name__)
FORMAT = "locref-shapes-world-seg-controlnet"
HINT_RATIO = 8  # comfy.controlnet.ControlNet's compression_ratio: hint side = 8 x latent side
HINT_UPSCALE = "nearest-exact"  # ControlBase.upscale_algorithm
NULL_PROB = 0.5  # captions dropped in training (ControlNet's recipe)
# How the hint block's convolutions but its (zeroed) last start. "torch": torch's default, as
# ControlNet's own; what tells two maps apart shrinks about 3 times per layer (`hint_spread` over
# 16 validation maps: 9e-6 before the last convolution). "kaiming": Kaiming-normal weights (ReLU
# gain) and zero biases; 1e-2 there, on either world VAE. Which one learns to pass the map on,
# and when: shapes_world_diagnose.py --hint-init.
HINT_INITS = ("torch", "kaiming")


def build_controlnet(host: SimpleNamespace, parts: SD15Parts, seed: int = 0,
                     hint_init: str = "torch") -> torch.nn.Module:
    """A ControlNet of the base UNet's config, initialised from the base UNet (ControlNet's
    recipe): encoder and middle block copied, every zero convolution and the hint block's last
    layer zero, the rest of the hint block random as `hint_init` says (HINT_INITS)."""
    if hint_init not in HINT_INITS:
        raise ValueError(f"hint_init {hint_init!r}: use one of {', '.join(HINT_INITS)}")
    config = dict(parts.patcher.model.model_config.unet_config)
    config.pop("out_channels", None)
    config["hint_channels"] = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        model = host.cldm.ControlNet(**config, device="cpu",
                                     operations=host.ops.disable_weight_init)
        reinit(model)
        if hint_init == "kaiming":
            for conv in hint_convs(model)[:-1]:
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                torch.nn.init.zeros_(conv.bias)
    set_norm_groups(model, norm_groups(parts.unet))  # normalised as the base UNet it copies
    unet = parts.unet.state_dict()
    own = model.state_dict()
    copied = {k: v for k, v in unet.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(copied, strict=False)
    with torch.no_grad():
        for module in (*model.zero_convs, model.middle_block_out, model.input_hint_block[-1]):
            for p in module.parameters():
                p.zero_()
    log.info("seg ControlNet: %d tensors copied from the base UNet, %d new", len(copied),
             len(own) - len(copied))
    return model.float()


def hint_convs(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The hint block's convolutions, in order (the last one maps onto the UNet's width)."""
    return [m for m in model.input_hint_block if isinstance(m, torch.nn.Conv2d)]


def hint_for(host: SimpleNamespace, maps: torch.Tensor, latent_side: int) -> torch.Tensor:
    """Maps (B, 3, H, W) in [0, 1] -> the hint the wrapper makes: (B, 3, 8 s, 8 s)."""
    side = latent_side * HINT_RATIO
    return host.utils.common_upscale(maps, side, side, HINT_UPSCALE, "center")


def control_of(parts: SD15Parts, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor,
               hint: torch.Tensor, context: torch.Tensor) -> dict[str, list]:
    """The residuals ControlNet.get_control hands the UNet (strength 1, no earlier ControlNet)."""
    ms = parts.patcher.model.model_sampling
    out = model(x=ms.calculate_input(sigma, x), hint=hint, timesteps=ms.timestep(sigma),
                context=context)
    return {"input": [], "middle": list(out["middle"]), "output": list(out["output"])}


def map_use(host: SimpleNamespace, parts: SD15Parts, model: torch.nn.Module,
            latents: torch.Tensor, maps: torch.Tensor, draws: int = 2, seed: int = 0
            ) -> dict[str, float]:
    """Whether the ControlNet reads its map: the base's eps MSE on unscaled image latents
    (N, 4, h, w), each noised `draws` times (the same noise in every column), with the
    ControlNet given each image's own map (N, 3, H, W) in [0, 1] ("own"), the next image's (the
    batch rolled by one, "other"), and no ControlNet ("none"); empty captions, so only the map
    can tell the layout. One that reads its map: own < none < other; one that ignores it:
    own == other."""
    ensure_loaded(host, parts)
    x0 = parts.patcher.model.latent_format.process_in(latents)
    context = encode_text(parts.clip, [""] * len(latents))
    g = torch.Generator().manual_seed(seed)
    errors: dict[str, list[float]] = {"own": [], "other": [], "none": []}
    with torch.no_grad():
        for _ in range(draws):
            noise, x, sigma = noised(parts, x0, g)
            for name, m in (("own", maps), ("other", maps.roll(1, 0)), ("none", None)):
                control = None if m is None else control_of(
                    parts, model, x, sigma, hint_for(host, m, x.shape[-1]), context)
                eps = predict_eps(host, parts.patcher, x, sigma, context, control=control)
                errors[name].append((eps - noise).square().mean().item())
    return {name: sum(v) / len(v) for name, v in errors.items()}


def hint_spread(model: torch.nn.Module, hints: torch.Tensor) -> dict[str, float]:
    """What is left of the difference between hints (B, 3, H, W) through the hint block: the
    standard deviation across the batch (mean over channels and positions) before its last
    convolution ("penultimate") and at its output ("out", 0 while that layer is zero)."""
    x, spread = hints, {}
    with torch.no_grad():
        for i, layer in enumerate(model.input_hint_block):
            x = layer(x)
            if i == len(model.input_hint_block) - 2:
                spread["penultimate"] = x.std(0).mean().item()
    spread["out"] = x.std(0).mean().item()
    return spread


def train_controlnet(host: SimpleNamespace, parts: SD15Parts, model: torch.nn.Module,
                     latents: torch.Tensor, maps: torch.Tensor,
                     captions: Sequence[Sequence[str]], steps: int, batch: int = 16,
                     lr: float = 1e-4, null_prob: float = NULL_PROB, seed: int = 0,
                     on_step: Callable[[int, float], None] | None = None,
                     checkpoints: LoopCheckpoints | None = None,
                     amp: torch.dtype | None = None, loss_weight: str = "eps") -> list[float]:
    """The base's own objective (`objective`: v's MSE for a v base) with the ControlNet's
    residuals, the base frozen, on unscaled image latents (N, 4, h, w), their maps
    (N, 3, H, W) in [0, 1] and captions; half the captions are dropped (ControlNet's recipe: the
    map alone must carry the layout). Trains only `model`; `checkpoints`: continue from (and
    write) checkpoints of this loop. `amp`: the forward passes' autocast dtype
    (`base.autocast`); the loss is taken in fp32. `loss_weight` "v" (an epsilon base only)
    weighs each row's epsilon MSE as the FG-DM trainer's --loss-weight v does (v's error,
    normalised to mean 1 over the schedule: the noisy steps, where the layout is decided, weigh
    most); "eps", the default, is the base's objective unchanged."""
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"loss_weight {loss_weight!r}: use one of {', '.join(LOSS_WEIGHTS)}")
    ms = parts.patcher.model.model_sampling
    if loss_weight != "eps" and (parts.patcher.model.model_type
                                 != host.model_base.ModelType.EPS):
        raise ValueError(f"loss_weight {loss_weight!r} reweighs an epsilon base's loss; this "
                         "base is trained on another objective: use loss_weight 'eps'")
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = checkpoints.resume(model, opt, g) if checkpoints else []
    process_in = parts.patcher.model.latent_format.process_in
    progress = Progress(DistEnv(), steps, len(losses), every=max(1, steps // 20))
    texts = TextCache(WORLD_CAPTIONS)  # the world's captions, each encoded once
    ensure_loaded(host, parts)
    for step in range(len(losses), steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = process_in(latents[idx])
        hint = hint_for(host, maps[idx], x0.shape[-1])
        context = encode_text(parts.clip, pick_captions(captions, idx, null_prob, g), texts)
        noise, x, sigma = noised(parts, x0, g)
        with autocast(amp):
            control = control_of(parts, model, x, sigma, hint, context)
            eps = predict_eps(host, parts.patcher, x, sigma, context, control=control).float()
        error = (eps - noise).square()
        weights = loss_weights(ms.sigmas, sigma, loss_weight)
        loss = (objective(host, parts, error, sigma) if weights is None
                else (error.mean(dim=(1, 2, 3)) * weights).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        progress.update(step, losses[-1])
        if on_step:  # before the checkpoint: a stop between the two repeats this step's call
            on_step(step, losses[-1])
        if checkpoints:
            checkpoints.after(step + 1, model, opt, g, losses, total=steps)
    freeze(model)
    return losses


def save_controlnet(path: str, model: torch.nn.Module, meta: dict[str, str]) -> None:
    """Written to a temporary name, then renamed: another process waiting for `path` never
    reads half a file."""
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_whole(tensors, path, metadata={"format": FORMAT, **meta})


def load_controlnet(host: SimpleNamespace, parts: SD15Parts, path: str) -> torch.nn.Module:
    """A ControlNet saved by `save_controlnet` for this base, frozen; strict."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a shapes-world seg ControlNet (format "
                         f"{meta.get('format')!r})")
    model = build_controlnet(host, parts)
    model.load_state_dict(load_file(path), strict=True)
    return freeze(model)


def wrap(host: SimpleNamespace, model: torch.nn.Module) -> Any:
    """The host's CONTROL_NET object (what ControlNetLoader returns) around `model`."""
    return host.controlnet.ControlNet(model, compression_ratio=HINT_RATIO,
                                      load_device=host.model_management.get_torch_device())


def with_control(control_net: Any, positive: list, negative: list, maps: torch.Tensor,
                 strength: float = 1.0, percent: tuple[float, float] = (0.0, 1.0),
                 negative_too: bool = True) -> tuple[list, list]:
    """Positive and negative conditioning with the ControlNet attached as ControlNetApplyAdvanced
    attaches it: one copy holding the hint, shared by both; maps (1, H, W, 3) in [0, 1]. `percent`
    is the node's (start_percent, end_percent): the share of the sampling, from its noisy end,
    over which the ControlNet speaks (the host turns it into a sigma range). `negative_too` False:
    the negative is returned as given, so only the positive branch sees the map and CFG scales
    the map's pull with the text's (ControlNetApplyAdvanced with its negative output left
    unwired). At CFG 1 the host samples the positive alone, and both wirings draw the same
    image."""
    if not 0.0 <= percent[0] <= percent[1] <= 1.0:
        raise ValueError(f"ControlNet percent range {percent} must satisfy 0 <= start <= end <= 1")
    c_net = control_net.copy().set_cond_hint(maps.movedim(-1, 1), strength, tuple(percent))
    attach = lambda cond: [[t[0], {**t[1], "control": c_net, "control_apply_to_uncond": False}]  # noqa: E731
                           for t in cond]
    return attach(positive), attach(negative) if negative_too else negative
