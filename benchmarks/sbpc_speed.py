"""SBPC vs SD best-of-N (FG-DM paper, Table 4), measured in one run on the host's SD-1.5.

SBPC: N segmentation maps at a quarter of the image area with t_map steps, sampled as one batch,
decoded by the VAE, turned into class ids and scored (recall, pick: the pack's own code); then one
image with t_img steps. SD best-of-N: N full-size images with t_img
steps (also one batch: SD's best case), decoded; the external segmenter that would score them is
left out, which favours SD. Both sides use the host's own sampler (comfy.sample.sample, Euler,
CFG) and VAE, random weights (speed does not depend on values), CPU.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/sbpc_speed.py [--image 512] [--mode steps]

--mode full runs both sides end to end (minutes on a GPU, most of an hour at 512 px on a 2-core
CPU); --mode steps (the default) times a few sampling steps of each of the three batch shapes and
every VAE decode for real and adds them up, since a sampler's cost is its step count times the
cost of a step. Sizes may be scaled down (--image 256) as long as the area ratio (maps = 1/4 of
the image area) and the step counts are kept.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from locref_overhead import build_unet, import_host  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from locref_core.fgdm.palettes import get_palette  # noqa: E402
from locref_core.fgdm.recall import required_classes  # noqa: E402
from locref_core.fgdm.sbpc import score_candidates  # noqa: E402

log = logging.getLogger("sbpc_speed")


def build_vae(comfy):
    """The host's SD VAE with small random weights."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "attn_resolutions": [], "dropout": 0.0}
    model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return comfy.sd.VAE(sd=model.state_dict())


def sample(comfy, model, n: int, size: int, steps: int, cond, seed: int = 0) -> torch.Tensor:
    """N latents of size x size pixels, one batch, Euler, CFG 7.5."""
    import comfy.sample

    latent = torch.zeros(n, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive, negative = [[cond, {}]], [[torch.zeros_like(cond), {}]]
    return comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", positive, negative,
                               latent, disable_pbar=True, seed=seed)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=int, default=512, help="image side in pixels")
    parser.add_argument("--n", type=int, default=10, help="candidates (N)")
    parser.add_argument("--t-map", type=int, default=10, help="steps per map (t_map)")
    parser.add_argument("--t-img", type=int, default=20, help="steps per image (t_img)")
    parser.add_argument("--mode", choices=("steps", "full"), default="steps",
                        help="full: run both sides end to end; steps: time a few sampling steps "
                        "of each batch shape (sampling cost is linear in the step count) and "
                        "every decode for real, then add up (for full-size runs on a CPU)")
    parser.add_argument("--probe-steps", type=int, default=2,
                        help="steps timed per batch shape in --mode steps")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--mode steps: interleaved rounds; medians are reported")
    parser.add_argument("--sd-chunk", type=int, default=2,
                        help="--mode steps: SD's N images are timed as one chunk of this many "
                        "and scaled by N / chunk (10 images of 512² in one batch do not fit in "
                        "24 GB on a CPU, where the cost of a batch is linear in its size anyway)")
    parser.add_argument("--attention", choices=("pytorch", "host"), default="pytorch",
                        help="pytorch: PyTorch SDPA (--use-pytorch-cross-attention); host: "
                        "the host's default on a CPU (sub-quadratic attention)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfy, convert_config = import_host(args.attention)
    torch.manual_seed(0)
    model, vae = build_unet(comfy, convert_config), build_vae(comfy)
    cond = torch.randn(1, 77, 768)
    map_size = args.image // 2  # a quarter of the image area
    palette = get_palette("coco183")
    required = required_classes(palette, "person, dog, umbrella")
    sample(comfy, model, 1, map_size, 1, cond)  # warm-up (model load, first-call costs)
    vae.decode(torch.zeros(1, 4, map_size // 8, map_size // 8))

    def maps_part(steps):
        maps = sample(comfy, model, args.n, map_size, steps, cond)
        return lambda: score_candidates(vae.decode(maps), palette, required, seed=0)

    def one_image(steps):
        image = sample(comfy, model, 1, args.image, steps, cond)
        return lambda: vae.decode(image)

    def n_images(steps, n=args.n):
        images = sample(comfy, model, n, args.image, steps, cond)
        return lambda: vae.decode(images)

    rows = []
    if args.mode == "full":
        t_sbpc = timed(lambda: (maps_part(args.t_map)(), one_image(args.t_img)()))
        t_sd = timed(lambda: n_images(args.t_img)())
    else:
        chunk = max(1, min(args.sd_chunk, args.n))
        shapes = (  # name, sampler call for k steps (returns the decode), steps, repeats
            (f"{args.n} maps {map_size}²", maps_part, args.t_map, 1),
            (f"1 image {args.image}²", one_image, args.t_img, 1),
            (f"SD: {chunk} images {args.image}² (x{args.n / chunk:g})",
             lambda k: n_images(k, chunk), args.t_img, args.n / chunk),
        )
        steps_s = {s[0]: [] for s in shapes}
        decode_s = {s[0]: [] for s in shapes}
        for r in range(args.rounds):  # interleaved, so drift on a shared machine hits all alike
            for name, fn, _, _ in shapes:
                start = time.perf_counter()
                decode = fn(args.probe_steps)
                steps_s[name].append((time.perf_counter() - start) / args.probe_steps)
                decode_s[name].append(timed(decode))
                log.info("round %d, %s: %.2f s/step, decode(+score) %.1f s", r + 1, name,
                         steps_s[name][-1], decode_s[name][-1])
        totals = []
        for name, _, steps, repeat in shapes:
            per_step = statistics.median(steps_s[name])
            t_decode = statistics.median(decode_s[name])
            totals.append((steps * per_step + t_decode) * repeat)
            rows.append((name, per_step, min(steps_s[name]), max(steps_s[name]), steps, t_decode,
                         totals[-1]))
        t_sbpc, t_sd = totals[0] + totals[1], totals[2]
    log.info("\nSD-1.5 (host UNet + VAE, random weights), CPU threads %d, torch %s, mode %s, "
             "attention %s", torch.get_num_threads(), torch.__version__, args.mode,
             comfy.ldm.modules.attention.optimized_attention.__name__)
    if rows:
        log.info("| batch | s/step (median) | min..max | steps | decode s | total s |\n"
                 "| --- | --- | --- | --- | --- | --- |")
        for name, per_step, lo, hi, steps, t_decode, total in rows:
            log.info("| %s | %.2f | %.2f..%.2f | %d | %.1f | %.1f |", name, per_step, lo, hi,
                     steps, t_decode, total)
    log.info("| method | work | seconds |\n| --- | --- | --- |")
    log.info("| SBPC | %d maps %d² x %d steps (one batch) + 1 image %d² x %d steps | %.1f |",
             args.n, map_size, args.t_map, args.image, args.t_img, t_sbpc)
    how = "one batch" if args.mode == "full" else f"batches of {min(args.sd_chunk, args.n)}"
    log.info("| SD best-of-%d | %d images %d² x %d steps (%s) | %.1f |",
             args.n, args.n, args.image, args.t_img, how, t_sd)
    log.info("speed-up of SBPC over SD best-of-%d: %.2fx", args.n, t_sd / t_sbpc)


if __name__ == "__main__":
    main()
