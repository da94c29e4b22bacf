"""The host (ComfyUI) as a library for training: the one place in locref_core that loads it.

Training runs the host's own UNet, CLIP and VAE code with the pack's patches installed exactly as
the nodes install them, so what is trained is what runs. Nothing here imports the host at module
import time: `load_host(root)` puts the checkout on sys.path and imports its modules by name
(importlib), and every other function takes the namespace it returns.
"""

from __future__ import annotations

import collections
import functools
import importlib
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

HOST_MODULES = {
    "cli_args": "comfy.cli_args",
    "model_management": "comfy.model_management",
    "sd": "comfy.sd",
    "sample": "comfy.sample",
    "model_patcher": "comfy.model_patcher",
    "patcher_extension": "comfy.patcher_extension",
    "supported_models": "comfy.supported_models",
    "model_detection": "comfy.model_detection",
    "autoencoder": "comfy.ldm.models.autoencoder",
    "openaimodel": "comfy.ldm.modules.diffusionmodules.openaimodel",
    "attention": "comfy.ldm.modules.attention",
    "ops": "comfy.ops",
    "model_base": "comfy.model_base",
    "model_sampling": "comfy.model_sampling",
    "utils": "comfy.utils",
    "cldm": "comfy.cldm.cldm",
    "controlnet": "comfy.controlnet",
    "folder_paths": "folder_paths",
}
TOKENS = 77  # one CLIP window: SD-1.5's context length


def load_host(comfyui_root: str | os.PathLike, cpu: bool | None = None) -> SimpleNamespace:
    """Import the ComfyUI checkout at `comfyui_root` and return its modules as a namespace.

    The checkout is appended to sys.path (never in front: the pack's `nodes/` must not be
    shadowed by the host's nodes.py). cpu=True (default: no CUDA device) sets the host's CPU option
    before `comfy.model_management` is imported, which otherwise fails on a CUDA build of torch
    without a GPU. PyTorch SDPA attention is selected (the CPU default, sub-quadratic, is far
    slower). Idempotent; an already imported host from another checkout is an error.
    """
    root = os.path.realpath(os.fspath(comfyui_root))
    if not (os.path.isfile(os.path.join(root, "main.py"))
            and os.path.isdir(os.path.join(root, "comfy"))):
        raise ValueError(f"--comfyui {comfyui_root!r} is not a ComfyUI checkout (expected main.py "
                         "and comfy/ inside it); pass the folder you start ComfyUI from")
    if root not in sys.path:
        sys.path.append(root)
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    cli_args = importlib.import_module(HOST_MODULES["cli_args"])
    origin = os.path.dirname(os.path.realpath(cli_args.__file__))
    if origin != os.path.join(root, "comfy"):
        raise ValueError(f"the host is already imported from {os.path.dirname(origin)}, not "
                         f"{root}; run the trainer in a fresh process")
    if "comfy.model_management" not in sys.modules:
        cli_args.args.cpu = cli_args.args.cpu or cpu
        cli_args.args.use_pytorch_cross_attention = True
    mods = {name: importlib.import_module(path) for name, path in HOST_MODULES.items()}
    return SimpleNamespace(root=root, **mods)


@dataclass
class SD15Parts:
    """The host objects a trainer needs: MODEL (ModelPatcher), CLIP and VAE."""

    patcher: Any
    clip: Any
    vae: Any

    @property
    def unet(self) -> torch.nn.Module:
        return self.patcher.model.diffusion_model


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """requires_grad False everywhere and eval mode: no gradients or optimizer state."""
    module.requires_grad_(False)
    return module.eval()


def load_sd15(host: SimpleNamespace, checkpoint_path: str,
              dtype: torch.dtype | None = None) -> SD15Parts:
    """An SD-1.5 checkpoint through the host's loader (CheckpointLoaderSimple's code path).

    dtype: the UNet's weight dtype (e.g. bf16 on GPU); None lets the host choose.
    """
    if not os.path.isfile(checkpoint_path):
        raise ValueError(f"--checkpoint {checkpoint_path!r} does not exist; pass an SD-1.5 "
                         ".safetensors file")
    options = {} if dtype is None else {"dtype": dtype}
    model, clip, vae, _ = host.sd.load_checkpoint_guess_config(
        checkpoint_path, output_vae=True, output_clip=True, model_options=options)
    if model is None or clip is None or vae is None:
        raise ValueError(f"{checkpoint_path}: needs the UNet, CLIP and VAE in one file (a full "
                         "SD-1.5 checkpoint)")
    name = type(model.model.model_config).__name__
    if name != "SD15":
        raise ValueError(f"{checkpoint_path}: the host detects a {name} model; the trainers "
                         "need an SD-1.5 checkpoint")
    freeze(model.model)
    return SD15Parts(model, clip, vae)


def load_base(host: SimpleNamespace, args: Any, dtype: torch.dtype | None = None) -> SD15Parts:
    """The frozen base a trainer adapts: --world-base (a shapes-world base, `world.models`),
    --tiny-unet (random, tests) or --checkpoint (SD-1.5)."""
    if getattr(args, "world_base", None):
        from ..world.models import load_world  # noqa: PLC0415 - world builds on this module

        return load_world(host, args.world_base)[0]
    if args.tiny_unet:
        return build_tiny_sd15(host, seed=args.seed)
    return load_sd15(host, args.checkpoint, dtype=dtype)


