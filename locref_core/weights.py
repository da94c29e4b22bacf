"""LocRef adapter files: the pack's own safetensors format, and IP-Adapter SD-1.5 files.

LocRef format: the adapter's state dict, with metadata {"format": "locref", "format_version": "1",
"config": <AdapterConfig JSON>}. IP-Adapter SD-1.5 (`ip-adapter_sd15.safetensors` and the same
layout, e.g. `_light`): `image_proj.proj`, `image_proj.norm`, `ip_adapter.{1,3,..,31}.to_k_ip /
to_v_ip`, numbered in diffusers order; mapped onto the 16 sites, shared by the CI and RI paths.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter import AdapterConfig, LocRefAdapter, site_key
from .filekind import IP_ADAPTER_IDS, LOCREF_FORMAT, require
from .grid import SD15_SITES

FORMAT_NAME, FORMAT_VERSION = LOCREF_FORMAT, "1"
SUPPORTED = ("a LocRef adapter (.safetensors written by this pack) or IP-Adapter SD-1.5 "
             "(ip-adapter_sd15.safetensors, ip-adapter_sd15_light.safetensors)")

SITE_OF_IP_ID = dict(zip(IP_ADAPTER_IDS, SD15_SITES))


def save_whole(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
               metadata: dict[str, str] | None = None) -> None:
    """`save_file`, written to `<path>.partial` and renamed into place once whole: a process
    waiting for `path`, or a rerun after a stop, never reads half a file, and a failed write
    leaves what was at `path` as it was."""
    path = os.fspath(path)
    partial = f"{path}.partial"
    try:
        save_file(tensors, partial, metadata=metadata)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    os.replace(partial, path)


def save_adapter(adapter: LocRefAdapter, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write `adapter` in the LocRef format (config in the metadata)."""
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "config": adapter.cfg.to_json(), **(metadata or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    save_file(tensors, path, metadata=meta)


def load_adapter(path: str) -> LocRefAdapter:
    """Load a LocRef or IP-Adapter SD-1.5 file; raise ValueError naming the file otherwise."""
    name = os.path.basename(path)
    if not path.endswith((".safetensors", ".sft")):
        raise ValueError(f"{name}: only .safetensors files are loaded (pickled .bin/.pt/.pth "
                         f"files can run code). Supported: {SUPPORTED}.")
    found = require(path, ("locref", "ip_adapter_sd15"), "adapter", SUPPORTED)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{name}: not a readable safetensors file ({err})") from None
    if found.kind == "locref":
        return _load_locref(name, meta, tensors)
    return _load_ip_adapter(name, tensors)


def _load_locref(name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> LocRefAdapter:
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{name}: LocRef format version {meta.get('format_version')!r}; this pack "
                         f"reads version {FORMAT_VERSION}. Update the pack.")
    try:
        cfg = AdapterConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{name}: bad or missing adapter config in the metadata ({err})") from None
    adapter = LocRefAdapter(cfg)
    load_strict(name, adapter, tensors)
    return adapter


def _load_ip_adapter(name: str, tensors: dict[str, torch.Tensor]) -> LocRefAdapter:
    proj = tensors["image_proj.proj.weight"]  # (T * 768, E)
    context_dim = tensors["image_proj.norm.weight"].shape[0]
    if context_dim != 768 or proj.shape[0] % context_dim:
        raise ValueError(f"{name}: image projection {tuple(proj.shape)} with context width "
                         f"{context_dim} is not SD-1.5's (T*768, E)")
    cfg = AdapterConfig(embed_dim=proj.shape[1], tokens=proj.shape[0] // context_dim,
                        context_dim=context_dim, hidden_dim=None, shared_kv=True)
    mapped = {
        "appearance.proj.weight": proj,
        "appearance.proj.bias": tensors["image_proj.proj.bias"],
        "appearance.norm.weight": tensors["image_proj.norm.weight"],
        "appearance.norm.bias": tensors["image_proj.norm.bias"],
    }
    for ip_id, site in SITE_OF_IP_ID.items():
        for src, dst in (("to_k_ip", "to_k"), ("to_v_ip", "to_v")):
            mapped[f"kv_ri.{site_key(site)}.{dst}.weight"] = tensors[
                f"ip_adapter.{ip_id}.{src}.weight"]
    adapter = LocRefAdapter(cfg)
    load_strict(name, adapter, mapped)
    return adapter


def load_strict(name: str, adapter: torch.nn.Module, tensors: dict[str, torch.Tensor],
                config: str = "adapter config") -> None:
    """load_state_dict(strict) with an error that names the file, what it should match
    (`config`: the LocRef adapter's, or FG-DM's factor config), the counts and the
    mismatches."""
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs expected {tuple(v.shape)}"
              for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} with the wrong shape (e.g. {shapes[:2]})")
        raise ValueError(f"{name}: does not match the {config} "
                         f"({len(expected)} tensors expected): " + "; ".join(parts))
    adapter.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)


def describe(adapter: LocRefAdapter) -> str:
    """One line for logs: config and parameter count."""
    params = sum(p.numel() for p in adapter.parameters())
    return f"{json.loads(adapter.cfg.to_json())} ({params / 1e6:.1f}M parameters)"

