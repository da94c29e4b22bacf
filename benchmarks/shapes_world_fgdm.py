"""FG-DM on the shapes world: the second table of `shapes_world.py` (imported by it, not run
alone). A seg factor trained by the pack's own FG-DM trainer makes the base draw COCO-stuff
label maps; the pack's own SBPC node samples N of them per held-out caption and keeps the one
with the best object recall (the pack's recall code); a seg ControlNet (the host's class, trained
here as scaffolding like the base) draws the image from the chosen map. Object recall of the
final images is measured by the world's detector against the caption's objects; the maps' own
recall (shape classes) is a second column. Rows: the base alone, N = 1, N = 10, and, as a
diagnostic of the image factor, the held-out image's own map.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from locref_core.data.factor_dataset import FactorDataset
from locref_core.data.synthetic import SHAPE_CLASSES
from locref_core.train import fgdm as fgdm_trainer
from locref_core.train.common import list_checkpoints
from locref_core.train.loop import TrainLog
from locref_core.weights import save_whole
from locref_core.world import base
from locref_core.world import controlnet as world_cn
from locref_core.world.evaluate import ratio_interval, sample_seed, world_class_share

log = logging.getLogger("shapes_world")
PALETTE = "coco183"  # the synthetic label maps carry COCO-stuff ids
CHECKPOINTS_PER_STAGE = 20  # a training stage stopped part-way loses at most 1/20 of its steps
CONTROLNET_CHECKPOINTS = "seg_controlnet_ckpt"
# The seg ControlNet stage's own recipe: its hint block's init (`world_cn.HINT_INITS`), written
# in its file's metadata ("hint_init"; a file without it is "torch", as every run before). A
# cached ControlNet of another init is trained again (the old file kept beside it) and every
# other stage kept. Kaiming: with torch's default the finer-latent base's ControlNet never read
# its map in its 1500 steps and the /4 one's only from about step 750 (diagnose --hint-init).
CONTROLNET_HINT_INIT = "kaiming"
TRAINER_LR = 1e-4  # the pack's trainers' default (SD-1.5's adapters train at 1e-4)


def read_maps(paths: dict, size: int = 64) -> torch.Tensor:
    """Every image's label map painted in the palette, as the FG-DM trainer sees it: (N, 3, S, S)
    in [-1, 1], in image order."""
    ds = FactorDataset(paths["images"], paths["labels"], captions_json=paths["captions"],
                       kind="seg", palette=PALETTE, size=size)
    return torch.stack([ds[i]["condition"] for i in range(len(ds))])


def loop_checkpoints(run: dict, folder: str, steps: int, **recipe) -> base.LoopCheckpoints:
    """Checkpoints of one of the run's own training loops, in `run["dir"]/folder`: a rerun of a
    stopped run continues the stage from the newest one (same weights as a run never stopped);
    `recipe`: more of what the stage's checkpoints must agree on."""
    return base.LoopCheckpoints(run["dir"] / folder, max(1, steps // CHECKPOINTS_PER_STAGE),
                                {"stage": folder, "steps": steps, "seed": run["seed"], **recipe})


def resumes(run: dict, *folders: str) -> bool:
    """Whether a stage about to run will continue from checkpoints in one of `folders`."""
    return any(list_checkpoints(str(run["dir"] / f)) for f in folders)


def cached_training(run: dict, tag: str, name: str, trainer_main, base_path: str,
                    steps: int, batch: int, data_args: list[str], lr: float = TRAINER_LR,
                    seed: int | None = None) -> str:
    """`run["dir"]/<name>.safetensors`, trained by one of the pack's trainers (`trainer_main`,
    its CLI entry) on the frozen world base unless it is cached; checkpoints in `<name>_ckpt`,
    TensorBoard curves in `tb/<tag>`. `data_args` are the trainer's own data flags; `seed` the
    trainer's (default the run's)."""
    out = run["dir"] / f"{name}.safetensors"
    if out.is_file():
        log.info("%s: cached %s", tag, out)
        return str(out)
    trainer_main(trainer_argv(run, tag, name, base_path, steps, batch, data_args, lr, seed))
    return str(out)


def trainer_argv(run: dict, tag: str, name: str, base_path: str, steps: int, batch: int,
                 data_args: list[str], lr: float = TRAINER_LR,
                 seed: int | None = None) -> list[str]:
    """The trainer's flags for one of the run's stages (`name` may hold a subfolder of the
    run's): checkpoints in `<name>_ckpt` every 1/CHECKPOINTS_PER_STAGE of the steps, and
    `--resume` from there when a stopped run left one (the trainer then ends with the weights
    of a run never stopped). `data_args` come last, so a flag there wins over the stage's own
    (argparse keeps the last)."""
    ckpt = run["dir"] / f"{name}_ckpt"
    return [
        "--comfyui", run["comfyui"], "--world-base", base_path, "--device", "cpu",
        "--size", "64", "--batch-size", str(batch), "--steps", str(steps), "--num-workers", "0",
        "--lr", f"{lr:g}", "--seed", str(run["seed"] if seed is None else seed),
        "--log-every", str(max(1, steps // 20)),
        "--text-cache", str(base.WORLD_CAPTIONS), "--out", str(run["dir"] / f"{name}.safetensors"),
        "--ckpt-dir", str(ckpt), "--ckpt-every", str(max(1, steps // CHECKPOINTS_PER_STAGE)),
        *(["--resume", str(ckpt)] if list_checkpoints(str(ckpt)) else []),
        *(["--mixed-precision", "bf16"] if run["amp"] == torch.bfloat16 else []),
        *(["--tensorboard", str(run["dir"] / "tb" / tag)] if run["tensorboard"] else []),
        *data_args]


def factor_data_args(train: dict) -> list[str]:
    """The FG-DM trainer's data flags for the world's training set (`data["train"]`)."""
    return ["--images", str(train["images"]), "--conditions", str(train["labels"]),
            "--captions", str(train["captions"]), "--kind", "seg", "--palette", PALETTE]


def stage_factor(run: dict, data: dict, base_path: str) -> str:
    """The seg factor, trained by the pack's own FG-DM trainer on the frozen base (cached). The
    trainer's adapter normalises in the base UNet's groups; a cached factor of other groups
    (made before it did) is trained again, the old file kept beside it."""
    p = run["preset"]
    retire_stale_factor(run)
    return cached_training(run, "fgdm", "fgdm_seg", fgdm_trainer.main, base_path,
                           p["factor_steps"], p["factor_batch"], factor_data_args(data["train"]))


def retire_stale_factor(run: dict) -> Path | None:
    """A cached seg factor whose adapter normalises in other groups than the base's UNet (made
    before the trainer followed the UNet's) moved aside to `fgdm_seg_groups<G>.safetensors`, so
    the stage trains it again; returns where it went (None: nothing cached, or it is current)."""
    made = stale_factor_groups(run)
    if made is None:
        return None
    path = run["dir"] / "fgdm_seg.safetensors"
    kept = path.with_name(f"fgdm_seg_groups{made}.safetensors")
    log.warning("seg factor: the cached one normalises in %d groups, the base's UNet in %d: "
                "trained again (the old one kept as %s)", made, run["unet_norm_groups"], kept)
    path.replace(kept)
    return kept


def stale_factor_groups(run: dict) -> int | None:
    """The GroupNorm groups of the run's cached seg factor where they are not its base UNet's
    (a factor made before the trainer followed the UNet's); None: nothing cached, or current."""
    path = run["dir"] / "fgdm_seg.safetensors"
    made = factor_norm_groups(path) if path.is_file() else None
    return None if made is None or made == run["unet_norm_groups"] else made


def factor_norm_groups(path: Path) -> int:
    """The GroupNorm groups of a saved factor's adapter (32 in files from before the field),
    from its metadata alone."""
    from locref_core.fgdm.weights import read_factor_config

    return read_factor_config(str(path)).norm_groups


def stage_controlnet(run: dict, host, parts, data: dict) -> Any:
    """The seg ControlNet (FG-DM's image factor), trained with the base frozen (cached); the
    host's CONTROL_NET object around it."""
    path = run["dir"] / "seg_controlnet.safetensors"
    if controlnet_is_current(path):
        log.info("seg ControlNet: cached %s", path)
        return world_cn.wrap(host, world_cn.load_controlnet(host, parts, str(path)))
    if path.is_file():
        made = hint_init_of(path)
        kept = path.with_name(f"seg_controlnet_hint_{made}.safetensors")
        log.warning("seg ControlNet: the cached one started its hint block from %r, this recipe "
                    "from %r: trained again (the old one kept as %s)", made,
                    CONTROLNET_HINT_INIT, kept)
        path.replace(kept)
    tb = TrainLog(run["env"], run["tb_args"], "seg_controlnet")
    model = world_cn.build_controlnet(host, parts, seed=run["seed"],
                                      hint_init=CONTROLNET_HINT_INIT)
    train_on_world(run, host, parts, data, model, CONTROLNET_CHECKPOINTS,
                   on_step=lambda s, v: tb.scalars(s + 1, {"controlnet_eps_mse": v}))
    tb.close()
    world_cn.save_controlnet(str(path), model, {"preset": run["name"],
                                                "hint_init": CONTROLNET_HINT_INIT})
    shutil.rmtree(run["dir"] / CONTROLNET_CHECKPOINTS, ignore_errors=True)
    log_map_use(run, host, parts, data, model)
    return world_cn.wrap(host, model)


def hint_init_of(path: Path) -> str:
    """The hint-block init a saved seg ControlNet started from ("torch" before it was written)."""
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("hint_init", "torch")


def controlnet_is_current(path: Path) -> bool:
    """Whether `path` holds a seg ControlNet trained by this recipe (CONTROLNET_HINT_INIT)."""
    return path.is_file() and hint_init_of(path) == CONTROLNET_HINT_INIT


def log_map_use(run: dict, host, parts, data: dict, model: torch.nn.Module, n: int = 16) -> None:
    """Whether the trained seg ControlNet reads its map (`world_cn.map_use` on the first `n`
    held-out layouts); a warning when its own map does not beat another layout's by 1 %, since
    the FG-DM image rows then measure the base and the caption, not the maps."""
    maps = ((read_maps(data["heldout_paths"]) + 1) / 2)[:n]
    use = world_cn.map_use(host, parts, model, base.encode_latents(
        parts, data["heldout_images"][:n]), maps, seed=run["seed"] + 123)
    said = (f"seg ControlNet, {len(maps)} held-out layouts, empty caption, eps MSE: own map "
            f"{use['own']:.4f}, another layout's {use['other']:.4f}, no ControlNet "
            f"{use['none']:.4f}")
    if use["own"] < 0.99 * use["other"]:
        log.info("%s", said)
    else:
        log.warning("%s: it hardly reads its map, so the FG-DM image rows say little about the "
                    "maps (shapes_world_diagnose.py --hint-init)", said)


def train_on_world(run: dict, host, parts, data: dict, model: torch.nn.Module,
                   checkpoints: str | None = None, seed: int | None = None,
                   hint_init: str = CONTROLNET_HINT_INIT, steps: int | None = None,
                   any_length: bool = False, **options) -> list[float]:
    """`model` (a seg ControlNet) trained as the run trains its own: the training images'
    latents, their maps and captions, the preset's steps unless `steps` and its batch, the run's
    seed unless `seed`; checkpoints in `run["dir"]/checkpoints` when given, which must agree on
    the `hint_init` `model` was built from and, unless `any_length`, on `steps` (the rate is
    constant, so a loop's first steps are a shorter loop's: with `any_length` a longer loop
    continues a shorter one's checkpoints); `options` for `train_controlnet` (lr, null_prob,
    on_step)."""
    p = run["preset"]
    steps = p["controlnet_steps"] if steps is None else steps
    latents = base.encode_latents(parts, data["train_images"])
    log.info("seg ControlNet: %d steps", steps)
    saved = None
    if checkpoints is not None:  # any length: every run's steps // 20, whatever the length
        saved = loop_checkpoints(run, checkpoints, p["controlnet_steps"], hint_init=hint_init,
                                 length="any (a constant rate)") if any_length else (
            loop_checkpoints(run, checkpoints, steps, hint_init=hint_init))
    return world_cn.train_controlnet(
        host, parts, model, latents, (data["train_maps"] + 1) / 2, data["train_captions"], steps,
        batch=p["controlnet_batch"], seed=run["seed"] if seed is None else seed,
        checkpoints=saved, amp=run["amp"], **options)


def required_objects(item) -> str:
    """The caption's objects as the palette's class names, for SBPC's `objects` input."""
    return ", ".join(sorted({SHAPE_CLASSES[shape] for _, shape in item.objects}))


def factor_model(parts, nodes: dict, factor_path: str) -> tuple[Any, list]:
    """What SBPC samples maps from: the base with the factor applied by the pack's own FGDM Apply
    Factor (once: every layout samples from the same patched clone), and the empty negative."""
    from locref_core.fgdm.weights import load_factor

    model = nodes["fgdm_nodes"].FGDMApplyFactor().apply(parts.patcher, load_factor(factor_path),
                                                        1.0)[0]
    return model, [[base.encode_text(parts.clip, [""]), {}]]


def sbpc_maps(run: dict, parts, cfg, nodes: dict, model, negative: list, item, seed: int,
              n: int) -> tuple[torch.Tensor, float, float]:
    """SBPC through the pack's own node on `model` (`factor_model`): N maps from `seed`, the
    chosen one (1, H, W, 3) in [0, 1] at the image size, its recall and how much of it is a map
    of this world (`world_class_share`)."""
    pos = [[base.encode_text(parts.clip, [item.caption]), {}]]
    side = cfg.size
    out = nodes["fgdm_map_nodes"].FGDMSBPCSelect().select(
        model, pos, negative, parts.vae, n, run["preset"]["sample_steps"], run["guidance"],
        "euler", "normal", side, side, seed, required_objects(item), PALETTE, side, side)
    chosen_map, recall = out["result"][0], out["result"][3]
    return chosen_map, float(recall), world_class_share(chosen_map[0].numpy())


def halves(n: int) -> tuple[range, range]:
    """The held-out layouts the FG-DM branch draws (the first half) and the parent process
    draws once its LocRef half is done and the seg ControlNet exists (the second half)."""
    return range(0, (n + 1) // 2), range((n + 1) // 2, n)


def generate(run: dict, host, parts, cfg, nodes: dict, factor_path: str, control_net,
             indices: range) -> dict:
    """Per held-out layout in `indices`: maps at N = 1 and N = 10 (same first seed) and their
    images, and the image from the layout's own map; progress with ETA. Each layout draws from
    its own seeds, so which process draws it changes nothing."""
    model, negative = factor_model(parts, nodes, factor_path)
    items, n_big = run["data"]["heldout"], run["preset"]["sbpc_n"]

    def draw(item, seed: int, chosen: torch.Tensor) -> torch.Tensor:
        return draw_from_map(run, host, parts, cfg, control_net, item, seed, chosen)

    true_maps = read_maps(run["data"]["heldout_paths"])
    rows: dict[str, dict[str, list]] = {
        k: {"images": [], "map_recall": [], "map_share": [], "maps": []}
        for k in ("n1", "nbig", "true")}
    t0 = time.perf_counter()
    for done, i in enumerate(indices, start=1):
        item, seed = items[i], sample_seed(run["seed"], i)
        for key, n in (("n1", 1), ("nbig", n_big)):
            chosen, recall, share = sbpc_maps(run, parts, cfg, nodes, model, negative, item,
                                              seed, n)
            rows[key]["map_recall"].append(recall)
            rows[key]["map_share"].append(share)
            rows[key]["maps"].append(chosen)
            rows[key]["images"].append(draw(item, seed, chosen))
        rows["true"]["images"].append(draw(item, seed, as_hint(true_maps[i])))
        rate = done / (time.perf_counter() - t0)
        log.info("FG-DM: %d/%d layouts (%d-%d of %d), ETA %.0f s", done, len(indices),
                 indices[0], indices[-1], len(items), (len(indices) - done) / rate)
    return rows


def draw_from_map(run: dict, host, parts, cfg, control_net, item, seed: int,
                  chosen: torch.Tensor) -> torch.Tensor:
    """The image of `item` (3, H, W) from the map `chosen` (1, H, W, 3) through the seg
    ControlNet."""
    return base.sample_images(host, parts.patcher, parts, [item.caption], [seed], cfg,
                              steps=run["preset"]["sample_steps"], guidance=run["guidance"],
                              control_net=control_net, maps=[chosen])[0]


def as_hint(true_map: torch.Tensor) -> torch.Tensor:
    """A map as `read_maps` gives it (3, H, W) in [-1, 1] -> a hint (1, H, W, 3) in [0, 1]."""
    return ((true_map + 1) / 2).permute(1, 2, 0)[None]


def image_recalls(run: dict, scores: list[dict]) -> tuple[tuple, tuple]:
    """Object recall of images, colour + shape and shape only: (value, low, high) each."""
    total = [s["objects"] for s in scores]
    return tuple(ratio_interval([s[k] for s in scores], total, run["preset"]["bootstrap"],
                                run["seed"]) for k in ("recalled", "shapes_recalled"))


def mean_interval(run: dict, values: list[float]) -> tuple[float, float, float]:
    """The mean of per-layout values in [0, 1] (map recall, world-class share) with its bootstrap
    interval over layouts: (value, low, high)."""
    return ratio_interval(values, [1.0] * len(values), run["preset"]["bootstrap"], run["seed"])


def write_table(run: dict, base_scores: list[dict], rows: dict, scores_of) -> str:
    """Recall of the images (colour + shape, shape) and of the maps, and how much of each chosen
    map is a map of this world (`world_class_share`), with bootstrap intervals."""
    n_big = run["preset"]["sbpc_n"]
    names = {"n1": "FG-DM: seg map (N = 1) -> seg ControlNet",
             "nbig": f"FG-DM: SBPC N = {n_big} -> seg ControlNet",
             "true": "diagnostic: the held-out image's own map -> seg ControlNet"}
    fmt = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
    lines = [("| configuration | image recall, colour + shape | image recall, shape | "
              "map recall, shape classes | map pixels in the world's classes |"),
             "| --- | --- | --- | --- | --- |"]
    mean = lambda v: "—" if not v else fmt(mean_interval(run, v))  # noqa: E731
    table = [("base model, caption only", base_scores, [], [])]
    # the diagnostic row's map is the truth: no map recall or share to report; a share is
    # reported only where every layout has one (halves saved before it have none)
    table += [(names[k], scores_of(rows[k]["images"]), rows[k]["map_recall"],
               rows[k]["map_share"] if len(rows[k]["map_share"]) == len(rows[k]["map_recall"])
               else []) for k in names]
    for name, scores, map_recall, map_share in table:
        both, shape = image_recalls(run, scores)
        lines.append(f"| {name} | {fmt(both)} | {fmt(shape)} | {mean(map_recall)} | "
                     f"{mean(map_share)} |")
    text = "\n".join(lines)
    (run["dir"] / "table_fgdm.md").write_text(text + "\n")
    return text



def save_rows(run: dict, rows: dict, part: str) -> Path:
    """One process's images, chosen N = 10 maps, maps' recalls and world-class shares (`part`:
    which half)."""
    tensors = {f"{k}_images": torch.stack(rows[k]["images"]).contiguous() for k in rows}
    tensors["nbig_maps"] = torch.cat(rows["nbig"]["maps"]).contiguous()
    path = rows_path(run, part)
    save_whole(tensors, path, metadata={  # a run stopped while writing leaves no half rows
        "map_recall": json.dumps({k: rows[k]["map_recall"] for k in rows}),
        "map_share": json.dumps({k: rows[k]["map_share"] for k in rows})})
    return path


def draw_half(run: dict, part: str, draw: Callable[[], dict]) -> bool:
    """One half's rows (`part`: "first" or "second"): kept from a run stopped part-way, or
    drawn by `draw()` and saved; True where they were kept."""
    if rows_path(run, part).is_file():
        log.info("fgdm images, %s half: kept from a run stopped part-way", part)
        return True
    save_rows(run, draw(), part)
    return False


def rows_path(run: dict, part: str) -> Path:
    """Where one half's rows wait for the tables; the run removes them once its tables are
    written, so only a run stopped part-way leaves them (and a rerun reads them)."""
    return run["dir"] / f"fgdm_rows_{part}.safetensors"


def load_rows(run: dict, part: str) -> dict:
    path = rows_path(run, part)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    recalls = json.loads(meta["map_recall"])
    shares = json.loads(meta.get("map_share", "{}"))  # absent from halves saved before it
    tensors = load_file(str(path))
    rows = {k: {"images": list(tensors[f"{k}_images"]), "map_recall": recalls[k],
                "map_share": shares.get(k, [])} for k in recalls}
    rows["nbig"]["maps"] = list(tensors["nbig_maps"])  # (H, W, 3) each
    return rows


def join_rows(first: dict, second: dict) -> dict:
    """The two halves' rows, in layout order."""
    return {k: {field: list(first[k][field]) + list(second[k][field]) for field in first[k]}
            for k in first}
