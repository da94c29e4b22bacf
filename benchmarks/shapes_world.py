"""The shapes world: do the pack's mechanisms do what the papers claim, measured end to end on a
CPU? A tiny text-to-image base (the host's SD-1.5 UNet, CLIP text model and AutoencoderKL at toy
sizes) is trained here on images of coloured shapes, frozen, then adapted by the pack's own LocRef
trainer; images are generated from held-out layouts through the state LocRef Apply builds and
scored by the world's detector (box AP through `locref_core.eval`), appearance (each box's colour
and shape against its reference), leakage and recall, with bootstrap 95 % intervals.

    python benchmarks/shapes_world.py --comfyui /path/to/ComfyUI [--quick] [--cache DIR]

The second table (`shapes_world_fgdm.py`) is FG-DM's: a seg factor trained by the pack's FG-DM
trainer, SBPC through the pack's own node at N = 1 and N = 10, and a seg ControlNet (the host's
class, trained here) drawing the image from the chosen map; object recall of the final images
and of the maps.

Every stage caches its result under --cache (a rerun skips what is done; the cache key holds the
preset, the seed and RECIPE_VERSION) and the run writes `table.md`, `table_fgdm.md`, `grid.png`,
`timings.json` (minutes per stage that ran), `machine.json` (the CPU, torch and vector code
the stages were trained with) and TensorBoard event files there. A run stopped
part-way (Ctrl-C, the machine taken back) continues from its training checkpoints and keeps the
images it had drawn until its tables are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from locref_core.data.locref_dataset import load_rgb  # noqa: E402
from locref_core.data.synthetic import make_synthetic_coco, synthetic_paths  # noqa: E402
from locref_core.eval.shapes import detect_shapes  # noqa: E402
from locref_core.layout import Box, Layout, Reference  # noqa: E402
from locref_core.patch import LocRefState, PatchSettings, install  # noqa: E402
from locref_core.preview import render_preview  # noqa: E402
from locref_core.train import locref as locref_trainer  # noqa: E402
from locref_core.train.host import load_host  # noqa: E402
from locref_core.train.loop import TrainLog  # noqa: E402
from locref_core.weights import save_whole  # noqa: E402
from locref_core.world import base  # noqa: E402
from locref_core.world.evaluate import (bootstrap, load_heldout, sample_seed,  # noqa: E402
                                       score_image)
from locref_core.world.models import WorldConfig, build_world, load_world, save_world  # noqa: E402

import shapes_world_fgdm as fgdm  # noqa: E402  (this folder)

log = logging.getLogger("shapes_world")
# Bumped whenever a stage trains differently, so a cache made by older code is never reused:
# 2 = the VAE trains on L1 + MSE with its learning rate decayed over the second half.
# 3 = the UNet's flipped rows are the flipped images' latents (were the latents flipped, which
#     this VAE decodes off the images: base.flipped_rows).
# (--prediction v: a base that predicts v, trained on v's MSE, cached in "...-v2-vpred".)
# The seg ControlNet keeps its own recipe in its file (shapes_world_fgdm.CONTROLNET_HINT_INIT).
RECIPE_VERSION = 3
# --vae-downscale -> the VAE's channel multipliers (one downsampling per multiplier after the
# first); 4 is WorldConfig's default, every run before the flag existed
VAE_MULT = {4: (1, 2, 2), 2: (1, 2)}
# What each stage does. The full preset was sized for the 90 minutes on 2 CPU cores; it
# takes 103 to 119 on the fastest 2-core machines measured, longer on others (the README's "How
# long"; `--estimate` projects it for this machine)
PRESETS = {
    "quick": {"train_images": 32, "heldout": 4, "vae_steps": 10, "unet_steps": 10,
              "locref_steps": 4, "locref_batch": 2, "factor_steps": 4, "factor_batch": 2,
              "controlnet_steps": 4, "controlnet_batch": 2, "sbpc_n": 3, "sample_steps": 4,
              "bootstrap": 20},
    "full": {"train_images": 2048, "heldout": 64, "vae_steps": 1500, "unet_steps": 4000,
             "locref_steps": 3000, "locref_batch": 8, "factor_steps": 1500, "factor_batch": 16,
             "controlnet_steps": 1500, "controlnet_batch": 16, "sbpc_n": 10, "sample_steps": 20,
             "bootstrap": 500},
}


def parse_args(argv=None) -> argparse.Namespace:
    # no abbreviations: restart_if_portable finds --portable by its whole name
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--comfyui", required=True, help="ComfyUI checkout (its classes are used)")
    p.add_argument("--quick", action="store_true", help="every stage at toy size (minutes)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "comfyui-locref-world"),
                   help="stage results, table.md, grid.png, TensorBoard events")
    p.add_argument("--seed", type=int, default=0, help="world, training and sampling seed")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale for every image")
    p.add_argument("--prediction", default="eps", choices=["eps", "v"],
                   help="what the base UNet predicts (SD-1.5: eps; v is an experiment, "
                        "cached in its own folder)")
    p.add_argument("--unet-channels", type=positive_multiple_of_32, default=32,
                   help="width of the base UNet (model_channels; a multiple of 32, GroupNorm's "
                        "groups). The presets are sized for 32; another width is an experiment, "
                        "cached in its own folder (...-c64)")
    p.add_argument("--unet-norm-groups", type=int, default=32, choices=[32, 8, 4],
                   help="GroupNorm groups in the base UNet's norms (the host builds 32; at 32 "
                        "channels that normalises each channel alone, its spatial mean too, so "
                        "the UNet can hardly set a latent's mean colour; 4 gives SD-1.5's 8 to "
                        "32 channels a group). Not 32 is an experiment, cached in its own "
                        "folder (...-g4)")
    p.add_argument("--vae-downscale", type=int, default=4, choices=[2, 4],
                   help="how much the base's VAE shrinks the 64 px images: 4 gives 16 x 16 "
                        "latents (a small square spans 3 to 4), 2 gives 32 x 32 (four times the "
                        "positions for the UNet). 2 is an experiment, cached in its "
                        "own folder (...-f2)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="every training stage's forward passes: fp32, or autocast in bfloat16 "
                        "(the weights and optimizers stay fp32; the images are drawn in fp32 "
                        "as the host draws them on a CPU). bf16 is fast only where the CPU has "
                        "bf16 instructions (AVX512-BF16, AMX) and is an experiment, cached in "
                        "its own folder (...-bf16)")
    p.add_argument("--portable", action="store_true",
                   help="numerics chosen by no property of the CPU but AVX2: oneDNN and NNPACK "
                        "off, ATen and MKL pinned to their AVX2 code (the command sets "
                        "ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 and starts itself again), the "
                        "base on 2 threads; so that another AVX2 or AVX-512 machine trains the "
                        "same weights (unproven across machines: --estimate prints a fingerprint "
                        "to compare). Cached in its own folder (...-portable)")
    p.add_argument("--estimate", action="store_true",
                   help="only time a few steps of every stage on this machine and print the "
                        "projected minutes (a few minutes; writes estimate.json, trains nothing "
                        "that is kept)")
    return p.parse_args(argv)


def positive_multiple_of_32(text: str) -> int:
    """--unet-channels: the host's UNet normalises in 32 groups, so its width is a multiple of
    32."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive multiple of 32 (the host's "
                                         "UNet normalises in 32 groups); try 32, 64 or 96")
    return value


