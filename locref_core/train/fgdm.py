"""Train an FG-DM condition-factor adapter: `python -m locref_core.train.fgdm --help`.

Top to bottom: flags -> torchrun/DDP -> the host's SD-1.5 (frozen, weights in the autocast dtype)
-> a FactorAdapter installed on the ModelPatcher as a diffusion-model wrapper, as the FGDM Apply
Factor node installs it -> data (condition maps in palette RGB -> the host's VAE latents: the
factor learns to *generate* the condition; captions -> the host's CLIP, 20% empty for CFG) ->
loop (epsilon MSE + every N steps the attention-distillation KL against the same UNet without the
adapter) -> checkpoints -> export to the pack's factor file (FGDM Factor Loader reads it).

Sridhar & Vasconcelos, "Adapting Diffusion Models for Improved Prompt Compliance and Controllable
Image Synthesis", Sec. 3; official defaults: distillation weight 0.1 every 10 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from ..fgdm.adapter import KINDS, FactorAdapter, FactorConfig, sinusoidal_embedding
from ..fgdm.factor_patch import WRAPPER_KEY, FactorWrapper
from ..fgdm.weights import load_factor, load_strict, save_factor
from .attention_maps import AttentionRecorder
from .common import (DistEnv, Progress, autocast_dtype, check_same_weights, checkpoint_metadata,
                     init_distributed, load_checkpoint, read_checkpoint_weights, setup_logging,
                     sharded_batches, shutdown_distributed, step_generator, wrap_ddp)
from .host import (SD15Parts, TextCache, add_text_cache_flag, add_world_base_flag, diffuse,
                   enable_grad_checkpointing, encode_images, encode_text, ensure_loaded,
                   load_base, load_host, predict_eps, text_cache)
from .loop import (TrainLog, add_optimizer_flags, add_output_flags, add_precision_flags,
                   check_tensorboard, checkpoint_if_due, log_step, optimizer_step,
                   preview_latents)
from .losses import attention_kl, v_error_weight

LOSS_WEIGHTS = ("eps", "v")  # --loss-weight: how a row's epsilon MSE is weighted (loss_weights)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m locref_core.train.fgdm", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("host and base model")
    g.add_argument("--comfyui", help="ComfyUI checkout (the folder with main.py); its SD-1.5 code "
                   "is used as a library")
    g.add_argument("--checkpoint", help="SD-1.5 checkpoint (.safetensors with UNet, CLIP, VAE)")
    g.add_argument("--tiny-unet", action="store_true", help="tests only: random narrow SD-1.5 "
                   "UNet (model_channels 32), 1-layer CLIP and small VAE from the host's classes")
    add_world_base_flag(g)
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA when available (one GPU per torchrun rank)")
    g = p.add_argument_group("data")
    g.add_argument("--images", help="folder of training images")
    g.add_argument("--conditions", help="folder of condition maps (label PNGs for seg, or "
                   "depth / normal / sketch images), same stems as the images")
    g.add_argument("--captions", help="COCO captions JSON (or the dataset's caption file)")
    g.add_argument("--kind", default="seg", choices=KINDS, help="which condition the factor "
                   "generates")
    g.add_argument("--palette", default="coco183", help="palette seg maps are painted in (the "
                   "factor's maps come out in it)")
    g.add_argument("--size", type=int, default=512, help="training resolution in pixels "
                   "(multiple of 64)")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    add_text_cache_flag(g)
    g = p.add_argument_group("adapter")
    g.add_argument("--time-conditioned", action=argparse.BooleanOptionalAction, default=True,
                   help="timestep-conditioned adapter (FG-DM's TimeAdapter); --no-time-"
                   "conditioned for the official plain variant")
    g.add_argument("--norm-groups", type=int, default=None, help="groups of the adapter's "
                   "GroupNorms (default: the UNet's own, 32 for SD-1.5 as in the release). A "
                   "tiny UNet of 32 channels normalised in 32 groups holds one channel a group, "
                   "which removes the time embedding's per-channel constant (README, "
                   "\"Training your own weights\"; benchmarks/shapes_world.md)")
    g.add_argument("--init", help="start from this factor .safetensors (e.g. the converted "
                   "official seg factor) instead of random weights")
    g = p.add_argument_group("optimisation")
    add_optimizer_flags(g, steps=10000, lr_help=" (official: 1e-6 x batch 160, LDM's scale_lr)",
                        warmup_help=" (official: 10000)")
    g.add_argument("--null-prob", type=float, default=0.2, help="fraction of samples trained "
                   "with the empty prompt, for classifier-free guidance")
    g.add_argument("--offset-noise", type=float, default=0.0, help="add this times a per-sample, "
                   "per-channel constant to the training noise (offset noise; 0: off, the "
                   "paper's; 0.1 is the usual value): SD-1.5's last timestep keeps 7%% of the "
                   "latent, so a model trained without it reads a map's mean colour through the "
                   "noise instead of learning to set it, as sampling from pure noise needs. On "
                   "the shapes world 0.1 did not change that (benchmarks/shapes_world.md)")
    g.add_argument("--loss-weight", default="eps", choices=LOSS_WEIGHTS, help="how each row's "
                   "epsilon MSE is weighted by its noise level: eps, none (the paper's); v, "
                   "times 1 + sigma^2 (the v-prediction loss of an epsilon model: the x0 error "
                   "counts alike at every noise level, so the steps where sampling must set a "
                   "map's layout and colours from pure noise weigh as much as the last ones), "
                   "normalised to mean 1 over the schedule's timesteps")
    g.add_argument("--distill-weight", type=float, default=0.1, help="weight of the attention-"
                   "distillation KL (0: off)")
    g.add_argument("--distill-every", type=int, default=10, help="apply the distillation loss "
                   "every N steps")
    add_precision_flags(g)
    g.add_argument("--seed", type=int, default=0, help="seed for data order, noise, timesteps "
                   "and dropout")
    add_output_flags(p, "fgdm_factor.safetensors", "models/fgdm")
    return p


def check_args(args: argparse.Namespace, have_dataset: bool) -> None:
    """ValueErrors for flag combinations that cannot work, before anything is loaded."""
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out!r} must end in .safetensors (the factor file format)")
    if args.export:
        return
    check_tensorboard(args)
    text_cache(args)  # a negative --text-cache is refused here
    if not args.comfyui:
        raise ValueError("--comfyui is required: the ComfyUI folder whose SD-1.5 code is used")
    if not (args.checkpoint or args.tiny_unet or args.world_base):
        raise ValueError("--checkpoint is required: an SD-1.5 .safetensors file")
    if not have_dataset and not (args.images and args.conditions):
        raise ValueError("--images and --conditions are required (folders of images and maps)")
    if args.size % 64:
        raise ValueError(f"--size {args.size} must be a multiple of 64 (UNet levels at /8../64)")
    for name in ("steps", "batch_size", "distill_every", "ckpt_every", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if not 0.0 <= args.null_prob <= 1.0:
        raise ValueError(f"--null-prob {args.null_prob} must be in [0, 1]")
    if not 0.0 <= args.offset_noise <= 1.0:
        raise ValueError(f"--offset-noise {args.offset_noise} must be in [0, 1] (0: off; 0.1 is "
                         "the usual value)")
    if args.resume and args.init:
        raise ValueError("--resume and --init both set: --resume continues a run, --init starts "
                         "one; pass only one")


def check_resumed_objective(args: argparse.Namespace) -> None:
    """--resume continues the checkpoint's objective: ValueError when its --offset-noise or
    --loss-weight (0 and eps in checkpoints from before the flags) are not this run's."""
    trained = json.loads(checkpoint_metadata(args.resume).get("args", "{}"))
    for flag, saved, asked in (
            ("--offset-noise", f"{float(trained.get('offset_noise', 0.0)):g}",
             f"{args.offset_noise:g}"),
            ("--loss-weight", trained.get("loss_weight", "eps"), args.loss_weight)):
        if saved != asked:
            raise ValueError(f"--resume {args.resume}: trained with {flag} {saved}, this run "
                             f"asks {asked}; resume with the same flags or start a new "
                             "--ckpt-dir")