def add_world_base_flag(g: Any) -> None:
    g.add_argument("--world-base", help="a shapes-world base model (benchmarks/shapes_world.py) "
                   "instead of --checkpoint: the tiny text-to-image model trained on the "
                   "synthetic shapes, frozen")


def add_text_cache_flag(g: Any) -> None:
    g.add_argument("--text-cache", type=int, default=0, help="captions kept encoded across steps "
                   "(236 KB each; 0: encode every step). Pays when captions repeat: a small "
                   "caption vocabulary (the shapes world: 8192) or many epochs of a small set")


def text_cache(args: Any) -> TextCache | None:
    """The `--text-cache` of a trainer's arguments (None when 0); a negative count is refused."""
    n = getattr(args, "text_cache", 0)
    if n < 0:
        raise ValueError(f"--text-cache {n}: give a number of captions, or 0 for no cache")
    return TextCache(n) if n else None


def sd15_ldm_unet_config(model_channels: int = 320, dtype: torch.dtype = torch.float32) -> dict:
    """SD-1.5's UNet hyper-parameters in the LDM yaml's terms (the host's convert_config input)."""
    return {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
            "model_channels": model_channels, "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "attention_resolutions": [4, 2, 1], "transformer_depth": 1,
            "transformer_depth_middle": 1, "context_dim": 768, "num_heads": 8,
            "num_head_channels": -1, "use_spatial_transformer": True, "legacy": False,
            "use_linear_in_transformer": False, "adm_in_channels": None,
            "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": dtype}


