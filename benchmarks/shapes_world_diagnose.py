"""What limits the shapes world's numbers? Diagnostics on a finished run's cache (the same
--cache, --quick, --seed, --prediction, --unet-channels, --vae-downscale and --precision as
`shapes_world.py`); each prints one line. A question can be asked as soon as the models it reads
are saved.

    python benchmarks/shapes_world_diagnose.py --comfyui /path/to/ComfyUI [--quick] [--prediction v]
        [--placement] [--samplers] [--adapter-lr LR ...] [--longer] [--adapter-times K ...]
        [--own-map] [--regional] [--base-longer] [--adapter-seeds S ...]
        [--controlnet-lr LR ...] [--one-object-map] [--controlnet-null P ...]
        [--controlnet-end F ...] [--controlnet-times K ...] [--controlnet-strength S ...]
        [--controlnet-colour] [--controlnet-loss-weight W ...] [--controlnet-positive]
        [--positive-only]
        [--hint-init INIT ...] [--factor-offset S ...] [--factor-loss-weight W ...]
        [--mean-control] [--factor-norm-groups G ...] [--unet-on-maps] [--factor-lr LR ...]
        [--factor-times K ...] [--crowding]
        [--skip-basics [--drawing]]

- vae-noise: the held-out latents with Gaussian noise of 0, 0.05, 0.1, 0.2 and 0.4 x their std,
  decoded and scored (is the decoder fragile to the UNet's small errors?), and mirrored left-right,
  decoded and mirrored back (is a mirrored latent a mirrored image's? the UNet trained on such
  latents for half its rows until recipe 3).
- probe: a linear probe (logistic regression) on the world's random CLIP vision tower's
  embeddings of the references: colour and shape accuracy on held-out objects (can the
  appearance projection read what it needs?).
- controlnet-eps: the seg ControlNet's epsilon error on the held-out latents (4 noise draws)
  with each layout's own map, with another layout's map, and without the ControlNet (does it
  read its map?).
- one-object: the base, caption only, one held-out object per caption ("a red square"), each
  image's detections: how often it holds the named colour and shape, the shape, the colour, and
  which shape the detector reads for each one asked, and the squares read as squares split by
  the side drawn, under or over half-way between the world's smallest and largest box (does the
  base draw what it is told? are only its small squares lost?).
- sdedit: the held-out images encoded, noised part of the way (denoise 0.2, 0.6, 1.0 of the
  sampler's 20 steps) and denoised by the base with their own caption at CFG 1 and at the
  benchmark's guidance: recall, what the detector reads for each shape, and the squares kept
  split by their side as given (from which noise level on does the base lose a shape it was
  given?).
The five lines above always run (about 12 minutes on the full preset) unless `--skip-basics`
asks for only the lines of the questions below.

- --drawing (with --skip-basics): only the one-object and sdedit lines, which read nothing but
  the base, so they can be asked as soon as the base is saved, while both halves still train
  (does a new base, for example a wider one, draw what it is told?).
- --placement (a few minutes): the base's and the LocRef adapter's images on the held-out
  layouts, their AP50 with the labels as in the table (colour + shape), by colour alone, by
  shape alone and with no label (is it the box or the shape that misses?), and their appearance
  split into colour and shape, and by the reference's shape (does the adapter carry the
  reference where the base can draw it?), and that shape read in the whole image rather than
  the box's crop (is a shape lost in the drawing, or where the crop cuts an object drawn past
  its box?). With --longer or --adapter-times, the same line for each adapter trained longer,
  on the images its table line scores (does training longer place the objects, or dress them?).
- --samplers (about 20 minutes): the base, caption only, under other sampler settings (CFG 1 and
  2, DPM++ 2M, Euler ancestral, guidance only while sigma > 1), scored on validation layouts
  (another seed; never the held-out ones, so no setting is chosen on the test): one-object
  colour + shape and the squares the detector reads as squares, and caption-only recall (is it
  the sampler that rounds the squares?).
- --adapter-lr LR [LR ...] (about an hour each): the LocRef adapter trained as the run trains
  it (its steps, batch, seed and one thread) at other learning rates, and each scored with the
  run's own (1e-4, the pack's default) on the validation layouts: AP50, appearance, leakage and
  recall (does the adapter learn faster at another rate, in the same steps?).
- --longer (about an hour on 2 cores): the LocRef adapter continued from its last checkpoint to
  twice its steps and the seg ControlNet trained as many steps again (fresh optimizer), each
  scored as in the tables (does more training help?).
- --adapter-times K [K ...]: the LocRef adapter continued to K times its steps, each K from the
  checkpoint of the one before (--longer's is K = 2), each scored as in the tables (how does
  placement grow with the adapter's training, and how long until it reaches a goal?).
- --own-map (about 7 minutes alone on the wider base): the held-out captions and seeds drawn
  by the base alone and by the seg ControlNet from each held-out image's own map (the FG-DM
  table's last row), and per object what the detector reads in its colour, by shape asked,
  squares by side, and the objects found by how many the caption names (where does the image
  factor lose the objects a perfect map gives it? does the map give back those the base loses
  as captions name more?).
- --regional (about 14 minutes alone on the 32-channel base): regional prompts (each box's label,
  region_text 1, no adapter) on the held-out layouts and seeds, with the layout's caption as the
  global prompt, as the table's row prompts them, and with the empty global prompt, as the
  example workflow leaves the objects to the boxes (its global prompt names the scene, not the
  objects), beside the base with no boxes and the same box texts through the host's own mask
  conditioning (ConditioningSetMask's blend of predictions, confined to each box at every step),
  under both prompts: AP50 with the table's labels and with none, appearance, leakage, recall,
  and how much the box texts change the image inside the boxes and outside, after sampling and
  (the patch) in one UNet call (does a box's text place its object when the global prompt does
  not ask for that object everywhere? does it where the host confines it to its box?).
- --base-longer (about 95 minutes alone on 2 cores for the full preset): the base's UNet
  trained as many steps again (from its saved EMA weights, with a fresh optimizer and EMA and the
  next seed's draws: not one run of twice the steps, whose optimizer the cache does not keep),
  then a LocRef adapter trained on it as the run trains its own; beside the run's base and
  adapter, in one call: each base's one-object line, and the table's caption-only and LocRef
  rows on each (does a base trained longer draw the squares, and LocRef on it reach the goals?).
- --adapter-seeds S [S ...] (about 25 minutes each on the full preset): the LocRef adapter
  trained as the run trains it (its steps, batch, learning rate and one thread) with other
  seeds of its trainer (the adapter's initial weights, its batches and noise draws, and the
  trainer's random CLIP vision tower), and each, with the run's own, drawn on the held-out
  layouts with the tables' sampling seeds and scored as the table scores the three rows that
  read the adapter (LocRef, instance masks off, composite path off): one line per seed, then
  how far each figure moves between seeds against the bootstrap intervals, which resample only
  the layouts, and for how many seeds each ablation's claim holds (are the table's differences
  the adapter's, or its seed's?).
- --controlnet-lr LR [LR ...] (about 25 minutes each to train on the full preset, then about 4
  minutes of images per ControlNet): the seg ControlNet trained as the run trains it (its steps,
  batch, seed and one thread) at other learning rates, and each with the run's own (1e-4) drawn
  from the validation layouts' own maps at CFG 1, 2 and the benchmark's guidance, beside the
  base from the same captions and seeds without a map: image recall, colour + shape and shape,
  and what the detector reads in each object's colour, by shape asked (does the image factor
  draw what a perfect map gives it better than the base draws from the caption, at some rate
  or guidance? chosen on validation layouts, never the held-out ones).
- --one-object-map (about 6 minutes alone on the full preset): each held-out object drawn
  alone from its one-object caption ("a red square", the one-object line's captions and seeds)
  by the base, and by the seg ControlNet from the held-out map with every other object painted
  over in the background's class: colour + shape, shape, colour, and what the detector reads in
  the named colour by shape asked (does the map cost an object its colour even when it is the
  only one, or only where several objects share the caption?).
- --controlnet-null P [P ...] (as --controlnet-lr): the seg ControlNet trained as the run trains
  it but dropping the caption in a share P of its rows instead of ControlNet's 0.5, each drawn
  with the run's own as --controlnet-lr draws them (does a ControlNet trained mostly with its
  caption keep the caption's colours where the map puts the objects?).
- --controlnet-end F [F ...] (about 5 minutes per F): the run's seg ControlNet over only the
  first F of the sampling steps (ControlNetApplyAdvanced's end_percent; the base alone after),
  drawn from the validation layouts' own maps beside its whole range and the base without a
  map, as --controlnet-lr draws (does the map need to speak only while the image is noisy?).
- --controlnet-times K [K ...] (about 25 minutes on one thread for each 1500 steps trained,
  then as --controlnet-lr): the seg ControlNet trained as the run trains it (its rate, caption
  share, batch, seed, hint init and one thread) for K times its steps, one loop from nothing
  saved as it passes each K (the rate is constant: its first steps are the run's ControlNet,
  which the line checks to the bit; its checkpoints are kept, so a longer K asked later
  continues it), each drawn with the run's own as --controlnet-lr draws them (ControlNet's own
  recipe trains for many times these steps: does the image factor draw what a perfect map
  gives it better than the base alone once it has trained longer?).
- --controlnet-strength S [S ...] (about 4 minutes per S on one thread on the /4 base;
  nothing trained): the run's seg ControlNet at ControlNetApplyAdvanced's strength S (its
  residuals scaled by S), drawn from the validation layouts' own maps beside strength 1 and the
  base as --controlnet-lr draws (does a map that speaks louder draw its shapes?).
- --controlnet-colour (about 25 minutes to train on one thread on the /4 base, then about 4
  minutes of images): the seg ControlNet trained as the run trains it (its steps, rate, caption
  share, batch, seed, hint init and one thread) on colour maps, the seg maps with each object's
  pixels in its image's colour, and drawn from the validation layouts' colour maps beside the
  run's own from their seg maps, as --controlnet-lr draws. Not the paper's seg factor, whose
  maps name classes only: a ceiling for the image factor (given where each object is, its class
  and its colour, does the ControlNet draw what the detector reads, where from a seg map it
  draws the base's colours and shapes?).
- --controlnet-loss-weight W [W ...] (about 25 minutes each to train on one thread on the /4
  base, then about 4 minutes of images): the seg ControlNet trained as the run trains it with
  each row's epsilon loss weighted as the FG-DM trainer's --loss-weight W weighs it (v: v's
  error, normalised to mean 1 over the schedule, so the noisy steps weigh most; an epsilon
  base's loss gives those steps, where the layout is laid down, the least weight), each drawn
  with the run's own as --controlnet-lr draws (does the map steer the shapes once its loss
  weighs the steps that decide them?).
- --controlnet-positive (about 23 minutes of images on one thread on the /4 base beside another
  diagnose; the colour ControlNet trained first if --controlnet-colour has not cached it): the
  run's seg ControlNet from the validation layouts' seg maps and the colour one from their
  colour maps, each attached to the positive CFG branch alone beside both branches
  (ControlNetApplyAdvanced's wiring, the run's), as --controlnet-lr draws. With the map on
  both branches CFG amplifies only what the caption adds to it; on the positive alone the
  map's pull too (does guidance with the map on both branches undo what the map gives? at CFG
  1 the two wirings draw the same images, the host sampling the positive alone).
- --positive-only (with any of --controlnet-lr, -null, -end, -times, -strength, -colour or
  -loss-weight): those lines draw every ControlNet, the run's included, attached to the positive
  CFG branch alone, as --controlnet-positive draws its "positive only" cells, and say so after
  their question's name (does a ControlNet trained otherwise, or longer, pass on more of its map
  once guidance amplifies the map's pull?). The base's cells are the lines' own either way, and
  at CFG 1 so are the ControlNets' (the host samples the positive alone there).
- --hint-init INIT [INIT ...] (about 25 minutes each on the /4 base, 110 on the finer-latent
  one): the seg ControlNet trained as the run trains it (its steps, batch, seed and one thread)
  from each init of its hint block (torch: ControlNet's own, the run's until recipe 3's
  ControlNet was retrained; kaiming: weights that keep the maps' differences, the run's now;
  `world_cn.HINT_INITS`), probed before training and at every
  checkpoint on validation layouts with empty captions: eps MSE with each layout's own map,
  another layout's, and no ControlNet, and the hint block's spread across maps (when does the
  ControlNet start to read its map, and does the hint block's init decide it?).
- --factor-offset S [S ...] (about 15 minutes each to train on the /4 base, then about 12
  minutes of maps and images per factor): the seg factor trained as the run trains it (the
  pack's FG-DM trainer, its steps, batch, seed and one thread) with offset noise S (0: the run's
  own), and each drawn on the validation layouts with the tables' sampling seeds: how much of
  the x0 it predicts from pure noise at the first sampling steps is a map of this world
  (`world_class_share`), its maps through the pack's SBPC node at N = 1 and N = 10 (recall of
  the shape classes and world-class share), and the run's seg ControlNet's images from them
  beside the base's from the same captions and seeds (does the factor start a map from the
  noise sampling starts from, or only keep one that leaks through SD-1.5's last timestep, and
  do the images follow once it draws maps?).
- --factor-loss-weight W [W ...] (as --factor-offset): the seg factor trained with the FG-DM
  trainer's --loss-weight W (v: each row's epsilon MSE times 1 + sigma^2, the x0 error weighing
  alike at every noise level; eps: the run's own), drawn as --factor-offset draws (with the
  plain epsilon loss an error in the map's x0 at the first timestep costs 1/213 of what it
  costs in the x0 at sigma 1: is that why the factor never learns to start a map?).
- --mean-control (about 5 minutes on the /4 base): the per-channel spatial mean of the
  validation maps' latents and of their images' (sampler scale); how far each model (the base,
  the run's seg factor) moves the mean of the epsilon it predicts with the mean of the noise
  it is given (a per-channel offset N(0, 1) added to the noise: slope 1 follows it, 0 cannot
  set it); and, from the tables' sampling seeds, how the mean of each sample's final latent
  follows the mean of the noise it started from (sigma_max times the noise's mean). Can the
  UNet set a latent's mean colour at all, or does the starting noise fix it (and with it
  whether a sample lands among the maps' means or the images')?
- --factor-norm-groups G [G ...] (as --factor-offset): the seg factor trained with the FG-DM
  trainer's --norm-groups G, its adapter's GroupNorms in G groups, drawn as --factor-offset
  draws (the time embedding enters each block as a per-channel constant before a norm: in 32
  groups at 32 channels, the tiny UNet's width, that norm removes it; does the factor start a
  map once its first scale hears the timestep?).
- --unet-on-maps (about 20 minutes on one thread, then as --factor-offset): the base's whole
  UNet trained on the maps as the seg factor is trained (its steps, batch, rate and caption
  drop; no EMA), drawn beside the run's factor as --factor-offset draws (can the world's UNet
  learn to draw its maps in the factor's steps, when it is not held frozen behind an adapter?).
- --factor-lr LR [LR ...] (as --factor-offset): the seg factor trained with the FG-DM
  trainer's --lr LR (the run's: 1e-4, SD-1.5's adapter rate; not trained again), drawn as
  --factor-offset draws (the adapter starts no map at 1e-4 where the UNet trained whole at the
  same rate does: is the rate too low for an adapter that learns from nothing?).
- --factor-times K [K ...] (with or without --factor-lr; about 16 minutes on one thread for
  each 1500 steps trained, then as --factor-offset): the seg factor trained K times the run's
  steps, at the run's rate and at each --factor-lr rate, from nothing (the rate is constant, so
  its first steps are the shorter factor's), drawn in --factor-lr's line (does the adapter,
  at a rate where it starts more maps, close the gap to the UNet trained whole if it trains
  longer, and do its images follow?).
- --crowding (about 4 minutes on one thread on the /4 base): the base, caption only, on the
  held-out layouts with the tables' seeds (the FG-DM table's first row) and each held-out
  object asked alone with the one-object line's captions and seeds: per object, found in its
  caption's image against found when asked alone, overall and by how many objects the caption
  names, with the difference's interval over layouts; and how many objects the detector finds
  per image against how many the caption names (SBPC gains in SD where a caption's objects are
  left out of its image: does this base leave them out, or draw each one as badly with others
  as alone?).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shapes_world as sw  # noqa: E402  (this folder)
import shapes_world_fgdm as fg  # noqa: E402

from locref_core.composite import square_reference  # noqa: E402
from locref_core.data.synthetic import SHAPE_CLASSES, coco_stuff_id, phrase  # noqa: E402
from locref_core.eval.boxes import iou_matrix  # noqa: E402
from locref_core.eval.shapes import SHAPES, appearance_scores, detect_shapes  # noqa: E402
from locref_core.train import fgdm as fgdm_trainer  # noqa: E402
from locref_core.train import locref as locref_trainer  # noqa: E402
from locref_core.masks import box_masks, foreground_mask  # noqa: E402
from locref_core.patch import install  # noqa: E402
from locref_core.train.common import list_checkpoints  # noqa: E402
from locref_core.train.host import (decode_latents, diffuse, encode_images,  # noqa: E402
                                    encode_text, ensure_loaded, predict_eps, unet_denoised)
from locref_core.train.loop import TrainLog  # noqa: E402
from locref_core.world import base  # noqa: E402
from locref_core.world import controlnet as world_cn  # noqa: E402
from locref_core.world.evaluate import (bootstrap, load_heldout, objects_found,  # noqa: E402
                                       ratio_interval, sample_seed, score_image, summary,
                                       world_class_share)
from locref_core.world.models import load_world, save_world  # noqa: E402

log = logging.getLogger("shapes_world_diagnose")


BASE, LOCREF, CONTROLNET = "base.safetensors", "locref.safetensors", "seg_controlnet.safetensors"
FACTOR = "fgdm_seg.safetensors"
# The questions asked by a flag (argparse's name -> how the flag is written, the run's model
# files it reads besides the base); the five basics read the seg ControlNet too.
QUESTIONS = {"drawing": ("--drawing", ()), "placement": ("--placement", (LOCREF,)),
             "samplers": ("--samplers", ()), "adapter_lr": ("--adapter-lr LR", (LOCREF,)),
             "longer": ("--longer", (LOCREF, CONTROLNET)),
             "adapter_times": ("--adapter-times K", (LOCREF,)),
             "own_map": ("--own-map", (CONTROLNET,)), "regional": ("--regional", ()),
             "base_longer": ("--base-longer", (LOCREF,)),
             "adapter_seeds": ("--adapter-seeds S", (LOCREF,)),
             "controlnet_lr": ("--controlnet-lr LR", (CONTROLNET,)),
             "one_object_map": ("--one-object-map", (CONTROLNET,)),
             "controlnet_null": ("--controlnet-null P", (CONTROLNET,)),
             "controlnet_end": ("--controlnet-end F", (CONTROLNET,)),
             "controlnet_times": ("--controlnet-times K", (CONTROLNET,)),
             "controlnet_strength": ("--controlnet-strength S", (CONTROLNET,)),
             "controlnet_colour": ("--controlnet-colour", (CONTROLNET,)),
             "controlnet_loss_weight": ("--controlnet-loss-weight W", (CONTROLNET,)),
             "controlnet_positive": ("--controlnet-positive", (CONTROLNET,)),
             "hint_init": ("--hint-init INIT", ()),
             "factor_offset": ("--factor-offset S", (FACTOR, CONTROLNET)),
             "factor_loss_weight": ("--factor-loss-weight W", (FACTOR, CONTROLNET)),
             "mean_control": ("--mean-control", (FACTOR,)),
             "factor_norm_groups": ("--factor-norm-groups G", (FACTOR, CONTROLNET)),
             "unet_on_maps": ("--unet-on-maps", (FACTOR, CONTROLNET)),
             "factor_lr": ("--factor-lr LR", (FACTOR, CONTROLNET)),
             "factor_times": ("--factor-times K", (FACTOR, CONTROLNET)),
             "crowding": ("--crowding", ())}
BASICS_READ = (CONTROLNET,)
# The questions whose lines `controlnets_on_validation` draws, each ControlNet on both CFG
# branches unless --positive-only (--controlnet-positive draws both wirings itself)
WIRED = ("controlnet_lr", "controlnet_null", "controlnet_end", "controlnet_times",
         "controlnet_strength", "controlnet_colour", "controlnet_loss_weight")


def parse_args(argv=None) -> argparse.Namespace:
    # no abbreviations: shapes_world.restart_if_portable finds --portable by its whole name
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--comfyui", required=True, help="ComfyUI checkout")
    p.add_argument("--quick", action="store_true", help="the quick preset's cache")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "comfyui-locref-world"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prediction", default="eps", choices=["eps", "v"],
                   help="the base of that run (shapes_world.py --prediction)")
    p.add_argument("--unet-channels", default="32",
                   help="the base's width of that run (shapes_world.py --unet-channels)")
    p.add_argument("--vae-downscale", default="4",
                   help="the base's VAE of that run (shapes_world.py --vae-downscale)")
    p.add_argument("--unet-norm-groups", default="32",
                   help="the base's UNet norms of that run (shapes_world.py --unet-norm-groups)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="that run's training precision (shapes_world.py --precision); what "
                        "the diagnose trains, it trains so too")
    p.add_argument("--portable", action="store_true",
                   help="that run's numerics (shapes_world.py --portable); the diagnose trains "
                        "and draws in them too")
    p.add_argument("--placement", action="store_true", help="also score the base's and the "
                   "LocRef adapter's images with coarser labels (a few minutes); with --longer "
                   "or --adapter-times, each longer-trained adapter's images too")
    p.add_argument("--samplers", action="store_true", help="also score the base under other "
                   "sampler settings on validation layouts (about 20 minutes)")
    p.add_argument("--adapter-lr", type=float, nargs="+", metavar="LR", default=[],
                   help="also train the LocRef adapter at these learning rates (the run's "
                   "steps, batch and one thread; about an hour each) and score each with the "
                   "run's own (lr 1e-4) on the validation layouts")
    p.add_argument("--longer", action="store_true", help="also train the LocRef adapter and the "
                   "seg ControlNet twice as long and score them (about an hour)")
    p.add_argument("--adapter-times", type=int, nargs="+", metavar="K", default=[],
                   help="also continue the LocRef adapter to K times the run's steps (each K "
                   "from the checkpoint of the one before, the first from the run's own) and "
                   "score it as in the tables")
    p.add_argument("--own-map", action="store_true", help="also read, object by object, the "
                   "seg ControlNet's images from each held-out image's own map (the FG-DM "
                   "table's diagnostic row) and the base's caption-only images (about 7 min)")
    p.add_argument("--regional", action="store_true", help="also score regional prompts (the "
                   "box labels, no adapter) under the empty global prompt, as the example "
                   "workflow leaves the objects to the boxes, beside the table's row, which "
                   "prompts with the caption, and the host's mask conditioning (about 14 "
                   "minutes on the 32-channel base)")
    p.add_argument("--base-longer", action="store_true", help="also train the base's UNet as "
                   "many steps again and a LocRef adapter on it, and score both bases and "
                   "adapters side by side (about 95 minutes alone on 2 cores)")
    p.add_argument("--adapter-seeds", type=int, nargs="+", metavar="S", default=[],
                   help="also train the LocRef adapter as the run does with these trainer seeds "
                   "(about 25 minutes each) and score each with the run's own on the held-out "
                   "layouts: LocRef and its two ablations' rows")
    p.add_argument("--controlnet-lr", type=float, nargs="+", metavar="LR", default=[],
                   help="also train the seg ControlNet at these learning rates (the run's "
                   "steps, batch, seed and one thread; about 25 minutes each) and draw each, "
                   "with the run's own (lr 1e-4), from the validation layouts' own maps at CFG "
                   "1, 2 and the benchmark's, beside the base without a map")
    p.add_argument("--controlnet-null", type=float, nargs="+", metavar="P", default=[],
                   help="also train the seg ControlNet dropping the caption in these shares of "
                   "its rows (the run's: 0.5; its steps, batch, rate, seed and one thread; about "
                   "25 minutes each) and draw each as --controlnet-lr draws its own")
    p.add_argument("--controlnet-end", type=float, nargs="+", metavar="F", default=[],
                   help="also draw from the validation layouts' own maps with the run's seg "
                   "ControlNet over only the first F of the steps (ControlNetApplyAdvanced's "
                   "end_percent; the base alone after), beside the whole range and the base "
                   "without a map, as --controlnet-lr draws (about 5 minutes per F)")
    p.add_argument("--controlnet-times", type=int, nargs="+", metavar="K", default=[],
                   help="also train the seg ControlNet as the run trains it for K times its "
                   "steps (one loop from nothing, saved at each K) and draw each, with the "
                   "run's own, from the validation layouts' own maps")
    p.add_argument("--controlnet-strength", type=float, nargs="+", metavar="S", default=[],
                   help="also draw the run's seg ControlNet at strength S (that of "
                   "ControlNetApplyAdvanced) from the validation layouts' own maps, beside "
                   "strength 1")
    p.add_argument("--controlnet-colour", action="store_true",
                   help="also train the seg ControlNet as the run trains it on colour maps (each "
                   "object in its image's colour, not only its class; about 25 minutes) and draw "
                   "it from the validation layouts' colour maps, beside the run's own from their "
                   "seg maps, as --controlnet-lr draws (a ceiling for the image factor)")
    p.add_argument("--controlnet-loss-weight", nargs="+", metavar="W", default=[],
                   choices=fgdm_trainer.LOSS_WEIGHTS,
                   help="also train the seg ControlNet as the run trains it with each row's "
                   "epsilon loss weighted as the FG-DM trainer's --loss-weight W weighs it (v: "
                   "the noisy steps most; about 25 minutes each) and draw each, with the run's "
                   "own (eps), as --controlnet-lr draws")
    p.add_argument("--controlnet-positive", action="store_true",
                   help="also draw the run's seg ControlNet, and the colour-map one (trained if "
                   "missing, as --controlnet-colour trains it), attached to the positive CFG "
                   "branch alone, beside both branches (ControlNetApplyAdvanced's wiring), "
                   "as --controlnet-lr draws")
    p.add_argument("--positive-only", action="store_true",
                   help="draw every ControlNet of the --controlnet-lr, -null, -end, -times, "
                   "-strength, -colour and -loss-weight lines on the positive CFG branch alone "
                   "(the run's wiring: both branches)")
    p.add_argument("--hint-init", nargs="+", metavar="INIT", default=[],
                   choices=world_cn.HINT_INITS,
                   help="also train the seg ControlNet from these inits of its hint block "
                   "(torch: ControlNet's own; kaiming: the run's) as the run trains its own, "
                   "probing at every checkpoint whether it reads its map (about 25 minutes "
                   "each on the /4 base, 110 on the finer-latent one)")
    p.add_argument("--factor-offset", type=float, nargs="+", metavar="S", default=[],
                   help="also train the seg factor with offset noise S (the FG-DM trainer's "
                   "--offset-noise; the run's steps, batch, seed and one thread; about 15 "
                   "minutes each on the /4 base; 0 is the run's own factor, not trained again) "
                   "and draw each, with the run's own, on the validation layouts: how much of "
                   "the x0 it predicts from pure noise is a map, its maps at N = 1 and SBPC's N, "
                   "and the seg ControlNet's images from them beside the base's (about 12 "
                   "minutes per factor)")
    p.add_argument("--factor-loss-weight", nargs="+", metavar="W", default=[],
                   choices=fgdm_trainer.LOSS_WEIGHTS,
                   help="also train the seg factor with the FG-DM trainer's --loss-weight W "
                   "(v: the x0 error weighs alike at every noise level; eps is the run's own "
                   "factor, not trained again) and draw each as --factor-offset draws")
    p.add_argument("--factor-norm-groups", type=int, nargs="+", metavar="G", default=[],
                   help="also train the seg factor with the FG-DM trainer's --norm-groups G "
                   "(its adapter's GroupNorms; the run's own factor normalises as the base's "
                   "UNet) and draw each as --factor-offset draws")
    p.add_argument("--unet-on-maps", action="store_true",
                   help="also train the base's whole UNet on the maps as the seg factor is "
                   "trained (about 20 minutes on one thread) and draw it beside the run's "
                   "factor as --factor-offset draws: can the world's UNet learn to draw its "
                   "maps at all in the factor's steps?")
    p.add_argument("--factor-lr", type=float, nargs="+", metavar="LR", default=[],
                   help="also train the seg factor with the FG-DM trainer's --lr LR (the run's "
                   "own, 1e-4, is the run's factor, not trained again) and draw each as "
                   "--factor-offset draws")
    p.add_argument("--factor-times", type=int, nargs="+", metavar="K", default=[],
                   help="also train the seg factor K times the run's steps, at the run's rate "
                   "and at each --factor-lr rate, and draw each in --factor-lr's line")
    p.add_argument("--crowding", action="store_true", help="also draw the held-out captions "
                   "and each held-out object alone by the base: is an object found less often "
                   "when the caption names others (what SBPC corrects in SD)? (about 4 min)")
    p.add_argument("--mean-control", action="store_true",
                   help="also measure whether the base and the run's seg factor can set the "
                   "per-channel mean of what they predict, and how a sample's mean follows its "
                   "starting noise's (about 5 minutes)")
    p.add_argument("--one-object-map", action="store_true", help="also draw each held-out "
                   "object alone, from its one-object caption, by the base and by the seg "
                   "ControlNet from the held-out map with that object alone (about 6 minutes)")
    p.add_argument("--skip-basics", action="store_true", help="print only the lines of the "
                   "questions asked above, without the five that always run (vae-noise, probe, "
                   "controlnet-eps, one-object, sdedit: about 12 minutes on the full preset)")
    p.add_argument("--drawing", action="store_true", help="with --skip-basics: also the "
                   "one-object and sdedit lines, which need only the base")
    args = p.parse_args(argv)
    if args.drawing and not args.skip_basics:
        p.error("--drawing is a part of the basics, which run anyway: add --skip-basics to ask "
                "only --drawing (and the other questions given)")
    if any(k < 2 for k in args.adapter_times):
        p.error(f"--adapter-times {' '.join(map(str, args.adapter_times))}: each K is a multiple "
                "of the run's adapter steps of at least 2 (1 is the run's own adapter)")
    if any(not 0.0 <= v <= 1.0 for v in args.factor_offset):
        p.error(f"--factor-offset {' '.join(map(str, args.factor_offset))}: each S is the "
                "offset noise's scale in [0, 1] (0: the run's own factor; 0.1 is the usual)")
    if any(g < 1 for g in args.factor_norm_groups):
        p.error(f"--factor-norm-groups {' '.join(map(str, args.factor_norm_groups))}: each G is "
                "a number of GroupNorm groups, at least 1, that divides the adapter's widths")
    if any(not 0.0 < lr < 1.0 for lr in args.factor_lr):
        p.error(f"--factor-lr {' '.join(f'{lr:g}' for lr in args.factor_lr)}: each LR is a "
                "learning rate in (0, 1) (the run's is 1e-4)")
    if any(k < 2 for k in args.factor_times):
        p.error(f"--factor-times {' '.join(map(str, args.factor_times))}: each K is a multiple "
                "of the run's factor steps of at least 2 (1 is --factor-lr's own length)")
    if any(not 0.0 < f <= 1.0 for f in args.controlnet_end):
        p.error(f"--controlnet-end {' '.join(map(str, args.controlnet_end))}: each F is a share "
                "of the steps in (0, 1] (0 would draw no map at all: the base's own cell)")
    if any(not 0.0 < v <= 10.0 for v in args.controlnet_strength):
        p.error(f"--controlnet-strength {' '.join(f'{v:g}' for v in args.controlnet_strength)}: "
                "each S is ControlNetApplyAdvanced's strength in (0, 10] (the run's is 1)")
    if any(k < 2 for k in args.controlnet_times):
        p.error(f"--controlnet-times {' '.join(map(str, args.controlnet_times))}: each K is a "
                "multiple of the run's ControlNet steps of at least 2 (1 is the run's own)")
    if args.positive_only:
        if args.controlnet_positive:
            p.error("--positive-only with --controlnet-positive: that line draws both wirings "
                    "itself; ask it without --positive-only")
        if not any(getattr(args, q) for q in WIRED):
            flags = [QUESTIONS[q][0].split()[0] for q in WIRED]
            p.error(f"--positive-only changes how {', '.join(flags[:-1])} and {flags[-1]} draw "
                    "their ControlNets: ask one of them too")
    if args.prediction == "v" and set(args.controlnet_loss_weight) - {"eps"}:
        p.error("--controlnet-loss-weight reweighs an epsilon base's loss; a v base's "
                "ControlNet already trains on v's error: leave the flag out with --prediction v")
    # --longer's line is K = 2's (the same cached adapter, scored the same way): asked once
    args.adapter_times = sorted(set(args.adapter_times) - ({2} if args.longer else set()))
    if args.skip_basics and not any(getattr(args, q) for q in QUESTIONS):
        *others, last = (flag for flag, _ in QUESTIONS.values())
        p.error(f"--skip-basics leaves nothing to do: add {', '.join(others)} or {last}")
    return args


def interval(name: str, stat) -> str:
    """`name value [low, high]`, a bootstrap statistic as the diagnose lines print it."""
    value, low, high = stat
    return f"{name} {value:.3f} [{low:.3f}, {high:.3f}]"


@torch.no_grad()
def vae_noise(run, parts) -> str:
    images = run["data"]["heldout_images"]
    z = base.encode_latents(parts, images)
    std, g, cells = z.std().item(), torch.Generator().manual_seed(run["seed"]), []
    for frac in (0.0, 0.05, 0.1, 0.2, 0.4):
        noisy = z + frac * std * torch.randn(z.shape, generator=g)
        decoded = ((parts.vae.first_stage_model.decode(noisy) + 1) / 2).clamp(0, 1)
        s = summary(sw.scores_of(run, list(decoded)))
        cells.append(f"{frac:g} x std: AP50 {s['AP50']:.3f} appearance {s['appearance']:.3f} "
                     f"recall {s['recall']:.3f}")
    # what the base's UNet trained on before recipe 3 for half its rows: the latent mirrored
    ae = parts.vae.first_stage_model
    plain, mirrored = ae.decode(z), ae.decode(z.flip(-1)).flip(-1)
    s = summary(sw.scores_of(run, list(((mirrored + 1) / 2).clamp(0, 1))))
    error = lambda x: (x - images).abs().mean().item()  # noqa: E731
    apart = (base.encode_latents(parts, images.flip(-1)) - z.flip(-1)).abs().mean() / z.abs().mean()
    cells.append(f"the latents mirrored, decoded, mirrored back: AP50 {s['AP50']:.3f} "
                 f"appearance {s['appearance']:.3f} recall {s['recall']:.3f}, pixel error "
                 f"{error(mirrored):.3f} against {error(plain):.3f} unmirrored; the mirrored "
                 f"images' latents differ from the latents mirrored by {apart:.3f} of their "
                 f"mean size")
    return "vae-noise: " + "; ".join(cells)


def probe(run, host) -> str:
    """Logistic regression (full batch, Adam, small L2) on standardised embeddings of the
    training images' references (up to 800 images), tested on the held-out references."""
    nodes = sw.load_pack()["locref_nodes"]
    tower = locref_trainer.load_clip_vision(host, None, run["seed"])  # the trainer's tower

    def embed(items):
        x = [nodes.encode(tower, square_reference(ref, mask)[None], crop=True)[0]
             for it in items for ref, mask in zip(it.references, it.masks)]
        return torch.stack(x), [o for it in items for o in it.objects]

    train_items = load_heldout(run["data"]["train"], limit=800)
    x_tr, o_tr = embed(train_items)
    x_te, o_te = embed(run["data"]["heldout"])
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    cells = []
    for name, k in (("colour", 0), ("shape", 1)):
        classes = sorted({o[k] for o in o_tr + o_te})
        y_tr = torch.tensor([classes.index(o[k]) for o in o_tr])
        y_te = torch.tensor([classes.index(o[k]) for o in o_te])
        torch.manual_seed(run["seed"])
        w = torch.zeros(x_tr.shape[1], len(classes), requires_grad=True)
        b = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        for _ in range(500):
            loss = torch.nn.functional.cross_entropy(x_tr @ w + b, y_tr) + 1e-3 * w.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = ((x_te @ w + b).argmax(1) == y_te).float().mean().item()
        cells.append(f"{name} ({len(classes)} classes) {acc:.3f}")
    return (f"probe: held-out accuracy from the CLIP vision tower's embeddings, {len(o_tr)} "
            f"training and {len(o_te)} held-out objects: " + ", ".join(cells))


