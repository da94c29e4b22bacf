"""The LocRef cross-attention patch, as two callables for the host's list-based patch points.

`attn2_patch` sees the normed hidden state n before the text cross-attention and keeps it;
`attn2_output_patch` sees that layer's output, recomputes q = to_q(n) with the layer's own
projection for the queries inside the regions, and blends in each token source's attention
(`regions.py`: references, and each box's own text) with the region masks. List-based points
compose with any other pack's patches (including an attn2 replace), in either order.

Everything that does not change during sampling (reference tokens, per-site keys/values of the
references and of the box prompts, masks) is computed once; a step only does the attention.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence

import torch

from .adapter import LocRefAdapter
from .attention import composite_attention, instance_visibility, locref_blend_rows
from .attention import region_attention, region_blend_rows
from .grid import SD15_SITES, token_grid
from .layout import Box, Layout
from .masks import box_masks, foreground_mask
from .regions import PatchSettings, ReferenceSource, TextSource

__all__ = ["LocRefBlend", "LocRefStash", "LocRefState", "LocRefTrainState", "PatchSettings",
           "foreground_queries", "install"]

log = logging.getLogger(__name__)


def foreground_queries(layout: Layout, h: int, w: int, tokens: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(query rows inside any box (Lf,), which instance tokens each of them sees (Lf, N*T)) on an
    h x w token grid; empty for a layout without boxes."""
    m = box_masks(layout, h, w)  # (N, h, w)
    rows = foreground_mask(m).flatten().nonzero().flatten()  # (Lf,)
    return rows, instance_visibility(m, tokens)[rows]