def load_pack() -> dict:
    """The repository as a package, as ComfyUI's custom-node loader imports it (LocRef Apply's
    own reference encoding, FGDM Apply Factor, FGDM SBPC Select): node module name -> module."""
    name = "locref_pack_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return {m: sys.modules[f"{name}.nodes.{m}"]
            for m in ("locref_nodes", "fgdm_nodes", "fgdm_map_nodes")}


def stage_data(run: dict) -> dict:
    """Training images (up to 4 objects) and held-out layouts (another seed)."""
    p, root = run["preset"], run["dir"] / "data"
    train = written_once(root / "train", n_images=p["train_images"], seed=run["seed"])
    held = written_once(root / "heldout", n_images=p["heldout"], seed=run["seed"] + 1000)
    images = read_images(train["images"])
    return {"train": train, "heldout": load_heldout(held), "heldout_paths": held,
            "heldout_images": read_images(held["images"]), "train_images": images,
            "train_maps": fgdm.read_maps(train),
            "train_captions": read_captions(train, len(images))}


def written_once(root: Path, n_images: int, seed: int) -> dict[str, Path]:
    """The world's shapes at `root`, written once per cache: into a side folder, then renamed
    into place, so a rerun (or a trainer of another process) never sees its files rewritten."""
    if not root.is_dir():
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        make_synthetic_coco(partial, n_images=n_images, size=64, seed=seed, max_objects=4)
        partial.rename(root)
    return synthetic_paths(root)


def read_images(folder: Path) -> torch.Tensor:
    files = sorted(glob.glob(str(folder / "*.png")))
    return torch.stack([load_rgb(f) * 2 - 1 for f in files])  # (N, 3, 64, 64) in [-1, 1]


def read_captions(paths: dict, n: int) -> list[list[str]]:
    """Every image's captions, in image order."""
    caps = json.loads(Path(paths["captions"]).read_text())["annotations"]
    by_image: dict[int, list[str]] = {}
    for c in caps:
        by_image.setdefault(c["image_id"], []).append(c["caption"])
    return [by_image[i + 1] for i in range(n)]


