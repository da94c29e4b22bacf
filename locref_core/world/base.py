"""Training the world's base model, as SD-1.5 was made: first the autoencoder (on images and on
segmentation maps painted in their palette: SD's VAE has seen all kinds of pictures, this one
would otherwise reconstruct no map FG-DM makes), then the UNet on its latents with captions
dropped for CFG, the UNet's weights averaged over the steps (EMA, as diffusion trainers keep
them). The text encoder stays random and frozen: SD-1.5's was pre-trained elsewhere (CLIP) and
frozen too; this one cannot be trained in place (the host's CLIP layers add their residuals in
place, which autograd refuses once the encoder's own weights need gradients). After this the base
is frozen, and the pack's own trainers (LocRef, FG-DM) adapt it like SD-1.5.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from ..masks import foreground_mask
from ..train.common import (DistEnv, Progress, list_checkpoints, load_checkpoint,
                            save_checkpoint)
from ..train.host import (SD15Parts, TextCache, diffuse, encode_text, ensure_loaded, freeze,
                          predict_eps)
from ..train.losses import v_error_weight
from .models import WorldConfig, set_latent_scale

log = logging.getLogger(__name__)
KL_WEIGHT = 1e-5  # keeps the latents near N(0, 1) without blurring flat colours
WORLD_CAPTIONS = 8192  # captions kept encoded while training (2048 images have ~2.7k: 0.6 GB)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside, as many as before after (also when the block raises). The
    world's run trains each half after the base on one core, and a model trained on another
    thread count differs in its last bits, so whoever retrains one of those models to compare it
    (the diagnose, the estimate) does it here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def autocast(amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The world's trainers' forward passes in `amp` (torch.bfloat16: CPU autocast, the
    weights and the optimizer staying fp32), or as they are (None: fp32, every run before
    `--precision`)."""
    return torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()


@dataclass(frozen=True)
class Share:
    """This process's part of every batch when the base trains in `world` processes. Every
    process draws the whole batch from the same generator and
    computes rows `rows(batch)` of it; after each backward `average` all-reduces the gradients
    and the logged losses over the processes (the default process group). Every loss here is a
    mean over equal shares of the batch, so the average is the whole batch's loss and gradient:
    the processes train on the batches one process would (the same draws, so the checkpoints
    are one process's), and only the sums' rounding differs, as between thread counts. Only
    rank 0 writes checkpoints and logs. (Not the trainers' `wrap_ddp`: DDP hooks a module's
    forward, and these loops call the host's sampling maths and the VAE's encoder and decoder,
    not the modules themselves.)

    The world's run does not use it: on a 2-core Xeon, two one-thread processes trained the
    32-channel UNet at 0.93 times and the VAE at 1.02 times the speed of one process on two
    threads (`benchmarks/base_processes.py`; the gradients' all-reduce eats what the second
    process gains). It is there for machines where that benchmark says otherwise."""

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"Share(rank={self.rank}, world={self.world}): the rank must be in "
                             f"0..world - 1")

    def rows(self, batch: int) -> slice:
        """This process's rows of a batch of `batch` (a multiple of `world`)."""
        if batch % self.world:
            raise ValueError(f"batch {batch} cannot be shared by {self.world} processes: use a "
                             f"multiple of {self.world}")
        n = batch // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    @property
    def env(self) -> DistEnv:
        return DistEnv(rank=self.rank, world_size=self.world)

    def average(self, params: Iterable[torch.nn.Parameter], *values: torch.Tensor
                ) -> list[float]:
        """After backward: the gradients of `params` replaced by their mean over the processes
        (one all-reduce); returns the mean of each scalar in `values`."""
        if self.world == 1:
            return [v.item() for v in values]
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]
                         + [torch.stack([v.detach().reshape(()) for v in values]).to(grads[0])])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[offset:].tolist()


ALONE = Share()


