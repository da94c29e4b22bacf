"""The pack's node classes, imported the way ComfyUI imports them, called in-process."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

from harness_locref import cached_clip_vision_h

ROOT = pathlib.Path(__file__).resolve().parents[2]


PACK_NAME = "locref_pack_under_test"


def load_pack():
    """The repository loaded as a package, like ComfyUI's custom-node loader does (once)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    return load_pack()


def layout(pack, boxes_json='{"version": 1, "boxes": [{"x0": 0, "y0": 0, "x1": 0.5, "y1": 1}]}'):
    return pack.NODE_CLASS_MAPPINGS["LocRefBoxes"]().build(256, 256, boxes_json)[0]


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_grey_rgb_and_rgba_references_become_rgb(pack, channels):
    node = pack.NODE_CLASS_MAPPINGS["LocRefReference"]()
    image = torch.rand(2, 40, 30, channels)  # a batch: the first image is used
    [out] = node.attach(layout(pack), image, 0, "")
    ref = out.boxes[0].reference
    assert ref.image.shape == (3, 40, 30)
    assert torch.equal(ref.image[0], image[0, :, :, 0])


def test_mask_and_invert(pack):
    node = pack.NODE_CLASS_MAPPINGS["LocRefReference"]()
    mask = torch.zeros(1, 40, 30)
    mask[:, :, :10] = 1
    [out] = node.attach(layout(pack), torch.rand(1, 40, 30, 3), 0, "", mask, True)
    assert out.boxes[0].reference.mask[:, :10].sum() == 0  # inverted: 1 - mask


def test_attach_by_unknown_label_names_the_labels(pack):
    node = pack.NODE_CLASS_MAPPINGS["LocRefReference"]()
    boxes = '{"version": 1, "boxes": [{"x0": 0, "y0": 0, "x1": 0.5, "y1": 1, "label": "dog"}]}'
    with pytest.raises(ValueError, match="'cat'.*'dog'"):
        node.attach(layout(pack, boxes), torch.rand(1, 8, 8, 3), 0, "cat")
    with pytest.raises(ValueError, match="box index 3 is out of range"):
        node.attach(layout(pack, boxes), torch.rand(1, 8, 8, 3), 3, "")


def test_apply_without_references_returns_an_unpatched_clone(pack, tiny_sd15):
    apply = pack.NODE_CLASS_MAPPINGS["LocRefApply"]()
    [model] = apply.apply(tiny_sd15, None, None, layout(pack), 1.0, 0.0, 0.0, 1.0)
    assert model is not tiny_sd15
    assert model.model_options == tiny_sd15.model_options
    with pytest.raises(ValueError, match="swap them"):
        apply.apply(tiny_sd15, None, None, layout(pack), 1.0, 0.0, 0.8, 0.2)


def test_clip_vision_of_the_wrong_width_is_a_clear_error(pack, tiny_sd15):
    import comfy.clip_vision

    from locref_core.adapter import AdapterConfig, LocRefAdapter

    clip_vision = comfy.clip_vision.load(str(cached_clip_vision_h()))
    adapter = LocRefAdapter(AdapterConfig(embed_dim=768, hidden_dim=None, model_channels=32))
    ref = pack.NODE_CLASS_MAPPINGS["LocRefReference"]()
    [with_ref] = ref.attach(layout(pack), torch.rand(1, 32, 32, 3), 0, "")
    with pytest.raises(ValueError, match="1024-wide image embeddings but the adapter expects 768"):
        pack.NODE_CLASS_MAPPINGS["LocRefApply"]().apply(
            tiny_sd15, adapter, clip_vision, with_ref, 1.0, 0.0, 0.0, 1.0)
    # The right width patches the tiny model at every site.
    adapter = LocRefAdapter(AdapterConfig(embed_dim=1024, hidden_dim=None, model_channels=32))
    [model] = pack.NODE_CLASS_MAPPINGS["LocRefApply"]().apply(
        tiny_sd15, adapter, clip_vision, with_ref, 1.0, 0.0, 0.0, 1.0)
    patches = model.model_options["transformer_options"]["patches"]
    assert len(patches["attn2_patch"]) == 1 and len(patches["attn2_output_patch"]) == 1
    assert "patches" not in tiny_sd15.model_options.get("transformer_options", {})


def test_reference_embeddings_keep_no_autograd_graph(pack):
    """Called from a script (no inference mode, unlike the server), the CLIP encode must not keep
    a graph: with the host's fp16 ViT-H on a CPU each call would hold ~3.4 GB of fp32 weights."""
    import comfy.clip_vision

    clip_vision = comfy.clip_vision.load(str(cached_clip_vision_h()))
    assert any(p.requires_grad for p in clip_vision.model.parameters())  # the host's default
    assert torch.is_grad_enabled()
    embeds = sys.modules[f"{PACK_NAME}.nodes.locref_nodes"].encode(
        clip_vision, torch.rand(1, 3, 32, 32), crop=True)
    assert embeds.shape == (1, 1024)
    assert embeds.grad_fn is None and not embeds.requires_grad


def test_every_node_has_a_help_page_naming_its_inputs_and_outputs(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        page = ROOT / "web" / "docs" / f"{node_id}.md"
        assert page.is_file(), f"{node_id} has no help page"
        text = page.read_text(encoding="utf-8")
        spec = cls.INPUT_TYPES()
        names = [*spec.get("required", {}), *spec.get("optional", {}), *cls.RETURN_NAMES]
        assert [n for n in names if f"`{n}`" not in text] == [], node_id


def test_every_node_function_shows_its_warnings(pack):
    warn = sys.modules[f"{PACK_NAME}.nodes.warn"]
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        function = getattr(cls, cls.FUNCTION)
        assert function.__code__ is warn.shows_warnings(lambda: None).__code__, node_id
