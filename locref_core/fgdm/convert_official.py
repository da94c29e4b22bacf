"""Convert the official FG-DM checkpoint (a PyTorch-Lightning .pth of the whole LDM) into this
pack's factor-adapter safetensors file, keeping only the adapter weights.

    python -m locref_core.fgdm.convert_official fgdm_seg.pth models/fgdm/fgdm_seg.safetensors

The file is read with `torch.load(weights_only=True)`: tensors and plain containers only. A
checkpoint that needs more than that (arbitrary pickled objects) is refused, never executed.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from collections.abc import Mapping

import torch

from .adapter import KINDS, FactorAdapter, FactorConfig
from .weights import load_strict, save_factor

log = logging.getLogger(__name__)
PREFIXES = ("model.diffusion_model.adapter.", "diffusion_model.adapter.", "adapter.")


def read_checkpoint(path: str) -> Mapping[str, torch.Tensor]:
    """The state dict of a Lightning/LDM checkpoint, loaded with weights_only=True."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise ValueError(
            f"{path}: refused: this file needs more than plain tensors to unpickle ({err}). Only "
            "checkpoints that load with weights_only=True are converted.") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: not a checkpoint (a {type(data).__name__}, no state dict)")
    return data


def extract_adapter(state: Mapping[str, torch.Tensor], path: str = "checkpoint") -> dict:
    """The adapter's tensors with the prefix stripped; ValueError if there are none."""
    for prefix in PREFIXES:
        found = {k[len(prefix):]: v for k, v in state.items()
                 if k.startswith(prefix) and isinstance(v, torch.Tensor)}
        if found:
            return found
    raise ValueError(f"{path}: no FG-DM adapter weights (keys starting with {PREFIXES[0]!r}); "
                     "is this the official FG-DM factor checkpoint?")


def infer_config(tensors: Mapping[str, torch.Tensor], kind: str, palette: str) -> FactorConfig:
    """FactorConfig from the adapter's tensor names and shapes."""
    if "conv_in.weight" not in tensors:
        raise ValueError("adapter weights have no conv_in.weight")
    time_conditioned = any(k.startswith("body.0.in_layers") for k in tensors)
    n_blocks = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(r"body\.(\d+)\.", k)))
    channels, per_scale = [], 2
    while n_blocks % per_scale:
        per_scale -= 1
    for i in range(n_blocks // per_scale):
        conv = (f"body.{i * per_scale}.in_layers.2.weight" if time_conditioned
                else f"body.{i * per_scale}.block1.weight")
        channels.append(tensors[conv].shape[0])
    emb = tensors["body.0.emb_layers.1.weight"].shape[1] if time_conditioned else 1280
    return FactorConfig(kind=kind, in_channels=tensors["conv_in.weight"].shape[1],
                        channels=tuple(channels), num_res_blocks=per_scale,
                        time_conditioned=time_conditioned, emb_channels=emb, palette=palette)


def convert(src: str, dst: str, kind: str = "seg", palette: str = "coco183") -> FactorConfig:
    """Read `src`, write the adapter to `dst`; returns its config."""
    tensors = extract_adapter(read_checkpoint(src), src)
    cfg = infer_config(tensors, kind, palette)
    adapter = FactorAdapter(cfg)
    load_strict(src, adapter, tensors)
    save_factor(adapter, dst, {"source": "official FG-DM checkpoint", "source_file": src})
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="the official FG-DM checkpoint (.pth / .ckpt)")
    parser.add_argument("dst", help="output .safetensors (put it in ComfyUI/models/fgdm/)")
    parser.add_argument("--kind", choices=KINDS, default="seg", help="what the factor generates")
    parser.add_argument("--palette", default="coco183",
                        help="palette of the factor's maps (the official seg factor: coco183)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = convert(args.src, args.dst, args.kind, args.palette)
    log.info("wrote %s: %s", args.dst, cfg.to_json())


if __name__ == "__main__":
    main()
