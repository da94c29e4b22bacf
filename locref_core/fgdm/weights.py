"""Factor adapter files: safetensors with the FactorConfig JSON in the metadata."""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..filekind import FGDM_FORMAT, require
from ..weights import load_strict as _load_strict
from .adapter import FactorAdapter, FactorConfig

FORMAT_NAME, FORMAT_VERSION = FGDM_FORMAT, "1"
SUPPORTED = ("FG-DM factor adapters (.safetensors written by this pack's trainer or by "
             "`python -m locref_core.fgdm.convert_official`)")


def save_factor(adapter: FactorAdapter, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write an FG-DM factor adapter (config in the metadata)."""
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "config": adapter.cfg.to_json(), **(metadata or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()},
              path, metadata=meta)


def read_factor_config(path: str) -> FactorConfig:
    """The FactorConfig of a factor file, read from its metadata alone (no tensor is read);
    the same named errors as `load_factor`."""
    return _read_factor(path, tensors=False)[0]


def load_factor(path: str) -> FactorAdapter:
    """Load a factor adapter written by `save_factor` or the converter; strict, named errors."""
    cfg, tensors = _read_factor(path, tensors=True)
    adapter = FactorAdapter(cfg)
    load_strict(os.path.basename(path), adapter, tensors)
    return adapter.eval()


def _read_factor(path: str, tensors: bool) -> tuple[FactorConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a factor file after the checks both readers make; `tensors` False
    leaves the dict empty and reads the header alone."""
    name = os.path.basename(path)
    if not path.endswith((".safetensors", ".sft")):
        raise ValueError(f"{name}: only .safetensors factor files are loaded; convert the official "
                         "FG-DM checkpoint with `python -m locref_core.fgdm.convert_official`")
    require(path, ("fgdm_factor",), "factor", SUPPORTED)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{name}: not a readable safetensors file ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{name}: factor format version {meta.get('format_version')!r}; this pack "
                         f"reads {FORMAT_VERSION}")
    try:
        cfg = FactorConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{name}: bad or missing factor config in the metadata ({err})") from None
    return cfg, weights


def load_strict(name: str, adapter: FactorAdapter, tensors: dict[str, torch.Tensor]) -> None:
    """load_state_dict(strict) with an error naming the file, counts and mismatches."""
    _load_strict(name, adapter, tensors, config="factor config")