@torch.no_grad()
def controlnet_eps(run, host, parts) -> str:
    model = world_cn.load_controlnet(host, parts, str(run["dir"] / CONTROLNET))
    images = run["data"]["heldout_images"]
    maps = (fg.read_maps(run["data"]["heldout_paths"]) + 1) / 2
    use = world_cn.map_use(host, parts, model, base.encode_latents(parts, images), maps,
                           draws=4, seed=run["seed"] + 123)
    return (f"controlnet-eps: held-out eps MSE, empty caption: own map {use['own']:.4f}, "
            f"another layout's map {use['other']:.4f}, no ControlNet {use['none']:.4f}")


LABELLINGS = {"colour + shape": lambda label: label, "colour": lambda label: label.split()[0],
              "shape": lambda label: label.split()[1], "no label": lambda label: "object"}


def relabelled(scores: list[dict], how) -> list[dict]:
    """`scores` with every truth and detection label mapped by `how`."""
    return [{**s, **{k: dataclasses.replace(s[k], labels=tuple(map(how, s[k].labels)))
                     for k in ("truth", "detections")}} for s in scores]


def best_in(found, colour: str):
    """The best-scored detection in `colour`, or None."""
    return next((d for d in found if d.colour == colour), None)  # best score first


def shape_read(found, colour: str) -> str:
    """The shape of the best-scored detection in `colour`, or "nothing"."""
    best = best_in(found, colour)
    return best.shape if best else "nothing"


