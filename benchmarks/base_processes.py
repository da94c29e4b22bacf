"""Does the shapes world's base train faster in two one-thread processes (`base.Share`, each
computing half of every batch, the gradients all-reduced), or compiled (`torch.compile`), than
in one process on two threads as the run trains it? Both sides measured in one run,
alternating, on this machine; prints the seconds per training step of each and their ratio.

    python benchmarks/base_processes.py --comfyui /path/to/ComfyUI [--stage unet] [--rounds 3]
    python benchmarks/base_processes.py --comfyui /path/to/ComfyUI --versus compile

Each side is a fresh process (or two) training the world's UNet (or VAE) from random weights on
random latents (images) for `--steps` steps of the run's batch (UNet 32, VAE 16); the first
`--warmup` steps are not timed. The two-process side's time is rank 0's and includes the
all-reduce. The compiled side compiles the UNet (the VAE's encoder and decoder) with
`torch.compile`'s defaults in its first step, which the warmup leaves out (its seconds are
logged: minutes on 2 cores the first time, less once torch's on-disk cache holds the kernels).
Single timings on a shared 2-core virtual machine vary by 10-20 %, so the sides alternate for
`--rounds` rounds and the medians are compared.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locref_core.world import base  # noqa: E402

log = logging.getLogger("base_processes")
SIDES = {"processes": "two processes, one thread each",  # --versus -> the other side's name
         "compile": "one process, two threads, compiled"}
BATCH = {stage: inspect.signature(train).parameters["batch"].default  # the run's batches
         for stage, train in (("unet", base.train_unet), ("vae", base.train_vae))}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--comfyui", required=True, help="ComfyUI checkout (its classes are used)")
    p.add_argument("--stage", choices=sorted(BATCH), default="unet", help="what is trained")
    p.add_argument("--versus", choices=sorted(SIDES), default="processes",
                   help="what one process on two threads is measured against")
    p.add_argument("--unet-channels", type=int, default=32, help="width of the world's UNet")
    p.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each side")
    args = p.parse_args(argv)
    if args.steps < args.warmup + 2 or args.warmup < 1 or args.rounds < 1:
        p.error(f"--steps {args.steps} --warmup {args.warmup} --rounds {args.rounds}: time at "
                "least 2 steps after a warmup of at least 1, in at least 1 round")
    return args


def worker(comfyui: str, stage: str, channels: int, steps: int, warmup: int, rank: int,
           world: int, store: str, compiled: bool = False) -> None:
    """One measuring process: `world` 1 trains alone on two threads (`compiled`: through
    torch.compile), else this is `rank` of `world` one-thread processes sharing each batch. Rank
    0 prints its seconds per step, and the first step's seconds."""
    import torch.distributed as dist

    from locref_core.train.host import load_host
    from locref_core.world.models import WorldConfig, build_world

    torch.set_num_threads(2 if world == 1 else 1)
    if world > 1:
        dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    host = load_host(comfyui, cpu=True)
    parts, share = build_world(host, WorldConfig(unet_channels=channels)), base.Share(rank, world)
    if compiled and stage == "vae":  # train_vae calls them (and two 1x1 convolutions)
        parts.vae.first_stage_model.encoder.compile()
        parts.vae.first_stage_model.decoder.compile()
    elif compiled:
        parts.unet.compile()
    stamps: list[float] = [time.perf_counter()]
    clock = lambda step, loss: stamps.append(time.perf_counter())  # noqa: E731
    g = torch.Generator().manual_seed(0)
    if stage == "vae":
        images = torch.rand(256, 3, 64, 64, generator=g) * 2 - 1
        base.train_vae(parts, images, steps, BATCH["vae"], maps=images.flip(-1), on_step=clock,
                       share=share)
    else:
        latents = torch.randn(256, 4, 16, 16, generator=g)
        captions = [["a red square and a blue disc", "a green triangle"]] * len(latents)
        base.train_unet(host, parts, latents, captions, steps, BATCH["unet"], on_step=clock,
                        share=share)
    if rank == 0:
        sys.stdout.write(f"first step {stamps[1] - stamps[0]}\n"
                         f"seconds per step {(stamps[-1] - stamps[warmup]) / (steps - warmup)}\n")
        sys.stdout.flush()
    if world > 1:
        dist.destroy_process_group()


def measure(args: argparse.Namespace, world: int, compiled: bool = False) -> float:
    """Seconds per step of one side (fresh processes)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = (Path(tmp) / "store").as_uri()
        procs = [subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", args.comfyui, args.stage,
             str(args.unet_channels), str(args.steps), str(args.warmup), str(rank), str(world),
             store, str(int(compiled))], stdout=subprocess.PIPE, text=True)
            for rank in range(world)]
        out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a measuring process failed (exit codes "
                           f"{[p.returncode for p in procs]}); its log is above")
    lines = {x.rsplit(" ", 1)[0]: float(x.rsplit(" ", 1)[1]) for x in out[0].splitlines()
             if x.startswith(("first step ", "seconds per step "))}
    if compiled:
        log.info("compiled side: its first step (compiling) took %.1f s", lines["first step"])
    return lines["seconds per step"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    other = SIDES[args.versus]
    sides = (("one process, two threads", 1, False),
             (other, 2, False) if args.versus == "processes" else (other, 1, True))
    times: dict[str, list[float]] = {name: [] for name, _, _ in sides}
    for r in range(args.rounds):
        for name, world, compiled in sides:
            times[name].append(measure(args, world, compiled))
            log.info("round %d/%d, %s: %.3f s/step", r + 1, args.rounds, name, times[name][-1])
    one, two = (statistics.median(v) for v in times.values())
    batch = BATCH[args.stage]
    log.info("%s at %d channels, batch %d, %d timed steps, median of %d rounds:\n"
             "  one process, two threads: %.3f s/step (%.1f images/s)\n"
             "  %s: %.3f s/step (%.1f images/s)\n"
             "  %s: %.2f times as fast", args.stage, args.unet_channels, batch,
             args.steps - args.warmup, args.rounds, one, batch / one, other, two, batch / two,
             other, one / two)
    return {"times": times, "ratio": one / two}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        a = sys.argv[2:]
        worker(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]), int(a[6]), a[7],
               a[8] == "1")
    else:
        main()
