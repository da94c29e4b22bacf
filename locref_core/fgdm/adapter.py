"""FG-DM condition-factor adapters (Sridhar & Vasconcelos, Sec. 3.2).

A T2I-Adapter-like encoder whose input is the condition's own noisy latent x_t (optionally
concatenated with the latents of earlier factors) and, in the timestep-conditioned variant, the
UNet's own time embedding. Four scales (320, 640, 1280, 1280 channels for SD-1.5), each two
residual blocks; the features are added to the UNet encoder after input blocks 2, 5, 8 and 11.

Parameter names follow the official release (DeepakSridhar/fgdm, `TimeAdapter` / `Adapter` with
nums_rb=2, ksize=1, sk=True, use_conv=False), so its weights load by stripping a prefix.
Down-sampling is 2x2 average pooling with ceil mode, so odd latent sizes match the UNet's
stride-2 convolutions (the official floor mode does the same on even sizes).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("seg", "depth", "normal", "sketch")
SD15_ADAPTER_BLOCKS = (2, 5, 8, 11)  # input blocks whose outputs get the adapter features


@dataclass(frozen=True)
class FactorConfig:
    """Shape and meaning of a factor adapter."""

    kind: str = "seg"  # what the factor generates: seg, depth, normal or sketch
    in_channels: int = 4  # 4 x (1 + number of earlier factors whose latents are concatenated)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    time_conditioned: bool = True  # False: the official release's variant without timestep
    emb_channels: int = 1280  # the UNet's time-embedding width (4 x model_channels)
    palette: str = "coco183"  # for seg factors: the palette its maps are painted in
    norm_groups: int = 32  # groups of the time blocks' GroupNorms (SD-1.5's and the release's)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.kind not in KINDS:
            raise ValueError(f"factor kind {self.kind!r} is unknown; use one of {KINDS}")
        if self.in_channels < 1 or self.in_channels % 4:
            raise ValueError(f"in_channels={self.in_channels} must be a positive multiple of 4 "
                             "(one SD latent per factor)")
        if len(self.channels) != len(SD15_ADAPTER_BLOCKS):
            raise ValueError(f"an SD-1.5 factor adapter has {len(SD15_ADAPTER_BLOCKS)} scales, "
                             f"got channels {self.channels}")
        if self.norm_groups < 1 or any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"norm_groups={self.norm_groups} must divide every scale's "
                             f"channels {self.channels}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FactorConfig:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown factor config keys {sorted(unknown)}")
        return cls(**data)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LDM's timestep embedding (B,) -> (B, dim): [cos(t f), sin(t f)], f = period^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2, 2, ceil_mode=True)  # ceil: 9 -> 5, like the UNet's stride-2 conv


class TimeResBlock(nn.Module):
    """LDM ResBlock: GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-conv (zero init).

    `groups`: the GroupNorms' groups (32 in LDM). The time embedding enters as a per-channel
    constant before the second norm, so a norm of one channel a group (32 groups at 32 channels,
    as in a tiny UNet) removes it: the block then cannot add a timestep-dependent constant."""

    def __init__(self, cin: int, cout: int, emb_channels: int, down: bool, groups: int = 32):
        super().__init__()
        self.down = down
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(),
                                       nn.Conv2d(cin, cout, 3, 1, 1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, 1, 1))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.down:
            h = _down(self.in_layers[:-1](x))
            x = _down(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class PlainResBlock(nn.Module):
    """The official non-timestep block: (pool, 1x1 in_conv if widths differ), 3x3-ReLU-1x1, + x."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.block1 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(cout, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.down:
            x = _down(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.block2(self.act(self.block1(x))) + x


class FactorAdapter(nn.Module):
    """x_t (B, in_channels, h, w) [+ time embedding (B, emb)] -> 4 feature maps for the UNet."""

    def __init__(self, cfg: FactorConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, 1, 1)
        blocks = []
        for i, c in enumerate(ch):
            for j in range(cfg.num_res_blocks):
                cin, down = (ch[i - 1], True) if (i > 0 and j == 0) else (c, False)
                blocks.append(TimeResBlock(cin, c, cfg.emb_channels, down, cfg.norm_groups)
                              if cfg.time_conditioned
                              else PlainResBlock(cin, c, down))
        self.body = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Features [(B, 320, h, w), (B, 640, h/2, w/2), (B, 1280, h/4, w/4), (B, 1280, h/8, w/8)]
        (ceil-halved sizes), one per scale."""
        if self.cfg.time_conditioned and emb is None:
            raise ValueError("this factor adapter is timestep-conditioned: pass the time embedding")
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"the factor adapter takes {self.cfg.in_channels} input channels "
                             f"(x_t and earlier factors' latents), got {x.shape[1]}")
        features = []
        x = self.conv_in(x)
        for i in range(len(self.cfg.channels)):
            for j in range(self.cfg.num_res_blocks):
                x = self.body[i * self.cfg.num_res_blocks + j](x, emb)
            features.append(x)
        return features


def control_for_unet(features: list[torch.Tensor], n_input_blocks: int = 12,
                     blocks: tuple[int, ...] = SD15_ADAPTER_BLOCKS) -> list[torch.Tensor | None]:
    """ComfyUI's control['input'] list: popped from the end, entry n-1-k lands after block k."""
    out: list[torch.Tensor | None] = [None] * n_input_blocks
    for feature, block in zip(features, blocks):
        out[n_input_blocks - 1 - block] = feature
    return out


def merge_control(control: dict | None, ours: list[torch.Tensor | None], scale: float) -> dict:
    """A new control dict with `ours` added to control['input'] (another ControlNet keeps
    working)."""
    merged = {k: list(v) for k, v in (control or {}).items()}
    theirs = merged.get("input", [])
    if len(theirs) < len(ours):  # pad at the front: lists are popped from the end
        theirs = [None] * (len(ours) - len(theirs)) + theirs
    offset = len(theirs) - len(ours)
    for i, feature in enumerate(ours):
        if feature is None:
            continue
        prev = theirs[offset + i]
        theirs[offset + i] = feature * scale if prev is None else prev + feature * scale
    merged["input"] = theirs
    return merged
