"""Convert a PyTorch pickle of tensors (.bin / .pt / .pth / .ckpt) into a .safetensors file,
once, so the pack's loaders can read it:

    python -m locref_core.convert_pickle ip-adapter_sd15.bin ip-adapter_sd15.safetensors

The file is read with `torch.load(weights_only=True)` (tensors and plain containers only; a file
that needs more is refused, never executed). Nested dicts are flattened with dots, as the
safetensors releases name them: {"image_proj": {"proj.weight": ...}} -> "image_proj.proj.weight".
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

from .fgdm.convert_official import read_checkpoint

log = logging.getLogger(__name__)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested mapping, keyed by its dotted path; other values are dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value.detach().clone().contiguous()  # own storage: save_file needs it
        elif isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
    return out


def convert(src: str, dst: str) -> int:
    """Write the tensors of pickle `src` to safetensors `dst`; the number of tensors."""
    tensors = flatten(read_checkpoint(src))
    if not tensors:
        raise ValueError(f"{src}: holds no tensors; nothing to convert")
    save_file(tensors, dst, metadata={"source_file": src})
    return len(tensors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="the pickle (.bin / .pt / .pth / .ckpt) to read")
    parser.add_argument("dst", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("wrote %s: %d tensors", args.dst, convert(args.src, args.dst))


if __name__ == "__main__":
    main()