def by_shape_asked(read: Counter) -> str:
    """ "square: square 8 disc 36, disc: ..." from counts of (shape asked, shape read)."""
    return ", ".join(f"{s}: " + " ".join(f"{r} {read[(s, r)]}" for r in (*SHAPES, "nothing")
                                         if read[(s, r)]) for s in SHAPES)


# The world's images are 64 px and its boxes 12..25 px a side (size // 5 .. 2 * size // 5):
# objects below the half-way side, 18.5 px, count as small.
SMALL_SIDE = 18.5 / 64


def side_class(box) -> str:
    """ "small" or "large": a normalised xyxy box's longer side against SMALL_SIDE."""
    return "small" if max(box[2] - box[0], box[3] - box[1]) < SMALL_SIDE else "large"


def squares_by_side(read: Counter) -> str:
    """ "squares read as squares by side: small 3 of 20, large 5 of 31" from counts of
    ("square", side class, shape read)."""
    cells = [f"{side} {read[('square', side, 'square')]} of "
             f"{sum(n for k, n in read.items() if k[:2] == ('square', side))}"
             for side in ("small", "large")]
    return (f"squares read as squares by side (small: under {SMALL_SIDE * 64:g} of 64 px): "
            + ", ".join(cells))


def one_object_tally(images, objects) -> Counter:
    """Per image of one (colour, shape) object: how many hold it ("both"), its shape, its
    colour, (shape asked, shape read in the named colour) pairs, and (shape asked, side class
    of the named colour's best detection, shape read) triples where that colour is found."""
    tally: Counter = Counter()
    for image, (c, s) in zip(images, objects):
        found = detect_shapes(image)
        tally["both"] += any((d.colour, d.shape) == (c, s) for d in found)
        tally["shape"] += any(d.shape == s for d in found)
        tally["colour"] += any(d.colour == c for d in found)
        tally[(s, shape_read(found, c))] += 1
        best = best_in(found, c)
        if best:
            tally[(s, side_class(best.box), best.shape)] += 1
    return tally


def one_object_figures(tally: Counter, n: int) -> str:
    """ "colour + shape 0.610, shape 0.726, colour 0.918": the shares of `n` one-object images
    holding the named colour and shape, the shape, the colour (`one_object_tally`)."""
    return (f"colour + shape {tally['both'] / n:.3f}, shape {tally['shape'] / n:.3f}, "
            f"colour {tally['colour'] / n:.3f}")


def every_tenth(what: str) -> Callable[[int, int], None]:
    """An `on_image` that logs `what: k of n images, ETA` at every tenth of the list."""
    t0 = time.perf_counter()

    def on_image(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            eta = (total - done) * (time.perf_counter() - t0) / done
            log.info("%s: %d of %d images, ETA %.0f s", what, done, total, eta)
    return on_image


@torch.no_grad()
def one_object(run, host, parts, cfg, who: str = "base") -> str:
    objects = [o for it in run["data"]["heldout"] for o in it.objects]
    texts = [phrase([o]) for o in objects]
    log.info("one-object: drawing %d images, one object each", len(texts))
    images = base.sample_images(host, parts.patcher, parts, texts,
                                [sample_seed(run["seed"], i) for i in range(len(texts))], cfg,
                                steps=run["preset"]["sample_steps"], guidance=run["guidance"],
                                on_image=every_tenth("one-object"))
    t, n = one_object_tally(images, objects), len(objects)
    return (f"one-object: {who}, caption only, {n} captions of one held-out object: "
            f"{one_object_figures(t, n)};"
            f" what the detector reads in the named colour, by shape asked: {by_shape_asked(t)};"
            f" {squares_by_side(t)} (the side drawn)")


def object_reading(images, items) -> Counter:
    """Per held-out object, what the detector reads in its colour: (shape asked, shape read)
    and (shape asked, side class of its box, shape read) pairs, and "recalled" where its colour
    and shape are both found."""
    read: Counter = Counter()
    for image, item in zip(images, items):
        found = detect_shapes(image)
        for (c, s), box in zip(item.objects, item.boxes):
            shape = shape_read(found, c)
            read[(s, shape)] += 1
            read[(s, side_class(box), shape)] += 1
            read["recalled"] += any((d.colour, d.shape) == (c, s) for d in found)
    return read


@torch.no_grad()
def sdedit(run, host, parts) -> str:
    items, steps = run["data"]["heldout"], run["preset"]["sample_steps"]
    latents = base.encode_latents(parts, run["data"]["heldout_images"])
    negative = [[encode_text(parts.clip, [""]), {}]]
    positive = [[[encode_text(parts.clip, [item.caption]), {}]] for item in items]
    n, cells = sum(len(it.objects) for it in items), []
    settings = [(g, d) for g in (1.0, run["guidance"]) for d in (0.2, 0.6, 1.0)]
    for guidance, denoise in settings:
        images = []
        for i in range(len(items)):
            seed = sample_seed(run["seed"], i)
            noise = torch.randn(latents[i:i + 1].shape,
                                generator=torch.Generator().manual_seed(seed))
            latent = host.sample.sample(
                parts.patcher, noise, steps, guidance, "euler", "normal",
                positive[i], negative, latents[i:i + 1],
                denoise=denoise, disable_pbar=True, seed=seed)
            images.append(parts.vae.decode(latent).movedim(-1, 1)[0])
        read = object_reading(images, items)
        head = f"CFG {guidance:g}, denoise {denoise:g}: recall {read['recalled'] / n:.3f}"
        cells.append(f"{head} ({by_shape_asked(read)}; {squares_by_side(read)})")
        log.info("sdedit: %d of %d settings done (%s)", len(cells), len(settings), head)
    return ("sdedit: the held-out images noised part way and denoised with their caption, what "
            "the detector reads in each object's colour: " + " | ".join(cells))


VALIDATION_SEED = 2000  # + the run's seed; the held-out layouts use + 1000, training + 0


def validation_paths(run) -> dict:
    """The files of the validation layouts (written once): another seed than training and
    held-out, as many as the held-out ones, for choosing settings without looking at the
    test."""
    return sw.written_once(run["dir"] / "data" / "validation", n_images=run["preset"]["heldout"],
                           seed=run["seed"] + VALIDATION_SEED)


def validation_layouts(run) -> list:
    """The validation layouts (`validation_paths`)."""
    return load_heldout(validation_paths(run))


def guidance_above(patcher, sigma_min: float):
    """A clone of `patcher` that applies CFG only while sigma > sigma_min and takes the
    conditional prediction below it (guidance limited to an interval of noise levels)."""

    def cfg(args):
        if float(args["sigma"].flatten()[0]) > sigma_min:
            return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]
        return args["cond"]

    clone = patcher.clone()
    clone.set_model_sampler_cfg_function(cfg, disable_cfg1_optimization=True)
    return clone


