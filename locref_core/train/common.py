"""Pieces both trainers share: torchrun/DDP setup, sharded resumable loading, rank-0 progress,
checkpoints (safetensors weights + a weights_only torch state file) and a weights digest.

One process per device; `torchrun --nproc_per_node N python -m locref_core.train.<name> ...`
sets RANK / WORLD_SIZE / LOCAL_RANK, without them everything runs in a single process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)

WEIGHTS_FILE, STATE_FILE = "weights.safetensors", "state.pt"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group (nccl on GPU, gloo on CPU) or run single-process.

    device: "auto" (CUDA when available), "cuda" or "cpu". On GPU each rank is pinned to
    cuda:LOCAL_RANK *before* the host is imported (the host picks the current CUDA device).
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device {device!r} is unknown; use auto, cuda or cpu")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not use_cuda:
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def setup_logging(env: DistEnv, level: int = logging.INFO) -> None:
    """INFO on rank 0, warnings only elsewhere (so N ranks do not print N progress lines)."""
    logging.basicConfig(level=level if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s")


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DDP around the trainable module (broadcasts rank 0's weights, all-reduces gradients)."""
    if not env.distributed:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator for one step's noise, timesteps and dropout: a function of (seed, step,
    rank) only, so a resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


class ShardedSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (for resume)."""

    start: int = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.start)


def sharded_batches(dataset: Dataset, batch_size: int, env: DistEnv, seed: int,
                    collate_fn: Any = None, num_workers: int = 0,
                    start_step: int = 0) -> tuple[Iterator[Any], int]:
    """An endless iterator of this rank's batches starting at `start_step`, and steps per epoch.

    Each epoch is a fresh seeded shuffle split across ranks (DistributedSampler, equal shard
    sizes); incomplete batches are dropped so every step has the same shape on every rank.
    """
    sampler = ShardedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                             seed=seed, drop_last=False)
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples over {env.world_size} rank(s) give "
                         f"{len(sampler)} per rank, fewer than --batch-size {batch_size}; "
                         "lower the batch size or add data")
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        collate_fn=collate_fn, num_workers=num_workers,
                        pin_memory=env.device.type == "cuda", persistent_workers=False)

    def endless() -> Iterator[Any]:
        epoch, skip = divmod(start_step, per_epoch)
        while True:
            sampler.set_epoch(epoch)
            sampler.start = skip * batch_size
            if hasattr(dataset, "set_epoch"):  # e.g. FactorDataset varies captions per epoch
                dataset.set_epoch(epoch)
            yield from loader
            epoch, skip = epoch + 1, 0

    return endless(), per_epoch


class Progress:
    """Rank-0 progress lines: step, loss (this step and running mean), steps/s, ETA.
    `averaged`: the losses handed in are already the mean over the ranks (the caller
    all-reduced them), so the running mean is not reduced again."""

    def __init__(self, env: DistEnv, total: int, start: int = 0, every: int = 10,
                 averaged: bool = False):
        self.env, self.total, self.every = env, total, max(1, every)
        self.averaged = averaged
        self.start_step, self.t0 = start, time.perf_counter()
        self.window: list[float] = []

    def update(self, step: int, loss: float, **extra: float) -> None:
        """Call on every rank after each step (the logged loss is averaged over ranks unless
        it already is)."""
        self.window.append(loss)
        done = step + 1
        if done % self.every and done != self.total:
            return
        mean = torch.tensor([sum(self.window) / len(self.window)], dtype=torch.float64,
                            device=self.env.device)  # nccl reduces device tensors only
        if self.env.distributed and not self.averaged:
            dist.all_reduce(mean)
            mean /= self.env.world_size
        self.window = []
        if not self.env.is_main:
            return
        rate = (done - self.start_step) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        extras = " ".join(f"{k} {v:.4f}" for k, v in extra.items())
        log.info("step %d/%d loss %.4f (mean %.4f) %s %.2f steps/s ETA %s", done, self.total,
                 loss, mean.item(), extras, rate, _hms(eta))


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), Python and numpy RNG states, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(ckpt_dir: str, step: int, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, config_json: str, args: dict[str, Any],
                    extra_state: dict[str, Any] | None = None, keep: int = 2) -> str:
    """Write `<ckpt_dir>/step_<step>/` (rank 0 only): the trainable weights as safetensors with
    config, args and step in the metadata, and `state.pt` (optimizer, RNG, extra) that
    `load_checkpoint` reads back with weights_only=True. Keeps the newest `keep` checkpoints."""
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = {"config": config_json, "args": json.dumps(args, sort_keys=True, default=str),
            "step": str(step)}
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
              os.path.join(tmp, WEIGHTS_FILE), metadata=meta)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": capture_rng(),
                "extra": extra_state or {}}, os.path.join(tmp, STATE_FILE))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)
    return final


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete `step_*` checkpoint directories under ckpt_dir, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = sorted(n for n in os.listdir(ckpt_dir)
                   if n.startswith("step_") and not n.endswith(".tmp")
                   and os.path.isfile(os.path.join(ckpt_dir, n, STATE_FILE)))
    return [os.path.join(ckpt_dir, n) for n in names]


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or the newest one inside a directory of checkpoints."""
    if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise ValueError(f"{path}: no checkpoint here (expected {WEIGHTS_FILE} and {STATE_FILE}, "
                         "or step_* folders written by --ckpt-dir)")
    return found[-1]