class LoopCheckpoints:
    """A training loop's state every `every` steps in `folder`, in the pack's trainer checkpoint
    format (the trained module's weights as safetensors, `config` in their metadata; optimizer,
    generator, losses so far and the EMA in a state file read back with weights_only=True). A
    loop given a folder that already holds a checkpoint continues from the newest one and ends
    with the weights a loop never stopped would have (the same draws from the same generator),
    so a long stage stopped part-way (a machine taken back, Ctrl-C) loses at most `every`
    steps."""

    def __init__(self, folder: str, every: int, config: dict[str, Any]):
        if every < 1:
            raise ValueError(f"checkpoint every {every} steps: must be >= 1")
        self.folder, self.every = str(folder), every
        self.config = json.dumps(config, sort_keys=True)

    def resume(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
               g: torch.Generator, average: EMA | None = None) -> list[float]:
        """Restore the newest checkpoint, if any (ValueError if it was made with another
        config); returns the losses of the steps it covers (empty: start from step 0)."""
        if not list_checkpoints(self.folder):
            return []
        try:
            saved = load_checkpoint(self.folder, module, optimizer, self.config)["extra"]
        except ValueError as err:
            raise ValueError(f"{err}. These checkpoints are of another run: delete "
                             f"{self.folder} to train this stage from its start") from None
        g.set_state(saved["generator"])
        if average is not None:
            average.n = int(saved["ema_n"])
            for shadow, value in zip(average.shadow, saved["ema"], strict=True):
                shadow.copy_(value)
        return saved["losses"].tolist()

    def after(self, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
              g: torch.Generator, losses: Sequence[float], average: EMA | None = None,
              total: int | None = None) -> None:
        """After `step` steps: a checkpoint when `step` is a multiple of `every` or `total`."""
        if step % self.every and step != total:
            return
        extra = {"generator": g.get_state(), "losses": torch.tensor(losses, dtype=torch.float64)}
        if average is not None:
            extra.update(ema=[s.clone() for s in average.shadow], ema_n=average.n)
        save_checkpoint(self.folder, step, module, optimizer, self.config, {}, extra)


def train_vae(parts: SD15Parts, images: torch.Tensor, steps: int, batch: int = 16,
              lr: float = 1e-3, seed: int = 0, on_step: Callable[[int, float], None] | None = None,
              maps: torch.Tensor | None = None,
              checkpoints: LoopCheckpoints | None = None, share: Share = ALONE,
              amp: torch.dtype | None = None) -> list[float]:
    """Fit the AutoencoderKL to images (N, 3, H, W) in [-1, 1] and, when given, maps (M, 3, H, W)
    in [-1, 1] (a quarter of every batch): L1 + MSE reconstruction of a sampled latent plus a
    small KL; `lr` for the first half, then decayed linearly to 0. Returns the per-step L1; the
    autoencoder ends frozen.

    Why: the held-out images' reconstructions, scored by the world's detector, bound every
    configuration of the benchmark. With L1 alone (its gradient is a sign: the same pull for a
    pixel off by 1 as for one off by 100) a 1000-step VAE reached AP50 0.26-0.45 (colours
    shifted, shapes mottled). With L1 + MSE (MSE pulls hardest on the largest errors) at a
    constant lr it reached 0.84 at 1000 steps and 0.85 at 1500. With the decay, 0.92 at step
    1250 of 1500. All on the same data and seed, images only in the batches.

    `checkpoints`: continue from (and write, on rank 0) checkpoints of this loop. `share`: this
    process's part of each batch when several train it together. `amp`: the forward passes'
    autocast dtype (`autocast`); the losses are taken in fp32."""
    ae = parts.vae.first_stage_model
    ae.requires_grad_(True).train()
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = checkpoints.resume(ae, opt, g) if checkpoints else []
    progress = Progress(share.env, steps, len(losses), every=max(1, steps // 20),
                        averaged=True)  # share.average returns the losses' mean
    n_maps = 0 if maps is None else batch // 4
    rows = share.rows(batch)
    for step in range(len(losses), steps):
        x = images[torch.randint(0, len(images), (batch - n_maps,), generator=g)]
        if n_maps:
            x = torch.cat([x, maps[torch.randint(0, len(maps), (n_maps,), generator=g)]])
        x = x[rows]
        with autocast(amp):
            mean, logvar = ae.quant_conv(ae.encoder(x)).float().chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            noise = torch.randn((batch, *mean.shape[1:]), generator=g)[rows]  # the whole batch's
            z = mean + noise * (0.5 * logvar).exp()
            error = ae.decode(z).float() - x
        l1 = error.abs().mean()
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, 2.0 * (1.0 - step / steps))
        opt.zero_grad(set_to_none=True)
        (l1 + error.square().mean() + KL_WEIGHT * kl).backward()
        l1_mean, kl_mean = share.average(ae.parameters(), l1, kl)
        opt.step()
        losses.append(l1_mean)
        progress.update(step, losses[-1], kl=kl_mean)
        if checkpoints and share.rank == 0:
            checkpoints.after(step + 1, ae, opt, g, losses, total=steps)
        if on_step:
            on_step(step, losses[-1])
    freeze(ae)
    return losses