def build_tiny_sd15(host: SimpleNamespace, model_channels: int = 32, seed: int = 0,
                    unet_overrides: dict | None = None) -> SD15Parts:
    """Random-weight SD-1.5-shaped parts from the host's own classes, small enough for CPU tests.

    UNet: the SD15 config (context 768, 8 heads, channel_mult 1,2,4,4, attention at 4/2/1) at
    `model_channels`, with `unet_overrides` of the LDM config keys; CLIP: the SD-1.5 text encoder
    with 1 layer (width 768 kept: the UNet's context); VAE: the host's AutoencoderKL at ch=32,
    1 res block (still /8, 4 latent channels).
    """
    dev = host.model_management.get_torch_device()
    cpu = torch.device("cpu")
    raw = sd15_ldm_unet_config(model_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = host.supported_models.SD15(host.model_detection.convert_config(raw))
        config.unet_config.update(unet_overrides or {})  # over SD15's own extra config
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({}, device=cpu)
        reinit(model.diffusion_model)
        patcher = host.model_patcher.ModelPatcher(freeze(model), load_device=dev,
                                                  offload_device=cpu)
        clip = host.sd.CLIP(target=config.clip_target(), model_options={
            "dtype": torch.float32,
            "clip_l_model_config": {"num_hidden_layers": 1, "intermediate_size": 256}})
        reinit(clip.cond_stage_model)
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                    "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1,
                    "attn_resolutions": [], "dropout": 0.0}
        ae = host.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        reinit(ae)
        vae = host.sd.VAE(sd=ae.state_dict(), dtype=torch.float32,
                          config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    freeze(clip.cond_stage_model)
    freeze(vae.first_stage_model)
    return SD15Parts(patcher, clip, vae)


def reinit(module: torch.nn.Module) -> None:
    """Fresh torch initialisation for every standard layer (the host's ops skip init); other
    parameters N(0, 0.02)."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm,
             torch.nn.Embedding)
    with torch.no_grad():
        done = set()
        for sub in module.modules():
            kind = next((k for k in kinds if isinstance(sub, k)), None)
            if kind is not None:
                kind.reset_parameters(sub)
                done.update(id(p) for p in sub.parameters(recurse=False))
        for p in module.parameters():
            if id(p) not in done:
                p.normal_(0.0, 0.02)


class TextCache:
    """Captions encoded by `encode_text`, kept across calls: a trainer whose captions repeat (a
    small vocabulary, many epochs) encodes each caption once. The least recently used caption is
    dropped past `max_entries` (each holds a (1, 77, 768) float32 context, 236 KB). A caption's
    context does not depend on the rest of the batch (each is encoded alone), so the results are
    the same with and without the cache."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"TextCache(max_entries={max_entries}): keep at least one caption")
        self.max_entries, self.hits, self.misses = max_entries, 0, 0
        self._kept: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def get(self, text: str) -> torch.Tensor | None:
        found = self._kept.get(text)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
            self._kept.move_to_end(text)
        return found

    def put(self, text: str, context: torch.Tensor) -> None:
        self._kept[text] = context
        self._kept.move_to_end(text)
        while len(self._kept) > self.max_entries:
            self._kept.popitem(last=False)

    def __len__(self) -> int:
        return len(self._kept)


@torch.no_grad()
def encode_text(clip: Any, captions: list[str], cache: TextCache | None = None) -> torch.Tensor:
    """Captions -> (B, 77, 768) context through the host's CLIP (first 77-token window only).

    Each caption is tokenized and encoded as CLIPTextEncode does; a caption longer than one window
    is cut to its first window so the batch stacks. Repeated captions are encoded once, and with a
    `cache`, once across calls.
    """
    seen: dict[str, torch.Tensor] = {}
    out = []
    for text in captions:
        context = seen.get(text)
        if context is None and cache is not None:
            context = cache.get(text)
        if context is None:
            cond = clip.encode_from_tokens(clip.tokenize(text))  # (1, 77 * windows, 768)
            context = cond[:, :TOKENS].float()
            if cache is not None:
                cache.put(text, context)
        seen[text] = context
        out.append(context)
    return torch.cat(out)


@torch.no_grad()
def encode_images(parts: SD15Parts, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) latents as the sampler sees them.

    The host's VAE.encode (pixels (B, H, W, 3) in [0, 1]) then the model's latent format
    (`process_in`: x 0.18215 for SD-1.5), i.e. what VAEEncode + KSampler do.
    """
    pixels = ((images.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()  # (B, H, W, 3)
    raw = parts.vae.encode(pixels)  # (B, 4, h, w)
    return parts.patcher.model.latent_format.process_in(raw).float()


@torch.no_grad()
def decode_latents(parts: SD15Parts, latents: torch.Tensor) -> torch.Tensor:
    """Sampler latents (B, 4, h, w) -> images (B, 3, H, W) in [0, 1] (VAEDecode's path)."""
    raw = parts.patcher.model.latent_format.process_out(latents.detach().float().cpu())
    return parts.vae.decode(raw).movedim(-1, 1).float()


def diffuse(parts: SD15Parts, x0: torch.Tensor, noise: torch.Tensor,
            t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM forward process at integer timesteps t (B,), in the host's k-diffusion form:
    x = x0 + sigma_t * noise, sigma_t = sqrt((1 - abar_t) / abar_t). Returns (x, sigma)."""
    ms = parts.patcher.model.model_sampling
    sigma = ms.sigmas.to(x0.device)[t.to(x0.device)].float()  # (B,)
    return ms.noise_scaling(sigma, noise, x0), sigma


def unet_denoised(host: SimpleNamespace, patcher: Any, x: torch.Tensor, sigma: torch.Tensor,
                  context: torch.Tensor, cond_or_uncond: list[int] | None = None,
                  control: dict | None = None) -> torch.Tensor:
    """One UNet call as the sampler makes it (comfy.samplers._calc_cond_batch), with gradients.

    The patcher's transformer_options (wrappers, attn patches, replace patches) are merged into a
    fresh dict with cond_or_uncond / uuids / sigmas, then BaseModel.apply_model. Returns the
    denoised x0 prediction (B, 4, h, w); gradients flow to whatever the patches hold. The model
    must be loaded (`ensure_loaded`); `patcher` may be any clone of the loaded one.
    """
    cond_or_uncond = [0] if cond_or_uncond is None else cond_or_uncond
    options = host.patcher_extension.merge_nested_dicts(
        {}, patcher.model_options.get("transformer_options", {}), copy_dict1=False)
    options.update(cond_or_uncond=list(cond_or_uncond), uuids=[None] * len(cond_or_uncond),
                   sigmas=sigma)
    return patcher.model.apply_model(x, sigma, c_crossattn=context, control=control,
                                     transformer_options=options)


def ensure_loaded(host: SimpleNamespace, parts: SD15Parts) -> None:
    """Put the UNet on its device (the host may have offloaded it to make room for the VAE or
    CLIP). Always the base patcher: its clones share the model, and asking for a different clone
    each call would make the host detach and re-load them."""
    host.model_management.load_models_gpu([parts.patcher])


def predict_eps(host: SimpleNamespace, patcher: Any, x: torch.Tensor, sigma: torch.Tensor,
                context: torch.Tensor, control: dict | None = None) -> torch.Tensor:
    """The UNet's epsilon prediction (B, 4, h, w): (x - denoised) / sigma (eps parameterisation);
    `control`: ControlNet residuals as the sampler passes them."""
    denoised = unet_denoised(host, patcher, x, sigma, context, control=control)
    return (x - denoised) / sigma.view(-1, 1, 1, 1)


def enable_grad_checkpointing(host: SimpleNamespace, unet: torch.nn.Module) -> int:
    """Recompute every ResBlock and SpatialTransformer in backward instead of storing its
    activations (torch.utils.checkpoint, non-reentrant); returns how many were wrapped.

    The host's UNet mutates transformer_options (block, transformer_index) after each layer, so the
    wrapper hands each call a shallow copy: the recomputation sees that call's values and the same
    patches. Under no_grad (the teacher) layers run plainly.
    """
    kinds = (host.openaimodel.ResBlock, host.attention.SpatialTransformer)
    count = 0
    for module in unet.modules():
        if isinstance(module, kinds) and not getattr(module, "_locref_checkpointed", False):
            module.forward = functools.partial(_checkpointed, module.forward)
            module._locref_checkpointed = True
            count += 1
    return count


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