def stage_base(run: dict, host, data: dict):
    """The frozen base: VAE (images and maps), then the text-to-image UNet (cached)."""
    path = run["dir"] / "base.safetensors"
    if path.is_file():
        log.info("base: cached %s", path)
        return (*load_world(host, str(path)), str(path))
    p, tb = run["preset"], TrainLog(run["env"], run["tb_args"], "base")
    images, maps = data["train_images"], data["train_maps"]
    cfg = world_config(run)
    parts = build_world(host, cfg)
    log.info("base: VAE, %d steps on %d images and their maps", p["vae_steps"], len(images))
    base.train_vae(parts, images, p["vae_steps"], seed=run["seed"], maps=maps, amp=run["amp"],
                   on_step=lambda s, v: tb.scalars(s + 1, {"vae_l1": v}),
                   checkpoints=fgdm.loop_checkpoints(run, "base_ckpt/vae", p["vae_steps"]))
    latents = base.encode_latents(parts, images)
    cfg = dataclasses.replace(cfg, latent_scale=base.fit_latent_scale(parts, latents))
    captions = data["train_captions"]
    log.info("base: UNet, %d steps", p["unet_steps"])
    base.train_unet(host, parts, latents, captions, p["unet_steps"], seed=run["seed"],
                    mirrored=base.encode_latents(parts, images.flip(-1)), amp=run["amp"],
                    on_step=lambda s, v: tb.scalars(s + 1, {"unet_loss": v}),
                    checkpoints=fgdm.loop_checkpoints(run, "base_ckpt/unet", p["unet_steps"]))
    tb.close()
    save_world(str(path), parts, cfg, {"preset": run["name"]})
    shutil.rmtree(run["dir"] / "base_ckpt", ignore_errors=True)  # base.safetensors holds it all
    return parts, cfg, str(path)


def stage_locref(run: dict, data: dict, base_path: str) -> str:
    """The LocRef adapter, trained on the world by the pack's own trainer (cached)."""
    p = run["preset"]
    return fgdm.cached_training(run, "locref", "locref", locref_trainer.main, base_path,
                                p["locref_steps"], p["locref_batch"],
                                locref_data_args(data["train"]))


def locref_data_args(train: dict) -> list[str]:
    """The LocRef trainer's data flags for the world's training set (references at 32 px)."""
    return ["--images", str(train["images"]), "--instances", str(train["instances"]),
            "--captions", str(train["captions"]), "--ref-size", "32"]


def layout_of(item, with_refs: bool = True) -> Layout:
    """The held-out layout as LocRef Apply gets it: each box with its label and, `with_refs`, its
    reference and that reference's mask (what the trainer's references are made of)."""
    return Layout(64, 64, tuple(
        Box(*box, label=item.label(i),
            reference=Reference(item.references[i], item.masks[i]) if with_refs else None)
        for i, box in enumerate(item.boxes)))


def locref_state(nodes, parts, adapter, clip_vision, item, **settings) -> LocRefState:
    """The state LocRef Apply builds (its own reference encoding), with ablation settings."""
    layout = layout_of(item)
    ri, ci = nodes.reference_tokens(adapter, clip_vision, layout, list(layout.boxes))
    return LocRefState(adapter, layout, ri, ci, PatchSettings(**settings), parts.unet)


def text_state(nodes, parts, item) -> LocRefState:
    """Regional prompts: each box's label through the base's CLIP, no adapter."""
    layout = layout_of(item, with_refs=False)
    return LocRefState(None, layout, None, None, PatchSettings(region_text=1.0), parts.unet,
                       nodes.encode_box_texts(parts.clip, layout))


def configurations(run, host, parts, locref_path, seed: int | None = None):
    """name -> state builder (None: the base, caption only). `seed`: the one the adapter was
    trained with (default the run's), as the trainer's random CLIP vision tower follows it."""
    from locref_core.weights import load_adapter

    nodes = load_pack()["locref_nodes"]
    adapter = load_adapter(locref_path).eval()
    clip_vision = locref_trainer.load_clip_vision(  # the tower the adapter was trained with
        host, None, run["seed"] if seed is None else seed)
    ref = lambda **kw: lambda item: locref_state(nodes, parts, adapter, clip_vision, item,  # noqa: E731
                                                 **kw)
    return {"base, caption only": None,
            "LocRef, trained adapter": ref(),
            "ablation: instance masks off": ref(instance_masks=False),
            "ablation: composite path off": ref(composite=False),
            "ablation: text kept in boxes": ref(text_in_boxes=1.0),
            "regional prompts (box text, no adapter)": lambda item: text_state(nodes, parts, item)}


def generate(run, host, parts, cfg, configs, items=None,
             prompt: str | None = None) -> dict[str, list[torch.Tensor]]:
    """Every configuration on every held-out layout (or on `items`), the same seed per layout,
    prompted with the layout's caption (or with `prompt` for all); progress with ETA."""
    items, steps = items or run["data"]["heldout"], run["preset"]["sample_steps"]
    total, done, t0 = len(items) * len(configs), 0, time.perf_counter()
    images: dict[str, list[torch.Tensor]] = {name: [] for name in configs}
    for i, item in enumerate(items):
        for name, build in configs.items():
            patcher = parts.patcher
            if build is not None:
                patcher = parts.patcher.clone()
                install(patcher, build(item))
            images[name].append(base.sample_images(
                host, patcher, parts, [item.caption if prompt is None else prompt],
                [sample_seed(run["seed"], i)], cfg,
                steps=steps, guidance=run["guidance"])[0])
            done += 1
        rate = done / (time.perf_counter() - t0)
        log.info("generated %d/%d images, ETA %.0f s", done, total, (total - done) / rate)
    return images


def kept_locref_path(run: dict) -> Path:
    """Where the LocRef images of a run stopped before its tables wait for the rerun."""
    return run["dir"] / "locref_images.safetensors"


