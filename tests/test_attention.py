import pytest
import torch

from locref_core.attention import (
    composite_attention,
    instance_visibility,
    locref_blend,
    locref_blend_rows,
    region_attention,
    region_attention_loop,
    select_rows,
)
from locref_core.layout import Box, Layout
from locref_core.masks import layout_masks

H, W, C, HEADS, T = 9, 14, 64, 8, 4
torch.manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def setup(boxes):
    masks, fm, _ = layout_masks(Layout(512, 512, boxes), H, W)
    q = rand(2, H * W, C)
    ks = [rand(2, T, C) for _ in boxes]
    vs = [rand(2, T, C) for _ in boxes]
    return masks, fm, q, ks, vs


def fused(q, ks, vs, masks):
    return region_attention(q, torch.cat(ks, 1), torch.cat(vs, 1),
                            instance_visibility(masks, T), HEADS)


def test_zero_strength_is_the_unpatched_layer():
    masks, fm, q, ks, vs = setup((Box(0.1, 0.1, 0.6, 0.7),))
    hs = rand(2, H * W, C)
    cihs = composite_attention(q, ks[0], vs[0], HEADS)
    for t in (0.0, 0.5, 1.0):
        assert torch.equal(locref_blend(hs, cihs, fused(q, ks, vs, masks), fm, 0.0, t), hs)


def test_paper_blend_replaces_text_inside_boxes_only():
    masks, fm, q, ks, vs = setup((Box(0.1, 0.1, 0.6, 0.7),))
    hs, cihs, rihs = rand(2, H * W, C), rand(2, H * W, C), fused(q, ks, vs, masks)
    out = locref_blend(hs, cihs, rihs, fm)
    inside = fm.flatten().bool()
    assert torch.allclose(out[:, ~inside], hs[:, ~inside])
    assert torch.allclose(out[:, inside], (cihs + rihs)[:, inside])


def test_whole_canvas_box_equals_plain_attention_to_the_reference():
    masks, _, q, ks, vs = setup((Box(0, 0, 1, 1),))
    assert torch.allclose(fused(q, ks, vs, masks), composite_attention(q, ks[0], vs[0], HEADS))


def test_fused_equals_per_instance_loop_on_disjoint_boxes():
    boxes = (Box(0.0, 0.0, 0.3, 0.5), Box(0.35, 0.1, 0.7, 0.9), Box(0.75, 0.6, 1.0, 1.0))
    masks, _, q, ks, vs = setup(boxes)
    assert (masks.sum(0) <= 1).all()
    assert torch.allclose(fused(q, ks, vs, masks), region_attention_loop(q, ks, vs, masks, HEADS))


def test_changing_reference_a_changes_rihs_only_inside_box_a():
    boxes = (Box(0.0, 0.0, 0.45, 0.6), Box(0.5, 0.3, 1.0, 1.0))
    masks, _, q, ks, vs = setup(boxes)
    before = fused(q, ks, vs, masks)
    after = fused(q, [rand(2, T, C), ks[1]], [rand(2, T, C), vs[1]], masks)
    changed = (before - after).abs().amax(dim=(0, 2)) > 0  # (Lq,)
    in_a = masks[0].flatten().bool()
    assert changed[in_a].all()
    assert torch.equal(before[:, ~in_a], after[:, ~in_a])  # exactly zero change elsewhere


def test_query_in_no_box_gets_zero_not_nan():
    masks, _, q, ks, vs = setup((Box(0.0, 0.0, 0.3, 0.3),))
    for dtype in (torch.float32, torch.float16 if hasattr(torch, "float16") else torch.float32):
        out = region_attention(q.to(dtype), ks[0].to(dtype), vs[0].to(dtype),
                               instance_visibility(masks, T), HEADS)
        assert not out.isnan().any()
        outside = ~masks[0].flatten().bool()
        assert (out[:, outside] == 0).all()


def test_overlapping_boxes_attend_jointly():
    boxes = (Box(0.0, 0.0, 0.6, 1.0), Box(0.4, 0.0, 1.0, 1.0))
    masks, _, q, ks, vs = setup(boxes)
    out = fused(q, ks, vs, masks)
    both = masks.bool().all(0).flatten()
    joint = composite_attention(q, torch.cat(ks, 1), torch.cat(vs, 1), HEADS)
    assert torch.allclose(out[:, both], joint[:, both])


@pytest.mark.parametrize("s, t", [(1.0, 0.0), (0.6, 0.0), (1.0, 1.0), (0.7, 0.3), (1.5, 0.2)])
def test_blend_on_foreground_rows_after_projection_equals_blend_before_it(s, t):
    masks, fm, q, ks, vs = setup((Box(0.2, 0.1, 0.8, 0.6), Box(0.0, 0.7, 0.3, 1.0)))
    to_out = torch.nn.Linear(C, C).double()
    hs, cihs, rihs = rand(2, H * W, C), rand(2, H * W, C), fused(q, ks, vs, masks)
    expected = to_out(locref_blend(hs, cihs, rihs, fm, s, t))
    rows = fm.flatten().nonzero().flatten()
    got = locref_blend_rows(to_out(hs), cihs[:, rows], rihs[:, rows], rows, to_out, s, t)
    assert torch.allclose(got, expected)


def test_select_rows_follows_cond_or_uncond_order():
    cond, uncond = torch.ones(3, 5), torch.zeros(3, 5)
    rows = select_rows(cond, uncond, [1, 0], 2)
    assert rows.shape == (4, 3, 5) and rows[:2].sum() == 0 and (rows[2:] == 1).all()
    rows = select_rows(cond, uncond, [0, 1], 1)
    assert (rows[0] == 1).all() and rows[1].sum() == 0
    assert (select_rows(cond, uncond, [0], 3) == 1).all()
