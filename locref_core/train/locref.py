"""Train a LocRef adapter: `python -m locref_core.train.locref --help`.

Top to bottom: flags -> torchrun/DDP -> the host's SD-1.5 and CLIP vision model (both frozen)
-> a LocRefAdapter installed on the ModelPatcher by the node's own `patch.install` (LocRefStash /
LocRefBlend around a LocRefTrainState: one layout per batch row, keys/values with gradients) ->
data (COCO instances: references, composite, boxes, instance-foreground mask) -> loop (epsilon MSE
weighted 2.3 on instance foreground, 0.3 elsewhere; 10% of rows with the null reference for CFG)
-> checkpoints -> export to the pack's LocRef file (LocRef Adapter Loader reads it).

LocRef-Diffusion (arXiv 2411.15252), Sec. 3.4: Wf = 2.3, Wb = 0.3; 100 epochs at batch 32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from ..adapter import AdapterConfig, LocRefAdapter
from ..patch import LocRefTrainState, install
from ..weights import load_adapter, load_strict, save_adapter
from .common import (DistEnv, Progress, autocast_dtype, check_same_weights, init_distributed,
                     load_checkpoint, read_checkpoint_weights, setup_logging, sharded_batches,
                     shutdown_distributed, step_generator, wrap_ddp)
from .host import (SD15Parts, TextCache, add_text_cache_flag, add_world_base_flag, diffuse,
                   enable_grad_checkpointing, encode_images, encode_text, ensure_loaded, freeze,
                   load_base, load_host, predict_eps, reinit, text_cache)
from .loop import (TrainLog, add_optimizer_flags, add_output_flags, add_precision_flags,
                   check_tensorboard, checkpoint_if_due, log_step, optimizer_step,
                   preview_latents)
from .losses import weighted_eps_mse

log = logging.getLogger(__name__)

# tests only: a 2-layer CLIP vision tower of the host's class with ViT-H's 1024-wide embedding
TINY_CLIP_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                    "num_hidden_layers": 2, "image_size": 32, "patch_size": 8,
                    "projection_dim": 1024, "num_channels": 3, "hidden_act": "gelu",
                    "layer_norm_eps": 1e-5, "model_type": "clip_vision_model"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m locref_core.train.locref", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("host and base models")
    g.add_argument("--comfyui", help="ComfyUI checkout (the folder with main.py); its SD-1.5 and "
                   "CLIP vision code is used as a library")
    g.add_argument("--checkpoint", help="SD-1.5 checkpoint (.safetensors with UNet, CLIP, VAE)")
    g.add_argument("--clip-vision", help="CLIP vision .safetensors as CLIPVisionLoader reads it "
                   "(ViT-H/14 for IP-Adapter-compatible adapters); frozen")
    g.add_argument("--tiny-unet", action="store_true", help="tests only: random narrow SD-1.5 "
                   "UNet (model_channels 32), 1-layer CLIP, small VAE and, without "
                   "--clip-vision, a 2-layer CLIP vision tower, all from the host's classes")
    add_world_base_flag(g)
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA when available (one GPU per torchrun rank)")
    g = p.add_argument_group("data")
    g.add_argument("--images", help="folder of training images")
    g.add_argument("--instances", help="COCO instances JSON (boxes, optional masks)")
    g.add_argument("--captions", help="COCO captions JSON")
    g.add_argument("--size", type=int, default=512, help="training resolution in pixels "
                   "(multiple of 64)")
    g.add_argument("--max-instances", type=int, default=4, help="boxes (references) per image")
    g.add_argument("--ref-size", type=int, default=224, help="reference crop size in pixels "
                   "(CLIP's input size)")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no flip / scale "
                   "/ colour jitter of the references")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    add_text_cache_flag(g)
    g = p.add_argument_group("adapter")
    g.add_argument("--tokens", type=int, default=4, help="context tokens per image")
    g.add_argument("--hidden-dim", type=int, default=1024, help="hidden width of the two-layer "
                   "Appearance-net projection (0: IP-Adapter's one layer)")
    g.add_argument("--shared-kv", action="store_true", help="one K/V pair per site for the CI "
                   "and RI paths (IP-Adapter layout)")
    g.add_argument("--init-from", help="start from this adapter file (a LocRef file or "
                   "ip-adapter_sd15.safetensors); its config replaces the three flags above")
    g = p.add_argument_group("optimisation")
    add_optimizer_flags(g, steps=100000)
    g.add_argument("--w-fg", type=float, default=2.3, help="loss weight on instance-foreground "
                   "pixels (paper: 2.3)")
    g.add_argument("--w-bg", type=float, default=0.3, help="loss weight elsewhere (paper: 0.3)")
    g.add_argument("--ref-dropout", type=float, default=0.1, help="fraction of rows trained "
                   "with the null reference (what uncond rows get at inference), for CFG")
    add_precision_flags(g)
    g.add_argument("--seed", type=int, default=0, help="seed for data order, augmentation, "
                   "noise, timesteps and dropout")
    add_output_flags(p, "locref_adapter.safetensors", "models/locref")
    return p


def check_args(args: argparse.Namespace, have_dataset: bool) -> None:
    """ValueErrors for flag combinations that cannot work, before anything is loaded."""
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out!r} must end in .safetensors (the LocRef file format)")
    if args.export:
        return
    check_tensorboard(args)
    text_cache(args)  # a negative --text-cache is refused here
    if not args.comfyui:
        raise ValueError("--comfyui is required: the ComfyUI folder whose SD-1.5 code is used")
    if not (args.tiny_unet or args.world_base) and not (args.checkpoint and args.clip_vision):
        raise ValueError("--checkpoint (SD-1.5 .safetensors) and --clip-vision (CLIP vision "
                         ".safetensors, e.g. CLIP-ViT-H-14-laion2B-s32B-b79K) are required")
    if not have_dataset and not (args.images and args.instances):
        raise ValueError("--images and --instances are required (COCO images folder and "
                         "instances JSON)")
    if args.size % 64:
        raise ValueError(f"--size {args.size} must be a multiple of 64 (UNet levels at /8../64)")
    for name in ("steps", "batch_size", "ckpt_every", "log_every", "tokens", "max_instances"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if not 0.0 <= args.ref_dropout <= 1.0:
        raise ValueError(f"--ref-dropout {args.ref_dropout} must be in [0, 1]")
    if args.resume and args.init_from:
        raise ValueError("--resume and --init-from both set: --resume continues a run, "
                         "--init-from starts one; pass only one")


def load_clip_vision(host: SimpleNamespace, path: str | None, seed: int) -> Any:
    """The host's CLIP_VISION object (what CLIPVisionLoader returns), frozen; path None: the
    tiny random tower (tests)."""
    clip_vision = host.sd.clip_vision  # comfy.clip_vision, already imported by comfy.sd
    if path is None:
        with tempfile.TemporaryDirectory() as tmp:
            config = os.path.join(tmp, "clip_vision_tiny.json")
            with open(config, "w") as f:
                json.dump(TINY_CLIP_VISION, f)
            model = clip_vision.ClipVisionModel(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            reinit(model.model)
    else:
        if not os.path.isfile(path):
            raise ValueError(f"--clip-vision {path!r} does not exist; pass a CLIP vision "
                             ".safetensors file (models/clip_vision)")
        model = clip_vision.load(path)
        if model is None:
            raise ValueError(f"{path}: the host does not recognise this CLIP vision file")
    freeze(model.model)
    return model


def adapter_config(args: argparse.Namespace, unet: torch.nn.Module) -> AdapterConfig:
    return AdapterConfig(tokens=args.tokens, hidden_dim=args.hidden_dim or None,
                         shared_kv=args.shared_kv, model_channels=unet.model_channels)


class ReferenceKV(torch.nn.Module):
    """What DDP wraps: CLIP image embeddings -> every site's keys/values of the composite and of
    each reference, with gradients (the inference LocRefState computes the same under no_grad).
    A zero embedding gives the null reference's tokens (`LocRefAdapter.null_tokens`)."""

    def __init__(self, adapter: LocRefAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, ri_embeds: torch.Tensor, ci_embeds: torch.Tensor) -> dict:
        """ri_embeds (B, K, E), ci_embeds (B, E) -> site -> (k_ci, v_ci (B, T, C), k_ri, v_ri
        (B, K*T, C)), the references' tokens concatenated in slot order."""
        b, k, _ = ri_embeds.shape
        ri = self.adapter.project(ri_embeds.flatten(0, 1))  # (B*K, T, 768)
        ri = ri.reshape(b, k * ri.shape[1], ri.shape[2])  # (B, K*T, 768)
        ci = self.adapter.project(ci_embeds)  # (B, T, 768)
        return {site: (*self.adapter.site_kv(site, ci, "ci"), *self.adapter.site_kv(site, ri, "ri"))
                for site in self.adapter.cfg.sites}