def checkpoint_metadata(path: str) -> dict[str, str]:
    """A checkpoint's metadata (config, the flags it was trained with, step), without its
    tensors."""
    with safe_open(os.path.join(resolve_checkpoint(path), WEIGHTS_FILE), framework="pt") as f:
        return dict(f.metadata() or {})


def read_checkpoint_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint's weights file."""
    path = resolve_checkpoint(path)
    with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_checkpoint(path: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    config_json: str) -> dict[str, Any]:
    """Restore weights (strict), optimizer and RNG; returns the state dict (step, extra)."""
    path = resolve_checkpoint(path)
    tensors, meta = read_checkpoint_weights(path)
    if meta.get("config") != config_json:
        raise ValueError(f"{path}: trained with config {meta.get('config')} but this run has "
                         f"{config_json}; resume with the same flags or start a new --ckpt-dir")
    module.load_state_dict(tensors, strict=True)
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"])
    log.info("resumed from %s at step %d", path, state["step"])
    return state


def check_same_weights(module: torch.nn.Module, env: DistEnv) -> str:
    """The weights digest, checked equal on every rank (RuntimeError naming the ranks if not)."""
    digest = weights_digest(module)
    if env.distributed:
        digests: list[Any] = [None] * env.world_size
        dist.all_gather_object(digests, digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise RuntimeError(f"ranks {differ} ended with weights different from rank 0's")
    log.info("weights digest %s (identical on %d rank(s))", digest[:16], env.world_size)
    return digest


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of the module's state (names, shapes, dtypes and bytes): equal iff bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def autocast_dtype(flag: str, device: torch.device) -> torch.dtype | None:
    """--mixed-precision -> the autocast dtype (None: fp32). On a GPU, auto is bf16 where
    supported, else fp16. On CPU, auto and no are fp32 and bf16 autocasts in bfloat16 (fast only
    where the CPU has bf16 instructions: `cpu_has_bf16`; elsewhere a warning says it is
    emulated); fp16 needs a GPU."""
    if device.type != "cuda":
        if flag == "fp16":
            raise ValueError("--mixed-precision fp16 needs a GPU; on CPU use bf16 (autocast in "
                             "bfloat16), auto or no (fp32)")
        if flag != "bf16":
            return None
        warn_unless_cpu_bf16("--mixed-precision bf16")
        return torch.bfloat16
    if flag == "no":
        return None
    if flag == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[flag]


def warn_unless_cpu_bf16(what: str) -> None:
    """A warning that `what` (a flag asking for bfloat16 on this CPU) will be slow where the CPU
    has no bf16 instructions."""
    if not cpu_has_bf16():
        log.warning("%s on a CPU without bf16 instructions (AVX512-BF16, AMX): torch emulates "
                    "them, usually slower than fp32", what)


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bfloat16 natively (its flags list avx512_bf16 or amx_bf16);
    False where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})
