"""LocRef's Appearance-net and the per-site key/value projections of the reference tokens.

Paper (arXiv 2411.15252, Sec. 3): a CLIP image embedding of each reference image (RI) and of the
composite image (CI) is projected to a few context tokens; every UNet cross-attention layer gets
its own key/value projections of those tokens (CIHS and RIHS paths, optionally shared).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn

from .grid import SD15_SITE_LEVEL, SD15_SITES

SD15_CHANNEL_MULT = (1, 2, 4, 4)  # UNet width per downsampling level, times model_channels
SD15_SITE_CHANNELS = {site: 320 * SD15_CHANNEL_MULT[lvl] for site, lvl in SD15_SITE_LEVEL.items()}


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of a LocRef adapter. `hidden_dim=None` is IP-Adapter's one-layer projection."""

    embed_dim: int = 1024  # CLIP image embedding width (ViT-H/14: 1024)
    tokens: int = 4  # context tokens per image
    context_dim: int = 768  # SD-1.5 cross-attention context width
    hidden_dim: int | None = 1024  # the paper's two linear layers; None = one layer
    shared_kv: bool = False  # one K/V pair per site for both the CI and the RI path
    model_channels: int = 320  # the UNet's base width (SD-1.5: 320; tests use narrow UNets)
    sites: tuple[tuple[str, int], ...] = SD15_SITES

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple((str(b), int(i)) for b, i in self.sites))
        unknown = [s for s in self.sites if s not in SD15_SITE_CHANNELS]
        if unknown:
            raise ValueError(f"unknown cross-attention sites {unknown}; SD-1.5 has {SD15_SITES}")
        for name in ("embed_dim", "tokens", "context_dim", "model_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"adapter config {name} must be positive")

    def site_channels(self, site: tuple[str, int]) -> int:
        """Width of the UNet's hidden states at `site`."""
        return self.model_channels * SD15_CHANNEL_MULT[SD15_SITE_LEVEL[site]]

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["sites"] = [list(s) for s in self.sites]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown adapter config keys {sorted(unknown)}")
        if "sites" in data:
            data["sites"] = tuple(tuple(s) for s in data["sites"])
        return cls(**data)


def site_key(site: tuple[str, int]) -> str:
    """'input_1', 'middle_0', 'output_11': module-name-safe site names."""
    return f"{site[0]}_{site[1]}"


class AppearanceProjection(nn.Module):
    """CLIP image embedding (B, E) -> T context tokens (B, T, 768), then LayerNorm."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        out = cfg.tokens * cfg.context_dim
        self.tokens, self.context_dim = cfg.tokens, cfg.context_dim
        if cfg.hidden_dim is None:
            self.proj = nn.Linear(cfg.embed_dim, out)
            self.hidden = None
        else:
            self.hidden = nn.Linear(cfg.embed_dim, cfg.hidden_dim)
            self.proj = nn.Linear(cfg.hidden_dim, out)
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        x = embeds if self.hidden is None else nn.functional.gelu(self.hidden(embeds))
        x = self.proj(x).reshape(-1, self.tokens, self.context_dim)  # (B, T, 768)
        return self.norm(x)


class SiteKV(nn.Module):
    """Bias-free key and value projections of reference tokens for one attention site."""

    def __init__(self, context_dim: int, channels: int):
        super().__init__()
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_k(tokens), self.to_v(tokens)


class LocRefAdapter(nn.Module):
    """The trainable part of LocRef: the Appearance-net and per-site K/V for CI and RI tokens."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.appearance = AppearanceProjection(cfg)
        self.kv_ri = nn.ModuleDict(
            {site_key(s): SiteKV(cfg.context_dim, cfg.site_channels(s)) for s in cfg.sites})
        self.kv_ci = None if cfg.shared_kv else nn.ModuleDict(
            {site_key(s): SiteKV(cfg.context_dim, cfg.site_channels(s)) for s in cfg.sites})

    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, E) to context tokens (B, T, 768)."""
        return self.appearance(embeds.to(self.appearance.proj.weight))

    def null_tokens(self) -> torch.Tensor:
        """Tokens of the null reference (zero embedding), used for unconditional CFG rows."""
        w = self.appearance.proj.weight
        return self.project(torch.zeros(1, self.cfg.embed_dim, device=w.device, dtype=w.dtype))

    def site_kv(self, site: tuple[str, int], tokens: torch.Tensor,
                path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (..., T, C) of `tokens` at `site` for path 'ri' or 'ci'."""
        table = self.kv_ri if path == "ri" or self.kv_ci is None else self.kv_ci
        return table[site_key(site)](tokens)
