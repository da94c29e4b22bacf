"""Regional text and region masks on plain tensors: the text source, the shared blend, masks."""

import pytest
import torch
from torch import nn

from locref_core.attention import (
    composite_attention,
    instance_visibility,
    locref_blend_rows,
    region_attention,
    region_blend_rows,
)
from locref_core.layout import Box, Layout
from locref_core.masks import add_region_box, box_masks, fit_region, region_cells, with_region
from locref_core.regions import TextSource

C, HEADS, H, W = 32, 4, 6, 8


class Attn(nn.Module):
    """Stands in for a host attention layer's projections (plain torch modules)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_k, self.to_v = nn.Linear(16, C, bias=False), nn.Linear(16, C, bias=False)
        self.to_out = nn.Linear(C, C)


def test_visibility_with_a_token_count_per_instance():
    masks = torch.zeros(2, 1, 3)
    masks[0, 0, 0] = masks[1, 0, 1:] = 1
    vis = instance_visibility(masks, [2, 3])  # (3 queries, 5 keys)
    assert vis.tolist() == [[True, True, False, False, False], [False, False, True, True, True],
                            [False, False, True, True, True]]
    assert torch.equal(instance_visibility(masks, 4), instance_visibility(masks, [4, 4]))


def test_unchanged_rows_are_exact_after_the_output_projection():
    to_out = nn.Linear(C, C)
    out, rows = torch.randn(2, 10, C), torch.tensor([1, 4, 5])
    same = region_blend_rows(out, rows, to_out, torch.ones(2, 3, 1), torch.zeros(2, 3, C))
    assert torch.equal(same, out)


def test_blend_after_projection_equals_blend_before_it():
    to_out = nn.Linear(C, C).double()
    hs, rows = torch.randn(2, 10, C, dtype=torch.float64), torch.tensor([0, 3, 7])
    keep, add = torch.rand(2, 3, 1, dtype=torch.float64), torch.randn(2, 3, C, dtype=torch.float64)
    got = region_blend_rows(to_out(hs), rows, to_out, keep, add)
    want = hs.clone()
    want[:, rows] = hs[:, rows] * keep + add
    assert torch.allclose(got, to_out(want))
    # The reference-only form is the same function with keep = 1 - s (1 - t).
    cihs = torch.randn(2, 3, C, dtype=torch.float64)
    rihs = torch.randn(2, 3, C, dtype=torch.float64)
    assert torch.allclose(locref_blend_rows(to_out(hs), cihs, rihs, rows, to_out, 0.7, 0.2),
                          region_blend_rows(to_out(hs), rows, to_out, 1 - 0.7 * 0.8,
                                            0.7 * (cihs + rihs)))


def text_source(boxes, lengths=(77,), weight=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(n, 16, generator=g) for n in lengths]
    return TextSource(Layout(512, 512, tuple(boxes)), tokens, weight)


def contribute(src, cond_or_uncond=(1, 0)):
    """The source's (keep, add) for every query of an H x W grid, rows of kind cond_or_uncond."""
    attn = Attn()
    masks = box_masks(src.layout, H, W)
    visible = instance_visibility(masks, src.counts)
    q = torch.randn(len(cond_or_uncond), H * W, C, generator=torch.Generator().manual_seed(2))
    keep, add = src.contribute(q, ("input", 1), attn, visible, visible.any(1), cond_or_uncond,
                               HEADS)
    return attn, q, keep, add


def test_whole_canvas_text_box_is_plain_attention_to_its_text_on_cond_rows():
    src = text_source([Box(0, 0, 1, 1, "a cat")])
    attn, q, keep, add = contribute(src)
    k, v = attn.to_k(src.tokens)[None], attn.to_v(src.tokens)[None]
    assert torch.equal(keep[0], torch.ones(H * W, 1)) and not add[0].any()  # uncond row: as is
    assert torch.equal(keep[1], torch.zeros(H * W, 1))  # cond row: the box text replaces it
    assert torch.allclose(add[1:], composite_attention(q[1:], k, v, HEADS), atol=1e-6)