@torch.no_grad()
def encode_latents(parts: SD15Parts, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> the VAE's latent means (N, 4, H/4, W/4), unscaled."""
    ae = parts.vae.first_stage_model
    out = [ae.quant_conv(ae.encoder(images[i:i + batch])).chunk(2, dim=1)[0]
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def fit_latent_scale(parts: SD15Parts, latents: torch.Tensor) -> float:
    """1 / std of the latents (SD-1.5's 0.18215 was chosen the same way), set on the model."""
    scale = float(1.0 / latents.std())
    set_latent_scale(parts, scale)
    return scale


def pick_captions(captions: Sequence[Sequence[str]], idx: torch.Tensor, null_prob: float,
                  g: torch.Generator) -> list[str]:
    """For each row index, one of that image's captions at random, or the empty caption with
    probability `null_prob` (what classifier-free guidance needs)."""
    return [captions[i][int(torch.randint(len(captions[i]), (1,), generator=g))]
            if torch.rand(1, generator=g).item() >= null_prob else "" for i in idx.tolist()]


def noised(parts: SD15Parts, x0: torch.Tensor, g: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise, and x0 diffused to a uniform random DDPM timestep per row: (noise, x, sigma)."""
    n_t = len(parts.patcher.model.model_sampling.sigmas)
    noise = torch.randn(x0.shape, generator=g)
    x, sigma = diffuse(parts, x0, noise, torch.randint(0, n_t, (len(x0),), generator=g))
    return noise, x, sigma


class EMA:
    """Exponential moving average of parameters (decay ramps up as (1 + n) / (10 + n))."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.params, self.decay, self.n = list(params), decay, 0
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def objective(host: SimpleNamespace, parts: SD15Parts, error: torch.Tensor,
              sigma: torch.Tensor) -> torch.Tensor:
    """The base's training loss from the squared epsilon error (B, C, h, w): the MSE of what the
    UNet predicts. Epsilon: the error's mean (computed as such, so epsilon runs keep their exact
    numbers). v: each row's mean times 1 + sigma^2 (v's error is epsilon's times
    sqrt(1 + sigma^2)), averaged."""
    if parts.patcher.model.model_type == host.model_base.ModelType.V_PREDICTION:
        return (error.mean(dim=(1, 2, 3)) * v_error_weight(sigma)).mean()
    return error.mean()


def flipped_rows(latents: torch.Tensor, mirrored: torch.Tensor | None, idx: torch.Tensor,
                 flip: torch.Tensor) -> torch.Tensor:
    """The latents of images `idx`, the rows where `flip` is set taken from `mirrored` (the
    latents of the images flipped left-right); with no `mirrored`, no row is flipped.

    Why not `latents.flip(-1)`: a learned VAE's latent space is not mirror-symmetric. The
    recipe-2 base's VAE decodes a held-out image's mirrored latent, mirrored back, to an image
    its detector reads at AP50 0.647 and appearance 0.774, against 0.974 and 0.973 for the
    latent itself (pixel error 0.066 against 0.032); trained on such latents for half its rows,
    a UNet learns to draw what the VAE then decodes off the images. Flipping the image and
    encoding it is the flip the images mean."""
    if mirrored is None:
        return latents[idx]
    if mirrored.shape != latents.shape:
        raise ValueError(f"mirrored latents {tuple(mirrored.shape)} and latents "
                         f"{tuple(latents.shape)} differ: pass encode_latents(parts, "
                         f"images.flip(-1)) of the same images")
    return torch.where(flip[:, None, None, None], mirrored[idx], latents[idx])


def train_unet(host: SimpleNamespace, parts: SD15Parts, latents: torch.Tensor,
               captions: Sequence[Sequence[str]], steps: int, batch: int = 32,
               lr: float = 3e-4, null_prob: float = 0.1, seed: int = 0,
               on_step: Callable[[int, float], None] | None = None, ema: float = 0.999,
               checkpoints: LoopCheckpoints | None = None, share: Share = ALONE,
               mirrored: torch.Tensor | None = None, amp: torch.dtype | None = None
               ) -> list[float]:
    """Text-to-image training of the UNet on unscaled VAE latents (N, 4, h, w) and each image's
    captions: epsilon MSE at uniform DDPM timesteps through the host's own sampling maths, a
    random caption of the image, the empty caption for `null_prob` of the rows (CFG), and, given
    `mirrored` (the latents of the same images flipped left-right: `encode_latents(parts,
    images.flip(-1))`), random horizontal flips (`flipped_rows`). The UNet ends with its weights'
    EMA (`ema` 0: the last step's), frozen. `checkpoints`: continue from (and write, on rank 0)
    checkpoints of this loop. `share`: this process's part of each batch when several train it
    together. `amp`: the UNet's autocast dtype (`autocast`); the loss is taken in fp32."""
    unet = parts.unet
    unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    average = EMA(list(unet.parameters()), ema) if ema else None
    g = torch.Generator().manual_seed(seed)
    losses = checkpoints.resume(unet, opt, g, average) if checkpoints else []
    process_in = parts.patcher.model.latent_format.process_in
    progress = Progress(share.env, steps, len(losses), every=max(1, steps // 20),
                        averaged=True)  # share.average returns the losses' mean
    texts = TextCache(WORLD_CAPTIONS)  # the world's captions, each encoded once
    ensure_loaded(host, parts)
    rows = share.rows(batch)
    for step in range(len(losses), steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        flip = torch.rand(batch, generator=g) < 0.5  # drawn with or without `mirrored`
        x0 = process_in(flipped_rows(latents, mirrored, idx, flip))
        texts_of_rows = pick_captions(captions, idx, null_prob, g)[rows]
        noise, x, sigma = (t[rows] for t in noised(parts, x0, g))  # the whole batch's draws
        context = encode_text(parts.clip, texts_of_rows, texts)
        with autocast(amp):
            eps = predict_eps(host, parts.patcher, x, sigma, context).float()
        error = (eps - noise).square()
        loss = objective(host, parts, error, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        (value,) = share.average(unet.parameters(), loss)
        opt.step()
        if average:
            average.update()
        losses.append(value)
        progress.update(step, losses[-1])
        if checkpoints and share.rank == 0:
            checkpoints.after(step + 1, unet, opt, g, losses, average, total=steps)
        if on_step:
            on_step(step, losses[-1])
    if average:
        average.copy_to_params()
    freeze(unet)
    return losses


def masked(mask: torch.Tensor) -> dict:
    """A conditioning's options as ConditioningSetMask sets them (strength 1, default area)."""
    return {"mask": mask[None], "set_area_to_bounds": False, "mask_strength": 1.0}


@torch.no_grad()
def sample_images(host: SimpleNamespace, patcher: Any, parts: SD15Parts, texts: Sequence[str],
                  seeds: Sequence[int], cfg: WorldConfig, steps: int = 20, guidance: float = 4.0,
                  sampler: str = "euler", negative: str = "", control_net: Any = None,
                  maps: Sequence[torch.Tensor] | None = None,
                  on_image: Callable[[int, int], None] | None = None,
                  regions: Sequence[Sequence[tuple[str, torch.Tensor]]] | None = None,
                  control_percent: tuple[float, float] = (0.0, 1.0),
                  control_strength: float = 1.0, control_negative: bool = True,
                  decode: bool = True) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from `patcher` (the base or a patched clone) through the
    host's own sampler (comfy.sample.sample, what KSampler calls), one seed per text; with a
    `control_net` (the host's CONTROL_NET) each image gets its map (1, H, W, 3) in [0, 1] as the
    hint, attached as ControlNetApplyAdvanced does, at `control_strength` (its strength) over
    `control_percent` (its start_percent, end_percent) of the sampling, on both CFG branches
    (`control_negative` False: on the positive alone, `controlnet.with_control`). With
    `regions`, each image's (text, mask (H, W) in [0, 1]) pairs are further positive
    conditionings, masked as ConditioningSetMask masks them (strength 1), and the image's own
    text is masked to where none of them is: the host blends the predictions by mask, so inside
    a region only its text speaks.
    `on_image(done, total)` after each image (progress for long lists). `decode` False: the
    sampled latents (B, 4, h, w) as the sampler returns them, not decoded."""
    from .controlnet import with_control

    side = cfg.size // cfg.downscale
    neg = [[encode_text(parts.clip, [negative]), {}]]  # the same for every image
    out = []
    for i, (text, seed) in enumerate(zip(texts, seeds)):
        pos, negative_cond = [[encode_text(parts.clip, [text]), {}]], neg
        if regions is not None and regions[i]:
            region_texts, masks = zip(*regions[i])
            masks = torch.stack(masks).float()
            pos = [[pos[0][0], masked(1 - foreground_mask(masks))]] + [
                [encode_text(parts.clip, [t]), masked(m)] for t, m in zip(region_texts, masks)]
        if control_net is not None:
            pos, negative_cond = with_control(control_net, pos, neg, maps[i],
                                              strength=control_strength, percent=control_percent,
                                              negative_too=control_negative)
        empty = torch.zeros(1, 4, side, side)
        noise = torch.randn(empty.shape, generator=torch.Generator().manual_seed(int(seed)))
        latent = host.sample.sample(patcher, noise, steps, guidance, sampler, "normal", pos,
                                    negative_cond, empty, disable_pbar=True, seed=int(seed))
        out.append(parts.vae.decode(latent).movedim(-1, 1) if decode  # (1, 3, H, W) in [0, 1]
                   else latent)
        if on_image is not None:
            on_image(i + 1, len(texts))
    return torch.cat(out)
