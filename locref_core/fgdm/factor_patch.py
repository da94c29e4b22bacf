"""Run a factor adapter inside the host's UNet at every step, as a diffusion-model wrapper.

The wrapper sees (x, timesteps, context, y, control, transformer_options) on every UNet call:
it computes the adapter's features from this call's x_t (all rows, cond and uncond) and the
UNet's own time embedding, and adds them to `control["input"]`, merged with whatever control is
already there (a ControlNet or T2I-Adapter on the same model keeps working).
"""

from __future__ import annotations

import torch

from .adapter import FactorAdapter, control_for_unet, merge_control, sinusoidal_embedding


WRAPPER_KEY = "locref_fgdm_factor"  # key of the DIFFUSION_MODEL wrapper on a patched model


class FactorWrapper:
    """WrappersMP.DIFFUSION_MODEL wrapper; immutable, so clones share it."""

    def __init__(self, adapter: FactorAdapter, strength: float = 1.0,
                 extra_latents: torch.Tensor | None = None):
        """extra_latents (1 or B, 4k, h, w): earlier factors' latents, concatenated to x_t."""
        self.adapter = adapter.eval()
        self.strength = float(strength)
        self.extra = extra_latents
        self._copies: dict = {}
        want = adapter.cfg.in_channels - 4
        have = 0 if extra_latents is None else extra_latents.shape[1]
        if want != have:
            raise ValueError(f"the factor adapter expects {want} channels of earlier factors' "
                             f"latents besides x_t, got {have}")

    def __deepcopy__(self, memo):
        return self  # ComfyUI deep-copies model_options on every clone; weights are read-only

    def _adapter_on(self, device: torch.device, dtype: torch.dtype) -> FactorAdapter:
        key = (device, dtype)
        if key not in self._copies:
            p = next(self.adapter.parameters())
            same = p.device == device and p.dtype == dtype
            self._copies[key] = self.adapter if same else _moved(self.adapter, device, dtype)
        return self._copies[key]

    def features(self, unet, x: torch.Tensor, timesteps: torch.Tensor) -> list[torch.Tensor]:
        """The adapter's four feature maps for this UNet call."""
        adapter = self._adapter_on(x.device, x.dtype)
        emb = None
        if adapter.cfg.time_conditioned:
            t_emb = sinusoidal_embedding(timesteps, unet.model_channels).to(x.dtype)
            emb = unet.time_embed(t_emb)  # (B, 1280): the UNet's own time embedding
        inp = x
        if self.extra is not None:
            extra = torch.nn.functional.interpolate(self.extra.to(x), size=x.shape[-2:],
                                                    mode="nearest")
            inp = torch.cat([x, extra.expand(x.shape[0], -1, -1, -1)], dim=1)
        with torch.no_grad():
            return adapter(inp, emb)

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options,
                 **kwargs):
        unet = executor.class_obj
        if self.strength != 0:
            feats = self.features(unet, x, timesteps)
            control = merge_control(control, control_for_unet(feats, len(unet.input_blocks)),
                                    self.strength)
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def _moved(adapter: FactorAdapter, device: torch.device, dtype: torch.dtype) -> FactorAdapter:
    copy = FactorAdapter(adapter.cfg)
    copy.load_state_dict(adapter.state_dict())
    return copy.to(device=device, dtype=dtype).eval()