def test_weight_blends_and_queries_outside_text_boxes_are_untouched():
    src = text_source([Box(0, 0, 0.5, 1, "a cat")], weight=0.3)
    _, _, keep, add = contribute(src, (0,))
    inside = box_masks(src.layout, H, W)[0].flatten().bool()
    assert torch.allclose(keep[0, inside], torch.full((int(inside.sum()), 1), 0.7))
    assert torch.equal(keep[0, ~inside], torch.ones(int((~inside).sum()), 1))
    assert not add[0, ~inside].any()


def test_prompts_of_several_windows_and_overlaps_attend_jointly():
    src = text_source([Box(0, 0, 0.75, 1, "a"), Box(0.25, 0, 1, 1, "b")], lengths=(154, 77))
    attn, q, _, add = contribute(src, (0,))
    k, v = attn.to_k(src.tokens)[None], attn.to_v(src.tokens)[None]
    masks = box_masks(src.layout, H, W)
    both = (masks[0] * masks[1]).flatten().bool()
    joint = composite_attention(q, k, v, HEADS)  # a query in both boxes sees all 231 tokens
    assert torch.allclose(add[0, both], joint[0, both], atol=1e-6)
    only_a = (masks[0] * (1 - masks[1])).flatten().bool()
    alone = composite_attention(q, k[:, :154], v[:, :154], HEADS)
    assert torch.allclose(add[0, only_a], alone[0, only_a], atol=1e-6)


def test_a_box_text_changes_only_its_own_queries():
    boxes = [Box(0, 0, 0.5, 1, "a"), Box(0.5, 0, 1, 1, "b")]
    _, _, _, add1 = contribute(text_source(boxes, (77, 77), seed=1), (0,))
    src2 = text_source(boxes, (77, 77), seed=1)
    src2.tokens[:77] += 1.0  # box A's prompt changes, box B's does not
    _, _, _, add2 = contribute(src2, (0,))
    in_a = box_masks(src2.layout, H, W)[0].flatten().bool()
    assert torch.equal(add1[0, ~in_a], add2[0, ~in_a])
    assert not torch.allclose(add1[0, in_a], add2[0, in_a])


def test_keys_are_computed_once_and_again_when_the_weights_change():
    src, attn = text_source([Box(0, 0, 1, 1, "a")]), Attn()
    k1, _ = src.kv(("input", 1), attn, torch.device("cpu"), torch.float32)
    assert src.kv(("input", 1), attn, torch.device("cpu"), torch.float32)[0] is k1
    with torch.no_grad():
        attn.to_k.weight.add_(1.0)  # in place, as a LoRA patched into the weights
    k2, _ = src.kv(("input", 1), attn, torch.device("cpu"), torch.float32)
    assert k2 is not k1 and not torch.allclose(k1, k2)
    attn.to_k.weight = nn.Parameter(attn.to_k.weight.detach() * 2)  # a replaced parameter
    assert src.kv(("input", 1), attn, torch.device("cpu"), torch.float32)[0] is not k2


def test_region_cells_use_half_coverage_and_keep_one_cell():
    region = torch.zeros(64, 64)
    region[:, :32] = 1
    assert torch.equal(region_cells(region, 4, 4)[:, :2], torch.ones(4, 2))
    assert not region_cells(region, 4, 4)[:, 2:].any()
    dot = torch.zeros(64, 64)
    dot[40, 50] = 1
    cells = region_cells(dot, 4, 4)
    assert cells.sum() == 1 and cells[2, 3] == 1


def test_rectangle_region_gives_the_same_cells_as_its_box():
    region = torch.zeros(512, 512)
    region[128:384, 64:320] = 1
    layout, stretched = with_region(Layout(512, 512, (Box(0, 0, 1, 1, "x"),)), 0, region)
    box = layout.boxes[0]
    assert not stretched and (box.x0, box.y0, box.x1, box.y1) == (0.125, 0.25, 0.625, 0.75)
    plain = Layout(512, 512, (Box(box.x0, box.y0, box.x1, box.y1),))
    for h, w in ((64, 64), (16, 16), (8, 8)):
        assert torch.equal(box_masks(layout, h, w), box_masks(plain, h, w))