def sampler_settings(run) -> dict[str, dict]:
    """name -> sample_images keywords (and "above": guidance only while sigma is above it)."""
    g = run["guidance"]
    return {f"euler, CFG {g:g} (the benchmark's)": {}, "euler, CFG 1": {"guidance": 1.0},
            "euler, CFG 2": {"guidance": 2.0}, f"dpmpp_2m, CFG {g:g}": {"sampler": "dpmpp_2m"},
            f"euler_ancestral, CFG {g:g}": {"sampler": "euler_ancestral"},
            f"euler, CFG {g:g} while sigma > 1": {"above": 1.0}}


@torch.no_grad()
def samplers(run, host, parts, cfg) -> str:
    layouts = validation_layouts(run)
    objects = [o for it in layouts for o in it.objects]
    steps, cells = run["preset"]["sample_steps"], []
    for name, kw in sampler_settings(run).items():
        kw = dict(kw)
        above = kw.pop("above", None)
        patcher = parts.patcher if above is None else guidance_above(parts.patcher, above)
        kw = {"steps": steps, "guidance": run["guidance"], **kw}
        seeds = [sample_seed(run["seed"], 500 + i) for i in range(len(objects))]
        singles = base.sample_images(host, patcher, parts, [phrase([o]) for o in objects], seeds,
                                     cfg, **kw)
        tally = one_object_tally(singles, objects)
        captioned = base.sample_images(host, patcher, parts, [it.caption for it in layouts],
                                       [sample_seed(run["seed"], i) for i in range(len(layouts))],
                                       cfg, **kw)
        recall = summary([score_image(im, it) for im, it in zip(captioned, layouts)])["recall"]
        squares = sum(s == "square" for _, s in objects)
        cells.append(f"{name}: one-object {tally['both'] / len(objects):.3f}, squares read as "
                     f"squares {tally[('square', 'square')]}/{squares}, caption recall "
                     f"{recall:.3f}")
    return (f"samplers: the base, caption only, on {len(layouts)} validation layouts "
            f"({len(objects)} one-object captions): " + " | ".join(cells))


def overlapping_shape(found, colour: str, box) -> str:
    """The shape of the `colour` detection of the whole image that overlaps `box` most, or
    "nothing": the object read whole, where the box's crop cuts off whatever is drawn past the
    box (a disc 2 px wider than its 20 px box reads as a square in the crop)."""
    mine = [d for d in found if d.colour == colour]
    if not mine:
        return "nothing"
    overlaps = iou_matrix([box], [d.box for d in mine])[0]
    k = int(overlaps.argmax())
    return mine[k].shape if overlaps[k] > 0 else "nothing"


def appearance_by_shape(images, items) -> str:
    """Per box, against its own reference: the share that holds its colour, its shape, and both
    (the table's appearance), then "both" by the reference's shape (is appearance lost only on
    the shapes the base cannot draw?), then the reference's shape as the whole image reads it
    (is a shape lost in the drawing, or only in the box's crop?)."""
    tally: Counter = Counter()
    for image, item in zip(images, items):
        found = detect_shapes(image)
        for a in appearance_scores(image, item.boxes, item.objects):
            colour, shape = a.reference
            tally.update({"boxes": 1, "colour": int(a.colour_match),  # a new key takes the
                          "shape": int(a.shape_match), "both": int(a.match),  # value: 0, not False
                          (shape, "boxes"): 1, (shape, "both"): int(a.match),
                          (shape, "whole"): int(overlapping_shape(found, colour, a.box) == shape)})
    n = max(1, tally["boxes"])

    def by_shape(what: str) -> str:
        return ", ".join(f"{s} {tally[(s, what)]}/{tally[(s, 'boxes')]}" for s in SHAPES
                         if tally[(s, "boxes")])
    return (f"colour {tally['colour'] / n:.3f}, shape {tally['shape'] / n:.3f}, both "
            f"{tally['both'] / n:.3f}; both, by the reference's shape: {by_shape('both')}; "
            "the reference's shape in the whole image (its colour's detection overlapping the "
            f"box most, not the box's crop): {by_shape('whole')}")


def placement(run, host, parts, cfg) -> list[str]:
    configs = sw.configurations(run, host, parts, str(run["dir"] / LOCREF))
    names = ("base, caption only", "LocRef, trained adapter")
    images = sw.generate(run, host, parts, cfg, {k: configs[k] for k in names})
    return [placement_line(run, name, images[name]) for name in names]


def placement_line(run, name: str, images) -> str:
    """The held-out images of one configuration: AP50 by each labelling, and appearance split
    into colour and shape and by the reference's shape."""
    scores = sw.scores_of(run, images)
    cells = [interval(label, bootstrap(relabelled(scores, how), rounds=run["preset"]["bootstrap"],
                                       seed=run["seed"])["AP50"])
             for label, how in LABELLINGS.items()]
    return (f"placement: {name}, AP50 by label: " + ", ".join(cells) + "; appearance: "
            + appearance_by_shape(images, run["data"]["heldout"]))


def masks_of(item, side: int) -> torch.Tensor:
    """(boxes, side, side): `item`'s boxes on a side x side grid, as the patch places them."""
    return box_masks(sw.layout_of(item, with_refs=False), side, side)


def inside_boxes(item, side: int) -> torch.Tensor:
    """(side, side) bool: the cells under any of `item`'s boxes."""
    return foreground_mask(masks_of(item, side)).bool()


def change_by_region(a, b, items) -> tuple[float, float]:
    """Mean absolute difference between two lists of (C, H, W) tensors (images or epsilons of
    the same layouts and seeds), over C, inside the layouts' boxes and outside them."""
    inside, outside = [], []
    for x, y, item in zip(a, b, items):
        diff, mask = (x - y).abs().mean(0), inside_boxes(item, x.shape[-1])
        inside.append(diff[mask].mean().item())
        outside.append(diff[~mask].mean().item() if (~mask).any() else 0.0)
    return float(np.mean(inside)), float(np.mean(outside))


@torch.no_grad()
def eps_change_by_region(run, host, parts, state_of, steps=(999, 500, 100)) -> list[str]:
    """Per DDPM step in `steps`: the held-out latents noised to it (one noise draw), one UNet
    call under the empty prompt with and without each layout's patch (`state_of(item)`), and the
    mean absolute change of the predicted epsilon inside the layout's boxes and outside them."""
    items = run["data"]["heldout"]
    ensure_loaded(host, parts)
    x0 = parts.patcher.model.latent_format.process_in(
        base.encode_latents(parts, run["data"]["heldout_images"]))
    context = encode_text(parts.clip, [""])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(run["seed"] + 321))
    patched = []
    for item in items:
        patcher = parts.patcher.clone()
        install(patcher, state_of(item))
        patched.append(patcher)
    cells = []
    for step in steps:
        x, sigma = diffuse(parts, x0, noise, torch.full((len(x0),), step))
        args = [(x[i:i + 1], sigma[i:i + 1], context) for i in range(len(items))]
        inside, outside = change_by_region(
            [predict_eps(host, patcher, *a)[0] for patcher, a in zip(patched, args)],
            [predict_eps(host, parts.patcher, *a)[0] for a in args], items)
        cells.append(f"step {step} (sigma {sigma[0].item():.2f}) {inside:.4f} inside, "
                     f"{outside:.4f} outside")
    return cells


MASKED = "the host's mask conditioning"


@torch.no_grad()
def regional(run, host, parts, cfg) -> str:
    """Regional prompts (each box's label, no adapter) and the base without boxes, prompted as
    the table prompts them (the layout's caption, which names every object, as the global prompt)
    and as the pack's example workflow does (a global prompt that leaves the objects to the boxes:
    here the empty one), and the same box texts through the host's own mask conditioning (each
    text masked to its box and the global prompt to the rest, as ConditioningSetMask masks them:
    the sampler blends the predictions by mask at every step); the held-out layouts and seeds.
    Per prompt, how much the box texts change the base's image inside the boxes and outside
    them; then the same split of the patch's change in one UNet call (is it the patch that acts
    outside the boxes, or the sampling that spreads it?)."""
    nodes = sw.load_pack()["locref_nodes"]
    text = lambda item: sw.text_state(nodes, parts, item)  # noqa: E731
    configs = {"base": None, "regional prompts": text}
    items, rounds, cells = run["data"]["heldout"], run["preset"]["bootstrap"], []
    side, steps = cfg.size, run["preset"]["sample_steps"]
    for prompt, said in ((None, "the caption"), ("", "the empty prompt")):
        images = sw.generate(run, host, parts, cfg, configs, prompt=prompt)
        images[MASKED] = base.sample_images(  # the same box texts through the host's own path
            host, parts.patcher, parts, [it.caption if prompt is None else prompt for it in items],
            [sample_seed(run["seed"], i) for i in range(len(items))], cfg, steps=steps,
            guidance=run["guidance"], on_image=every_tenth(f"regional, {MASKED}, {said}"),
            regions=[[(it.label(k), m) for k, m in enumerate(masks_of(it, side))]
                     for it in items])
        for name, drawn in images.items():
            scores = sw.scores_of(run, drawn)
            s = summary(scores)
            ap50 = [interval(label, bootstrap(relabelled(scores, LABELLINGS[label]),
                                              rounds=rounds, seed=run["seed"])["AP50"])
                    for label in ("colour + shape", "no label")]
            cells.append(f"{name}, {said}: AP50 by label {', '.join(ap50)}; appearance "
                         f"{s['appearance']:.3f}, leakage {s['leakage']:.3f}, recall "
                         f"{s['recall']:.3f}")
        for name in ("regional prompts", MASKED):
            inside, outside = change_by_region(images[name], images["base"], items)
            cells.append(f"the box texts as {name}, under {said}, change the base's image by "
                         f"{inside:.3f} inside the boxes and {outside:.3f} outside (mean "
                         "absolute pixel difference, same seed)")
    cells.append("in one UNet call on the held-out latents (the empty prompt), the box texts "
                 "change the predicted epsilon by: " +
                 ", ".join(eps_change_by_region(run, host, parts, text)))
    return (f"regional: {len(items)} held-out layouts, each box's label as its regional prompt "
            "(region_text 1, no adapter), the global prompt the caption or empty: " +
            " | ".join(cells))


@torch.no_grad()
def own_map(run, host, parts, cfg) -> str:
    control_net = world_cn.wrap(host, world_cn.load_controlnet(host, parts,
                                                               str(run["dir"] / CONTROLNET)))
    items, maps = run["data"]["heldout"], fg.read_maps(run["data"]["heldout_paths"])
    texts = [item.caption for item in items]
    seeds = [sample_seed(run["seed"], i) for i in range(len(items))]  # the tables' seeds
    kw = {"steps": run["preset"]["sample_steps"], "guidance": run["guidance"]}
    drawn = {"base, caption only": base.sample_images(
                 host, parts.patcher, parts, texts, seeds, cfg, **kw,
                 on_image=every_tenth("own-map, base")),
             "own map -> seg ControlNet": base.sample_images(
                 host, parts.patcher, parts, texts, seeds, cfg, **kw, control_net=control_net,
                 maps=[fg.as_hint(m) for m in maps], on_image=every_tenth("own-map, own map"))}
    n, cells = sum(len(it.objects) for it in items), []
    for name, images in drawn.items():
        read = object_reading(images, items)
        cells.append(f"{name}: colour + shape found {read['recalled'] / n:.3f} "
                     f"({by_shape_asked(read)}; {squares_by_side(read)}; by objects named: "
                     f"{recall_by_named([score_image(im, it) for im, it in zip(images, items)])})")
    return (f"own-map: the held-out captions and seeds, {n} objects, what the detector reads in "
            "each object's colour: " + " | ".join(cells))


def recall_by_named(scores: list[dict]) -> str:
    """ "1 named 0.688, 2 named 0.480, ...": from images' `score_image` scores, the share of
    the objects found (colour + shape) in the images of the layouts whose caption names that
    many (where the base loses objects to crowding, does a map give them back?)."""
    found: Counter = Counter()
    total: Counter = Counter()
    for s in scores:
        found[s["objects"]] += s["recalled"]
        total[s["objects"]] += s["objects"]
    return ", ".join(f"{k} named {found[k] / total[k]:.3f}" for k in sorted(total))


def lone_object_map(true_map: torch.Tensor, item, k: int) -> torch.Tensor:
    """A held-out map (3, S, S) with only object `k` kept: every other object painted over in
    the background's colour (read where no box lies, inside the one-pixel void frame)."""
    side = true_map.shape[-1]
    covered = inside_boxes(item, side)
    covered[0, :] = covered[-1, :] = covered[:, 0] = covered[:, -1] = True  # the void frame
    ys, xs = torch.nonzero(~covered, as_tuple=True)
    if not len(ys):
        raise ValueError(f"layout {item.caption!r}: no background cell outside its boxes")
    lone = true_map.clone()
    lone[:, 1:-1, 1:-1] = true_map[:, ys[0], xs[0], None, None]
    mask = item.masks[k].bool()
    x0, y0 = int(item.boxes[k][0] * side), int(item.boxes[k][1] * side)  # crop_edges' floor
    h, w = mask.shape
    window = (slice(None), slice(y0, y0 + h), slice(x0, x0 + w))
    lone[window] = torch.where(mask, true_map[window], lone[window])
    return lone


@torch.no_grad()
def one_object_map(run, host, parts, cfg) -> str:
    control_net = world_cn.wrap(host, world_cn.load_controlnet(host, parts,
                                                               str(run["dir"] / CONTROLNET)))
    items, maps = run["data"]["heldout"], fg.read_maps(run["data"]["heldout_paths"])
    objects = [o for it in items for o in it.objects]
    lone = [fg.as_hint(lone_object_map(m, it, k))
            for m, it in zip(maps, items) for k in range(len(it.objects))]
    texts = [phrase([o]) for o in objects]
    seeds = [sample_seed(run["seed"], i) for i in range(len(texts))]  # the one-object line's
    kw = {"steps": run["preset"]["sample_steps"], "guidance": run["guidance"]}
    drawn = {"base, caption only": base.sample_images(
                 host, parts.patcher, parts, texts, seeds, cfg, **kw,
                 on_image=every_tenth("one-object-map, base")),
             "its map alone -> seg ControlNet": base.sample_images(
                 host, parts.patcher, parts, texts, seeds, cfg, **kw, control_net=control_net,
                 maps=lone, on_image=every_tenth("one-object-map, its map"))}
    n, cells = len(objects), []
    for who, images in drawn.items():
        t = one_object_tally(images, objects)
        cells.append(f"{who}: {one_object_figures(t, n)} ({by_shape_asked(t)})")
    return (f"one-object-map: {n} captions of one held-out object, drawn by the base and by the "
            "seg ControlNet from the held-out map with that object alone: " + " | ".join(cells))


