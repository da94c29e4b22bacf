"""Cost of the LocRef patch per UNet call: patched vs unpatched, measured in one run.

The host's full-size SD-1.5 UNet (random weights: speed does not depend on values), a 512x512
latent batch of 2 (one CFG pair, uncond first), on the CPU. Median wall time of a UNet call
without LocRef and with LocRef for 1, 4 and 16 reference instances, 4 text boxes (regional
prompts: each box's own (77, 768) embedding, no adapter) and 4 boxes with text and a reference;
prints the ratios to the plain call.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/locref_overhead.py [--reps 5] [--layout grid]

Needs a Python environment with ComfyUI's requirements (see README, "Real-host tests").
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locref_core.adapter import AdapterConfig, LocRefAdapter  # noqa: E402
from locref_core.layout import Box, Layout, Reference  # noqa: E402
from locref_core.patch import LocRefState, PatchSettings, install  # noqa: E402
from locref_core.train.host import sd15_ldm_unet_config  # noqa: E402

log = logging.getLogger("locref_overhead")


def import_host(attention: str = "pytorch"):
    """Import ComfyUI from COMFYUI_PATH, on the CPU. attention "pytorch": PyTorch SDPA (what
    --use-pytorch-cross-attention gives); "host": the host's own CPU choice (sub-quadratic)."""
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "main.py").is_file():
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (see README)")
    sys.path.append(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = attention == "pytorch"
    import comfy.ldm.modules.attention
    import comfy.model_patcher
    import comfy.supported_models
    from comfy.model_detection import convert_config

    log.info("host attention: %s", comfy.ldm.modules.attention.optimized_attention.__name__)
    return comfy, convert_config


def build_unet(comfy, convert_config):
    """The host's SD-1.5 BaseModel, fp32, small random weights, in a ModelPatcher."""
    config = convert_config(sd15_ldm_unet_config(320, torch.float32))
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu")).eval()
    with torch.no_grad():  # ComfyUI layers skip init; uninitialised memory can be denormal/NaN
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def grid_layout(n: int, layout: str, refs: bool = True) -> Layout:
    """n boxes: a sqrt(n) x sqrt(n) grid, each box 80% of its cell; or all full-canvas. Each box
    has a reference when refs, else none."""
    ref = Reference(torch.rand(3, 64, 64)) if refs else None
    if layout == "full":
        return Layout(512, 512, tuple(Box(0, 0, 1, 1, f"{i}", ref) for i in range(n)))
    side = math.ceil(math.sqrt(n))
    cell = 1.0 / side
    boxes = [Box((i % side + 0.1) * cell, (i // side + 0.1) * cell, (i % side + 0.9) * cell,
                 (i // side + 0.9) * cell, f"{i}", ref) for i in range(n)]
    return Layout(512, 512, tuple(boxes))


def patched(model, n: int, layout_kind: str, refs: bool = True, text: bool = False):
    """A clone with LocRef for n boxes, each with a reference (through a random adapter) when
    refs and its own random prompt embedding (77, 768) when text; no adapter without refs."""
    layout = grid_layout(n, layout_kind, refs)
    adapter = ri = ci = None
    if refs:
        adapter = LocRefAdapter(AdapterConfig()).eval()
        with torch.no_grad():
            ri = adapter.project(torch.randn(n, 1024))
            ci = adapter.project(torch.randn(1, 1024))[0]
    texts = [torch.randn(77, 768) for _ in range(n)] if text else None
    state = LocRefState(adapter, layout, ri, ci, PatchSettings(),
                        model.get_model_object("diffusion_model"), text_tokens=texts)
    assert len(state.sources) == refs + text, "a token source is missing"
    m = model.clone()
    install(m, state)
    coverage = sum(min(1.0, b.area) for b in layout.boxes) if layout_kind == "grid" else 1.0
    return m, state, coverage


def unet_call(model, x, sigma, ctx):
    options = dict(model.model_options.get("transformer_options", {}))
    options.update(cond_or_uncond=[1, 0], sigmas=sigma, uuids=[None, None])
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="timed calls per variant (median)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--layout", choices=["grid", "full"], default="grid",
                        help="grid: boxes at 80%% of a grid cell; full: every box is the canvas")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfy, convert_config = import_host()
    torch.manual_seed(0)
    base = build_unet(comfy, convert_config)
    lat = args.size // 8
    x, ctx = torch.randn(2, 4, lat, lat), torch.randn(2, 77, 768)
    sigma = torch.full((2,), 5.0)
    variants = {"plain": (base, None, 0.0)}
    for n in (1, 4, 16):
        variants[f"{n} instances"] = patched(base, n, args.layout)
    variants["4 text boxes"] = patched(base, 4, args.layout, refs=False, text=True)
    variants["4 text+reference boxes"] = patched(base, 4, args.layout, text=True)
    times = {name: [] for name in variants}
    for name, (model, state, _) in variants.items():
        unet_call(model, x, sigma, ctx)  # warm-up
        if state is not None:
            assert len(state.fired) == 16, f"{name}: the patch fired at {len(state.fired)} sites"
    for rep in range(args.reps):  # interleaved, so drift affects every variant alike
        for name, (model, _, _) in variants.items():
            start = time.perf_counter()
            unet_call(model, x, sigma, ctx)
            times[name].append(time.perf_counter() - start)
        log.info("round %d/%d done", rep + 1, args.reps)
    plain = statistics.median(times["plain"])
    log.info("\nSD-1.5 UNet, %dx%d, batch 2, CPU threads %d, torch %s, layout %s",
             args.size, args.size, torch.get_num_threads(), torch.__version__, args.layout)
    log.info("| variant | box area | median s/call | min..max s | ratio (median) | ratio (min) |")
    log.info("| --- | --- | --- | --- | --- | --- |")
    fastest_plain = min(times["plain"])
    for name, (_, _, coverage) in variants.items():
        med, lo, hi = statistics.median(times[name]), min(times[name]), max(times[name])
        log.info("| %s | %.0f%% | %.3f | %.3f..%.3f | %.3f | %.3f |", name, 100 * coverage, med,
                 lo, hi, med / plain, lo / fastest_plain)


if __name__ == "__main__":
    main()