def test_region_of_another_size_is_resized_and_an_empty_one_named():
    layout = Layout(512, 256, (Box(0, 0, 1, 1, "a dog"),))
    region = torch.zeros(100, 100)
    region[:, 50:] = 1
    shaped, stretched = with_region(layout, 0, region)
    assert stretched and shaped.boxes[0].region.shape == (256, 512)
    assert shaped.boxes[0].x0 == pytest.approx(0.5, abs=0.01) and shaped.boxes[0].x1 == 1.0
    with pytest.raises(ValueError, match=r"box 0 \('a dog'\) is empty"):
        with_region(layout, 0, torch.zeros(64, 64))


def test_region_masks_are_capped_and_added_as_a_new_box():
    mask, _ = fit_region(torch.ones(3000, 3000), 4096, 4096)
    assert mask.shape == (1024, 1024)
    region = torch.zeros(64, 64)
    region[10:20, 30:40] = 1
    layout, _ = add_region_box(Layout(64, 64, (Box(0, 0, 1, 1, "sky"),)), region, "a kite")
    assert [b.label for b in layout.boxes] == ["sky", "a kite"]
    assert layout.boxes[1].region is not None and layout.boxes[1].x0 == 30 / 64


def test_region_attention_on_a_mask_sees_only_its_tokens():
    region = torch.zeros(H, W)
    region[1:4, 2:5] = 1
    region[2, 3] = 0  # a hole: that query sees no text
    layout, _ = with_region(Layout(512, 384, (Box(0, 0, 1, 1, "a"),)), 0, region)
    masks = box_masks(layout, H, W)
    assert masks[0, 2, 3] == 0 and masks[0, 1, 2] == 1
    q, k = torch.randn(1, H * W, C), torch.randn(1, 5, C)
    out = region_attention(q, k, k, instance_visibility(masks, 5), HEADS)
    assert not out[0, 2 * W + 3].any() and out[0, 1 * W + 2].any()


def test_preview_tints_a_region_and_outlines_its_bounding_box():
    from locref_core.preview import box_colour, render_preview

    region = torch.zeros(64, 64)
    region[8:40, 16:48] = 1
    region[20:28, 28:36] = 0  # a hole stays untinted
    layout, _ = with_region(Layout(64, 64, (Box(0, 0, 1, 1),)), 0, region)
    image = render_preview(layout, torch.zeros(3, 64, 64), show_labels=False)
    red = torch.tensor(box_colour(0)) / 255.0
    assert torch.allclose(image[:, 30, 20], 0.35 * red, atol=1 / 255)  # tinted inside
    assert not image[:, 24, 32].any()  # the hole
    assert torch.allclose(image[:, 8, 30], red, atol=1 / 255)  # outline on the bounding box


def reference_source(**settings):
    from locref_core.adapter import AdapterConfig, LocRefAdapter
    from locref_core.regions import PatchSettings, ReferenceSource

    torch.manual_seed(0)
    adapter = LocRefAdapter(AdapterConfig(embed_dim=8, hidden_dim=None, context_dim=16,
                                          model_channels=C // 1, sites=(("input", 1),)))
    boxes = (Box(0, 0, 0.5, 1, "a"), Box(0.5, 0, 1, 1, "b"))
    with torch.no_grad():
        ri, ci = adapter.project(torch.randn(2, 8)), adapter.project(torch.randn(1, 8))[0]
    return ReferenceSource(adapter, Layout(512, 512, boxes), ri, ci, PatchSettings(**settings))


def test_ablations_switch_off_the_instance_masks_and_the_composite():
    q = torch.randn(1, H * W, C, generator=torch.Generator().manual_seed(3))
    outs = {}
    for name, kw in (("paper", {}), ("no_masks", {"instance_masks": False}),
                     ("no_composite", {"composite": False})):
        src = reference_source(**kw)
        masks = box_masks(src.layout, H, W)
        visible = instance_visibility(masks, src.counts)
        outs[name] = src.contribute(q, ("input", 1), None, visible, visible.any(1), (0,), 1)[1]
    left = box_masks(Layout(512, 512, (Box(0, 0, 0.5, 1),)), H, W)[0].flatten().bool()
    assert not torch.allclose(outs["no_masks"][0, left], outs["paper"][0, left])
    assert not torch.allclose(outs["no_composite"], outs["paper"])