CROWDING_LABELS = ("colour + shape", "shape", "colour")


def crowding_counts(items, caption_found: list[list[tuple[str, str]]],
                    alone_found: list[list[tuple[str, str]]]) -> dict[str, Any]:
    """Per layout of `items`: how many of its objects the detector finds in the image of its
    caption (`caption_found`: each image's detections as (colour, shape), in layout order) and
    in the images of each object asked alone (`alone_found`: one per object, in layout then
    box order), by label: colour + shape, shape (as the tables count it: per shape, at most as
    many as the caption asks), colour; and how many detections each caption image holds."""
    if len(caption_found) != len(items) or len(alone_found) != sum(len(it.objects)
                                                                  for it in items):
        raise ValueError(f"crowding: {len(caption_found)} caption images and {len(alone_found)} "
                         f"one-object images for {len(items)} layouts of "
                         f"{sum(len(it.objects) for it in items)} objects")
    counts: dict[str, Any] = {"objects": [], "detections": [],
                              **{f"{where} {label}": [] for where in ("caption", "alone")
                                 for label in CROWDING_LABELS}}
    lone = iter(alone_found)
    for item, found in zip(items, caption_found):
        both, shape = objects_found(item.objects, found)  # as the tables count them
        counts["objects"].append(len(item.objects))
        counts["detections"].append(len(found))
        counts["caption colour + shape"].append(both)
        counts["caption shape"].append(shape)
        counts["caption colour"].append(sum(any(c == f[0] for f in found)
                                            for c, _ in item.objects))
        alone = [(o, next(lone)) for o in item.objects]
        counts["alone colour + shape"].append(sum(o in f for o, f in alone))
        counts["alone shape"].append(sum(any(o[1] == g[1] for g in f) for o, f in alone))
        counts["alone colour"].append(sum(any(o[0] == g[0] for g in f) for o, f in alone))
    return counts


def crowding_figures(run, counts: dict[str, Any]) -> str:
    """`crowding_counts` as the line prints it: per label, the share found in the caption's
    image and alone, and their difference with its interval over layouts; then by how many
    objects the caption names; then detections per image against objects asked."""
    rounds, seed = run["preset"]["bootstrap"], run["seed"]
    objects = np.asarray(counts["objects"])

    def cells(keep: np.ndarray) -> str:
        out = []
        for label in CROWDING_LABELS:
            cap = np.asarray(counts[f"caption {label}"])[keep]
            alone = np.asarray(counts[f"alone {label}"])[keep]
            total = objects[keep]
            out.append(f"{label} {cap.sum() / total.sum():.3f} in the caption against "
                       f"{alone.sum() / total.sum():.3f} alone, "
                       + interval("difference", ratio_interval(cap - alone, total, rounds, seed)))
        return "; ".join(out)

    every = np.ones(len(objects), dtype=bool)
    by_count = []
    for n in sorted(set(objects.tolist())):
        k = int((objects == n).sum())
        by_count.append(f"{n} named ({k} layout{'' if k == 1 else 's'}): {cells(objects == n)}")
    detections = np.asarray(counts["detections"])
    per_count = ", ".join(f"{n} named: {detections[objects == n].mean():.2f}"
                          for n in sorted(set(objects.tolist())))
    return (f"all {int(objects.sum())} objects: {cells(every)} | by objects named: "
            + " | ".join(by_count) + f" | detections per caption image, by objects named: "
            f"{per_count}")


@torch.no_grad()
def crowding(run, host, parts, cfg) -> str:
    items = run["data"]["heldout"]
    objects = [o for it in items for o in it.objects]
    kw = {"steps": run["preset"]["sample_steps"], "guidance": run["guidance"]}
    captions = base.sample_images(  # the FG-DM table's first row: the tables' seeds
        host, parts.patcher, parts, [it.caption for it in items],
        [sample_seed(run["seed"], i) for i in range(len(items))], cfg, **kw,
        on_image=every_tenth("crowding, captions"))
    alone = base.sample_images(  # the one-object line's captions and seeds
        host, parts.patcher, parts, [phrase([o]) for o in objects],
        [sample_seed(run["seed"], i) for i in range(len(objects))], cfg, **kw,
        on_image=every_tenth("crowding, alone"))
    found = lambda images: [[(d.colour, d.shape) for d in detect_shapes(im)]  # noqa: E731
                            for im in images]
    counts = crowding_counts(items, found(captions), found(alone))
    return (f"crowding: the base, caption only, {len(items)} held-out layouts, each object found "
            "in its caption's image and in the image of it asked alone (the one-object line's): "
            + crowding_figures(run, counts))


def continued_name(times: int) -> str:
    """The diagnose's name of the LocRef adapter continued to `times` times the run's steps
    (--longer's twice keeps the name it always had)."""
    return "diagnose/locref_longer" if times == 2 else f"diagnose/locref_x{times}"


def continued_from(folder: Path, times: int) -> Path:
    """The checkpoints the adapter continued to `times` times the run's steps starts from: those
    of the longest shorter one trained in the run's `folder`, else the run's own."""
    shorter = [folder / f"{continued_name(k)}_ckpt" for k in range(times - 1, 1, -1)]
    return next((c for c in shorter if c.is_dir()), folder / "locref_ckpt")


def continued_locref(run, host, parts, cfg, base_path: str, times: int,
                     question: str = "adapter-times", placement: bool = False) -> list[str]:
    """The LocRef adapter continued to `times` times the run's steps (the learning rate is
    constant, so this is the run's training, longer) and scored as in the tables; `placement`:
    its images' placement line too (`placement_line`). It continues from the newest checkpoint
    of the longest shorter one trained here, else of the run's own."""
    p = run["preset"]
    name, steps = continued_name(times), times * p["locref_steps"]
    ckpt = run["dir"] / f"{name}_ckpt"
    if not (run["dir"] / f"{name}.safetensors").is_file() and not ckpt.exists():
        source = continued_from(run["dir"], times)
        found = list_checkpoints(str(source))
        if not found:
            raise SystemExit(f"{source} holds no checkpoint to continue the LocRef adapter from: "
                             "delete it and rerun the question (or the run) that trains it")
        log.info("%s: the adapter continues to %d steps from %s", question, steps, found[-1])
        partial = ckpt.with_name(ckpt.name + ".partial")  # the newest only, renamed once whole
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(found[-1], partial / Path(found[-1]).name)
        partial.rename(ckpt)
    out = fg.cached_training(run, Path(name).name, name, locref_trainer.main, base_path, steps,
                             p["locref_batch"], sw.locref_data_args(run["data"]["train"]))
    name = "LocRef, trained adapter"
    images = sw.generate(run, host, parts, cfg,
                         {name: sw.configurations(run, host, parts, out)[name]})
    lines = [f"{question}: LocRef adapter at {steps} steps: {table_cells(run, images[name])}"]
    if placement:
        lines.append(placement_line(run, f"LocRef adapter at {steps} steps", images[name]))
    return lines


def table_cells(run, images) -> str:
    """The held-out images scored as the LocRef table scores a row: every statistic with its
    bootstrap interval, as the diagnose lines print them."""
    stats = bootstrap(sw.scores_of(run, images), rounds=run["preset"]["bootstrap"],
                      seed=run["seed"])
    return ", ".join(interval(k, v) for k, v in stats.items())


def retrained_adapter(run, base_path: str, tag: str, lr: float = fg.TRAINER_LR,
                      seed: int | None = None) -> str:
    """`diagnose/<tag>.safetensors`: the LocRef adapter trained as the run trains its own (its
    steps, batch and one thread, so a rerun gives the same weights) at learning rate `lr` with
    trainer seed `seed` (default the run's); cached."""
    p = run["preset"]
    (run["dir"] / "diagnose").mkdir(exist_ok=True)
    with base.one_thread():
        return fg.cached_training(run, tag, f"diagnose/{tag}", locref_trainer.main, base_path,
                                  p["locref_steps"], p["locref_batch"],
                                  sw.locref_data_args(run["data"]["train"]), lr, seed)


def adapter_lr(run, host, parts, cfg, base_path: str, rates: list[float]) -> str:
    """The LocRef adapter trained as the run trains it but at other learning rates (cached in
    diagnose/), each scored with the run's own adapter on the validation layouts, so that a
    rate can be chosen without looking at the held-out ones."""
    p, layouts = run["preset"], validation_layouts(run)
    paths = {fg.TRAINER_LR: str(run["dir"] / LOCREF)}
    for lr in rates:
        paths[lr] = paths.get(lr) or retrained_adapter(run, base_path, f"locref_lr{lr:g}", lr=lr)
    name, cells = "LocRef, trained adapter", []
    for lr, path in paths.items():
        images = sw.generate(run, host, parts, cfg,
                             {name: sw.configurations(run, host, parts, path)[name]}, layouts)
        stats = bootstrap([score_image(im, it) for im, it in zip(images[name], layouts)],
                          rounds=p["bootstrap"], seed=run["seed"])
        own = " (the run's)" if lr == fg.TRAINER_LR else ""
        cells.append(f"lr {lr:g}{own}: " + ", ".join(
            interval(k, stats[k]) for k in ("AP50", "appearance", "leakage", "recall")))
    return (f"adapter-lr: the LocRef adapter at {p['locref_steps']} steps, on {len(layouts)} "
            "validation layouts: " + " | ".join(cells))


def longer_controlnet(run, host, parts, cfg) -> str:
    p, data = run["preset"], run["data"]
    out = run["dir"] / "diagnose" / "seg_controlnet_longer.safetensors"
    if out.is_file():
        model = world_cn.load_controlnet(host, parts, str(out))
    else:
        model = world_cn.load_controlnet(host, parts,
                                         str(run["dir"] / CONTROLNET))
        fg.train_on_world(run, host, parts, data, model, seed=run["seed"] + 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        world_cn.save_controlnet(str(out), model, {"preset": run["name"], "diagnose": "longer"})
    control_net = world_cn.wrap(host, model)
    true_maps = fg.read_maps(data["heldout_paths"])
    images = [fg.draw_from_map(run, host, parts, cfg, control_net, item,
                               sample_seed(run["seed"], i), fg.as_hint(true_maps[i]))
              for i, item in enumerate(data["heldout"])]
    cells = fg.image_recalls(run, sw.scores_of(run, images))
    return (f"longer: seg ControlNet at {2 * p['controlnet_steps']} steps, the held-out image's "
            f"own map: image recall {interval('colour + shape', cells[0])}, "
            f"{interval('shape', cells[1])}")


def colour_maps(paths: dict, maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """`maps`, the layouts' seg maps as `fg.read_maps(paths)` gives them ((N, 3, S, S) in
    [-1, 1]), with every object's pixels in its own colour, taken from its image (`images`, as
    `sw.read_images(paths["images"])` gives them; the world paints each object in one flat
    colour over exactly its label map's pixels): a hint that carries the colour the caption gives
    each object as well as where its class is, which a seg map does not. Background and void
    pixels keep the palette's colours."""
    files = sorted(Path(paths["labels"]).glob("*.png"))
    labels = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.int64))
                          for f in files])
    if images.shape != maps.shape or labels.shape != (maps.shape[0], *maps.shape[-2:]):
        raise ValueError(f"colour maps: {len(files)} label maps {tuple(labels.shape[1:])} and "
                         f"images {tuple(images.shape)} do not match the seg maps "
                         f"{tuple(maps.shape)}; delete {Path(paths['images']).parent} to write "
                         "the world's files again")
    objects = torch.isin(labels, torch.tensor([coco_stuff_id(c) - 1
                                               for c in SHAPE_CLASSES.values()]))
    return torch.where(objects[:, None], images, maps)


def retrained_controlnet(run, host, parts, lr: float = fg.TRAINER_LR,
                         null_prob: float = world_cn.NULL_PROB, colour: bool = False,
                         loss_weight: str = "eps") -> str:
    """`diagnose/seg_controlnet_<lr, null, colour, weight>.safetensors`: the seg ControlNet
    trained as the run's FG-DM half trains its own (its steps, batch, seed, the same latents, and
    one thread, so a rerun gives the same weights, from the run's hint init) at learning rate
    `lr`, dropping the caption in a share `null_prob` of its rows, on the training images' colour
    maps (`colour_maps`) instead of their seg maps where `colour`, its loss weighted by noise
    level as `loss_weight` says (`world_cn.train_controlnet`); cached (trained again where the
    cached one is of another hint init), checkpointed as the run's stages are."""
    p, data = run["preset"], run["data"]
    tags = ([f"lr{lr:g}"] if lr != fg.TRAINER_LR else []) + (
        [f"null{null_prob:g}"] if null_prob != world_cn.NULL_PROB else []) + (
        ["colour"] if colour else []) + ([f"weight-{loss_weight}"] if loss_weight != "eps"
                                         else [])
    name = f"diagnose/seg_controlnet_{'_'.join(tags)}"
    out = run["dir"] / f"{name}.safetensors"
    if fg.controlnet_is_current(out):
        log.info("controlnet: cached %s", out)
        return str(out)
    if colour:
        data = {**data, "train_maps": colour_maps(data["train"], data["train_maps"],
                                                  data["train_images"])}
    log.info("controlnet: the seg ControlNet at lr %g, captions dropped in %g of the rows, %d "
             "steps, on %s maps, loss weight %s", lr, null_prob, p["controlnet_steps"],
             "colour" if colour else "seg", loss_weight)
    out.parent.mkdir(parents=True, exist_ok=True)
    with base.one_thread():  # as the run's FG-DM half: the latents too
        model = world_cn.build_controlnet(host, parts, seed=run["seed"],
                                          hint_init=fg.CONTROLNET_HINT_INIT)
        fg.train_on_world(run, host, parts, data, model, f"{name}_ckpt", lr=lr,
                          null_prob=null_prob, loss_weight=loss_weight)
    world_cn.save_controlnet(str(out), model, {"preset": run["name"], "diagnose": " ".join(tags),
                                               "hint_init": fg.CONTROLNET_HINT_INIT})
    shutil.rmtree(run["dir"] / f"{name}_ckpt", ignore_errors=True)
    return str(out)


def recall_cells(run, images, items) -> str:
    """Image recall (colour + shape, shape) with intervals, what the detector reads in each
    object's colour by shape asked, and the objects found by how many the caption names."""
    scores = [score_image(im, it) for im, it in zip(images, items)]
    both, shape = fg.image_recalls(run, scores)
    return (f"{interval('recall', both)}, {interval('shape', shape)} "
            f"({by_shape_asked(object_reading(images, items))}, by objects named: "
            f"{recall_by_named(scores)})")