def locref_images(run, host, parts, cfg, configs) -> tuple[dict[str, list[torch.Tensor]], bool]:
    """Every configuration's images and whether they were kept: read back from
    `locref_images.safetensors` where a run stopped after drawing them left it (the run removes
    it once its tables are written), else drawn and saved there (renamed into place once whole).
    """
    from safetensors.torch import load_file

    path = kept_locref_path(run)
    if path.is_file():
        kept = load_file(str(path))
        if set(kept) == set(configs):
            log.info("locref images: kept from a run stopped part-way (%s)", path)
            return {name: list(kept[name]) for name in configs}, True
        log.info("locref images: %s holds other configurations (%s); drawing them again",
                 path, ", ".join(sorted(kept)))
    images = generate(run, host, parts, cfg, configs)
    save_whole({name: torch.stack(v).contiguous() for name, v in images.items()}, path)
    return images, False


def drop_kept_images(run: dict) -> None:
    """Once the tables are written: a later rerun draws every image again (a kept image would
    hide a change in the code that draws it)."""
    for path in (kept_locref_path(run), fgdm.rows_path(run, "first"),
                 fgdm.rows_path(run, "second")):
        path.unlink(missing_ok=True)


@torch.no_grad()
def reconstructions(run, parts) -> list[torch.Tensor]:
    """The held-out images through the base's VAE (encode, decode): the best any configuration
    can score once the detector reads what the VAE draws (3, H, W) in [0, 1]."""
    images = run["data"]["heldout_images"]
    decoded = parts.vae.first_stage_model.decode(base.encode_latents(parts, images))
    return list(((decoded + 1) / 2).clamp(0, 1))


def scores_of(run, images: list[torch.Tensor]) -> list[dict]:
    return [score_image(im, it) for im, it in zip(images, run["data"]["heldout"])]