def loss_weights(sigmas: torch.Tensor, sigma: torch.Tensor, kind: str) -> torch.Tensor | None:
    """Per-row weights of the epsilon MSE at noise levels `sigma` (B,) for --loss-weight `kind`,
    normalised to mean 1 over the schedule's `sigmas`; None for eps (the plain mean, computed
    as before the flag so those runs keep their numbers)."""
    if kind == "eps":
        return None
    if kind == "v":
        return v_error_weight(sigma.float()) / v_error_weight(sigmas.float()).mean()
    raise ValueError(f"--loss-weight {kind!r}: use one of {', '.join(LOSS_WEIGHTS)}")


class TrainableFactorWrapper(FactorWrapper):
    """The node's FactorWrapper (same __call__: features from this call's x_t and the UNet's time
    embedding, merged into control['input']) with `features` differentiable: the node's version
    runs the adapter under no_grad on a copy in x's dtype; here the adapter (or its DDP wrapper)
    runs on x cast to its own dtype, autocast picks the compute dtype."""

    def __init__(self, adapter: FactorAdapter, forward_module: torch.nn.Module | None = None):
        super().__init__(adapter)
        adapter.train()
        self.forward_module = forward_module if forward_module is not None else adapter

    def features(self, unet: Any, x: torch.Tensor, timesteps: torch.Tensor) -> list[torch.Tensor]:
        dtype = next(self.adapter.parameters()).dtype
        emb = None
        if self.adapter.cfg.time_conditioned:
            t_emb = sinusoidal_embedding(timesteps, unet.model_channels).to(x.dtype)
            emb = unet.time_embed(t_emb).to(dtype)  # (B, 4 * model_channels)
        return self.forward_module(x.to(dtype), emb)


