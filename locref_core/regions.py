"""The two token sources of the region attention: references (through the adapter's per-site
keys/values) and each box's own text (through the layer's own to_k/to_v), with the settings.

A source sees the queries inside any region of the layer and returns (keep, add): the global
text attention is scaled by every source's keep and every source's add is summed in
(`attention.region_blend_rows`), so both act on a box that has text and a reference.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapter import LocRefAdapter
from .attention import composite_attention, region_attention, select_rows
from .layout import Layout


@dataclass(frozen=True)
class PatchSettings:
    strength: float = 1.0  # s: how much the references change the layer
    text_in_boxes: float = 0.0  # t: global text kept inside reference boxes
    sigma_start: float = float("inf")  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    region_text: float = 1.0  # w: each box's own text inside it (0 = off, 1 = replaces the prompt)
    # the paper's ablations (benchmarks/shapes_world.py), not node inputs:
    instance_masks: bool = True  # False: a query in any box sees every box's reference
    composite: bool = True  # False: no composite-image (CIHS) term


class ReferenceSource:
    """Reference tokens through the adapter's per-site K/V: CIHS for every query in a reference
    box, RIHS per instance; the unconditional rows get the null reference."""

    def __init__(self, adapter: LocRefAdapter, layout: Layout, ri_tokens: torch.Tensor,
                 ci_tokens: torch.Tensor, settings: PatchSettings):
        """layout: the boxes that have a reference; ri_tokens (N, T, 768) for them, in order;
        ci_tokens (T, 768) for the composite image."""
        self.layout, self.settings = layout, settings
        self.sites, self.counts = tuple(adapter.cfg.sites), adapter.cfg.tokens
        self._cache: dict = {}
        with torch.no_grad():
            null = adapter.null_tokens()[0]  # (T, 768)
            n = ri_tokens.shape[0]
            self._kv = {}  # site -> (k_ci, v_ci, k_ci0, v_ci0, k_ri, v_ri, k_ri0, v_ri0), (L, C)
            for site in self.sites:
                k_ci, v_ci = adapter.site_kv(site, ci_tokens, "ci")
                k_ci0, v_ci0 = adapter.site_kv(site, null, "ci")
                k_ri, v_ri = adapter.site_kv(site, ri_tokens.reshape(n * self.counts, -1), "ri")
                k_ri0, v_ri0 = adapter.site_kv(site, null.repeat(n, 1), "ri")
                self._kv[site] = tuple(t.detach().float().cpu() for t in
                                       (k_ci, v_ci, k_ci0, v_ci0, k_ri, v_ri, k_ri0, v_ri0))

    def kv(self, site: tuple[str, int], cond_or_uncond: Sequence[int], rows: int,
           device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Per-row (k_ci, v_ci, k_ri, v_ri), each (B, L, C): null reference on uncond rows."""
        key = ("kv", site, tuple(cond_or_uncond), rows, device, dtype)
        if key not in self._cache:
            k_ci, v_ci, k_ci0, v_ci0, k_ri, v_ri, k_ri0, v_ri0 = self._kv[site]
            self._cache[key] = tuple(
                select_rows(c, u, cond_or_uncond, rows).to(device, dtype)
                for c, u in ((k_ci, k_ci0), (v_ci, v_ci0), (k_ri, k_ri0), (v_ri, v_ri0)))
        return self._cache[key]

    def contribute(self, q: torch.Tensor, site: tuple[str, int], attn: torch.nn.Module,
                   visible: torch.Tensor, member: torch.Tensor, cond_or_uncond: Sequence[int],
                   heads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keep (1, Lf, 1), add (B, Lf, C)) = (1 - s (1 - t) FM, s (CIHS FM + RIHS))."""
        if site not in self.sites:
            return None
        k_ci, v_ci, k_ri, v_ri = self.kv(site, cond_or_uncond, q.shape[0] // len(cond_or_uncond),
                                         q.device, q.dtype)
        s, t = self.settings.strength, self.settings.text_in_boxes
        fm = member[None, :, None].to(q.dtype)  # (1, Lf, 1)
        if not self.settings.instance_masks:  # ablation: every reference visible in every box
            visible = member[:, None].expand_as(visible)
        rihs = region_attention(q, k_ri, v_ri, visible, heads)  # (B, Lf, C)
        if not self.settings.composite:  # ablation: no composite-image path
            return 1 - s * (1 - t) * fm, s * rihs
        cihs = composite_attention(q, k_ci, v_ci, heads) * fm  # (B, Lf, C)
        return 1 - s * (1 - t) * fm, s * (cihs + rihs)


class TextSource:
    """Each box's own prompt as its region's tokens, projected by the layer's own to_k/to_v
    (training-free regional text). Conditional rows only: negative rows are left as they are."""

    def __init__(self, layout: Layout, tokens: Sequence[torch.Tensor], weight: float):
        """layout: the boxes that have text; tokens: their prompt embeddings (L_i, 768), in order
        (L_i = 77 per prompt window)."""
        self.layout, self.weight = layout, weight
        self.counts = [int(t.shape[0]) for t in tokens]
        self.tokens = torch.cat([t.detach().float().cpu() for t in tokens])  # (sum L_i, 768)
        self._kv: dict = {}  # site -> (weights seen, k (1, L, C), v (1, L, C))

    def kv(self, site: tuple[str, int], attn: torch.nn.Module, device: torch.device,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of every box prompt at this layer, computed once per run: again only when
        the layer's weights change (a LoRA patched in or out) or the device or dtype does."""
        hit = self._kv.get(site)
        if hit is None or not _same_weights(hit[0], attn, device, dtype):
            with torch.no_grad():
                x = self.tokens.to(device, dtype)
                hit = self._kv[site] = (_weights_seen(attn, device, dtype),
                                        attn.to_k(x)[None], attn.to_v(x)[None])
        return hit[1], hit[2]

    def contribute(self, q: torch.Tensor, site: tuple[str, int], attn: torch.nn.Module,
                   visible: torch.Tensor, member: torch.Tensor, cond_or_uncond: Sequence[int],
                   heads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keep (B, Lf, 1), add (B, Lf, C)) = (1 - w FM, w RTHS) on cond rows, (1, 0) else."""
        per = q.shape[0] // len(cond_or_uncond)
        cond = [j * per + r for j, kind in enumerate(cond_or_uncond) if kind == 0
                for r in range(per)]
        if not cond:
            return None
        idx = torch.tensor(cond, device=q.device)
        k, v = self.kv(site, attn, q.device, q.dtype)
        qc = q.index_select(0, idx)  # (Bc, Lf, C)
        rths = region_attention(qc, k.expand(len(cond), -1, -1), v.expand(len(cond), -1, -1),
                                visible, heads)  # (Bc, Lf, C); zero outside the text boxes
        keep = torch.ones(q.shape[0], q.shape[1], 1, dtype=q.dtype, device=q.device)
        keep[idx] = 1 - self.weight * member[None, :, None].to(q.dtype)
        add = torch.zeros_like(q).index_copy(0, idx, self.weight * rths)
        return keep, add


def _weights_seen(attn: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> tuple:
    weights = (attn.to_k.weight, attn.to_v.weight)
    return (tuple(weakref.ref(w) for w in weights), tuple(_version(w) for w in weights),
            device, dtype)


def _same_weights(seen: tuple, attn: torch.nn.Module, device: torch.device,
                  dtype: torch.dtype) -> bool:
    refs, versions, dev, dt = seen
    weights = (attn.to_k.weight, attn.to_v.weight)
    return (all(r() is w for r, w in zip(refs, weights)) and dev == device and dt == dtype
            and versions == tuple(_version(w) for w in weights))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (they cannot change)
        return -1
