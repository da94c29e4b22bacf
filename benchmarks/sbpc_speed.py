"""SBPC vs SD best-of-N (FG-DM paper, Table 4), measured in one run on the host's SD-1.5.

SBPC: N segmentation maps at a quarter of the image area with t_map steps, sampled as one batch,
decoded by the VAE; then one image with t_img steps. SD best-of-N: N full-size images with t_img
steps (also one batch: SD's best case), decoded; the external segmenter that would score them is
left out, which favours SD. Both sides use the host's own sampler (comfy.sample.sample, Euler,
CFG) and VAE, random weights (speed does not depend on values), CPU.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/sbpc_speed.py [--image 256] [--n 10]

Sizes may be scaled down for a CPU as long as the area ratio (maps = 1/4 of the image area)
and the step counts are kept.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from locref_overhead import build_unet, import_host  # noqa: E402

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
    parser.add_argument("--image", type=int, default=256, help="image side in pixels")
    parser.add_argument("--n", type=int, default=10, help="candidates (N)")
    parser.add_argument("--t-map", type=int, default=10, help="steps per map (t_map)")
    parser.add_argument("--t-img", type=int, default=20, help="steps per image (t_img)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfy, convert_config = import_host()
    torch.manual_seed(0)
    model, vae = build_unet(comfy, convert_config), build_vae(comfy)
    cond = torch.randn(1, 77, 768)
    map_size = args.image // 2  # a quarter of the image area
    sample(comfy, model, 1, map_size, 1, cond)  # warm-up (model load, first-call costs)
    vae.decode(torch.zeros(1, 4, map_size // 8, map_size // 8))

    def sbpc():
        maps = sample(comfy, model, args.n, map_size, args.t_map, cond)
        vae.decode(maps)
        image = sample(comfy, model, 1, args.image, args.t_img, cond)
        vae.decode(image)

    def best_of_n():
        images = sample(comfy, model, args.n, args.image, args.t_img, cond)
        vae.decode(images)

    t_sbpc = timed(sbpc)
    t_sd = timed(best_of_n)
    log.info("\nSD-1.5 (host UNet + VAE, random weights), CPU threads %d, torch %s",
             torch.get_num_threads(), torch.__version__)
    log.info("| method | work | seconds |\n| --- | --- | --- |")
    log.info("| SBPC | %d maps %d² x %d steps (one batch) + 1 image %d² x %d steps | %.1f |",
             args.n, map_size, args.t_map, args.image, args.t_img, t_sbpc)
    log.info("| SD best-of-%d | %d images %d² x %d steps (one batch) | %.1f |",
             args.n, args.n, args.image, args.t_img, t_sd)
    log.info("speed-up of SBPC over SD best-of-%d: %.2fx", args.n, t_sd / t_sbpc)


if __name__ == "__main__":
    main()