class Drawn(NamedTuple):
    """How a validation line draws one seg ControlNet (`controlnets_on_validation`): its file,
    over the first `end` of the steps (ControlNetApplyAdvanced's end_percent) at `strength`, on
    both CFG branches or (`negative` False) the positive alone, from the layouts' seg maps or
    (`colour`) their colour maps (`colour_maps`)."""

    path: str
    end: float = 1.0
    strength: float = 1.0
    negative: bool = True
    colour: bool = False


def controlnets_on_validation(run, host, parts, cfg, question: str,
                              paths: dict[str, str | Drawn], trained: str | None = None) -> str:
    """Seg ControlNets (label -> file, drawn as the run draws, or how to draw it), each from the
    validation layouts' own maps at CFG 1, 2 and the run's guidance, beside the base from the
    same captions and seeds without a map: `question`'s line; `trained` says how long they
    trained where the run's steps do not. Where the run says `positive_only` (the diagnose's
    --positive-only), every ControlNet is drawn on the positive CFG branch alone, and the
    line's question says so."""
    wanted = {who: Drawn(p) if isinstance(p, str) else p for who, p in paths.items()}
    if run.get("positive_only"):
        wanted = {who: d._replace(negative=False) for who, d in wanted.items()}
        question += " (every ControlNet on the positive CFG branch alone)"
    loaded = {p: world_cn.wrap(host, world_cn.load_controlnet(host, parts, p))
              for p in {d.path for d in wanted.values()}}
    layouts, files = validation_layouts(run), validation_paths(run)
    seg = fg.read_maps(files)
    maps = [fg.as_hint(m) for m in seg]
    colours = [fg.as_hint(m) for m in colour_maps(files, seg, sw.read_images(files["images"]))
               ] if any(d.colour for d in wanted.values()) else []
    texts = [item.caption for item in layouts]
    seeds = [sample_seed(run["seed"], i) for i in range(len(layouts))]
    cells = []
    for guidance in sorted({1.0, 2.0, run["guidance"]}):
        kw = {"steps": run["preset"]["sample_steps"], "guidance": guidance}
        drawn = {"base, no map": base.sample_images(
            host, parts.patcher, parts, texts, seeds, cfg, **kw,
            on_image=every_tenth(f"{question}, CFG {guidance:g}, base"))}
        for who, d in wanted.items():
            drawn[f"{who}, own map"] = base.sample_images(
                host, parts.patcher, parts, texts, seeds, cfg, **kw, control_net=loaded[d.path],
                maps=colours if d.colour else maps, control_percent=(0.0, d.end),
                control_strength=d.strength, control_negative=d.negative,
                on_image=every_tenth(f"{question}, CFG {guidance:g}, {who}"))
        cells.append(f"CFG {guidance:g}: " + "; ".join(
            f"{who}: {recall_cells(run, images, layouts)}" for who, images in drawn.items()))
    trained = trained or f"at {run['preset']['controlnet_steps']} steps"
    return (f"{question}: the seg ControlNet {trained}, {len(layouts)} validation layouts, image "
            "recall: " + " | ".join(cells))


def controlnet_lr(run, host, parts, cfg, rates: list[float]) -> str:
    """The seg ControlNet trained at other learning rates (cached in diagnose/), each with the
    run's own on the validation layouts (`controlnets_on_validation`). (Not under no_grad: it
    trains; `sample_images` draws without gradients.)"""
    paths = {f"lr {fg.TRAINER_LR:g} (the run's)": str(run["dir"] / CONTROLNET)}
    for lr in rates:
        if lr != fg.TRAINER_LR:
            paths[f"lr {lr:g}"] = retrained_controlnet(run, host, parts, lr=lr)
    return controlnets_on_validation(run, host, parts, cfg, "controlnet-lr", paths)


def controlnet_null(run, host, parts, cfg, probs: list[float]) -> str:
    """The seg ControlNet trained dropping the caption in other shares of its rows (cached in
    diagnose/), each with the run's own on the validation layouts."""
    paths = {f"captions dropped {world_cn.NULL_PROB:g} (the run's)": str(run["dir"] / CONTROLNET)}
    for prob in probs:
        if prob != world_cn.NULL_PROB:
            paths[f"captions dropped {prob:g}"] = retrained_controlnet(run, host, parts,
                                                                       null_prob=prob)
    return controlnets_on_validation(run, host, parts, cfg, "controlnet-null", paths)


def controlnet_colour(run, host, parts, cfg) -> str:
    """The seg ControlNet trained as the run trains its own on colour maps (`colour_maps`: each
    object in its image's colour, not only its class; cached in diagnose/), drawn from the
    validation layouts' colour maps beside the run's own from their seg maps: a ceiling for the
    image factor, not the paper's seg factor (a seg map names classes, never colours)."""
    paths = {"seg maps (the run's)": str(run["dir"] / CONTROLNET),
             "colour maps": Drawn(retrained_controlnet(run, host, parts, colour=True),
                                  colour=True)}
    return controlnets_on_validation(run, host, parts, cfg, "controlnet-colour", paths)


def controlnet_positive(run, host, parts, cfg) -> str:
    """The run's seg ControlNet and the colour-map one (`controlnet_colour`'s, trained if
    missing) each attached to the positive CFG branch alone (`world_cn.with_control`'s
    negative_too), beside both branches as the run attaches them, on the validation layouts:
    with the map on both branches CFG amplifies only what the caption adds to it; on the
    positive alone it amplifies the map's pull too. At CFG 1 both wirings draw the same images
    (the host samples the positive alone there). Inference only, but for the colour file."""
    own = str(run["dir"] / CONTROLNET)
    colour = retrained_controlnet(run, host, parts, colour=True)
    paths = {"seg maps, both branches (the run's)": own,
             "seg maps, positive only": Drawn(own, negative=False),
             "colour maps, both branches": Drawn(colour, colour=True),
             "colour maps, positive only": Drawn(colour, negative=False, colour=True)}
    return controlnets_on_validation(run, host, parts, cfg, "controlnet-positive", paths)


def controlnet_loss_weight(run, host, parts, cfg, weights: list[str]) -> str:
    """The seg ControlNet trained with its loss weighted by noise level (`world_cn.
    train_controlnet`'s loss_weight; cached in diagnose/), each with the run's own (eps) on the
    validation layouts."""
    paths = {"loss weight eps (the run's)": str(run["dir"] / CONTROLNET)}
    for weight in weights:
        if weight != "eps":
            paths[f"loss weight {weight}"] = retrained_controlnet(run, host, parts,
                                                                  loss_weight=weight)
    return controlnets_on_validation(run, host, parts, cfg, "controlnet-loss-weight", paths)


def controlnet_end(run, host, parts, cfg, ends: list[float]) -> str:
    """The run's seg ControlNet speaking over only the first `end` of the steps (the map sets
    the layout while the image is noisy; the base alone draws the rest), each end beside the
    whole range on the validation layouts. Inference only: nothing is trained."""
    own = str(run["dir"] / CONTROLNET)
    paths = {"whole range (the run's)": Drawn(own)}
    paths.update({f"first {end:g} of the steps": Drawn(own, end) for end in ends if end != 1.0})
    return controlnets_on_validation(run, host, parts, cfg, "controlnet-end", paths)


def controlnet_strength(run, host, parts, cfg, strengths: list[float]) -> str:
    """The run's seg ControlNet at other strengths (ControlNetApplyAdvanced's: its residuals
    scaled), each beside strength 1 on the validation layouts. Inference only."""
    own = str(run["dir"] / CONTROLNET)
    paths = {"strength 1 (the run's)": Drawn(own)}
    paths.update({f"strength {s:g}": Drawn(own, strength=s) for s in strengths if s != 1.0})
    return controlnets_on_validation(run, host, parts, cfg, "controlnet-strength", paths)


def equals_run_controlnet(run, path: Path) -> str | None:
    """"yes" where the seg ControlNet file `path` holds the run's own ControlNet's weights to the
    bit, "NO" where it does not; None where the run's is of another hint init (nothing to
    compare: a ControlNet of this recipe must differ from it)."""
    own = run["dir"] / CONTROLNET
    if not fg.controlnet_is_current(own):
        return None
    mine, runs = load_file(str(path)), load_file(str(own))
    return "yes" if mine.keys() == runs.keys() and all(
        torch.equal(v, runs[k]) for k, v in mine.items()) else "NO"


CHAIN = "diagnose/seg_controlnet_steps"  # --controlnet-times: <CHAIN><S>.safetensors, <CHAIN>_ckpt


def chained_controlnets(run, host, parts, totals: list[int]) -> dict[int, Path]:
    """Total steps -> `diagnose/seg_controlnet_steps<S>.safetensors`: the seg ControlNet trained
    as the run's FG-DM half trains its own (its rate, caption share, batch, seed, hint init,
    latents and one thread), the run's steps and each of `totals`, all from one loop (the rate is
    constant, so the first S steps of a longer loop are a loop of S steps), which saves the
    weights as it passes each. Cached; the loop's checkpoints are kept (`<CHAIN>_ckpt`, the
    newest two), so asking a longer K later continues it instead of starting again."""
    steps = run["preset"]["controlnet_steps"]
    files = {s: run["dir"] / f"{CHAIN}{s}.safetensors" for s in sorted({steps, *totals})}
    todo = {s for s, f in files.items() if not fg.controlnet_is_current(f)}
    if not todo:
        return files
    folder = run["dir"] / f"{CHAIN}_ckpt"
    newest = list_checkpoints(str(folder))
    if newest and int(Path(newest[-1]).name.split("_")[-1]) >= min(todo):
        log.warning("controlnet-times: %s is past step %d, whose weights are not saved: the loop "
                    "trains again from its start", folder, min(todo))
        shutil.rmtree(folder)
    log.info("controlnet-times: the seg ControlNet to %d steps, saved at %s", max(todo),
             ", ".join(map(str, sorted(todo))))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with base.one_thread():  # as the run's FG-DM half: the latents too
        model = world_cn.build_controlnet(host, parts, seed=run["seed"],
                                          hint_init=fg.CONTROLNET_HINT_INIT)

        def save(step: int, _loss: float) -> None:
            if step + 1 in todo:
                world_cn.save_controlnet(str(files[step + 1]), model, {
                    "preset": run["name"], "diagnose": f"steps {step + 1}",
                    "steps": str(step + 1), "hint_init": fg.CONTROLNET_HINT_INIT})

        fg.train_on_world(run, host, parts, run["data"], model, f"{CHAIN}_ckpt",
                          steps=max(todo), any_length=True, on_step=save)
    return files


def controlnet_times(run, host, parts, cfg, times: list[int]) -> str:
    """The seg ControlNet trained K times the run's steps (`chained_controlnets`), each beside
    the run's own on the validation layouts; the question says whether the loop's first steps
    are the run's ControlNet to the bit (they must be, where the run's is of this recipe)."""
    steps = run["preset"]["controlnet_steps"]
    files = chained_controlnets(run, host, parts, [k * steps for k in times])
    same = equals_run_controlnet(run, files[steps]) or (
        "not asked: the run's is of another hint init")
    paths = {f"{steps} steps (the run's)": str(run["dir"] / CONTROLNET)}
    paths.update({f"{k * steps} steps": str(files[k * steps]) for k in sorted(set(times))})
    return controlnets_on_validation(
        run, host, parts, cfg, f"controlnet-times (the loop's first {steps} steps equal the run's "
        f"ControlNet to the bit: {same})", paths, trained="at the steps each label names")


HINT_PROBES = 16  # validation layouts each hint-init probe reads


