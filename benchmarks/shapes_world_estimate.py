"""How long would the shapes world take on this machine? `shapes_world.py --estimate` (imported
by it, not run alone) times a few steps of every stage at the preset's sizes, with the threads
the run gives each stage, and projects the minutes per stage and in all, before anything is
trained for real. It writes `estimate.json` in the run's folder and keeps nothing else: the
models it times are random and thrown away; only the world's data (written once, as the run
writes it) stays for the run.

Why: the same code takes very different times on different 2-core machines (the UNet's
training step at batch 32: 0.56 to 0.64 s on one kind of virtual machine, about 1.6 s on
another), so whether the full preset fits a time budget is a property of the machine, and it can
be known in a few minutes instead of hours.

The two halves after the base run side by side on one core each, and may slow each other
(memory bandwidth, caches): their stages are timed here while a neighbour process trains the
world's UNet on the other core, so that is counted. What it leaves out: the UNet is timed on a
few images' captions, already encoded (in the run, each caption's first use encodes it once,
well under a minute in all), and the grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__":  # the estimate's neighbour process (`neighbour`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locref_core.train.common import weights_digest  # noqa: E402
from locref_core.world import base  # noqa: E402
from locref_core.world import controlnet as world_cn  # noqa: E402
from locref_core.world.evaluate import bootstrap, score_image  # noqa: E402
from locref_core.world.models import WorldConfig, build_world, save_world  # noqa: E402

log = logging.getLogger("shapes_world")
STEPS = 6  # steps timed per trainer, after WARMUP (the first steps allocate)
WARMUP = 2


class StepClock:
    """`on_step` for the world's trainers: the seconds per step after the first `warmup`."""

    def __init__(self, warmup: int = WARMUP):
        self.warmup, self.stamps = warmup, []

    def __call__(self, step: int, loss: float) -> None:
        self.stamps.append(time.perf_counter())

    @property
    def seconds(self) -> float:
        timed = self.stamps[self.warmup - 1:]
        if len(timed) < 2:
            raise ValueError(f"StepClock: {len(self.stamps)} steps recorded; time at least "
                             f"{self.warmup + 1}")
        return (timed[-1] - timed[0]) / (len(timed) - 1)


def per_call(fn: Callable[[int], Any], short: int, long: int) -> float:
    """Seconds per step of `fn(steps)` (a trainer run that sets itself up each time): the
    difference between a run of `long` and of `short` steps, so the setup cancels. A first,
    untimed run of `short` steps pays what only a process's first run pays (imports, kernels'
    first calls): timed, it made the difference 15 % too small."""
    fn(short)
    times = []
    for n in (short, long):
        t = time.perf_counter()
        fn(n)
        times.append(time.perf_counter() - t)
    return max(0.0, (times[1] - times[0]) / (long - short))


def estimate(run: dict, host, data: dict, sw, data_seconds: float = 0.0) -> dict[str, Any]:
    """Seconds per unit of every stage on this machine and the projected minutes of the run
    (`sw`: shapes_world's stage code: stage_locref, configurations, generate, load_pack,
    world_config; `data_seconds`: what starting the host and writing or reading the world's data
    took). Writes `estimate.json`."""
    work = run["dir"] / "estimate"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    est = {**run, "dir": work, "tensorboard": False}
    rate = {"data": data_seconds}
    try:
        # the base: the run trains it on every core
        cfg = sw.world_config(run)
        parts = build_world(host, cfg)
        images = data["train_images"]
        clock = StepClock()
        base.train_vae(parts, images, WARMUP + STEPS, seed=run["seed"], maps=data["train_maps"],
                       on_step=clock, amp=run["amp"])
        rate["VAE step"] = clock.seconds
        fingerprint = {"VAE": weights_digest(parts.vae.first_stage_model)[:16]}
        t = time.perf_counter()
        latents = base.encode_latents(parts, images)
        mirrored = base.encode_latents(parts, images.flip(-1))
        rate["latents"] = time.perf_counter() - t
        cfg = dataclasses.replace(cfg, latent_scale=base.fit_latent_scale(parts, latents))
        clock, few = StepClock(), data["train_captions"][:4]
        base.train_unet(host, parts, latents, [few[i % len(few)] for i in range(len(latents))],
                        WARMUP + STEPS, seed=run["seed"], on_step=clock, mirrored=mirrored,
                        amp=run["amp"])
        rate["UNet step"] = clock.seconds
        fingerprint["UNet"] = weights_digest(parts.unet)[:16]
        base_path = str(work / "base.safetensors")
        save_world(base_path, parts, cfg, {"preset": run["name"], "estimate": "random"})
        # the two halves: one core each in the run, side by side
        with base.one_thread(), neighbour(run["comfyui"], run["unet_channels"],
                                          run["vae_downscale"], run["amp"] is not None,
                                          run["portable"]):
            rate.update(half_rates(est, host, parts, cfg, data, latents, base_path, sw))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_estimate(run, rate, fingerprint)


