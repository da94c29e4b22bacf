"""The shapes world: do the pack's mechanisms do what the papers claim, measured end to end on a
CPU? A tiny text-to-image base (the host's SD-1.5 UNet, CLIP text model and AutoencoderKL at toy
sizes) is trained here on images of coloured shapes, frozen, then adapted by the pack's own LocRef
trainer; images are generated from held-out layouts through the state LocRef Apply builds and
scored by the world's detector (box AP through `locref_core.eval`), appearance (each box's colour
and shape against its reference), leakage and recall, with bootstrap 95 % intervals.

    python benchmarks/shapes_world.py --comfyui /path/to/ComfyUI [--quick] [--cache DIR]

Every stage caches its result under --cache (a rerun skips what is done; the cache key holds the
preset and the seed) and the run writes `table.md`, `grid.png` and TensorBoard event files there.
Rows still to come (issue 12): the FG-DM seg factor + seg ControlNet and SBPC N = 1 / N = 10.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locref_core.data.locref_dataset import load_rgb  # noqa: E402
from locref_core.data.synthetic import make_synthetic_coco  # noqa: E402
from locref_core.eval.shapes import detect_shapes  # noqa: E402
from locref_core.layout import Box, Layout, Reference  # noqa: E402
from locref_core.patch import LocRefState, PatchSettings, install  # noqa: E402
from locref_core.preview import render_preview  # noqa: E402
from locref_core.train import locref as locref_trainer  # noqa: E402
from locref_core.train.host import load_host  # noqa: E402
from locref_core.train.loop import TrainLog  # noqa: E402
from locref_core.world import base  # noqa: E402
from locref_core.world.evaluate import bootstrap, load_heldout, score_image  # noqa: E402
from locref_core.world.models import WorldConfig, build_world, load_world, save_world  # noqa: E402

log = logging.getLogger("shapes_world")
PRESETS = {  # what each stage does; the full preset is sized for ~90 minutes on 2 CPU cores
    "quick": {"train_images": 32, "heldout": 4, "vae_steps": 10, "unet_steps": 10,
              "locref_steps": 4, "locref_batch": 2, "sample_steps": 4, "bootstrap": 20},
    "full": {"train_images": 2048, "heldout": 64, "vae_steps": 800, "unet_steps": 4500,
             "locref_steps": 1500, "locref_batch": 8, "sample_steps": 20, "bootstrap": 500},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--comfyui", required=True, help="ComfyUI checkout (its classes are used)")
    p.add_argument("--quick", action="store_true", help="every stage at toy size (minutes)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "comfyui-locref-world"),
                   help="stage results, table.md, grid.png, TensorBoard events")
    p.add_argument("--seed", type=int, default=0, help="world, training and sampling seed")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale for every image")
    return p.parse_args(argv)


def load_pack():
    """The repository as a package, as ComfyUI's custom-node loader imports it (for LocRef
    Apply's own reference encoding)."""
    name = "locref_pack_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[f"{name}.nodes.locref_nodes"]


def stage_data(run: dict) -> dict:
    """Training images (up to 4 objects) and held-out layouts (another seed)."""
    p, root = run["preset"], run["dir"] / "data"
    train = make_synthetic_coco(root / "train", n_images=p["train_images"], size=64,
                                seed=run["seed"], max_objects=4)
    held = make_synthetic_coco(root / "heldout", n_images=p["heldout"], size=64,
                               seed=run["seed"] + 1000, max_objects=4)
    return {"train": train, "heldout": load_heldout(held, ref_size=32)}


def read_images(folder: Path) -> torch.Tensor:
    files = sorted(glob.glob(str(folder / "*.png")))
    return torch.stack([load_rgb(f) * 2 - 1 for f in files])  # (N, 3, 64, 64) in [-1, 1]


def stage_base(run: dict, host, data: dict):
    """The frozen base: VAE, then the text-to-image UNet (cached)."""
    path = run["dir"] / "base.safetensors"
    if path.is_file():
        log.info("base: cached %s", path)
        return (*load_world(host, str(path)), str(path))
    p, tb = run["preset"], TrainLog(run["env"], run["tb_args"], "base")
    images = read_images(data["train"]["images"])
    cfg = WorldConfig(seed=run["seed"])
    parts = build_world(host, cfg)
    log.info("base: VAE, %d steps on %d images", p["vae_steps"], len(images))
    base.train_vae(parts, images, p["vae_steps"], seed=run["seed"],
                   on_step=lambda s, v: tb.scalars(s + 1, {"vae_l1": v}))
    latents = base.encode_latents(parts, images)
    cfg = dataclasses.replace(cfg, latent_scale=base.fit_latent_scale(parts, latents))
    caps = json.loads(Path(data["train"]["captions"]).read_text())["annotations"]
    by_image: dict[int, list[str]] = {}
    for c in caps:
        by_image.setdefault(c["image_id"], []).append(c["caption"])
    captions = [by_image[i + 1] for i in range(len(images))]
    log.info("base: UNet, %d steps", p["unet_steps"])
    base.train_unet(host, parts, latents, captions, p["unet_steps"], seed=run["seed"],
                    on_step=lambda s, v: tb.scalars(s + 1, {"unet_eps_mse": v}))
    tb.close()
    save_world(str(path), parts, cfg, {"preset": run["name"]})
    return parts, cfg, str(path)


