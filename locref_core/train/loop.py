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
                   help="autocast dtype on GPU (auto: bf16 if supported, else fp16); CPU: fp32")
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
