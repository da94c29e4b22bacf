"""LocRef Apply's box texts and LocRef Region Mask, called in-process with the host's own CLIP
(from the cached random SD-1.5 checkpoint) and the tiny UNet."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from test_host_locref_patch import RED
from test_host_nodes_inprocess import load_pack
from test_host_region_text import first_layer_output, run


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.fixture(scope="module")
def clip(sd15_checkpoint):
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=False,
                                                output_clipvision=False, output_model=False)
    return out[1]


def boxes(pack, *labelled, width=256, height=256):
    data = {"version": 1, "boxes": [{"x0": x0, "y0": y0, "x1": x1, "y1": y1, "label": label}
                                    for (x0, y0, x1, y1), label in labelled]}
    return pack.NODE_CLASS_MAPPINGS["LocRefBoxes"]().build(width, height, json.dumps(data))[0]


def apply(pack, model, layout, **kw):
    return pack.NODE_CLASS_MAPPINGS["LocRefApply"]().apply(model, layout=layout, **kw)[0]


def encode(clip, text):
    return clip.encode_from_tokens(clip.tokenize(text)).float()  # (1, 77 * windows, 768)


def state_of(model):
    return model.model_options["transformer_options"]["patches"]["attn2_output_patch"][-1].state


def test_three_labelled_boxes_steer_with_only_the_checkpoint_clip(pack, tiny_sd15, clip):
    layout = boxes(pack, ((0, 0, 0.4, 0.5), "a red car"), ((0.5, 0, 1, 0.5), "a blue bird"),
                   ((0.2, 0.5, 0.8, 1), "a green tree"))
    model = apply(pack, tiny_sd15, layout, clip=clip)
    out, plain = run(model, encode(clip, "a park")), run(tiny_sd15, encode(clip, "a park"))
    state = state_of(model)
    assert len(state.fired) == 16 and [s.__class__.__name__ for s in state.sources] == \
        ["TextSource"]
    assert state.sources[0].counts == [77, 77, 77]
    assert not torch.allclose(out, plain)
    assert "patches" not in tiny_sd15.model_options.get("transformer_options", {})


def test_whole_canvas_label_equals_prompting_the_model_with_it(pack, tiny_sd15, clip):
    model = apply(pack, tiny_sd15, boxes(pack, ((0, 0, 1, 1), "a red car")), clip=clip,
                  region_text=1.0)
    got = run(model, encode(clip, "a photo of a street"))
    want = run(tiny_sd15, encode(clip, "a red car"))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_region_text_zero_and_empty_labels_leave_the_model_unpatched(pack, tiny_sd15, clip,
                                                                     caplog):
    labelled = boxes(pack, ((0, 0, 1, 1), "a red car"))
    for model in (apply(pack, tiny_sd15, labelled, clip=clip, region_text=0.0),
                  apply(pack, tiny_sd15, boxes(pack, ((0, 0, 0.5, 1), ""),
                                               ((0.5, 0, 1, 1), "  \t ")), clip=clip)):
        assert model.model_options == tiny_sd15.model_options
    assert "returned unpatched" in caplog.text


def test_whitespace_label_gets_no_region_beside_a_real_one(pack, tiny_sd15, clip):
    layout = boxes(pack, ((0, 0, 0.5, 1), "   "), ((0.5, 0, 1, 1), "a cat"))
    model = apply(pack, tiny_sd15, layout, clip=clip)
    assert state_of(model).sources[0].layout.labels == ["a cat"]
    plain, out = first_layer_output(tiny_sd15), first_layer_output(model)
    assert torch.equal(out[:, :16], plain[:, :16])  # the whitespace box's half is untouched


def test_long_emoji_and_non_latin_labels(pack, tiny_sd15, clip, caplog):
    long = " ".join(["a very detailed red sports car with chrome wheels"] * 38)  # ~300 words
    layout = boxes(pack, ((0, 0, 0.5, 0.5), long), ((0.5, 0, 1, 0.5), "🐈 一只猫 кошка"),
                   ((0, 0.5, 1, 1), "ÉTÉ à Paris"))
    with caplog.at_level(logging.WARNING):
        model = apply(pack, tiny_sd15, layout, clip=clip)
    counts = state_of(model).sources[0].counts
    assert counts[0] > 77 and counts[0] % 77 == 0 and counts[1:] == [77, 77]
    assert "box 0 ('a very detailed" in caplog.text and "77-token window" in caplog.text
    assert torch.isfinite(run(model, encode(clip, "x"))).all()


def test_text_without_clip_is_an_error_or_with_references_a_warning(pack, tiny_sd15, caplog):
    layout = boxes(pack, ((0, 0, 0.5, 1), "a red car"))
    with pytest.raises(ValueError, match=r"box 0 \('a red car'\) has text.*clip input.*"
                                         r"region_text to 0"):
        apply(pack, tiny_sd15, layout)
    assert apply(pack, tiny_sd15, layout, region_text=0.0).model_options == \
        tiny_sd15.model_options


def test_a_reference_without_adapter_or_clip_vision_names_both(pack, tiny_sd15, clip):
    node = pack.NODE_CLASS_MAPPINGS["LocRefReference"]()
    [layout] = node.attach(boxes(pack, ((0, 0, 0.5, 1), "a dog")), RED.permute(1, 2, 0)[None],
                           0, "")
    with pytest.raises(ValueError, match=r"box 0 \('a dog'\) has a reference image, so adapter "
                                         r"and clip_vision must be connected"):
        apply(pack, tiny_sd15, layout, clip=clip)


def test_old_workflows_with_references_and_labels_but_no_clip_still_run(pack, tiny_sd15,
                                                                       caplog):
    from harness_locref import cached_clip_vision_h
    import comfy.clip_vision

    from locref_core.adapter import AdapterConfig, LocRefAdapter

    adapter = LocRefAdapter(AdapterConfig(hidden_dim=None, model_channels=32)).eval()
    clip_vision = comfy.clip_vision.load(str(cached_clip_vision_h()))
    node = pack.NODE_CLASS_MAPPINGS["LocRefReference"]()
    [layout] = node.attach(boxes(pack, ((0, 0, 0.5, 1), "a dog")), RED.permute(1, 2, 0)[None],
                           0, "")
    with caplog.at_level(logging.WARNING):  # positional, as scripts called it before
        [model] = pack.NODE_CLASS_MAPPINGS["LocRefApply"]().apply(
            tiny_sd15, adapter, clip_vision, layout, 1.0, 0.0, 0.0, 1.0)
    assert "has text but no CLIP is connected" in caplog.text
    assert [s.__class__.__name__ for s in state_of(model).sources] == ["ReferenceSource"]


def test_region_mask_node_resizes_refuses_empty_and_shapes_the_text(pack, tiny_sd15, clip,
                                                                   caplog):
    node = pack.NODE_CLASS_MAPPINGS["LocRefRegionMask"]()
    layout = boxes(pack, ((0, 0, 1, 1), "a red car"))
    with pytest.raises(ValueError, match=r"region mask for box 0 \('a red car'\) is empty"):
        node.shape(layout, torch.zeros(1, 256, 256), 0, "")
    mask = torch.zeros(1, 100, 50)  # another size and aspect than the 256 x 256 canvas
    mask[:, 10:60, 25:] = 1
    with caplog.at_level(logging.WARNING):
        [shaped] = node.shape(layout, mask, 0, "a red car")
    assert "resized to the canvas" in caplog.text
    box = shaped.boxes[0]
    assert box.region.shape == (256, 256) and box.x0 == pytest.approx(0.5, abs=0.01)
    [added] = node.shape(layout, 1 - mask, 0, "a kite", add_new_box=True)
    assert added.labels == ["a red car", "a kite"]
    model = apply(pack, tiny_sd15, shaped, clip=clip)
    plain, out = first_layer_output(tiny_sd15), first_layer_output(model)
    assert torch.equal(out[:, :15], plain[:, :15])  # left of the mask: untouched
    assert not torch.allclose(out[4:20, 17:], plain[4:20, 17:])
    preview = pack.NODE_CLASS_MAPPINGS["LocRefLayoutPreview"]().preview(shaped)["result"][0]
    assert preview.shape == (1, 256, 256, 3)
