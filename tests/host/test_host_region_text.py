"""Regional text (each box's own prompt) inside the host's own SD-1.5 UNet (tiny, in-process)."""

from __future__ import annotations

import copy

import pytest
import torch

from comfy_harness import apply_patched_model
from locref_core.grid import SD15_SITES
from locref_core.layout import Box, Layout, Reference
from locref_core.masks import with_region
from locref_core.patch import LocRefState, PatchSettings, install
from test_host_locref_patch import RED, make_state, patched, run_with_control, tiny_controlnet
from test_host_locref_patch import assert_composes_with_foreign

G = torch.Generator().manual_seed(11)
GLOBAL = torch.randn(1, 77, 768, generator=G)  # the global prompt's embedding
TEXT_A, TEXT_B = torch.randn(77, 768, generator=G), torch.randn(77, 768, generator=G)
X = torch.randn(1, 4, 32, 32, generator=G)


def text_state(model, boxes, texts, weight=1.0, **settings):
    layout = Layout(512, 512, tuple(boxes))
    return LocRefState(None, layout, None, None, PatchSettings(region_text=weight, **settings),
                       model.get_model_object("diffusion_model"), list(texts))


def run(model, context=GLOBAL, cond_or_uncond=(0,), x=X):
    rows = x.shape[0] * len(cond_or_uncond)
    return apply_patched_model(model, x.repeat(len(cond_or_uncond), 1, 1, 1),
                               torch.full((rows,), 5.0), context.expand(rows, -1, -1),
                               list(cond_or_uncond))


def first_layer_output(model, context=GLOBAL):
    """The first cross-attention site's output (1, 1024, C) as a 32 x 32 grid."""
    seen = []

    def grab(out, extra):
        if extra["transformer_index"] == 0:
            seen.append(out.clone())
        return out

    m = model.clone()
    m.set_model_attn2_output_patch(grab)
    run(m, context)
    return seen[0].view(32, 32, -1)


def test_text_regions_fire_at_all_16_sites(tiny_sd15):
    state = text_state(tiny_sd15, [Box(0, 0, 0.5, 1, "a"), Box(0.5, 0, 1, 1, "b")],
                       [TEXT_A, TEXT_B])
    out = run(patched(tiny_sd15, state))
    assert sorted(state.fired) == sorted(SD15_SITES) and set(state.fired.values()) == {1}
    assert not torch.allclose(out, run(tiny_sd15))


def test_region_text_zero_equals_the_unpatched_model(tiny_sd15):
    # A box with text at weight 0 and a reference at strength 0: the patch runs, changes nothing.
    box = Box(0.1, 0.1, 0.8, 0.9, "a", Reference(RED))
    state = text_state_with_reference(tiny_sd15, box, PatchSettings(strength=0.0, region_text=0.0))
    assert len(state.sources) == 1  # weight 0: the text source is not even built
    assert torch.equal(run(patched(tiny_sd15, state)), run(tiny_sd15))
    assert len(state.fired) == 16
    with pytest.raises(ValueError, match="no box has a reference or"):
        text_state(tiny_sd15, [Box(0, 0, 1, 1, "a")], [TEXT_A], weight=0.0)


def test_whole_canvas_box_at_weight_one_equals_the_model_prompted_with_its_text(tiny_sd15):
    state = text_state(tiny_sd15, [Box(0, 0, 1, 1, "a")], [TEXT_A])
    got = run(patched(tiny_sd15, state), GLOBAL)
    want = run(tiny_sd15, TEXT_A[None])
    assert not torch.allclose(run(tiny_sd15, GLOBAL), want, atol=1e-3)  # the prompts differ
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_changing_box_a_text_changes_the_layer_only_inside_a(tiny_sd15):
    boxes = [Box(0, 0, 0.5, 1, "a"), Box(0.5, 0.25, 1, 0.75, "b")]
    one = first_layer_output(patched(tiny_sd15, text_state(tiny_sd15, boxes, [TEXT_A, TEXT_B])))
    two = first_layer_output(patched(tiny_sd15, text_state(tiny_sd15, boxes,
                                                           [TEXT_A + 1.0, TEXT_B])))
    assert torch.equal(one[:, 16:], two[:, 16:])  # outside A: exactly the same
    assert not torch.allclose(one[:, :16], two[:, :16])
    plain = first_layer_output(tiny_sd15)
    assert torch.equal(one[:8, 16:], plain[:8, 16:])  # outside every box: the plain layer


