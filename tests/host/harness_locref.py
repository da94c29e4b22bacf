"""Random-weight model files for LocRef workflows: a CLIP ViT-H/14 vision model in the layout
`CLIPVisionLoader` reads, and an IP-Adapter SD-1.5 file; both cached next to the checkpoint."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

from harness_env import atomic_write, cache_dir, comfyui_path, ensure_comfy_importable
from harness_models import reinit_parameters

LOG = logging.getLogger(__name__)
FORMAT_VERSION = 1
CLIP_VISION_NAME = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
IP_ADAPTER_NAME = "ip-adapter_sd15.safetensors"
# diffusers attention-processor ids of SD-1.5's attn2 layers and their widths
IP_IDS_AND_WIDTHS = ([(i, 320) for i in (1, 3, 25, 27, 29)]
                     + [(i, 640) for i in (5, 7, 19, 21, 23)]
                     + [(i, 1280) for i in (9, 11, 13, 15, 17, 31)])


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def cached_clip_vision_h() -> Path:
    """A random CLIP ViT-H/14 vision tower (fp16), built with the host's own class."""
    path = cache_dir() / f"clip-vision-h-random-v{FORMAT_VERSION}.safetensors"
    if path.is_file():
        return path
    ensure_comfy_importable()
    import torch
    import comfy.clip_vision

    LOG.info("generating %s (one-off)", path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        config = comfy.clip_vision.ClipVisionModel(
            str(comfyui_path() / "comfy" / "clip_vision_config_h.json"))
        reinit_parameters(config.model)
        state = {k: v.to(torch.float16).contiguous() for k, v in config.model.state_dict().items()}
    return _atomic_save(state, path, {"generator": "comfyui-locref tests"})


def cached_ip_adapter() -> Path:
    """A random IP-Adapter SD-1.5 file with the real key layout and shapes (fp16)."""
    path = cache_dir() / f"ip-adapter-sd15-random-v{FORMAT_VERSION}.safetensors"
    if path.is_file():
        return path
    import torch

    g = torch.Generator().manual_seed(3)
    t = {"image_proj.proj.weight": torch.randn(4 * 768, 1024, generator=g) * 0.02,
         "image_proj.proj.bias": torch.zeros(4 * 768),
         "image_proj.norm.weight": torch.ones(768), "image_proj.norm.bias": torch.zeros(768)}
    for ip_id, width in IP_IDS_AND_WIDTHS:
        for name in ("to_k_ip", "to_v_ip"):
            t[f"ip_adapter.{ip_id}.{name}.weight"] = torch.randn(width, 768, generator=g) * 0.05
    t = {k: v.half().contiguous() for k, v in t.items()}
    return _atomic_save(t, path, {"generator": "comfyui-locref tests"})


def install_locref_models(base_dir: Path) -> None:
    """Link the random CLIP vision and IP-Adapter files into a server's model folders."""
    for folder, name, source in (("clip_vision", CLIP_VISION_NAME, cached_clip_vision_h()),
                                 ("ipadapter", IP_ADAPTER_NAME, cached_ip_adapter())):
        target = Path(base_dir) / "models" / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_symlink():
            target.symlink_to(source)


def free_cache(server) -> None:
    """Ask the server to drop its execution cache after the next prompt."""
    req = urllib.request.Request(f"{server.url}/free", method="POST",
                                 data=json.dumps({"free_memory": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()