def hint_init(run, host, parts, inits: list[str]) -> list[str]:
    """One line per hint-block init (`world_cn.HINT_INITS`): the seg ControlNet trained from it
    as the run trains its own (its steps, batch, seed, latents and one thread: the run's init,
    fg.CONTROLNET_HINT_INIT, retraces the run's ControlNet), probed before training and at each
    checkpoint on the first HINT_PROBES validation layouts: `map_use` (own map, another's,
    none) and `hint_spread` (before the hint block's last layer, at its output). A stopped
    question continues from its checkpoints and keeps the probes it made
    (`diagnose/hint_<init>_probes.json`); the trained weights are cached
    (`diagnose/seg_controlnet_hint_<init>.safetensors`)."""
    val = validation_paths(run)
    maps = ((fg.read_maps(val) + 1) / 2)[:HINT_PROBES]
    steps = run["preset"]["controlnet_steps"]
    every = max(1, steps // fg.CHECKPOINTS_PER_STAGE)
    with base.one_thread():  # as the run's FG-DM half: the latents too
        latents = base.encode_latents(parts, sw.read_images(val["images"])[:HINT_PROBES])
    hints = world_cn.hint_for(host, maps, latents.shape[-1])
    lines = []
    for init in inits:
        name = f"diagnose/seg_controlnet_hint_{init}"
        out = run["dir"] / f"{name}.safetensors"
        probes_path = run["dir"] / "diagnose" / f"hint_{init}_probes.json"
        probes = json.loads(probes_path.read_text()) if probes_path.is_file() else {}
        with base.one_thread():  # as the run's FG-DM half

            def probe(step: int, model) -> None:
                if str(step) in probes:
                    return
                probes[str(step)] = {**world_cn.map_use(host, parts, model, latents, maps,
                                                        seed=run["seed"] + 123),
                                     **world_cn.hint_spread(model, hints)}
                probes_path.parent.mkdir(parents=True, exist_ok=True)
                probes_path.write_text(json.dumps(probes, indent=1))
                log.info("hint-init %s, step %d: %s", init, step, hint_probe(probes[str(step)]))

            if not out.is_file():
                model = world_cn.build_controlnet(host, parts, seed=run["seed"], hint_init=init)
                if not fg.resumes(run, f"{name}_ckpt"):
                    probe(0, model)

                def after(step: int, _loss: float, model=model) -> None:
                    if (step + 1) % every == 0:
                        probe(step + 1, model)

                fg.train_on_world(run, host, parts, run["data"], model, f"{name}_ckpt",
                                  hint_init=init, on_step=after)
                world_cn.save_controlnet(str(out), model, {"preset": run["name"],
                                                           "diagnose": f"hint_init {init}",
                                                           "hint_init": init})
                shutil.rmtree(run["dir"] / f"{name}_ckpt", ignore_errors=True)
        same = ""
        if init == fg.CONTROLNET_HINT_INIT:
            same = " (the run's recipe)"
            equal = equals_run_controlnet(run, out)
            if equal is not None:
                same = f" (the run's recipe; its weights equal the run's ControlNet: {equal})"
        lines.append(f"hint-init {init}{same}: the seg ControlNet trained {steps} steps, "
                     f"{len(maps)} validation layouts, empty caption, eps MSE own map / "
                     "another layout's / no ControlNet, and the hint block's spread across "
                     "maps before its last layer / at its output, by step: " + "; ".join(
                         f"{s}: {hint_probe(probes[str(s)])}"
                         for s in sorted(map(int, probes))))
    return lines


def hint_probe(p: dict[str, float]) -> str:
    return (f"{p['own']:.5f} / {p['other']:.5f} / {p['none']:.5f}, "
            f"spread {p['penultimate']:.1e} / {p['out']:.1e}")


def variant_factor(run, base_path: str, suffix: str, flags: list[str],
                   steps: int | None = None) -> str:
    """The seg factor trained as the run trains its own (the pack's FG-DM trainer, the run's
    steps unless `steps` says, its batch, seed, one thread) plus the trainer's `flags`; with no
    flags and no other steps, the run's own file. Cached in
    `diagnose/fgdm_seg_<suffix>.safetensors`, checkpointed as the run's stages are."""
    p, name = run["preset"], f"diagnose/fgdm_seg_{suffix}"
    steps = p["factor_steps"] if steps is None else steps
    if not flags and steps == p["factor_steps"]:
        return str(run["dir"] / FACTOR)
    stale = fg.stale_factor_groups(run)
    if stale is not None and "--norm-groups" not in flags:
        log.warning("seg factor %s: the run's own normalises in %d groups, this one in the base "
                    "UNet's %d (the trainer's default since): beside the run's it differs in "
                    "its norms as well as in %s; shapes_world.py with the same flags trains the "
                    "run's again", suffix, stale, run["unet_norm_groups"], " ".join(flags))
    (run["dir"] / "diagnose").mkdir(exist_ok=True)
    with base.one_thread():  # as the run's FG-DM half
        return fg.cached_training(run, f"fgdm_{suffix}", name, fgdm_trainer.main,
                                  base_path, steps, p["factor_batch"],
                                  [*fg.factor_data_args(run["data"]["train"]), *flags])


def offset_factor(run, base_path: str, offset: float) -> str:
    """The seg factor trained with offset noise `offset` (`variant_factor`; 0: the run's own),
    cached in `diagnose/fgdm_seg_offset<S>.safetensors`."""
    return variant_factor(run, base_path, f"offset{offset:g}",
                          ["--offset-noise", f"{offset:g}"] if offset else [])


FROM_NOISE_STEPS = (999, 900, 800)  # DDPM timesteps of the first sampling steps


@torch.no_grad()
def from_noise(run, host, parts, model, texts: list[str], maps: torch.Tensor
               ) -> dict[int, tuple[float, float]]:
    """Timestep -> world-class share of the x0 that `model` predicts there (a) from pure noise,
    what sampling starts from, and (b) from the layouts' own maps (N, 3, H, W) in [-1, 1]
    noised to that step, what training shows it (SD-1.5's last timestep keeps 7 % of the
    latent); one draw per text, the same noise for every model."""
    ensure_loaded(host, parts)
    x0 = encode_images(parts, maps)
    g = torch.Generator().manual_seed(run["seed"] + 321)
    context = encode_text(parts.clip, texts)

    def share(x, sigma) -> float:
        images = decode_latents(parts, unet_denoised(host, model, x, sigma, context))
        return float(np.mean([world_class_share(im.permute(1, 2, 0).clamp(0, 1).numpy())
                              for im in images]))

    out = {}
    for t in FROM_NOISE_STEPS:
        noise = torch.randn(x0.shape, generator=g)
        steps = torch.full((len(texts),), t)
        out[t] = tuple(share(*diffuse(parts, start, noise, steps))
                       for start in (torch.zeros_like(x0), x0))
    return out


def noise_cell(shares: dict[int, tuple[float, float]]) -> str:
    return ("world classes of the x0 from pure noise (from the own map noised) " + ", ".join(
        f"t {t}: {pure:.3f} ({leaked:.3f})" for t, (pure, leaked) in shares.items()))


def factor_cells(run, host, parts, cfg, nodes, factor_path: str, control_net, layouts,
                 maps: torch.Tensor, question: str) -> str:
    """One factor on `layouts`: its from-noise shares, its maps at N = 1 and SBPC's N through
    the pack's node (recall, world-class share) and the seg ControlNet's images from them."""
    model, negative = fg.factor_model(parts, nodes, factor_path)
    return model_cells(run, host, parts, cfg, nodes, model, negative, control_net, layouts, maps,
                       question)


def model_cells(run, host, parts, cfg, nodes, model, negative: list, control_net, layouts,
                maps: torch.Tensor, question: str) -> str:
    """`factor_cells` for any model that draws maps (a factor applied, or a UNet of its own)."""
    noise = from_noise(run, host, parts, model, [item.caption for item in layouts], maps)
    log.info("%s: %s", question, noise_cell(noise))  # known in seconds; the maps take minutes
    n_big = run["preset"]["sbpc_n"]
    rows = {n: {"recall": [], "share": [], "images": []} for n in (1, n_big)}
    t0 = time.perf_counter()
    for i, item in enumerate(layouts):
        seed = sample_seed(run["seed"], i)
        for n, row in rows.items():
            chosen, recall, share = fg.sbpc_maps(run, parts, cfg, nodes, model, negative, item,
                                                 seed, n)
            row["recall"].append(recall)
            row["share"].append(share)
            row["images"].append(fg.draw_from_map(run, host, parts, cfg, control_net, item, seed,
                                                  chosen))
        if (i + 1) % 10 == 0 or i + 1 == len(layouts):
            rate = (i + 1) / (time.perf_counter() - t0)
            log.info("%s: %d/%d layouts, ETA %.0f s", question, i + 1, len(layouts),
                     (len(layouts) - i - 1) / rate)
    return (noise_cell(noise) + "; " + "; ".join(
        f"N = {n}: maps recall {mean_cell(run, row['recall'])}, world classes "
        f"{mean_cell(run, row['share'])}, "
        f"images {recall_cells(run, row['images'], layouts)}" for n, row in rows.items()))


def mean_cell(run, values: list[float]) -> str:
    """`value [low, high]`: `fg.mean_interval` as the diagnose lines print it."""
    return interval("", fg.mean_interval(run, values)).strip()


def factor_offset(run, host, parts, cfg, base_path: str, offsets: list[float]) -> str:
    """The seg factor trained with offset noise (`offset_factor`), each with the run's own on
    the validation layouts (`factor_variants`)."""
    paths = {"offset 0 (the run's factor)": offset_factor(run, base_path, 0.0)}
    for offset in sorted(set(offsets) - {0.0}):
        paths[f"offset {offset:g}"] = offset_factor(run, base_path, offset)
    return factor_variants(run, host, parts, cfg, paths, "factor-offset")


def factor_loss_weight(run, host, parts, cfg, base_path: str, weights: list[str]) -> str:
    """The seg factor trained with the FG-DM trainer's --loss-weight W (`variant_factor`,
    cached in `diagnose/fgdm_seg_weight-<W>.safetensors`), each with the run's own (eps) on the
    validation layouts (`factor_variants`)."""
    paths = {"eps (the run's factor)": str(run["dir"] / FACTOR)}
    for weight in sorted(set(weights) - {"eps"}):
        paths[weight] = variant_factor(run, base_path, f"weight-{weight}",
                                       ["--loss-weight", weight])
    return factor_variants(run, host, parts, cfg, paths, "factor-loss-weight")


def factor_norm_groups(run, host, parts, cfg, base_path: str, groups: list[int]) -> str:
    """The seg factor trained with the FG-DM trainer's --norm-groups G (its adapter's
    GroupNorms; `variant_factor`, cached in `diagnose/fgdm_seg_groups<G>.safetensors`; the run's
    own factor's groups are the run's factor, not trained again), each with the run's own on
    the validation layouts (`factor_variants`)."""
    own = fg.factor_norm_groups(run["dir"] / FACTOR)
    paths = {f"{own} groups (the run's factor)": str(run["dir"] / FACTOR)}
    for g in sorted(set(groups) - {own}):
        paths[f"{g} groups"] = variant_factor(run, base_path, f"groups{g}",
                                              ["--norm-groups", str(g)])
    return factor_variants(run, host, parts, cfg, paths, "factor-norm-groups")


def factor_lr(run, host, parts, cfg, base_path: str, rates: list[float],
              times: list[int] = ()) -> str:
    """The seg factor trained with the FG-DM trainer's --lr LR, and K times the run's steps at
    the run's rate and at each LR (`variant_factor`, cached in
    `diagnose/fgdm_seg_lr<LR>[_steps<S>].safetensors`; the run's rate and steps are the run's
    factor, not trained again), each with the run's own on the validation layouts
    (`factor_variants`)."""
    steps = run["preset"]["factor_steps"]
    paths = {f"lr {fg.TRAINER_LR:g} (the run's factor)": str(run["dir"] / FACTOR)}
    for lr in sorted(set(rates) | {fg.TRAINER_LR}):
        for k in sorted({1, *times}):
            if lr == fg.TRAINER_LR and k == 1:
                continue
            longer = f"_steps{k * steps}" if k > 1 else ""
            label = f"lr {lr:g}" + (f", {k * steps} steps" if k > 1 else "")
            paths[label] = variant_factor(run, base_path, f"lr{lr:g}{longer}",
                                          ["--lr", f"{lr:g}"], steps=k * steps)
    return factor_variants(run, host, parts, cfg, paths, "factor-lr")


UNET_ON_MAPS = "diagnose/unet_on_maps"


def unet_on_maps_base(run, host, data):
    """(parts, cfg, path) of the run's base with its whole UNet trained on the training maps as
    the seg factor is trained (the factor's steps, batch and rate, the FG-DM trainer's caption
    drop, no EMA, the run's seed, one thread); cached in diagnose/ (`cached_base`). Not FG-DM:
    a reference for how far the frozen UNet with an adapter falls short of a UNet free to learn
    the maps."""
    p = run["preset"]
    null_prob = fgdm_trainer.build_parser().get_default("null_prob")

    def train(parts, checkpoints) -> None:
        with base.one_thread():
            base.train_unet(host, parts, base.encode_latents(parts, data["train_maps"]),
                            data["train_captions"], p["factor_steps"], batch=p["factor_batch"],
                            lr=fg.TRAINER_LR, null_prob=null_prob, seed=run["seed"], ema=0,
                            amp=run["amp"], checkpoints=checkpoints)

    return cached_base(run, host, UNET_ON_MAPS, "unet-on-maps", p["factor_steps"],
                       f"the base's UNet trained on the maps, {p['factor_steps']} steps", train)


def unet_on_maps(run, host, data, parts, cfg) -> str:
    """The run's seg factor beside the base's whole UNet trained on the maps
    (`unet_on_maps_base`), each drawn as --factor-offset draws its factors."""
    def unet() -> tuple:
        maps_parts, *_ = unet_on_maps_base(run, host, data)
        return maps_parts.patcher, [[encode_text(parts.clip, [""]), {}]]

    return factor_variants(run, host, parts, cfg, {"the run's factor": str(run["dir"] / FACTOR)},
                           "unet-on-maps", {"the base's UNet trained on the maps": unet})


def drawn_once(run, key: str, draw: Callable[[], str]) -> str:
    """The cells `draw` returns, drawn once per diagnose: --factor-offset and
    --factor-loss-weight both draw the base and the run's own factor on the same layouts and
    seeds, which give the same cells."""
    memo = run.setdefault("factor_cells", {})
    if key not in memo:
        memo[key] = draw()
    return memo[key]


def factor_variants(run, host, parts, cfg, paths: dict[str, str], question: str,
                    others: dict[str, Callable[[], tuple]] | None = None) -> str:
    """Each seg factor of `paths` (label -> file) on the validation layouts (`factor_cells`),
    beside the base's images from the same captions and seeds; `others` (label -> a function
    giving (model, negative)): more map generators drawn so (`model_cells`). (Not under
    no_grad: the factors were trained just before; the cells draw without gradients.)"""
    control_net = world_cn.wrap(host, world_cn.load_controlnet(host, parts,
                                                               str(run["dir"] / CONTROLNET)))
    nodes, layouts = sw.load_pack(), validation_layouts(run)
    texts = [item.caption for item in layouts]
    maps = fg.read_maps(validation_paths(run))

    def base_cell() -> str:
        seeds = [sample_seed(run["seed"], i) for i in range(len(layouts))]
        base_images = base.sample_images(host, parts.patcher, parts, texts, seeds, cfg,
                                         steps=run["preset"]["sample_steps"],
                                         guidance=run["guidance"],
                                         on_image=every_tenth(f"{question}, base"))
        shares = from_noise(run, host, parts, parts.patcher, texts, maps)
        log.info("%s: base, no factor: %s", question, noise_cell(shares))
        return f"{noise_cell(shares)}; images {recall_cells(run, base_images, layouts)}"

    cells = [f"base, no factor: {drawn_once(run, 'base', base_cell)}"]
    for who, path in paths.items():
        cells.append(f"{who}: " + drawn_once(run, path, lambda: factor_cells(
            run, host, parts, cfg, nodes, path, control_net, layouts, maps, f"{question} {who}")))
    for who, make in (others or {}).items():
        cells.append(f"{who}: " + model_cells(run, host, parts, cfg, nodes, *make(), control_net,
                                              layouts, maps, f"{question} {who}"))
    steps = run["preset"]["factor_steps"]
    said = (f"{steps} steps where its label names no other" if any(
        "steps" in who for who in paths) else f"{steps} steps")
    return (f"{question}: the seg factor at {said}, {len(layouts)} validation layouts: "
            + " | ".join(cells))


MEAN_CONTROL_STEPS = (999, 700, 400, 100)  # DDPM timesteps where the epsilon mean is read


def slope(x: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares slope of y on x (flattened)."""
    x, y = x.flatten().double(), y.flatten().double()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / x.square().sum())


def channel_means(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) -> (B, 4): each latent's per-channel spatial mean."""
    return latents.mean(dim=(2, 3))


@torch.no_grad()
def mean_control(run, host, parts, cfg) -> str:
    """The --mean-control line (see the module's docstring)."""
    nodes, layouts = sw.load_pack(), validation_layouts(run)
    texts = [item.caption for item in layouts]
    val = validation_paths(run)
    ensure_loaded(host, parts)
    x_maps = encode_images(parts, fg.read_maps(val))
    x_images = encode_images(parts, sw.read_images(val["images"]))
    m_maps, m_images = channel_means(x_maps), channel_means(x_images)

    def vec(v: torch.Tensor) -> str:
        return "[" + ", ".join(f"{float(c):.2f}" for c in v) + "]"

    cells = [f"per-channel mean of the latents (sampler scale): maps {vec(m_maps.mean(0))} "
             f"(spread across maps {vec(m_maps.std(0))}), images {vec(m_images.mean(0))} "
             f"(spread {vec(m_images.std(0))}), apart by "
             f"{float((m_maps.mean(0) - m_images.mean(0)).norm()):.2f}"]
    models = {"base": parts.patcher,
              "the run's factor": fg.factor_model(parts, nodes, str(run["dir"] / FACTOR))[0]}
    context = encode_text(parts.clip, texts)
    g = torch.Generator().manual_seed(run["seed"] + 654)
    slopes: dict[str, list[str]] = {who: [] for who in models}
    for t in MEAN_CONTROL_STEPS:
        noise = torch.randn(x_maps.shape, generator=g)
        noise = noise + torch.randn(len(texts), x_maps.shape[1], 1, 1, generator=g)
        x, sigma = diffuse(parts, x_maps, noise, torch.full((len(texts),), t))
        for who, model in models.items():
            eps = (x - unet_denoised(host, model, x, sigma, context)) / sigma[:, None, None, None]
            slopes[who].append(f"{slope(channel_means(noise), channel_means(eps)):.3f}")
    cells.append(f"the mean of the epsilon predicted against the noise's mean (a per-channel "
                 f"offset N(0, 1) added; 1 follows it, 0 cannot set it), slope at t "
                 f"{'/'.join(map(str, MEAN_CONTROL_STEPS))}: " + "; ".join(
                     f"{who} {'/'.join(v)}" for who, v in slopes.items()))
    side = cfg.size // cfg.downscale
    sigma_max = float(parts.patcher.model.model_sampling.sigma_max)
    seeds = [sample_seed(run["seed"], i) for i in range(len(texts))]
    start = torch.cat([channel_means(sigma_max * torch.randn(  # the noise sample_images draws
        1, 4, side, side, generator=torch.Generator().manual_seed(seed))) for seed in seeds])
    fmt = parts.patcher.model.latent_format
    for who, model in models.items():
        latents = base.sample_images(host, model, parts, texts, seeds, cfg,
                                     steps=run["preset"]["sample_steps"],
                                     guidance=run["guidance"], decode=False)
        end = channel_means(fmt.process_in(latents.float()))
        nearer = int(((end - m_maps.mean(0)).norm(dim=1)
                      < (end - m_images.mean(0)).norm(dim=1)).sum())
        corr = float(torch.corrcoef(torch.stack([start.flatten(), end.flatten()]))[0, 1])
        cells.append(f"{who}'s samples from the tables' seeds: their latent's mean against "
                     f"the starting noise's (sigma_max {sigma_max:.1f} times its mean, spread "
                     f"{float(start.std()):.2f}): slope {slope(start, end):.2f}, correlation "
                     f"{corr:.2f}; nearer the maps' mean than the images' {nearer} of "
                     f"{len(texts)}")
    return (f"mean-control: {len(texts)} validation layouts: " + " | ".join(cells))


BASE_LONGER = "diagnose/base_longer"


def cached_base(run, host, stem: str, question: str, steps: int, what: str,
                train: Callable[[Any, Any], None]) -> tuple:
    """(parts, cfg, path) of the run's base after `train(parts, checkpoints)` (`steps` of
    training, checkpointed as the run's stages are; `what` is logged first), cached in
    `<stem>.safetensors` under the run's folder; the checkpoints are removed once it is
    saved."""
    out = run["dir"] / f"{stem}.safetensors"
    if out.is_file():
        log.info("%s: cached %s", question, out)
        return (*load_world(host, str(out)), str(out))
    parts, cfg = load_world(host, str(run["dir"] / BASE))
    log.info("%s: %s", question, what)
    train(parts, fg.loop_checkpoints(run, f"{stem}_ckpt", steps))
    save_world(str(out), parts, cfg, {"preset": run["name"], "diagnose": question})
    shutil.rmtree(run["dir"] / f"{stem}_ckpt", ignore_errors=True)
    return parts, cfg, str(out)


def longer_base(run, host, data):
    """(parts, cfg, path) of the run's base with its UNet trained as many steps again (cached in
    diagnose/, `cached_base`): from the saved weights (the EMA the run ends with), a fresh AdamW
    at the run's rate, a fresh EMA and the draws of the next seed. The run's cache keeps neither
    the UNet's last raw weights nor its optimizer, so this is a second round of the run's
    training, not one run of twice the steps."""
    steps = run["preset"]["unet_steps"]

    def train(parts, checkpoints) -> None:
        tb = TrainLog(run["env"], argparse.Namespace(tensorboard=str(run["dir"] / "tb" / Path(
            BASE_LONGER).name) if run["tensorboard"] else None, preview_every=0), "base")
        images = data["train_images"]
        base.train_unet(host, parts, base.encode_latents(parts, images),
                        data["train_captions"], steps, seed=run["seed"] + 1,
                        mirrored=base.encode_latents(parts, images.flip(-1)), amp=run["amp"],
                        on_step=lambda s, v: tb.scalars(steps + s + 1, {"unet_loss": v}),
                        checkpoints=checkpoints)
        tb.close()

    return cached_base(run, host, BASE_LONGER, "base-longer", steps,
                       f"the base's UNet, {steps} more steps", train)


def base_longer(run, host, data, parts, cfg) -> list[str]:
    """The run's base and adapter against a base trained as many steps again and an adapter
    trained on it as the run trains its own: each base's one-object line, then the table's
    caption-only and LocRef rows on each base, the same layouts and seeds."""
    p = run["preset"]
    longer, longer_cfg, longer_path = longer_base(run, host, data)
    adapter = fg.cached_training(run, "locref_on_base_longer", "diagnose/locref_on_base_longer",
                                 locref_trainer.main, longer_path, p["locref_steps"],
                                 p["locref_batch"], sw.locref_data_args(data["train"]))
    lines, rows = [], ("base, caption only", "LocRef, trained adapter")
    for who, (b, b_cfg, locref) in {
            f"base at {p['unet_steps']} steps (the run's)": (parts, cfg, str(run["dir"] / LOCREF)),
            f"base at {2 * p['unet_steps']} steps": (longer, longer_cfg, adapter)}.items():
        lines.append("base-longer: " + one_object(run, host, b, b_cfg, who))
        configs = sw.configurations(run, host, b, locref)
        images = sw.generate(run, host, b, b_cfg, {r: configs[r] for r in rows})
        lines += [f"base-longer: {who}, {r}: {table_cells(run, images[r])}" for r in rows]
    return lines


SEED_ROWS = ("LocRef, trained adapter", "ablation: instance masks off",
             "ablation: composite path off")


def adapter_seeds(run, host, parts, cfg, base_path: str, seeds: list[int]) -> list[str]:
    """The LocRef adapter trained as the run trains it with other trainer seeds (cached in
    diagnose/), each and the run's own drawn on the held-out layouts with the tables' sampling
    seeds and scored as the table scores SEED_ROWS: a line per seed, then the spread between
    seeds against the bootstrap intervals, and per ablation for how many seeds its claim holds
    (masks off: leakage higher; composite off: AP50 lower; "outside": the intervals apart)."""
    p = run["preset"]
    paths = {run["seed"]: str(run["dir"] / LOCREF)}
    for seed in seeds:
        paths[seed] = paths.get(seed) or retrained_adapter(run, base_path, f"locref_seed{seed}",
                                                           seed=seed)
    lines, stats = [], {}
    for seed, path in paths.items():
        configs = sw.configurations(run, host, parts, path, seed=seed)
        images = sw.generate(run, host, parts, cfg, {r: configs[r] for r in SEED_ROWS})
        stats[seed] = {r: bootstrap(sw.scores_of(run, images[r]), rounds=p["bootstrap"],
                                    seed=run["seed"]) for r in SEED_ROWS}
        own = " (the run's)" if seed == run["seed"] else ""
        lines.append(f"adapter-seeds: seed {seed}{own}: " + " | ".join(
            f"{r}: " + ", ".join(interval(k, stats[seed][r][k])
                                 for k in ("AP50", "appearance", "leakage")) for r in SEED_ROWS))
    return lines + [seed_spread(stats)]


def seed_spread(stats: dict[int, dict[str, dict]]) -> str:
    """The summary line of --adapter-seeds from each seed's bootstrap statistics (seed -> row
    -> statistic -> (value, low, high))."""
    n, cells = len(stats), []
    for row in SEED_ROWS:
        moves = []
        for k in ("AP50", "appearance", "leakage"):
            values = [s[row][k][0] for s in stats.values()]
            width = float(np.mean([s[row][k][2] - s[row][k][1] for s in stats.values()]))
            moves.append(f"{k} {min(values):.3f} to {max(values):.3f} (its intervals "
                         f"{width:.3f} wide on average)")
        cells.append(f"{row}: " + ", ".join(moves))
    claims = []
    for ablation, k, sign in (("ablation: instance masks off", "leakage", 1),
                              ("ablation: composite path off", "AP50", -1)):
        pairs = [(s[ablation][k], s[SEED_ROWS[0]][k]) for s in stats.values()]
        moved = sum(sign * (a[0] - b[0]) > 0 for a, b in pairs)
        apart = sum(a[1] > b[2] if sign > 0 else a[2] < b[1] for a, b in pairs)
        said = "raise leakage" if sign > 0 else "lower AP50"
        claims.append(f"{ablation.split(': ')[1]} {said} for {moved} of {n} seeds, outside the "
                      f"intervals for {apart}")
    return (f"adapter-seeds: over {n} seeds of the adapter's training: " + "; ".join(cells) +
            " | " + "; ".join(claims))


def missing_models(run: dict, args: argparse.Namespace) -> list[str]:
    """The run's model files that the questions asked need and its cache lacks: the base always,
    the basics' and each question's files from BASICS_READ and QUESTIONS (so a question can be
    asked while the run's other half trains; --drawing and --samplers read only the base)."""
    needed = {BASE, *([] if args.skip_basics else BASICS_READ)}
    for q, (_, reads) in QUESTIONS.items():
        if getattr(args, q):
            needed.update(reads)
    return [name for name in (BASE, LOCREF, FACTOR, CONTROLNET)
            if name in needed and not (run["dir"] / name).is_file()]


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run = sw.make_run(sw.parse_args(["--comfyui", args.comfyui, "--cache", args.cache,
                                     "--seed", str(args.seed), "--prediction", args.prediction,
                                     "--unet-channels", args.unet_channels,
                                     "--vae-downscale", args.vae_downscale,
                                     "--unet-norm-groups", args.unet_norm_groups,
                                     "--precision", args.precision,
                                     *(["--quick"] if args.quick else []),
                                     *(["--portable"] if args.portable else [])]))
    if args.portable:
        sw.enter_portable()
        torch.set_num_threads(sw.PORTABLE_THREADS)
    run["positive_only"] = args.positive_only  # read by controlnets_on_validation
    missing = missing_models(run, args)
    if missing:
        raise SystemExit(f"{run['dir']} holds no finished run ({', '.join(missing)} missing); "
                         "run benchmarks/shapes_world.py with the same --cache, --quick and "
                         "--seed first")
    sw.warn_if_busy("diagnose")
    sw.recorded_machines(run, sw.machine(), "diagnose")
    host, data = sw.start(run)
    parts, cfg, base_path = sw.stage_base(run, host, data)
    asked = [] if args.skip_basics else [  # each returns its line, or lines (placement)
        lambda: vae_noise(run, parts), lambda: probe(run, host),
        lambda: controlnet_eps(run, host, parts)]
    if not args.skip_basics or args.drawing:  # the basics' two lines that read the base alone
        asked += [lambda: one_object(run, host, parts, cfg), lambda: sdedit(run, host, parts)]
    if args.placement:
        asked.append(lambda: placement(run, host, parts, cfg))
    if args.samplers:
        asked.append(lambda: samplers(run, host, parts, cfg))
    if args.adapter_lr:
        asked.append(lambda: adapter_lr(run, host, parts, cfg, base_path, args.adapter_lr))
    if args.own_map:
        asked.append(lambda: own_map(run, host, parts, cfg))
    if args.regional:
        asked.append(lambda: regional(run, host, parts, cfg))
    if args.longer:
        asked += [lambda: continued_locref(run, host, parts, cfg, base_path, 2, "longer",
                                           placement=args.placement),
                  lambda: longer_controlnet(run, host, parts, cfg)]
    for times in args.adapter_times:  # in increasing order, each continuing the one before
        asked.append(lambda times=times: continued_locref(run, host, parts, cfg, base_path, times,
                                                          placement=args.placement))
    if args.base_longer:
        asked.append(lambda: base_longer(run, host, data, parts, cfg))
    if args.adapter_seeds:
        asked.append(lambda: adapter_seeds(run, host, parts, cfg, base_path, args.adapter_seeds))
    if args.controlnet_lr:
        asked.append(lambda: controlnet_lr(run, host, parts, cfg, args.controlnet_lr))
    if args.one_object_map:
        asked.append(lambda: one_object_map(run, host, parts, cfg))
    if args.controlnet_null:
        asked.append(lambda: controlnet_null(run, host, parts, cfg, args.controlnet_null))
    if args.controlnet_end:
        asked.append(lambda: controlnet_end(run, host, parts, cfg, args.controlnet_end))
    if args.hint_init:
        asked.append(lambda: hint_init(run, host, parts, args.hint_init))
    if args.factor_offset:
        asked.append(lambda: factor_offset(run, host, parts, cfg, base_path, args.factor_offset))
    if args.factor_loss_weight:
        asked.append(lambda: factor_loss_weight(run, host, parts, cfg, base_path,
                                                args.factor_loss_weight))
    if args.mean_control:
        asked.append(lambda: mean_control(run, host, parts, cfg))
    if args.factor_norm_groups:
        asked.append(lambda: factor_norm_groups(run, host, parts, cfg, base_path,
                                                args.factor_norm_groups))
    if args.unet_on_maps:
        asked.append(lambda: unet_on_maps(run, host, data, parts, cfg))
    if args.factor_lr or args.factor_times:
        asked.append(lambda: factor_lr(run, host, parts, cfg, base_path, args.factor_lr,
                                       args.factor_times))
    if args.crowding:
        asked.append(lambda: crowding(run, host, parts, cfg))
    if args.controlnet_times:
        asked.append(lambda: controlnet_times(run, host, parts, cfg, args.controlnet_times))
    if args.controlnet_strength:
        asked.append(lambda: controlnet_strength(run, host, parts, cfg, args.controlnet_strength))
    if args.controlnet_colour:
        asked.append(lambda: controlnet_colour(run, host, parts, cfg))
    if args.controlnet_loss_weight:
        asked.append(lambda: controlnet_loss_weight(run, host, parts, cfg,
                                                    args.controlnet_loss_weight))
    if args.controlnet_positive:
        asked.append(lambda: controlnet_positive(run, host, parts, cfg))
    lines, t0 = [], time.perf_counter()
    for n, ask in enumerate(asked, 1):  # each line logged as soon as it is known
        answer = ask()
        for line in [answer] if isinstance(answer, str) else answer:
            log.info("%s", line)
            lines.append(line)
        log.info("diagnose: %d of %d questions answered, %.1f min so far", n, len(asked),
                 (time.perf_counter() - t0) / 60)
    return lines


if __name__ == "__main__":
    sw.restart_if_portable(__file__, sys.argv[1:])
    main()
