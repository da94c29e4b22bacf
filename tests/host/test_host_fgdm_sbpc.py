"""FGDM SBPC Select in-process, on the host's tiny SD-1.5, its sampler and a random SD VAE."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from harness_fgdm import random_vae
from test_host_fgdm_factor import adapter

from locref_core.fgdm.maps import decode
from locref_core.fgdm.palettes import get_palette
from locref_core.fgdm.recall import lookup_class, select_best

N, MAP, STEPS = 4, 64, 3


@pytest.fixture(scope="module")
def nodes():
    from test_host_nodes_inprocess import load_pack

    return load_pack().NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def vae():
    return random_vae()


@pytest.fixture(scope="module")
def factored(tiny_sd15, nodes):
    [m] = nodes["FGDMApplyFactor"]().apply(tiny_sd15, adapter(seed=4), 1.0)
    return m


def conds(seed=2):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.zeros(1, 77, 768), {}]]


def sbpc(nodes, model, vae, seed=100, objects="", palette="coco183", n=N, **kw):
    pos, neg = conds()
    args = {"model": model, "positive": pos, "negative": neg, "vae": vae, "n": n,
            "steps": STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "map_width": MAP, "map_height": MAP, "seed": seed, "objects": objects,
            "palette": palette, "output_width": 96, "output_height": 80}
    args.update(kw)
    return nodes["FGDMSBPCSelect"]().select(**args)


def alone(model, vae, seed, palette="coco183"):
    """Sample one candidate by itself, as a plain KSampler run with that seed would."""
    import comfy.sample

    pos, neg = conds()
    latent = torch.zeros(1, 4, MAP // 8, MAP // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", pos, neg, latent,
                                  disable_pbar=True, seed=seed)
    return samples, decode(vae.decode(samples)[0], get_palette(palette))


def test_chosen_seed_reproduces_its_map_when_sampled_alone(nodes, factored, vae):
    pal = get_palette("coco183")
    singles = [alone(factored, vae, 100 + i) for i in range(N)]
    # Require the class whose area varies most between the candidates, so the pick is not
    # decided by the seed tie-break alone.
    fractions = np.stack([np.bincount(m.ravel(), minlength=pal.num_ids) for _, m in singles])
    varied = int(np.argmax(fractions.max(0) - fractions.min(0)))
    expected = select_best([m for _, m in singles], [varied], pal,
                           seeds=[100 + i for i in range(N)], min_area=0.0)
    out = sbpc(nodes, factored, vae, objects=pal.names[varied], min_area=0.0)["result"]
    image, class_map, masks, recall, seed, grid, latent = out
    assert seed == expected.seed, (seed, expected)
    samples, alone_map = singles[seed - 100]
    # a batch of N and a batch of 1 round differently in the GEMMs: the error scales with the
    # latents (random weights make them large: |x| ~ 150 here), measured 2.4e-6 of the maximum
    scale = float(samples.abs().max())
    torch.testing.assert_close(latent["samples"], samples, rtol=1e-4, atol=2e-5 * scale)
    from locref_core.fgdm.maps import resize_nearest

    agree = (class_map.ids == resize_nearest(alone_map, 80, 96)).mean()
    assert agree >= 0.999, f"only {agree:.4f} of the pixels agree with the map sampled alone"
    assert image.shape == (1, 80, 96, 3) and masks.shape == (1, 80, 96)
    assert torch.equal(masks[0] > 0.5, torch.from_numpy(class_map.ids == varied))
    assert recall == expected.recall
    assert grid.shape[0] == 1 and grid.shape[-1] == 3


def test_outputs_follow_the_palette_and_required_objects(nodes, factored, vae):
    res = sbpc(nodes, factored, vae, objects="person, animal", palette="ade150", n=2)
    image, class_map, masks, recall, seed, _grid, _latent = res["result"]
    assert class_map.palette.name == "ade150"
    assert masks.shape == (2, 80, 96)
    colours = get_palette("ade150").color_table()
    assert np.array_equal((image[0].numpy() * 255).round().astype(np.uint8),
                          colours[class_map.ids])
    assert res["ui"]["images"][0]["type"] == "temp"
    assert 0.0 <= recall <= 1.0 and seed in (100, 101)


@pytest.mark.parametrize("bad, message", [
    ({"n": 0}, "between 1 and 64"),
    ({"n": 65}, "between 1 and 64"),
    ({"objects": "person, flying saucer"}, "flying saucer"),
    ({"map_width": 60}, "multiple of 8"),
])
def test_bad_inputs_give_clear_errors(nodes, factored, vae, bad, message):
    with pytest.raises(ValueError, match=message):
        sbpc(nodes, factored, vae, **bad)


def test_auto_palette_comes_from_the_applied_factor(nodes, factored, tiny_sd15):
    import sys

    from test_host_nodes_inprocess import PACK_NAME

    fgdm_map_nodes = sys.modules[f"{PACK_NAME}.nodes.fgdm_map_nodes"]
    assert fgdm_map_nodes.factor_palette(factored) == "coco183"
    assert fgdm_map_nodes.factor_palette(tiny_sd15) is None


@pytest.mark.parametrize("areas, kept, why", [
    ([[0.0, 0.0], [0.0, 0.003], [0.001, 0.0]], 1, r"cover the most area \(0\.3%, under min_area\)"),
    ([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], 0, "none has any pixel of a required class"),
])
def test_the_no_recall_warning_names_the_candidate_the_tie_break_kept(nodes, caplog, areas,
                                                                      kept, why):
    """All recalls 0: select_best keeps the candidate whose required classes cover the most area
    (then the lowest seed); the warning names that candidate and its seed, not candidate 0."""
    import sys

    from test_host_nodes_inprocess import PACK_NAME

    palette = get_palette("coco183")
    dog, cat = (lookup_class(palette, name) for name in ("dog", "cat"))
    maps = []
    for a_dog, a_cat in areas:  # 100 x 100 maps: one pixel is 0.01 %
        ids = np.zeros((100, 100), dtype=np.int64)
        ids.flat[: round(a_dog * 10000)] = dog
        ids.flat[5000: 5000 + round(a_cat * 10000)] = cat
        maps.append(ids)
    sel = select_best(maps, [dog, cat], palette, seeds=[7, 8, 9], min_area=0.01)
    assert max(sel.recalls) == 0 and sel.index == kept
    fgdm_map_nodes = sys.modules[f"{PACK_NAME}.nodes.fgdm_map_nodes"]
    with caplog.at_level("WARNING"):
        fgdm_map_nodes.warn_no_recall(sel, 0.01)
    text = caplog.text
    assert f"candidate {kept} (seed {7 + kept}) was kept because" in text, text
    assert re.search(why, text), text