def write_table(run, scores: dict[str, list[dict]]) -> str:
    lines = ["| configuration | AP | AP50 | appearance match | leakage | recall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, per_layout in scores.items():
        stats = bootstrap(per_layout, rounds=run["preset"]["bootstrap"], seed=run["seed"])
        cells = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in
                 (stats[k] for k in ("AP", "AP50", "appearance", "leakage", "recall"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (run["dir"] / "table.md").write_text(table + "\n")
    return table


def write_grid(run, columns: dict[str, list[torch.Tensor]], rows: int = 6, scale: int = 3
               ) -> Path:
    """A title row, then per layout: its preview and each column's image with the detected
    boxes drawn over it (not over maps: columns whose title ends in "map")."""
    side = 64 * scale
    titles = ["layout", *columns]
    head = Image.new("RGB", (side * len(titles), 18), (255, 255, 255))
    draw = ImageDraw.Draw(head)
    for k, title in enumerate(titles):
        draw.text((k * side + 3, 3), title[:30], fill=(0, 0, 0))
    tiles = [np.asarray(head)]
    for item, *generated in list(zip(run["data"]["heldout"], *columns.values()))[:rows]:
        row = [render_preview(layout_of(item), show_labels=False)] + list(generated)
        pics = [Image.fromarray((t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8))
                .resize((side, side), Image.NEAREST) for t in row]
        for pic, t, title in zip(pics[1:], row[1:], columns):
            if title.endswith("map"):
                continue  # a label map: nothing for the detector
            draw = ImageDraw.Draw(pic)
            for d in detect_shapes(t):
                draw.rectangle([v * side for v in d.box], outline=(255, 255, 255))
        tiles.append(np.concatenate([np.asarray(p) for p in pics], axis=1))
    path = run["dir"] / "grid.png"
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)
    return path


CEILING = "ceiling: the held-out image through the VAE"
GRID_TITLES = {CEILING: "VAE ceiling", "base, caption only": "base (caption)",
               "LocRef, trained adapter": "LocRef",
               "ablation: instance masks off": "masks off",
               "ablation: composite path off": "composite off",
               "ablation: text kept in boxes": "text in boxes",
               "regional prompts (box text, no adapter)": "regional prompts"}


class Timings:
    """Minutes per stage, in `file`. A stage loaded from the cache keeps the minutes it took when
    it was trained (an earlier run's, from the same file), so a rerun does not record the
    seconds its loading took as the stage's cost."""

    def __init__(self, run: dict, file: str = "timings.json"):
        self.path, self.t = run["dir"] / file, time.perf_counter()
        self.earlier = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.minutes: dict[str, float] = {}

    def mark(self, stage: str, cached: bool = False, resumed: bool = False) -> None:
        """`resumed`: the stage continued from a checkpoint, so its minutes are only the part
        this run did; it is listed under "resumed" so that nobody reads them as the stage's."""
        now = time.perf_counter()
        took = round((now - self.t) / 60, 2)
        self.minutes[stage] = self.earlier.get(stage, took) if cached else took
        if resumed and not cached:
            self.minutes.setdefault("resumed", []).append(stage)
        self.t = now
        self.path.write_text(json.dumps(self.minutes, indent=1))


ONE_CORE_STAGES = {"timings.json": ("locref adapter", "locref images", "locref table",
                                     "fgdm images, second half"),
                   "timings_fgdm.json": ("fgdm seg factor", "seg controlnet",
                                         "fgdm images, first half")}


def least_on_two_cores(minutes: dict, branch_minutes: dict) -> float | None:
    """The least any order of a run's stages could take on 2 cores, from its `Timings` minutes
    (timings.json) and the FG-DM half's (timings_fgdm.json): every stage after the base needs
    the base, and a stage on both cores is at best twice as fast as on one, so the data, the
    base and the tables plus half the one-core stages' minutes (the waits left out). None where
    a stage was resumed (its minutes are only part of its cost)."""
    if "resumed" in minutes or "resumed" in branch_minutes:
        return None
    one_core = (sum(minutes[k] for k in ONE_CORE_STAGES["timings.json"])
                + sum(branch_minutes[k] for k in ONE_CORE_STAGES["timings_fgdm.json"]))
    return minutes["data"] + minutes["base"] + one_core / 2 + minutes["tables and grid"]


def world_config(run: dict) -> WorldConfig:
    """The base's sizes for this run (before its VAE fixes the latent scale)."""
    return WorldConfig(seed=run["seed"], prediction=run["prediction"],
                       unet_channels=run["unet_channels"],
                       unet_norm_groups=run["unet_norm_groups"],
                       vae_mult=VAE_MULT[run["vae_downscale"]])


def make_run(args: argparse.Namespace) -> dict:
    from locref_core.train.common import DistEnv, warn_unless_cpu_bf16

    name = "quick" if args.quick else "full"
    run = {"name": name, "preset": PRESETS[name], "seed": args.seed, "comfyui": args.comfyui,
           "guidance": args.guidance,
           "prediction": args.prediction, "unet_channels": args.unet_channels,
           "vae_downscale": args.vae_downscale, "unet_norm_groups": args.unet_norm_groups,
           "dir": Path(args.cache) / (f"{name}-seed{args.seed}-v{RECIPE_VERSION}"
                                      + ("-vpred" if args.prediction == "v" else "")
                                      + (f"-c{args.unet_channels}"
                                         if args.unet_channels != 32 else "")
                                      + (f"-f{args.vae_downscale}"
                                         if args.vae_downscale != 4 else "")
                                      + (f"-g{args.unet_norm_groups}"
                                         if args.unet_norm_groups != 32 else "")
                                      + ("-bf16" if args.precision == "bf16" else "")
                                      + ("-portable" if args.portable else ""))}
    run["portable"] = args.portable
    run["amp"] = torch.bfloat16 if args.precision == "bf16" else None
    if run["amp"] is not None:
        warn_unless_cpu_bf16("--precision bf16")
    run["dir"].mkdir(parents=True, exist_ok=True)
    run["tensorboard"] = importlib.util.find_spec("tensorboard") is not None
    run["env"], run["tb_args"] = DistEnv(), argparse.Namespace(
        tensorboard=str(run["dir"] / "tb" / "base") if run["tensorboard"] else None,
        preview_every=0)
    return run


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, busy + idle) CPU ticks of the whole machine so far, from /proc/stat (steal and
    guest time left out); None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    user, nice, system, idle, *rest = fields
    iowait, irq, softirq = (rest + [0, 0, 0])[:3]
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait


def busy_share(seconds: float = 0.5, ticks=cpu_ticks) -> float | None:
    """The share of the machine's CPU time that other processes used over the next `seconds`
    (this process's own time taken out), or None where the system does not say."""
    before, own = ticks(), time.process_time()
    if before is None:
        return None
    time.sleep(seconds)
    after, own = ticks(), time.process_time() - own
    if after is None or after[1] <= before[1]:
        return None
    busy = after[0] - before[0] - own * os.sysconf("SC_CLK_TCK")
    return max(0.0, busy) / (after[1] - before[1])


BUSY_SHARE = 0.4  # one busy thread on 2 cores is 0.5


def warn_if_busy(what: str, share: float | None = None) -> bool:
    """Log a warning (and return True) when other processes already keep the machine busy (a
    `busy_share` of BUSY_SHARE or more, measured now when not given). The runs fix their thread
    counts for the cores they expect; beside other work their threads wait for each other's,
    and their minutes are no timing."""
    share = busy_share() if share is None else share
    if share is None or share < BUSY_SHARE:
        return False
    log.warning("%s: the machine is busy before it starts (other processes use %.0f %% of its "
                "CPU time); its threads will compete with that work (a diagnose image took 36 s "
                "instead of 2.3 s beside a two-thread run on 2 cores) and its minutes are no "
                "timing: pause or wait for the other work", what, 100 * share)
    return True


# Environment variables that choose the vector code torch (ATen), MKL (matrix products) and
# oneDNN (convolutions) run. They change the trained weights: on an AMD EPYC with AVX-512,
# ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 trained another VAE than the same run
# without them.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                 "MKL_CBWR", "OMP_NUM_THREADS")


# --portable: numerics that no property of an AVX2 CPU but AVX2 itself chooses. oneDNN
# (convolutions) and NNPACK (convolutions of 16 images or more once oneDNN is off) block their
# loops by the CPU's cache sizes and vector width, so they are switched off (the convolutions then
# run as ATen's im2col and MKL's matrix products); ATen's own kernels are pinned to their AVX2 code
# and MKL to its AVX2 branch with conditional numerical reproducibility (MKL_CBWR); the base
# trains on PORTABLE_THREADS threads whatever the machine has (how a sum is split between threads
# changes its last bits). ATEN_CPU_CAPABILITY and MKL_CBWR are read once per process, before any
# work: the command line sets them and starts itself again (`restart_if_portable`).
PORTABLE_VARIABLES = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
PORTABLE_THREADS = 2


def portable_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with PORTABLE_VARIABLES set. ValueError naming any of them set otherwise (a run
    under another value would not be the portable one)."""
    other = {k: environ[k] for k, v in PORTABLE_VARIABLES.items() if environ.get(k, v) != v}
    if other:
        raise ValueError("--portable runs with " + " ".join(
            f"{k}={v}" for k, v in PORTABLE_VARIABLES.items()) + "; this environment sets "
            + " ".join(f"{k}={v}" for k, v in other.items()) + ": unset it, or leave out "
            "--portable")
    return {**environ, **PORTABLE_VARIABLES}


def unset_portable_variables() -> list[str]:
    """"NAME=value" for each of PORTABLE_VARIABLES this process's environment does not hold."""
    return [f"{k}={v}" for k, v in PORTABLE_VARIABLES.items() if os.environ.get(k) != v]


def restart_if_portable(script: str, argv: list[str]) -> None:
    """A command line (`script` with `argv`) that asks --portable without PORTABLE_VARIABLES set
    starts itself again with them (exits naming a variable set otherwise); else returns."""
    if "--portable" not in argv or not unset_portable_variables():
        return
    try:
        environment = portable_environment(os.environ)
    except ValueError as e:
        sys.exit(str(e))
    os.execve(sys.executable, [sys.executable, str(Path(script).resolve()), *argv], environment)


def enter_portable() -> None:
    """Switch this process to the --portable numerics (its environment must already hold
    PORTABLE_VARIABLES: `portable_environment`). RuntimeError if it does not, or if torch does
    not run its AVX2 code here."""
    missing = unset_portable_variables()
    if missing:
        raise RuntimeError(f"--portable: set {' '.join(missing)} before Python starts (the "
                           "command line `python benchmarks/shapes_world.py --portable ...` "
                           "does so itself); torch and MKL read them once per process")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        raise RuntimeError(f"--portable needs a CPU with AVX2 and FMA; torch runs its "
                           f"{capability} code here, so this machine cannot train the portable "
                           "weights: leave out --portable")
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)