def unet_norm_groups(unet: torch.nn.Module) -> int:
    """The groups of the UNet's GroupNorms (32 for SD-1.5), or 32 when they differ."""
    from ..world.models import norm_groups  # noqa: PLC0415 - world builds on train.host

    try:
        return norm_groups(unet)
    except ValueError:
        return 32


def resumed_config(ckpt: str, cfg: FactorConfig) -> str:
    """The config JSON a checkpoint must carry to resume this run: its own text when it means
    `cfg` (a checkpoint written before a config field existed spells it without the field),
    else `cfg`'s, which load_checkpoint then refuses by name."""
    saved = checkpoint_metadata(ckpt).get("config")  # its tensors are read once, on loading
    try:
        same = saved is not None and FactorConfig.from_json(saved) == cfg
    except (ValueError, TypeError):
        same = False
    return saved if same else cfg.to_json()


def factor_config(args: argparse.Namespace, unet: torch.nn.Module) -> FactorConfig:
    """The adapter's shape follows the host UNet (320/640/1280/1280 and 1280 for SD-1.5), and so
    do its norms unless --norm-groups says otherwise."""
    groups = args.norm_groups if args.norm_groups is not None else unet_norm_groups(unet)
    return FactorConfig(kind=args.kind, palette=args.palette, in_channels=4,
                        time_conditioned=args.time_conditioned,
                        channels=tuple(unet.model_channels * m for m in unet.channel_mult),
                        emb_channels=unet.time_embed[-1].out_features, norm_groups=groups)


@dataclass
class Run:
    """Everything the step function needs."""

    args: argparse.Namespace
    env: DistEnv
    host: SimpleNamespace
    parts: SD15Parts
    adapter: FactorAdapter
    student: Any  # ModelPatcher clone with the factor wrapper
    student_rec: Any  # ... and attention recording (distillation steps)
    teacher_rec: Any  # the frozen UNet without the wrapper, recording
    rec_s: AttentionRecorder
    rec_t: AttentionRecorder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    texts: TextCache | None = None  # --text-cache


