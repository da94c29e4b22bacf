"""The parts of a trainer's command line and loop that both trainers share: the optimisation,
precision and output flags, one optimizer step (LR warm-up, AMP loss scaling, gradient clipping)
and the checkpoint cadence. What each trainer learns, and how, stays in its own script.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from .common import DistEnv, barrier, save_checkpoint


def add_optimizer_flags(g: argparse._ArgumentGroup, steps: int, lr_help: str = "",
                        warmup_help: str = "") -> None:
    """--steps, --batch-size, --lr, --weight-decay, --warmup-steps, --max-grad-norm."""
    g.add_argument("--steps", type=int, default=steps, help="total optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="samples per rank and step")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate" + lr_help)
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps"
                   + warmup_help)
    g.add_argument("--max-grad-norm", type=float, default=0.0, help="clip the gradient norm "
                   "(0: off)")


def add_precision_flags(g: argparse._ArgumentGroup) -> None:
    """--mixed-precision, --grad-checkpointing."""
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast dtype on GPU (auto: bf16 if supported, else fp16); on CPU "
                        "auto is fp32 and bf16 autocasts in bfloat16 (fast on CPUs with "
                        "AVX512-BF16 or AMX)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute UNet blocks in "
                   "backward (less memory, ~30%% slower)")


def add_output_flags(p: argparse.ArgumentParser, default_out: str, folder: str) -> None:
    """The output group: --out, checkpoints, --resume, --export, --log-every."""
    g = p.add_argument_group("output")
    g.add_argument("--out", default=default_out, help=f"exported file (put it in {folder})")
    g.add_argument("--ckpt-dir", help="training checkpoints (default: <out>_checkpoints)")
    g.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many to keep (0: all)")
    g.add_argument("--resume", help="checkpoint folder (or a --ckpt-dir: its newest) to continue")
    g.add_argument("--export", metavar="CHECKPOINT", help="only convert this training "
                   "checkpoint to --out and exit")
    g.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    g.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard event files to "
                   "DIR: the losses every step and, every --preview-every steps, the first "
                   "row's target and denoised prediction as images (needs `tensorboard`)")
    g.add_argument("--preview-every", type=int, default=500, help="TensorBoard preview images "
                   "every N steps (0: none)")


def check_tensorboard(args: argparse.Namespace) -> None:
    """--tensorboard needs the tensorboard package: say so before any model loads."""
    if getattr(args, "tensorboard", None):
        try:
            import torch.utils.tensorboard  # noqa: F401, PLC0415 - optional dependency
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install "
                             "tensorboard (or leave --tensorboard out)") from None


class TrainLog:
    """Rank 0's TensorBoard writer for --tensorboard; every call is a no-op without it."""

    def __init__(self, env: DistEnv, args: argparse.Namespace, prefix: str):
        self.writer, self.prefix = None, prefix
        self.every = getattr(args, "preview_every", 0)
        if env.is_main and getattr(args, "tensorboard", None):
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional

            self.writer = SummaryWriter(args.tensorboard)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars at `step` (1-based: after that many optimizer steps)."""
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{self.prefix}/{name}", value, step)

    def preview_due(self, step: int) -> bool:
        """After 0-based `step`: is it time for preview images?"""
        return self.writer is not None and self.every > 0 and (step + 1) % self.every == 0

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        """Images (B, 3, H, W) in [0, 1], one tag each."""
        if self.writer is not None:
            for name, value in images.items():
                self.writer.add_images(f"{self.prefix}/{name}", value.clamp(0, 1), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def preview_latents(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """The first row's target latent and the model's denoised guess x - sigma * eps."""
    denoised = x[:1] - sigma[:1].view(-1, 1, 1, 1) * eps[:1].float()
    return {"target": x0[:1].detach(), "denoised": denoised.detach()}


def log_step(tb: TrainLog, parts: Any, step: int, stats: dict[str, Any]) -> None:
    """The step's scalars, and its preview latents decoded through the base's VAE."""
    tb.scalars(step + 1, {k: v for k, v in stats.items() if isinstance(v, float)})
    if "preview" in stats and tb.writer is not None:
        from .host import decode_latents  # noqa: PLC0415 - torch-only module, kept lazy

        tb.images(step + 1, {k: decode_latents(parts, v) for k, v in stats["preview"].items()})


def ckpt_dir(args: argparse.Namespace) -> str:
    """--ckpt-dir, or <out without .safetensors>_checkpoints."""
    return args.ckpt_dir or os.path.splitext(args.out)[0] + "_checkpoints"


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, params: Any, args: argparse.Namespace,
                   step: int) -> None:
    """Backward and one AdamW step: linear warm-up over --warmup-steps, the fp16 loss scale
    (a no-op scaler otherwise), the gradient norm clipped to --max-grad-norm when set."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.max_grad_norm > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def checkpoint_if_due(env: DistEnv, args: argparse.Namespace, step: int,
                      module: torch.nn.Module, config_json: str,
                      optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """After `step` (0-based): every --ckpt-every steps and at the end, rank 0 writes a
    checkpoint with the run's flags (--resume checks them) and the loss scale; all ranks wait."""
    if (step + 1) % args.ckpt_every and step + 1 != args.steps:
        return
    if env.is_main:
        saved = {k: v for k, v in vars(args).items() if k != "start_step"}
        save_checkpoint(ckpt_dir(args), step + 1, module, optimizer, config_json, saved,
                        {"scaler": scaler.state_dict()}, args.keep_checkpoints)
    barrier(env)