class LocRefState:
    """Run constants shared by the two patch callables; cheap to 'copy' (it never is).

    One mechanism with two token sources: reference boxes (the adapter's K/V) and text boxes
    (the layer's own K/V of each box's prompt). Each source scales the global text attention by
    its keep and adds its own term, inside its boxes only; `blend` runs them in one place.
    """

    def __init__(self, adapter: LocRefAdapter | None, layout: Layout,
                 ri_tokens: torch.Tensor | None, ci_tokens: torch.Tensor | None,
                 settings: PatchSettings, unet: torch.nn.Module,
                 text_tokens: Sequence[torch.Tensor | None] | None = None):
        """ri_tokens (N, T, 768) for the N boxes that have a reference, in layout order;
        ci_tokens (T, 768) for the composite image (all three None: no references).
        text_tokens: per box of `layout`, its prompt's embedding (L, 768) or None (no text
        region); used when settings.region_text > 0. `unet` is the host's diffusion model."""
        self.layout = layout
        self.sources: list = []
        if adapter is not None and ri_tokens is not None and ri_tokens.shape[0]:
            refs = Layout(layout.width, layout.height,
                          tuple(b for b in layout.boxes if b.reference is not None))
            self.sources.append(ReferenceSource(adapter, refs, ri_tokens, ci_tokens, settings))
        texts = [(b, t) for b, t in zip(layout.boxes, text_tokens or ()) if t is not None]
        if texts and settings.region_text > 0:
            boxes = Layout(layout.width, layout.height, tuple(b for b, _ in texts))
            self.sources.append(TextSource(boxes, [t for _, t in texts], settings.region_text))
        if not self.sources:
            raise ValueError("LocRef: no box has a reference or (with region_text > 0) text")
        self._bind(adapter, settings, unet, text=len(texts) > 0)
        self._kv = self.sources[0]._kv if isinstance(self.sources[0], ReferenceSource) else {}
        for _, t in texts:
            self._check_text_width(t)

    def _bind(self, adapter: LocRefAdapter | None, settings: PatchSettings,
              unet: torch.nn.Module, text: bool = False) -> None:
        """What inference and training states share: settings, sites, the host UNet (weakly),
        the per-layer stash and caches; refuses an adapter made for another UNet width."""
        self.settings = settings
        self.sites = SD15_SITES if text or adapter is None else tuple(adapter.cfg.sites)
        self.tokens = adapter.cfg.tokens if adapter is not None else 0
        self._unet = weakref.ref(unet)
        self._stash: dict = {}
        self._cache: dict = {}
        self.fired: dict[tuple[str, int], int] = {}  # site -> calls that blended (for tests/logs)
        self._warned_aspect = False
        # How a warning found while sampling is given (%-style args); a node may show it too.
        self.warn: Callable[..., None] = log.warning
        if adapter is not None:
            self._check_widths(adapter)

    def __deepcopy__(self, memo):
        return self  # immutable run constants; ComfyUI deep-copies model_options on every clone

    def active(self, extra_options: dict) -> bool:
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(torch.as_tensor(sigmas).max())
        return self.settings.sigma_end <= sigma <= self.settings.sigma_start

    def attn2(self, extra_options: dict) -> torch.nn.Module:
        """The host's cross-attention module of the layer these options describe."""
        key = (tuple(extra_options["block"]), extra_options.get("block_index", 0))
        module = self._cache.get(key)
        if module is None:
            unet = self._unet()
            if unet is None:
                raise RuntimeError("LocRef: the patched model no longer exists")
            kind, index = key[0]
            blocks = {"input": unet.input_blocks, "output": unet.output_blocks}
            block = unet.middle_block if kind == "middle" else blocks[kind][index]
            transformer = next(m for m in block if hasattr(m, "transformer_blocks"))
            module = self._cache[key] = transformer.transformer_blocks[key[1]].attn2
        return module

    def _check_widths(self, adapter: LocRefAdapter) -> None:
        for site in adapter.cfg.sites:
            attn = self.attn2({"block": site, "block_index": 0})
            want, have = adapter.cfg.site_channels(site), attn.to_q.out_features
            if want != have:
                raise ValueError(
                    f"the adapter was made for a UNet {want} channels wide at {site} but this "
                    f"model has {have}: LocRef adapters work with SD-1.5 models only")

    def _check_text_width(self, tokens: torch.Tensor) -> None:
        attn = self.attn2({"block": self.sites[0], "block_index": 0})
        want = attn.to_k.in_features
        if tokens.ndim != 2 or tokens.shape[-1] != want:
            raise ValueError(
                f"a box's text embedding is {tuple(tokens.shape)} but this model's "
                f"cross-attention takes {want}-wide text: connect the CLIP of the same "
                "checkpoint (SD-1.5: 768) to LocRef Apply's clip input")

    def masks(self, h: int, w: int, device: torch.device
              ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(query rows inside any region (Lf,), per source: (which of its tokens each of those
        rows sees (Lf, sum T_i), whether the row is in one of its boxes (Lf,))), cached."""
        key = ("mask", h, w, device)
        if key not in self._cache:
            cells = [box_masks(src.layout, h, w) for src in self.sources]  # (N_s, h, w) each
            rows = foreground_mask(torch.cat(cells)).flatten().nonzero().flatten()  # (Lf,)
            parts = []
            for src, m in zip(self.sources, cells):
                visible = instance_visibility(m, src.counts)[rows]  # (Lf, sum T_i)
                parts.append((visible.to(device), visible.any(dim=1).to(device)))
            self._cache[key] = (rows.to(device), parts)
            self._check_aspect(h, w)
        return self._cache[key]

    def blend(self, out: torch.Tensor, n: torch.Tensor, site: tuple[str, int],
              extra_options: dict) -> torch.Tensor:
        """Every source's attention for this layer's queries inside its boxes, blended into
        `out` (B, Lq, C): HS * prod(keep) + sum(add), computed on the region rows only."""
        attn = self.attn2(extra_options)
        h, w = token_grid(extra_options.get("activations_shape"), tokens=n.shape[1])
        rows, parts = self.masks(h, w, n.device)
        cond_or_uncond = extra_options.get("cond_or_uncond") or [0]
        if n.shape[0] % len(cond_or_uncond):
            raise ValueError(f"LocRef: batch {n.shape[0]} does not split into {cond_or_uncond}")
        q = attn.to_q(n.index_select(1, rows))  # (B, Lf, C): only queries inside regions
        heads = extra_options.get("n_heads", attn.heads)
        keep, add = 1.0, None
        for src, (visible, member) in zip(self.sources, parts):
            part = src.contribute(q, site, attn, visible, member, cond_or_uncond, heads)
            if part is not None:
                keep, add = keep * part[0], part[1] if add is None else add + part[1]
        if add is None:
            return out
        self.fired[site] = self.fired.get(site, 0) + 1
        return region_blend_rows(out, rows, attn.to_out, keep, add)

    def _check_aspect(self, h: int, w: int) -> None:
        canvas = self.layout.width / self.layout.height
        if not self._warned_aspect and h > 4 and w > 4 and abs(w / h - canvas) / canvas > 0.08:
            self.warn("LocRef: the latent is %dx%d (aspect %.2f) but the layout canvas is %dx%d "
                      "(%.2f); boxes are stretched to fit. Match the Boxes size to the latent.",
                      w * 8, h * 8, w / h, self.layout.width, self.layout.height, canvas)
            self._warned_aspect = True


class LocRefTrainState(LocRefState):
    """The training counterpart of LocRefState for the same LocRefStash / LocRefBlend callables:
    one layout per batch row and per-site keys/values that carry gradients, set every step by
    `set_batch`. Each row runs the inference math (`LocRefState.blend`'s functions) on its own
    boxes; the UNet itself stays batched, only this extra attention loops over rows (B is small,
    the cost is the UNet's). Rows whose tokens are the null reference are CFG-dropout rows."""

    def __init__(self, adapter: LocRefAdapter, unet: torch.nn.Module,
                 settings: PatchSettings = PatchSettings()):
        self._bind(adapter, settings, unet)
        self._batch_kv: dict = {}
        self._boxes: list[list[tuple[float, float, float, float]]] = []

    def set_batch(self, kv: dict, boxes: torch.Tensor, valid: torch.Tensor) -> None:
        """kv: site -> (k_ci, v_ci (B, T, C), k_ri, v_ri (B, K*T, C)) with gradients; boxes
        (B, K, 4) normalised x0, y0, x1, y1; valid (B, K) bool (slot k of row b is a box)."""
        missing = [s for s in self.sites if s not in kv]
        if missing:
            raise ValueError(f"LocRef training: no keys/values for sites {missing}")
        self._batch_kv = kv
        self._boxes = [[tuple(bx) for bx, ok in zip(row.tolist(), v.tolist()) if ok]
                       for row, v in zip(boxes, valid)]
        self._valid = [v.nonzero().flatten() for v in valid]  # per row: slots with a box
        self._cache = {k: v for k, v in self._cache.items() if k[0] != "row"}
        self._stash.clear()

    def row_masks(self, b: int, h: int, w: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row b: (foreground rows (Lf,), visibility (Lf, N*T), token slots (N*T,) of its N
        boxes in k_ri), cached for this batch."""
        key = ("row", b, h, w, device)
        if key not in self._cache:
            boxes = tuple(Box(*bx) for bx in self._boxes[b])
            # masks use box fractions only: the canvas size does not matter
            rows, visible = foreground_queries(Layout(512, 512, boxes), h, w, self.tokens)
            slots = (self._valid[b][:, None] * self.tokens
                     + torch.arange(self.tokens)).flatten()  # (N*T,)
            self._cache[key] = (rows.to(device), visible.to(device), slots.to(device))
        return self._cache[key]

    def blend(self, out: torch.Tensor, n: torch.Tensor, site: tuple[str, int],
              extra_options: dict) -> torch.Tensor:
        """Per row: CIHS + RIHS with that row's boxes and keys/values, blended into out."""
        attn = self.attn2(extra_options)
        h, w = token_grid(extra_options.get("activations_shape"), tokens=n.shape[1])
        k_ci, v_ci, k_ri, v_ri = self._batch_kv[site]
        if n.shape[0] != k_ci.shape[0]:
            raise ValueError(f"LocRef training: the UNet batch has {n.shape[0]} rows but the "
                             f"references {k_ci.shape[0]} (one UNet call per batch, no CFG)")
        self.fired[site] = self.fired.get(site, 0) + 1
        heads = extra_options.get("n_heads", attn.heads)
        s, t = self.settings.strength, self.settings.text_in_boxes
        rows_out = []
        for b in range(n.shape[0]):
            rows, visible, slots = self.row_masks(b, h, w, n.device)
            if rows.numel() == 0:
                rows_out.append(out[b:b + 1])
                continue
            q = attn.to_q(n[b:b + 1].index_select(1, rows))  # (1, Lf, C)
            kc, vc = (x[b:b + 1].to(q.dtype) for x in (k_ci, v_ci))  # (1, T, C)
            kr, vr = (x[b:b + 1].index_select(1, slots).to(q.dtype)
                      for x in (k_ri, v_ri))  # (1, N*T, C)
            cihs = composite_attention(q, kc, vc, heads)  # (1, Lf, C)
            rihs = region_attention(q, kr, vr, visible, heads)  # (1, Lf, C)
            rows_out.append(locref_blend_rows(out[b:b + 1], cihs, rihs, rows, attn.to_out, s, t))
        return torch.cat(rows_out)  # (B, Lq, C)


class LocRefStash:
    """attn2_patch: keep the normed hidden state for the output patch of the same layer."""

    def __init__(self, state: LocRefState):
        self.state = state

    def __call__(self, n, context, value, extra_options):
        if self.state.active(extra_options):
            self.state._stash[_layer_key(extra_options)] = n
        return n, context, value

    def __deepcopy__(self, memo):
        return self


class LocRefBlend:
    """attn2_output_patch: add CIHS + RIHS inside the boxes (the paper's blend)."""

    def __init__(self, state: LocRefState):
        self.state = state

    def __call__(self, out, extra_options):
        st = self.state
        n = st._stash.pop(_layer_key(extra_options), None)
        site = tuple(extra_options["block"])
        if n is None or site not in st.sites or not st.active(extra_options):
            return out
        return st.blend(out, n, site, extra_options)

    def __deepcopy__(self, memo):
        return self


def install(patcher, state: LocRefState) -> None:
    """Put the two callables on a ModelPatcher (always a clone): LocRef Apply and the trainer
    both call this, so what is trained is what runs."""
    patcher.set_model_attn2_patch(LocRefStash(state))
    patcher.set_model_attn2_output_patch(LocRefBlend(state))


def _layer_key(extra_options: dict) -> tuple:
    return (tuple(extra_options["block"]), extra_options.get("block_index", 0),
            extra_options.get("transformer_index"))