def setup(args: argparse.Namespace, env: DistEnv) -> Run:
    host = load_host(args.comfyui, cpu=env.device.type == "cpu")
    amp = autocast_dtype(args.mixed_precision, env.device)
    parts = load_base(host, args, amp or torch.float32)
    if args.grad_checkpointing:
        log.info("gradient checkpointing on %d UNet blocks",
                 enable_grad_checkpointing(host, parts.unet))
    cfg = factor_config(args, parts.unet)
    torch.manual_seed(args.seed)  # same initial adapter on every rank (DDP broadcasts anyway)
    adapter = FactorAdapter(cfg)
    if args.init:
        init = load_factor(args.init)
        if init.cfg != cfg:
            raise ValueError(f"--init {args.init}: its config {init.cfg.to_json()} differs from "
                             f"this run's {cfg.to_json()}; match --kind/--palette/--time-"
                             "conditioned")
        adapter.load_state_dict(init.state_dict())
    adapter.to(env.device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr,
                                  weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)
    args.start_step = 0
    if args.resume:
        check_resumed_objective(args)
        state = load_checkpoint(args.resume, adapter, optimizer, resumed_config(args.resume, cfg))
        args.start_step = int(state["step"])
        if state["extra"].get("scaler"):
            scaler.load_state_dict(state["extra"]["scaler"])
    wrapper = TrainableFactorWrapper(adapter, wrap_ddp(adapter, env))
    student = parts.patcher.clone()
    host.patcher_extension.add_wrapper_with_key(
        host.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper,
        student.model_options, is_model_options=True)
    rec_s, rec_t = AttentionRecorder(), AttentionRecorder()
    return Run(args, env, host, parts, adapter, student, rec_s.install(student.clone()),
               rec_t.install(parts.patcher.clone()), rec_s, rec_t, optimizer, scaler, amp,
               text_cache(args))