@dataclass
class Run:
    """Everything the step function needs."""

    args: argparse.Namespace
    env: DistEnv
    host: SimpleNamespace
    parts: SD15Parts
    clip_vision: Any
    adapter: LocRefAdapter
    kv_module: torch.nn.Module  # ReferenceKV or its DDP wrapper
    state: LocRefTrainState
    student: Any  # ModelPatcher clone with LocRefStash / LocRefBlend installed
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    texts: TextCache | None = None  # --text-cache


def setup(args: argparse.Namespace, env: DistEnv) -> Run:
    host = load_host(args.comfyui, cpu=env.device.type == "cpu")
    amp = autocast_dtype(args.mixed_precision, env.device)
    parts = load_base(host, args, amp or torch.float32)
    clip_vision = load_clip_vision(host, args.clip_vision, args.seed)
    if args.grad_checkpointing:
        log.info("gradient checkpointing on %d UNet blocks",
                 enable_grad_checkpointing(host, parts.unet))
    torch.manual_seed(args.seed)  # same initial adapter on every rank (DDP broadcasts anyway)
    if args.init_from:
        adapter = load_adapter(args.init_from)
        if adapter.cfg.model_channels != parts.unet.model_channels:
            raise ValueError(f"--init-from {args.init_from}: made for a UNet of width "
                             f"{adapter.cfg.model_channels}, this one is "
                             f"{parts.unet.model_channels}")
        log.info("initialised from %s (config %s)", args.init_from, adapter.cfg.to_json())
    else:
        adapter = LocRefAdapter(adapter_config(args, parts.unet))
    adapter.float().to(env.device).train()
    cfg_json = adapter.cfg.to_json()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr,
                                  weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)
    args.start_step = 0
    if args.resume:
        saved = load_checkpoint(args.resume, adapter, optimizer, cfg_json)
        args.start_step = int(saved["step"])
        if saved["extra"].get("scaler"):
            scaler.load_state_dict(saved["extra"]["scaler"])
    # the same callables LocRef Apply installs, around a state with per-row layouts
    state = LocRefTrainState(adapter, parts.unet)
    student = parts.patcher.clone()
    install(student, state)
    return Run(args, env, host, parts, clip_vision, adapter, wrap_ddp(ReferenceKV(adapter), env),
               state, student, optimizer, scaler, amp, text_cache(args))