def stage_locref(run: dict, data: dict, base_path: str) -> str:
    """The LocRef adapter, trained on the world by the pack's own trainer (cached)."""
    out = run["dir"] / "locref.safetensors"
    if out.is_file():
        log.info("locref: cached %s", out)
        return str(out)
    p, train = run["preset"], data["train"]
    locref_trainer.main([
        "--comfyui", run["comfyui"], "--world-base", base_path, "--device", "cpu",
        "--images", str(train["images"]), "--instances", str(train["instances"]),
        "--captions", str(train["captions"]), "--size", "64", "--ref-size", "32",
        "--batch-size", str(p["locref_batch"]), "--steps", str(p["locref_steps"]),
        "--num-workers", "0", "--lr", "1e-4", "--seed", str(run["seed"]),
        "--log-every", str(max(1, p["locref_steps"] // 20)), "--out", str(out),
        "--ckpt-dir", str(run["dir"] / "locref_ckpt"), "--ckpt-every", str(p["locref_steps"]),
        *(["--tensorboard", str(run["dir"] / "tb" / "locref")] if run["tensorboard"] else [])])
    return str(out)


def layout_of(item, with_refs: bool = True) -> Layout:
    return Layout(64, 64, tuple(Box(*box, label=item.label(i),
                                    reference=Reference(item.references[i]) if with_refs else None)
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


def configurations(run, host, parts, locref_path):
    """name -> state builder (None: the base, caption only)."""
    from locref_core.weights import load_adapter

    nodes = load_pack()
    adapter = load_adapter(locref_path).eval()
    clip_vision = locref_trainer.load_clip_vision(host, None, run["seed"])  # the trainer's tower
    ref = lambda **kw: lambda item: locref_state(nodes, parts, adapter, clip_vision, item,  # noqa: E731
                                                 **kw)
    return {"base, caption only": None,
            "LocRef, trained adapter": ref(),
            "ablation: instance masks off": ref(instance_masks=False),
            "ablation: composite path off": ref(composite=False),
            "ablation: text kept in boxes": ref(text_in_boxes=1.0),
            "regional prompts (box text, no adapter)": lambda item: text_state(nodes, parts, item)}


def generate(run, host, parts, cfg, configs) -> dict[str, list[torch.Tensor]]:
    """Every configuration on every held-out layout, same seeds; progress with ETA."""
    items, steps = run["data"]["heldout"], run["preset"]["sample_steps"]
    total, done, t0 = len(items) * len(configs), 0, time.perf_counter()
    images: dict[str, list[torch.Tensor]] = {name: [] for name in configs}
    for i, item in enumerate(items):
        for name, build in configs.items():
            patcher = parts.patcher
            if build is not None:
                patcher = parts.patcher.clone()
                install(patcher, build(item))
            images[name].append(base.sample_images(
                host, patcher, parts, [item.caption], [run["seed"] * 1000 + i], cfg,
                steps=steps, guidance=run["guidance"])[0])
            done += 1
        rate = done / (time.perf_counter() - t0)
        log.info("generated %d/%d images, ETA %.0f s", done, total, (total - done) / rate)
    return images


def write_table(run, images) -> str:
    items = run["data"]["heldout"]
    lines = ["| configuration | AP | AP50 | appearance match | leakage | recall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, imgs in images.items():
        stats = bootstrap([score_image(im, it) for im, it in zip(imgs, items)],
                          rounds=run["preset"]["bootstrap"], seed=run["seed"])
        cells = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in
                 (stats[k] for k in ("AP", "AP50", "appearance", "leakage", "recall"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (run["dir"] / "table.md").write_text(table + "\n")
    return table


def write_grid(run, images, rows: int = 6, scale: int = 3) -> Path:
    """Per layout: its preview, then each configuration's image with the detected boxes."""
    tiles = []
    for item, *generated in list(zip(run["data"]["heldout"], *images.values()))[:rows]:
        row = [render_preview(layout_of(item), show_labels=False)] + list(generated)
        pics = [Image.fromarray((t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8))
                .resize((64 * scale, 64 * scale), Image.NEAREST) for t in row]
        for pic, t in zip(pics[1:], row[1:]):
            draw = ImageDraw.Draw(pic)
            for d in detect_shapes(t):
                draw.rectangle([v * 64 * scale for v in d.box], outline=(255, 255, 255))
        tiles.append(np.concatenate([np.asarray(p) for p in pics], axis=1))
    path = run["dir"] / "grid.png"
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    name = "quick" if args.quick else "full"
    run = {"name": name, "preset": PRESETS[name], "seed": args.seed, "comfyui": args.comfyui,
           "guidance": args.guidance, "dir": Path(args.cache) / f"{name}-seed{args.seed}"}
    run["dir"].mkdir(parents=True, exist_ok=True)
    from locref_core.train.common import DistEnv

    run["tensorboard"] = importlib.util.find_spec("tensorboard") is not None
    if not run["tensorboard"]:
        log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
    run["env"], run["tb_args"] = DistEnv(), argparse.Namespace(
        tensorboard=str(run["dir"] / "tb" / "base") if run["tensorboard"] else None,
        preview_every=0)
    t0 = time.perf_counter()
    host = load_host(args.comfyui, cpu=True)
    run["data"] = stage_data(run)
    parts, cfg, base_path = stage_base(run, host, run["data"])
    locref_path = stage_locref(run, run["data"], base_path)
    images = generate(run, host, parts, cfg, configurations(run, host, parts, locref_path))
    table = write_table(run, images)
    grid = write_grid(run, images)
    minutes = (time.perf_counter() - t0) / 60
    log.info("shapes world (%s, seed %d) in %.1f min:\n%s\ngrid: %s", name, args.seed, minutes,
             table, grid)
    return {"table": table, "grid": str(grid), "dir": str(run["dir"]), "minutes": minutes}


if __name__ == "__main__":
    main()