def train_step(run: Run, step: int, batch: dict[str, Any], preview: bool = False
               ) -> dict[str, Any]:
    """One optimizer step on this rank's batch; returns the losses (and with `preview`, the
    first row's target and denoised condition latents)."""
    args, dev = run.args, run.env.device
    gen = step_generator(args.seed, step, run.env.rank)
    cond = batch["condition"]  # (B, 3, S, S) palette RGB in [-1, 1]
    b = cond.shape[0]
    x0 = encode_images(run.parts, cond).to(dev)  # (B, 4, S/8, S/8): the factor's target latent
    drop = (torch.rand(b, generator=gen) < args.null_prob).tolist()
    captions = ["" if d else str(c) for d, c in zip(drop, batch["caption"])]
    context = encode_text(run.parts.clip, captions, run.texts).to(dev)  # (B, 77, 768), no grad
    ms = run.parts.patcher.model.model_sampling
    t = torch.randint(0, len(ms.sigmas), (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    if args.offset_noise:  # drawn only when asked, so runs without it keep their draws
        noise = noise + args.offset_noise * torch.randn(b, x0.shape[1], 1, 1, generator=gen)
    noise = noise.to(dev)
    ensure_loaded(run.host, run.parts)
    x, sigma = diffuse(run.parts, x0, noise, t)  # x_t of the condition latent
    distill = args.distill_weight > 0 and step % args.distill_every == 0
    kl = torch.zeros((), device=dev)
    amp = torch.autocast(dev.type, dtype=run.amp) if run.amp else contextlib.nullcontext()
    with amp:
        eps = predict_eps(run.host, run.student_rec if distill else run.student, x, sigma, context)
        weights = loss_weights(ms.sigmas, sigma, args.loss_weight)
        if weights is None:
            loss_eps = F.mse_loss(eps.float(), noise)
        else:
            per_row = (eps.float() - noise).square().mean(dim=(1, 2, 3))
            loss_eps = (per_row * weights.to(per_row.device)).mean()
        if distill:
            s_self, g_self = run.rec_s.take("self")
            s_cross, g_cross = run.rec_s.take("cross")
            with torch.no_grad():
                predict_eps(run.host, run.teacher_rec, x, sigma, context)
            t_self, t_cross = run.rec_t.take("self")[0], run.rec_t.take("cross")[0]
            # self maps all share the 1/2 grid; cross maps are resized to the full latent grid
            kl = (attention_kl(t_self, s_self, grids=g_self)
                  + attention_kl(t_cross, s_cross, grids=g_cross))
    loss = loss_eps + args.distill_weight * kl
    optimizer_step(loss, run.optimizer, run.scaler, run.adapter.parameters(), args, step)
    run.rec_s.clear()  # with --grad-checkpointing the recomputation in backward records again
    stats: dict[str, Any] = {"loss": loss.item(), "eps": loss_eps.item(), "kl": kl.item()}
    if preview:
        stats["preview"] = preview_latents(x0, x, sigma, eps)
    return stats


def build_dataset(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..data.factor_dataset import FactorDataset, collate_factor  # written alongside

    dataset = FactorDataset(args.images, args.conditions, captions_json=args.captions,
                            kind=args.kind, palette=args.palette, size=args.size)
    return dataset, collate_factor


def train(args: argparse.Namespace, env: DistEnv, dataset: Any = None,
          collate_fn: Any = None) -> dict[str, Any]:
    """The training run; returns {"losses": per-step losses on this rank, "digest", "out"}."""
    if dataset is None:
        dataset, collate_fn = build_dataset(args)  # validates the data before any model loads
    run = setup(args, env)
    start = args.start_step
    batches, per_epoch = sharded_batches(dataset, args.batch_size, env, args.seed, collate_fn,
                                         args.num_workers, start)
    log.info("FG-DM %s factor: %d samples, %d steps/epoch x %d rank(s), steps %d..%d",
             args.kind, len(dataset), per_epoch, env.world_size, start, args.steps)
    progress = Progress(env, args.steps, start, args.log_every)
    tb = TrainLog(env, args, f"fgdm_{args.kind}")
    losses, last_kl = [], 0.0
    for step in range(start, args.steps):
        stats = train_step(run, step, next(batches), tb.preview_due(step))
        log_step(tb, run.parts, step, stats)
        losses.append(stats["loss"])
        if args.distill_weight > 0 and step % args.distill_every == 0:
            last_kl = stats["kl"]  # logged until the next distillation step
        progress.update(step, stats["loss"], eps=stats["eps"], kl=last_kl)
        checkpoint_if_due(env, args, step, run.adapter, run.adapter.cfg.to_json(),
                          run.optimizer, run.scaler)
    tb.close()
    if env.is_main:
        save_factor(run.adapter, args.out, _export_meta(args.steps, vars(args)))
        log.info("exported %s", args.out)
    digest = check_same_weights(run.adapter, env)
    return {"losses": losses, "digest": digest, "out": args.out,
            "rank": env.rank, "steps": args.steps}


def _export_meta(step: int | str, trained: dict[str, Any]) -> dict[str, str]:
    """The exported factor's metadata: the trainer, its steps and how it was trained, from the
    run's flags (`vars(args)`) or a checkpoint's recorded ones (files from before a flag get
    its default)."""
    meta = {"trainer": "locref_core.train.fgdm", "trained_steps": str(step),
            "offset_noise": f"{float(trained.get('offset_noise') or 0.0):g}",
            "loss_weight": str(trained.get("loss_weight") or "eps")}
    if trained.get("lr") is not None:
        meta["lr"] = f"{float(trained['lr']):g}"
    if trained.get("checkpoint"):
        meta["base_model"] = os.path.basename(str(trained["checkpoint"]))
    return meta


def export_checkpoint(ckpt: str, out: str) -> str:
    """A training checkpoint -> the pack's factor file (no host needed)."""
    tensors, meta = read_checkpoint_weights(ckpt)
    try:
        cfg = FactorConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{ckpt}: not an FG-DM training checkpoint ({err})") from None
    adapter = FactorAdapter(cfg)
    load_strict(ckpt, adapter, tensors)
    trained = json.loads(meta.get("args") or "{}")  # the flags it was trained with
    save_factor(adapter, out, _export_meta(meta.get("step", "?"), trained))
    log.info("exported %s (step %s) to %s", ckpt, meta.get("step"), out)
    return out


def main(argv: list[str] | None = None, dataset: Any = None,
         collate_fn: Any = None) -> dict[str, Any]:
    """CLI entry; `dataset`/`collate_fn` replace the folder dataset (tests)."""
    args = build_parser().parse_args(argv)
    check_args(args, dataset is not None)
    if args.export:
        logging.basicConfig(level=logging.INFO)
        return {"out": export_checkpoint(args.export, args.out)}
    env = init_distributed(args.device)
    setup_logging(env)
    try:
        return train(args, env, dataset, collate_fn)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        logging.getLogger(__name__).error("%s", err)
        sys.exit(2)