def cpuinfo_fields(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields in `cpuinfo` (empty where there is no such file)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block ends
                if ":" in line:
                    key, value = line.split(":", 1)
                    fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name from `cpuinfo`, else what `platform` says (may be empty)."""
    return cpuinfo_fields(cpuinfo).get("model name") or platform.processor()


def cpu_id(cpuinfo: str = "/proc/cpuinfo") -> str:
    """"family F model M stepping S" from `cpuinfo` (x86), "" where it does not say: under a
    hypervisor the model name can be "AMD EPYC" alone for several generations."""
    fields = cpuinfo_fields(cpuinfo)
    if not fields.get("cpu family"):
        return ""
    return " ".join(f"{word} {fields[key]}" for word, key in (
        ("family", "cpu family"), ("model", "model"), ("stepping", "stepping")) if key in fields)


def cpu_caches(folder: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, str]:
    """The first CPU's caches as the kernel lists them ({"L1 Data": "32K", "L2 Unified":
    "512K", ...}; empty where it does not): matrix and convolution libraries block their loops
    by cache size, so two CPUs of one vector code can still sum in other orders."""
    caches = {}
    for index in sorted(glob.glob(os.path.join(folder, "index*"))):
        try:
            level, kind, size = (Path(index, n).read_text().strip()
                                 for n in ("level", "type", "size"))
        except OSError:
            continue
        caches[f"L{level} {kind}"] = size
    return caches


def machine(cpuinfo: str = "/proc/cpuinfo",
            caches: str = "/sys/devices/system/cpu/cpu0/cache") -> dict:
    """What the trained weights may depend on besides the seed: the CPU (its name, family, model
    and stepping, its caches) and the vector code torch uses on it, torch's version, its threads
    and the ISA_VARIABLES set. The same seed trained other weights on an Intel Xeon with AVX-512
    than on an AMD EPYC with AVX2 (recipe 2: LocRef AP50 0.098 against 0.155), the same weights
    on two AMD EPYCs, one with AVX2 and one with AVX-512 (recipe 3: both tables to the digit),
    and other weights again on a third "AMD EPYC" with AVX2 (family 25 model 1, 2026-12-07: its
    VAE alone moved the ceiling row's AP from 0.826 to 0.817), which the name, the vector code
    and the rest did not tell from the first; hence the family and the caches. Also whether
    the convolutions may run in oneDNN and NNPACK (--portable switches both off; recorded, not
    compared: its folder is apart)."""
    return {"cpu": cpu_model(cpuinfo), "cpu id": cpu_id(cpuinfo), "caches": cpu_caches(caches),
            "cores": os.cpu_count(),
            "cpu capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "isa variables": {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ},
            "convolution libraries": {"oneDNN": torch.backends.mkldnn.enabled,
                                      "NNPACK": torch._C._get_nnpack_enabled()}}


MACHINE_KEYS = ("cpu", "cpu capability", "torch", "threads", "isa variables")  # the weights' inputs
# Recorded since 2026-12-07: compared only where both records have them (an older record cannot
# tell the CPUs its name covers apart, so it is taken at its word).
MACHINE_KEYS_SINCE = ("cpu id", "caches")


def same_machine(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in MACHINE_KEYS) and all(
        a[k] == b[k] for k in MACHINE_KEYS_SINCE if k in a and k in b)


def described(m: dict) -> dict:
    """The record's keys that tell machines apart, those it has of MACHINE_KEYS_SINCE included."""
    return {k: m.get(k) for k in (*MACHINE_KEYS, *(k for k in MACHINE_KEYS_SINCE if k in m))}


def recorded_machines(run: dict, now: dict, what: str) -> list[dict]:
    """The machines the run folder's `machine.json` lists (those that trained or drew its
    stages; empty if there is none). Logs a warning when one of them is not `now`: the cached
    weights are that machine's, so what `what` draws or trains here need not give the run's
    tables to the digit."""
    path = run["dir"] / "machine.json"
    machines = json.loads(path.read_text())["machines"] if path.is_file() else []
    others = [m for m in machines if not same_machine(m, now)]
    if others:
        log.warning("%s: stages cached in %s were made on %s; this machine is %s. What is "
                    "drawn from them here may differ from what a run from nothing here gives "
                    "(another CPU kind, vector code, thread count, torch or \"isa variables\" "
                    "can train other weights)", what, run["dir"],
                    " and ".join(json.dumps(described(m)) for m in others),
                    json.dumps(described(now)))
    return machines


def record_machine(run: dict, now: dict | None = None) -> list[dict]:
    """Log this machine and add it to the machines `machine.json` in the run's folder lists
    (every machine that trained or drew part of the run): unless one of them is this machine,
    known by every key this one has (a record made before MACHINE_KEYS_SINCE existed does not
    warn, as `same_machine`, but is not taken for this one: this one is added beside it)."""
    now = machine() if now is None else now
    machines = recorded_machines(run, now, "shapes world")
    if not any(same_machine(m, now) and all(k in m for k in MACHINE_KEYS_SINCE if k in now)
               for m in machines):  # a record older than the keys it lacks may be another CPU
        machines.append(now)
    log.info("machine: %s", json.dumps(now))
    (run["dir"] / "machine.json").write_text(json.dumps({"machines": machines}, indent=1))
    return machines


def start(run: dict):
    """The host (its temp folder in the run's, for SBPC's preview grids) and the data."""
    host = load_host(run["comfyui"], cpu=True)
    host.folder_paths.set_temp_directory(str(run["dir"] / "temp"))
    run["data"] = stage_data(run)
    return host, run["data"]


def fgdm_branch(argv: list[str]) -> None:
    """The FG-DM half, in its own process on one core while the LocRef half runs on the other:
    seg factor, seg ControlNet, maps and images for the first half of the held-out layouts
    (saved for the parent, which draws the second half once its LocRef half is done). Both
    halves only read the frozen base."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fgdm-branch %(message)s")
    torch.set_num_threads(1)
    args = parse_args(argv)
    if args.portable:
        enter_portable()
    run = make_run(args)
    host, data = start(run)
    parts, cfg, base_path = stage_base(run, host, data)
    timings = Timings(run, "timings_fgdm.json")
    cached = (run["dir"] / "fgdm_seg.safetensors").is_file()
    resumed = fgdm.resumes(run, "fgdm_seg_ckpt")
    factor_path = fgdm.stage_factor(run, data, base_path)
    timings.mark("fgdm seg factor", cached, resumed)
    cached = fgdm.controlnet_is_current(run["dir"] / "seg_controlnet.safetensors")
    resumed = fgdm.resumes(run, fgdm.CONTROLNET_CHECKPOINTS)
    control_net = fgdm.stage_controlnet(run, host, parts, data)
    timings.mark("seg controlnet", cached, resumed)
    first, _ = fgdm.halves(len(data["heldout"]))
    kept = fgdm.draw_half(run, "first", lambda: fgdm.generate(
        run, host, parts, cfg, load_pack(), factor_path, control_net, first))
    timings.mark("fgdm images, first half", kept)


def wait_for_fgdm_models(run: dict, branch: subprocess.Popen, host, parts):
    """The seg factor's path and the seg ControlNet (the host's CONTROL_NET) once the FG-DM
    branch has saved them (the ControlNet is written atomically, after the factor)."""
    from locref_core.world import controlnet as world_cn

    path = run["dir"] / "seg_controlnet.safetensors"
    while not fgdm.controlnet_is_current(path):  # not one of another recipe, about to go
        if branch.poll() is not None and not fgdm.controlnet_is_current(path):
            raise RuntimeError(f"the FG-DM half ended (exit code {branch.returncode}) without "
                               f"saving {path}; its log, prefixed fgdm-branch, is above")
        time.sleep(2.0)
    model = world_cn.load_controlnet(host, parts, str(path))
    return str(run["dir"] / "fgdm_seg.safetensors"), world_cn.wrap(host, model)


def main(argv=None) -> dict:
    """Data and base here (all cores); then the LocRef half here and the FG-DM half in a second
    process, one core each (thread counts are fixed, so a rerun reproduces every number)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.portable:
        enter_portable()
        torch.set_num_threads(PORTABLE_THREADS)
    run = make_run(args)
    if not run["tensorboard"]:
        log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
    warn_if_busy("shapes world")
    t0, timings = time.perf_counter(), Timings(run)
    host, data = start(run)
    if args.estimate:  # timings.json stays the run's own
        from shapes_world_estimate import estimate  # noqa: PLC0415  (this folder)

        stages = SimpleNamespace(stage_locref=stage_locref, configurations=configurations,
                                 generate=generate, load_pack=load_pack,
                                 world_config=world_config)
        return {"estimate": estimate(run, host, data, stages,
                                     data_seconds=time.perf_counter() - t0),
                "dir": str(run["dir"])}
    record_machine(run)
    timings.mark("data")
    cached = (run["dir"] / "base.safetensors").is_file()
    resumed = fgdm.resumes(run, "base_ckpt/vae", "base_ckpt/unet")
    parts, cfg, base_path = stage_base(run, host, data)
    timings.mark("base", cached, resumed)
    branch = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv,
                               "--fgdm-branch"])
    try:
        with base.one_thread():
            cached = (run["dir"] / "locref.safetensors").is_file()
            resumed = fgdm.resumes(run, "locref_ckpt")
            locref_path = stage_locref(run, data, base_path)
            timings.mark("locref adapter", cached, resumed)
            configs = configurations(run, host, parts, locref_path)
            images, kept = locref_images(run, host, parts, cfg, configs)
            timings.mark("locref images", kept)
            images[CEILING] = reconstructions(run, parts)
            scores = {k: scores_of(run, v) for k, v in images.items()}
            table = write_table(run, scores)
            log.info("LocRef table (%s, seed %d), in %s while the FG-DM half goes on:\n%s",
                     run["name"], args.seed, run["dir"] / "table.md", table)
            timings.mark("locref table")
            # then half of the FG-DM images, so both cores work until the end
            factor_path, control_net = wait_for_fgdm_models(run, branch, host, parts)
            timings.mark("waiting for the seg ControlNet")
            _, second = fgdm.halves(len(data["heldout"]))
            kept = fgdm.draw_half(run, "second", lambda: fgdm.generate(
                run, host, parts, cfg, load_pack(), factor_path, control_net, second))
            timings.mark("fgdm images, second half", kept)
    finally:
        code = branch.wait()
    if code != 0:
        raise RuntimeError(f"the FG-DM half failed (exit code {code}); its log, prefixed "
                           "fgdm-branch, is above")
    timings.mark("waiting for the FG-DM half")
    rows = fgdm.join_rows(fgdm.load_rows(run, "first"), fgdm.load_rows(run, "second"))
    table_fgdm = fgdm.write_table(run, scores["base, caption only"], rows,
                                  lambda imgs: scores_of(run, imgs))
    columns = {GRID_TITLES[k]: v for k, v in images.items()}
    n_big = run["preset"]["sbpc_n"]
    columns.update({"FG-DM N=1": rows["n1"]["images"],
                    f"SBPC N={n_big} map": [m.permute(2, 0, 1) for m in rows["nbig"]["maps"]],
                    f"SBPC N={n_big}": rows["nbig"]["images"]})
    grid = write_grid(run, columns)
    drop_kept_images(run)
    timings.mark("tables and grid")
    minutes = (time.perf_counter() - t0) / 60
    branch_minutes = json.loads((run["dir"] / "timings_fgdm.json").read_text())
    least = least_on_two_cores(timings.minutes, branch_minutes)
    log.info("shapes world (%s, seed %d) in %.1f min:\n%s\n\n%s\ngrid: %s\nminutes per stage: "
             "%s; FG-DM half, alongside: %s; no order of these stages on 2 cores takes less "
             "than %s", run["name"], args.seed, minutes, table, table_fgdm, grid,
             timings.minutes, branch_minutes,
             "(a stage was resumed)" if least is None else f"{least:.1f} min")
    return {"table": table, "table_fgdm": table_fgdm, "grid": str(grid), "dir": str(run["dir"]),
            "minutes": minutes, "timings": timings.minutes, "timings_fgdm": branch_minutes,
            "least on 2 cores": least}


if __name__ == "__main__":
    restart_if_portable(__file__, sys.argv[1:])
    if "--fgdm-branch" in sys.argv:
        fgdm_branch([a for a in sys.argv[1:] if a != "--fgdm-branch"])
    else:
        main()