@torch.no_grad()
def encode_references(run: Run, batch: dict[str, Any], drop: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen CLIP vision embeddings as LocRef Apply makes them: references cropped, the
    composite squashed. Returns ri (B, K, E) (zeros in empty slots) and ci (B, E); rows in
    `drop` (B,) get zero embeddings, i.e. the null reference."""
    refs, valid = batch["references"], batch["valid"]  # (B, K, 3, R, R), (B, K)
    b, k = valid.shape
    embed_dim = run.adapter.cfg.embed_dim
    ci = run.clip_vision.encode_image(batch["composite"].movedim(1, -1),
                                      crop=False)["image_embeds"].float().cpu()  # (B, E)
    if ci.shape[-1] != embed_dim:
        raise ValueError(f"the CLIP vision model gives {ci.shape[-1]}-wide embeddings but the "
                         f"adapter expects {embed_dim}; use a ViT-H/14 model")
    ri = torch.zeros(b * k, embed_dim)
    flat = valid.flatten().nonzero().flatten()
    if flat.numel():
        images = refs.flatten(0, 1)[flat].movedim(1, -1)  # (M, R, R, 3) in [0, 1]
        ri[flat] = run.clip_vision.encode_image(images, crop=True)["image_embeds"].float().cpu()
    keep = (~drop).float()
    ri = ri.reshape(b, k, embed_dim) * keep[:, None, None]
    return ri.to(run.env.device), (ci * keep[:, None]).to(run.env.device)


def train_step(run: Run, step: int, batch: dict[str, Any], preview: bool = False
               ) -> dict[str, Any]:
    """One optimizer step on this rank's batch; returns the loss (and with `preview`, the first
    row's target and denoised latents)."""
    args, dev = run.args, run.env.device
    gen = step_generator(args.seed, step, run.env.rank)
    b = batch["image"].shape[0]
    x0 = encode_images(run.parts, batch["image"]).to(dev)  # (B, 4, S/8, S/8)
    drop = torch.rand(b, generator=gen) < args.ref_dropout  # (B,) null-reference rows
    ri_embeds, ci_embeds = encode_references(run, batch, drop)
    context = encode_text(run.parts.clip, [str(c) for c in batch["caption"]], run.texts).to(dev)
    ms = run.parts.patcher.model.model_sampling
    t = torch.randint(0, len(ms.sigmas), (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen).to(dev)
    ensure_loaded(run.host, run.parts)
    x, sigma = diffuse(run.parts, x0, noise, t)
    amp = torch.autocast(dev.type, dtype=run.amp) if run.amp else contextlib.nullcontext()
    with amp:
        run.state.set_batch(run.kv_module(ri_embeds, ci_embeds), batch["boxes"], batch["valid"])
        eps = predict_eps(run.host, run.student, x, sigma, context)
        loss = weighted_eps_mse(eps, noise, batch["fg_mask"], args.w_fg, args.w_bg)
    # backward may call the patch again (--grad-checkpointing recomputes blocks): the batch's
    # keys/values stay set until the next step's set_batch
    optimizer_step(loss, run.optimizer, run.scaler, run.adapter.parameters(), args, step)
    stats: dict[str, Any] = {"loss": loss.item()}
    if preview:
        stats["preview"] = preview_latents(x0, x, sigma, eps)
    return stats


def build_dataset(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load and validate the COCO data (DataError naming the file and entry) before any model."""
    from ..data.coco import load_coco
    from ..data.locref_dataset import LocRefDataset, collate_locref

    coco = load_coco(args.images, args.instances, args.captions)
    dataset = LocRefDataset(coco, size=args.size, max_instances=args.max_instances,
                            ref_size=args.ref_size, augment=args.augment, seed=args.seed)
    return dataset, collate_locref


def train(args: argparse.Namespace, env: DistEnv, dataset: Any = None,
          collate_fn: Any = None) -> dict[str, Any]:
    """The training run; returns {"losses": per-step losses on this rank, "digest", "out"}."""
    if dataset is None:
        dataset, collate_fn = build_dataset(args)  # validates the data before any model loads
    run = setup(args, env)
    start = args.start_step
    batches, per_epoch = sharded_batches(dataset, args.batch_size, env, args.seed, collate_fn,
                                         args.num_workers, start)
    log.info("LocRef adapter: %d samples, %d steps/epoch x %d rank(s), steps %d..%d",
             len(dataset), per_epoch, env.world_size, start, args.steps)
    progress = Progress(env, args.steps, start, args.log_every)
    tb = TrainLog(env, args, "locref")
    losses = []
    for step in range(start, args.steps):
        stats = train_step(run, step, next(batches), tb.preview_due(step))
        if step == start:
            _report_sites(run.state)
        losses.append(stats["loss"])
        progress.update(step, stats["loss"])
        log_step(tb, run.parts, step, stats)
        checkpoint_if_due(env, args, step, run.adapter, run.adapter.cfg.to_json(),
                          run.optimizer, run.scaler)
    tb.close()
    if env.is_main:
        save_adapter(run.adapter, args.out, _export_meta(args.steps, args))
        log.info("exported %s", args.out)
    digest = check_same_weights(run.adapter, env)
    return {"losses": losses, "digest": digest, "out": args.out, "rank": env.rank,
            "steps": args.steps, "fired": dict(run.state.fired)}


def _report_sites(state: LocRefTrainState) -> None:
    """Log at how many cross-attention sites the patch ran in the first step (a site the host
    never reports would silently get no training)."""
    missing = [site for site in state.sites if site not in state.fired]
    if missing:
        log.warning("the LocRef patch did not run at %s: those sites learn nothing with this "
                    "host version", missing)
    log.info("the LocRef patch ran at %d of %d cross-attention sites",
             len(state.sites) - len(missing), len(state.sites))


def _export_meta(step: int | str, args: argparse.Namespace | None = None) -> dict[str, str]:
    meta = {"trainer": "locref_core.train.locref", "trained_steps": str(step)}
    if args is not None and args.checkpoint:
        meta["base_model"] = os.path.basename(args.checkpoint)
    if args is not None and args.clip_vision:
        meta["clip_vision"] = os.path.basename(args.clip_vision)
    return meta


def export_checkpoint(ckpt: str, out: str) -> str:
    """A training checkpoint -> the pack's LocRef file (no host needed)."""
    tensors, meta = read_checkpoint_weights(ckpt)
    try:
        cfg = AdapterConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{ckpt}: not a LocRef training checkpoint ({err})") from None
    adapter = LocRefAdapter(cfg)
    load_strict(ckpt, adapter, tensors)
    save_adapter(adapter, out, _export_meta(meta.get("step", "?")))
    log.info("exported %s (step %s) to %s", ckpt, meta.get("step"), out)
    return out


def main(argv: list[str] | None = None, dataset: Any = None,
         collate_fn: Any = None) -> dict[str, Any]:
    """CLI entry; `dataset`/`collate_fn` replace the COCO dataset (tests)."""
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