@contextlib.contextmanager
def neighbour(comfyui: str, channels: int, downscale: int = 4, bf16: bool = False,
              portable: bool = False) -> Iterator[None]:
    """A second process training the world's UNet (`channels` wide, on latents of a
    /`downscale` VAE, autocast in bfloat16 if `bf16`) on one core (what the other half does in
    the run) from its first step until the block ends."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--neighbour",
                             comfyui, str(channels), str(downscale), str(int(bf16)),
                             str(int(portable))],
                            stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # anything the host prints before is passed over
            if line.strip() == "ready":
                break
        else:
            raise RuntimeError(f"the estimate's neighbour process ended (exit code "
                               f"{proc.wait()}) before its first step; its log is above")
        yield
    finally:
        proc.kill()
        proc.wait()


def neighbour_main(comfyui: str, channels: int, downscale: int, bf16: bool = False,
                   portable: bool = False) -> None:
    """The neighbour's loop: UNet training steps at batch 16 on one thread, random latents and
    one caption, in the run's numerics (`portable`: shapes_world.enter_portable, its environment
    inherited); prints "ready" after the first step."""
    from locref_core.train.host import load_host  # noqa: PLC0415

    if portable:
        from shapes_world import enter_portable  # noqa: PLC0415  (this folder)

        enter_portable()
    torch.set_num_threads(1)
    host = load_host(comfyui, cpu=True)
    parts = build_world(host, WorldConfig(unet_channels=channels))
    side = WorldConfig().size // downscale
    latents = torch.randn(64, 4, side, side)

    def ready(step: int, loss: float) -> None:
        if step == 0:  # the parent reads it on a pipe
            sys.stdout.write("ready\n")
            sys.stdout.flush()

    base.train_unet(host, parts, latents, [["a red square"]] * len(latents), 10 ** 9,
                    batch=16, on_step=ready, amp=torch.bfloat16 if bf16 else None)


def half_rates(est: dict, host, parts, cfg, data: dict, latents: torch.Tensor, base_path: str,
               sw) -> dict[str, float]:
    """Seconds per step of the three adapters' training and per layout of each half's images,
    and the tables' cost, on one thread (`latents`: the training images' through the base's
    frozen VAE)."""
    import shapes_world_fgdm as fgdm  # noqa: PLC0415  (this folder)

    p, rate = est["preset"], {}
    est = {**est, "preset": dict(p)}

    def trained(stage: Callable, name: str, key: str) -> Callable[[int], Any]:
        def train(steps: int) -> None:
            est["preset"][key] = steps
            (est["dir"] / f"{name}.safetensors").unlink(missing_ok=True)
            shutil.rmtree(est["dir"] / f"{name}_ckpt", ignore_errors=True)
            stage(est, data, base_path)
        return train

    rate["LocRef step"] = per_call(trained(sw.stage_locref, "locref", "locref_steps"), WARMUP,
                                   WARMUP + STEPS)
    rate["seg factor step"] = per_call(trained(fgdm.stage_factor, "fgdm_seg", "factor_steps"),
                                       WARMUP, WARMUP + STEPS)
    model, clock = world_cn.build_controlnet(
        host, parts, seed=est["seed"], hint_init=fgdm.CONTROLNET_HINT_INIT), StepClock()
    world_cn.train_controlnet(host, parts, model, latents, (data["train_maps"] + 1) / 2,
                              data["train_captions"], WARMUP + STEPS,
                              batch=p["controlnet_batch"], seed=est["seed"], on_step=clock,
                              amp=est["amp"])
    rate["seg ControlNet step"] = clock.seconds
    est["data"] = {**data, "heldout": data["heldout"][:1]}
    t = time.perf_counter()
    configs = sw.configurations(est, host, parts, str(est["dir"] / "locref.safetensors"))
    images = sw.generate(est, host, parts, cfg, configs)
    rate["LocRef layout"] = time.perf_counter() - t  # every configuration's image of a layout
    t = time.perf_counter()
    fgdm.generate(est, host, parts, cfg, sw.load_pack(), str(est["dir"] / "fgdm_seg.safetensors"),
                  world_cn.wrap(host, model), range(1))
    rate["FG-DM layout"] = time.perf_counter() - t  # N = 1 and N = 10 maps, three images
    t = time.perf_counter()
    scores = [score_image(im[0], data["heldout"][0]) for im in images.values()]
    rate["image scored"] = (time.perf_counter() - t) / len(scores)
    t = time.perf_counter()
    bootstrap(scores[:1] * p["heldout"], rounds=p["bootstrap"], seed=est["seed"])
    rate["table row"] = time.perf_counter() - t
    return rate


def project(preset: dict, rate: dict[str, float], rows: int = 7, fgdm_rows: int = 3
            ) -> dict[str, float]:
    """Minutes per stage of the run from `rate` (seconds per step, layout, image or row):
    `rows` configurations in the LocRef table (the ceiling included) and `fgdm_rows` image rows
    in the FG-DM table; the two halves after the base side by side ("total"), and the least any
    order of the same stages could take on 2 cores ("least on 2 cores")."""
    n = preset["heldout"]
    first, second = (n + 1) // 2, n // 2
    m = {"data": rate["data"] / 60,
         "VAE": (preset["vae_steps"] * rate["VAE step"] + rate["latents"]) / 60,
         "UNet": preset["unet_steps"] * rate["UNet step"] / 60,
         "LocRef adapter": preset["locref_steps"] * rate["LocRef step"] / 60,
         "LocRef images": n * rate["LocRef layout"] / 60,
         "seg factor": preset["factor_steps"] * rate["seg factor step"] / 60,
         "seg ControlNet": preset["controlnet_steps"] * rate["seg ControlNet step"] / 60,
         "FG-DM images, first half": first * rate["FG-DM layout"] / 60,
         "FG-DM images, second half": second * rate["FG-DM layout"] / 60,
         "tables": (n * (rows + fgdm_rows) * rate["image scored"]
                    + rows * rate["table row"]) / 60}
    m["LocRef half"] = m["LocRef adapter"] + m["LocRef images"] + m["FG-DM images, second half"]
    m["FG-DM half"] = m["seg factor"] + m["seg ControlNet"] + m["FG-DM images, first half"]
    after_base = max(m["LocRef half"], m["FG-DM half"])
    m["total"] = m["data"] + m["VAE"] + m["UNet"] + after_base + m["tables"]
    # Every stage after the base needs the base, so no order of these stages on 2 cores ends
    # before the base plus half the one-core minutes after it (a stage on both cores at best
    # twice as fast as on one): the run's order loses only the gap between its halves.
    m["least on 2 cores"] = (m["data"] + m["VAE"] + m["UNet"]
                             + (m["LocRef half"] + m["FG-DM half"]) / 2 + m["tables"])
    return m


def write_estimate(run: dict, rate: dict[str, float], fingerprint: dict[str, str]
                   ) -> dict[str, Any]:
    """`fingerprint`: the first 16 hex digits of the VAE's and the UNet's weights digests after
    their timed steps (the run's seed and data, its threads and numerics): two machines that
    print the same did those steps bit for bit alike; two that do not will train other weights
    (the converse is not proven: a kernel the steps do not reach could still differ)."""
    minutes = project(run["preset"], rate)
    result = {"preset": run["name"], "threads": torch.get_num_threads(),
              "portable": run["portable"], "fingerprint": fingerprint,
              "seconds": {k: round(v, 4) for k, v in rate.items()},
              "minutes": {k: round(v, 1) for k, v in minutes.items()}}
    (run["dir"] / "estimate.json").write_text(json.dumps(result, indent=1))
    log.info("estimate (%s preset, this machine): %s", run["name"], format_estimate(result))
    log.info("fingerprint (%s numerics, %d threads): VAE %s, UNet %s (compare with the README's "
             "\"Running it\")", "portable" if result["portable"] else "default",
             result["threads"], fingerprint["VAE"], fingerprint["UNet"])
    return result


def format_estimate(result: dict[str, Any]) -> str:
    m, s = result["minutes"], result["seconds"]
    return (f"about {m['total']:.0f} min from nothing: data {m['data']:.1f}, base {m['VAE']:.1f} "
            f"(VAE, {s['VAE step']:.2f} s/step) + {m['UNet']:.1f} (UNet, "
            f"{s['UNet step']:.2f} s/step); then side by side the LocRef half "
            f"{m['LocRef half']:.1f} (adapter {m['LocRef adapter']:.1f} at "
            f"{s['LocRef step']:.2f} s/step, images {m['LocRef images']:.1f}, FG-DM images "
            f"{m['FG-DM images, second half']:.1f}) and the FG-DM half {m['FG-DM half']:.1f} "
            f"(seg factor {m['seg factor']:.1f}, seg ControlNet {m['seg ControlNet']:.1f}, "
            f"images {m['FG-DM images, first half']:.1f}); tables {m['tables']:.1f}. No order "
            f"of these stages on 2 cores takes less than {m['least on 2 cores']:.0f} min")


if __name__ == "__main__" and sys.argv[1:2] == ["--neighbour"]:
    neighbour_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:6] == ["1"],
                   sys.argv[6:7] == ["1"])