def test_changing_a_mask_region_text_changes_only_the_mask(tiny_sd15):
    region = torch.zeros(256, 256)
    region[32:160, 40:200] = 1  # on the 32 x 32 grid: rows 4..19, cols 5..24
    region[64:128, 96:144] = 0  # a hole: rows 8..15, cols 12..17
    layout, _ = with_region(Layout(256, 256, (Box(0, 0, 1, 1, "a"),)), 0, region)
    state = lambda text: LocRefState(  # noqa: E731
        None, layout, None, None, PatchSettings(), tiny_sd15.get_model_object("diffusion_model"),
        [text])
    one = first_layer_output(patched(tiny_sd15, state(TEXT_A)))
    two = first_layer_output(patched(tiny_sd15, state(TEXT_B)))
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[4:20, 5:25] = True
    inside[8:16, 12:18] = False
    assert torch.equal(one[~inside], two[~inside])
    assert not torch.allclose(one[inside], two[inside])


def test_unconditional_rows_are_left_as_they_are(tiny_sd15):
    state = text_state(tiny_sd15, [Box(0, 0, 0.7, 0.7, "a")], [TEXT_A])
    m = patched(tiny_sd15, state)
    for order in ((1, 0), (0, 1)):
        out, plain = run(m, cond_or_uncond=order), run(tiny_sd15, cond_or_uncond=order)
        u, c = order.index(1), order.index(0)
        assert torch.equal(out[u], plain[u])
        assert not torch.allclose(out[c], plain[c])


def test_text_and_reference_on_the_same_box_both_act(tiny_sd15):
    box = Box(0.1, 0.1, 0.9, 0.9, "a", Reference(RED))
    both = text_state_with_reference(tiny_sd15, box)
    outs = {name: run(patched(tiny_sd15, s)) for name, s in
            (("ref", make_state(tiny_sd15, boxes=(box,))),  # same adapter seed, no text
             ("text", text_state(tiny_sd15, [box], [TEXT_A])), ("both", both))}
    plain = run(tiny_sd15)
    assert len(both.sources) == 2 and len(both.fired) == 16
    for name in ("ref", "text", "both"):
        assert not torch.allclose(outs[name], plain)
    assert not torch.allclose(outs["both"], outs["ref"])
    assert not torch.allclose(outs["both"], outs["text"])


def text_state_with_reference(model, box, settings=None, seed=0):
    """make_state's adapter and reference tokens (same seed), plus the box's text TEXT_A."""
    from locref_core.adapter import AdapterConfig, LocRefAdapter

    torch.manual_seed(seed)
    adapter = LocRefAdapter(AdapterConfig(hidden_dim=None, shared_kv=True, model_channels=32))
    adapter.eval()
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        ri, ci = adapter.project(torch.randn(1, 1024)), adapter.project(torch.randn(1, 1024))[0]
    return LocRefState(adapter, Layout(512, 512, (box,)), ri, ci, settings or PatchSettings(),
                       model.get_model_object("diffusion_model"), [TEXT_A])


@pytest.mark.parametrize("order", ["locref_first", "foreign_first"])
def test_text_regions_compose_with_a_foreign_attn2_replace(tiny_sd15, order):
    assert_composes_with_foreign(
        tiny_sd15, lambda: text_state(tiny_sd15, [Box(0, 0, 0.5, 1, "a")], [TEXT_A]), order, run)


def test_text_regions_compose_with_a_controlnet(tiny_sd15):
    # A ControlNet rides on the conditioning, so it meets the patched model whatever the order
    # of Apply ControlNet and LocRef Apply in the graph.
    controlnet = tiny_controlnet()
    state = text_state(tiny_sd15, [Box(0, 0, 0.5, 1, "a")], [TEXT_A])
    both = run_with_control(patched(tiny_sd15, state), controlnet)
    control_only = run_with_control(tiny_sd15, controlnet)
    assert len(state.fired) == 16 and set(state.fired.values()) == {1}  # never in the ControlNet
    assert not torch.allclose(both, control_only)


def test_nothing_leaks_into_a_later_plain_run(tiny_sd15):
    before, options = run(tiny_sd15), copy.deepcopy(tiny_sd15.model_options)
    state = text_state(tiny_sd15, [Box(0, 0, 1, 1, "a")], [TEXT_A])
    m = tiny_sd15.clone()
    install(m, state)
    run(m)
    assert tiny_sd15.model_options == options
    assert torch.equal(run(tiny_sd15), before)


def test_text_of_the_wrong_width_is_a_clear_error(tiny_sd15):
    with pytest.raises(ValueError, match=r"\(77, 1280\).*768-wide text.*clip input"):
        text_state(tiny_sd15, [Box(0, 0, 1, 1, "a")], [torch.randn(77, 1280)])
