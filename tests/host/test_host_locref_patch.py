"""The LocRef patch inside the host's own SD-1.5 UNet (tiny width, in-process)."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from comfy_harness import apply_patched_model
from locref_core.adapter import AdapterConfig, LocRefAdapter
from locref_core.grid import SD15_SITES
from locref_core.layout import Box, Layout, Reference
from locref_core.patch import LocRefState, PatchSettings, install

TINY_CHANNELS = 32  # the tiny_sd15 fixture's model_channels
RED = torch.ones(3, 32, 32) * torch.tensor([1.0, 0, 0])[:, None, None]


def make_state(model, boxes=None, settings=PatchSettings(), seed=0):
    """A LocRef state with random adapter weights and random reference tokens."""
    torch.manual_seed(seed)
    cfg = AdapterConfig(hidden_dim=None, shared_kv=True, model_channels=TINY_CHANNELS)
    adapter = LocRefAdapter(cfg).eval()
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    boxes = boxes or (Box(0.0, 0.0, 0.5, 1.0, "a", Reference(RED)),
                      Box(0.5, 0.2, 1.0, 0.9, "b", Reference(RED)))
    layout = Layout(512, 512, boxes)
    n = sum(b.reference is not None for b in boxes)
    with torch.no_grad():
        ri = adapter.project(torch.randn(n, 1024))
        ci = adapter.project(torch.randn(1, 1024))[0]
    return LocRefState(adapter, layout, ri, ci, settings, model.get_model_object("diffusion_model"))


def patched(model, state):
    m = model.clone()
    install(m, state)
    return m


def run(model, h=32, w=32, batch=1, cond_or_uncond=(0,), seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = batch * len(cond_or_uncond)
    x = torch.randn(rows, 4, h, w, generator=g)
    ctx = torch.randn(rows, 77, 768, generator=g)
    return apply_patched_model(model, x, torch.full((rows,), 5.0), ctx, list(cond_or_uncond))


def test_patch_fires_at_all_16_sites(tiny_sd15):
    state = make_state(tiny_sd15)
    out = run(patched(tiny_sd15, state))
    assert sorted(state.fired) == sorted(SD15_SITES)
    assert set(state.fired.values()) == {1}
    assert not torch.equal(out, run(tiny_sd15))


@pytest.mark.parametrize("h, w", [(24, 40), (36, 20), (9, 13)])
def test_any_latent_size_and_batch(tiny_sd15, h, w):
    state = make_state(tiny_sd15)
    out = run(patched(tiny_sd15, state), h, w, batch=2, cond_or_uncond=(1, 0))
    assert out.shape == (4, 4, h, w) and torch.isfinite(out).all()
    assert len(state.fired) == 16


def test_zero_strength_equals_the_plain_model(tiny_sd15):
    state = make_state(tiny_sd15, settings=PatchSettings(strength=0.0))
    assert torch.equal(run(patched(tiny_sd15, state)), run(tiny_sd15))


def test_sigma_range_switches_the_patch_off(tiny_sd15):
    state = make_state(tiny_sd15, settings=PatchSettings(sigma_start=4.0, sigma_end=1.0))
    assert torch.equal(run(patched(tiny_sd15, state)), run(tiny_sd15))  # sigma 5 is outside
    assert state.fired == {}


def test_uncond_rows_get_the_null_reference(tiny_sd15):
    # Same latent and context in both rows: cond and uncond rows differ only by LocRef tokens.
    m = patched(tiny_sd15, make_state(tiny_sd15))
    x = torch.randn(1, 4, 32, 32).repeat(2, 1, 1, 1)
    ctx = torch.randn(1, 77, 768).repeat(2, 1, 1)
    out = apply_patched_model(m, x, torch.full((2,), 5.0), ctx, [1, 0])
    plain = apply_patched_model(tiny_sd15, x, torch.full((2,), 5.0), ctx, [1, 0])
    assert torch.equal(plain[0], plain[1])
    assert not torch.allclose(out[0], out[1])
    # Order is read from cond_or_uncond, never assumed: swapping it swaps the rows.
    swapped = apply_patched_model(m, x, torch.full((2,), 5.0), ctx, [0, 1])
    assert torch.allclose(swapped[0], out[1]) and torch.allclose(swapped[1], out[0])


def test_input_model_is_untouched_and_nothing_leaks(tiny_sd15):
    before = run(tiny_sd15)
    options_before = copy.deepcopy(tiny_sd15.model_options)
    run(patched(tiny_sd15, make_state(tiny_sd15)))
    assert tiny_sd15.model_options == options_before
    assert torch.equal(run(tiny_sd15), before)


def test_clones_share_the_patch_without_copying_tensors(tiny_sd15):
    state = make_state(tiny_sd15)
    m = patched(tiny_sd15, state)
    tensors = {id(t) for kv in state._kv.values() for t in kv}
    gc.collect()
    clones = [m]
    for _ in range(10):
        clones.append(clones[-1].clone())
    last = clones[-1].model_options["transformer_options"]["patches"]
    assert last["attn2_patch"][-1].state is state and last["attn2_output_patch"][-1].state is state
    assert {id(t) for kv in last["attn2_patch"][-1].state._kv.values() for t in kv} == tensors
    assert clones[-1].model is tiny_sd15.model  # the UNet itself is shared, not copied
    assert torch.equal(run(clones[-1]), run(m))


def foreign_replace(calls):
    """An IP-Adapter-style attn2 replace: plain attention plus a visible offset."""
    def replace(q, k, v, extra_options):
        calls.append(tuple(extra_options["block"]))
        heads = extra_options["n_heads"]
        b, n, c = q.shape
        split = lambda t: t.view(b, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(b, n, c) + 0.5
    return replace


def with_foreign(model, calls):
    m = model.clone()
    for block, index in SD15_SITES:
        m.set_model_attn2_replace(foreign_replace(calls), block, index)
    return m


def assert_composes_with_foreign(model, make, order, run_model):
    """LocRef (a state from `make()`) and a foreign attn2 replace both act, in either order."""
    state, calls = make(), []
    if order == "locref_first":
        m = with_foreign(patched(model, state), calls)
    else:
        m = patched(with_foreign(model, calls), state)
    both = run_model(m)
    assert len(calls) == 16 and len(state.fired) == 16
    assert not torch.allclose(both, run_model(with_foreign(model, [])))
    assert not torch.allclose(both, run_model(patched(model, make())))


@pytest.mark.parametrize("order", ["locref_first", "foreign_first"])
def test_composes_with_a_foreign_attn2_replace(tiny_sd15, order):
    assert_composes_with_foreign(tiny_sd15, lambda: make_state(tiny_sd15), order, run)


def test_query_outside_boxes_is_unchanged_at_first_layer(tiny_sd15):
    # With one box on the left half, the first site's output on the right half is untouched.
    state = make_state(tiny_sd15, boxes=(Box(0.0, 0.0, 0.5, 1.0, "a", Reference(RED)),))
    seen = {}

    def grab(out, extra):
        if extra["transformer_index"] == 0:
            seen.setdefault("outs", []).append(out.clone())
        return out

    m = patched(tiny_sd15, state)
    m.set_model_attn2_output_patch(grab)
    p = tiny_sd15.clone()
    p.set_model_attn2_output_patch(grab)
    run(m), run(p)
    locref_out, plain_out = seen["outs"]
    grid, plain = locref_out.view(1, 32, 32, -1), plain_out.view(1, 32, 32, -1)
    assert torch.equal(grid[:, :, 16:], plain[:, :, 16:])
    assert not torch.allclose(grid[:, :, :16], plain[:, :, :16])


@pytest.mark.parametrize("h, w", [(68, 100), (9, 13)])
def test_core_grid_and_site_table_match_the_host(tiny_sd15, h, w):
    from comfy_harness import record_attn2_sites
    from locref_core.grid import SD15_SITE_LEVEL, downsampled, token_grid

    records = record_attn2_sites(tiny_sd15, h, w)
    assert [r["block"] for r in records] == list(SD15_SITES)
    assert [r["transformer_index"] for r in records] == list(range(16))
    for r in records:
        grid = tuple(r["activations_shape"][-2:])
        level = SD15_SITE_LEVEL[r["block"]]
        assert grid == (downsampled(h, level), downsampled(w, level))
        assert token_grid(tokens=r["tokens"], latent_hw=(h, w)) == grid
        assert token_grid(r["activations_shape"], tokens=r["tokens"]) == grid


def test_fp16_unet(tiny_sd15):
    """The patch runs in a half-precision UNet (as on GPUs) and stays close to fp32."""
    from comfy_harness import build_tiny_sd15_model

    half = build_tiny_sd15_model()
    half.model.diffusion_model.to(torch.float16)
    half.model.diffusion_model.dtype = torch.float16
    state16, state32 = make_state(half), make_state(tiny_sd15)
    out16 = run(patched(half, state16)).float()
    out32 = run(patched(tiny_sd15, state32))
    assert len(state16.fired) == 16 and torch.isfinite(out16).all()
    # ran in fp16
    assert {k[-1] for k in state16.sources[0]._cache if k[0] == "kv"} == {torch.float16}
    assert (out16 - out32).abs().max() < 0.05 * out32.abs().max()


def test_ten_clones_do_not_grow_memory(tiny_sd15):
    import psutil

    m = patched(tiny_sd15, make_state(tiny_sd15))
    gc.collect()
    rss = psutil.Process().memory_info().rss
    clones = [m]
    for _ in range(10):
        clones.append(clones[-1].clone())
    gc.collect()
    grown = psutil.Process().memory_info().rss - rss
    unet_bytes = sum(p.numel() * p.element_size() for p in tiny_sd15.model.parameters())
    assert grown < unet_bytes, f"10 clones grew RSS by {grown} bytes (UNet is {unet_bytes})"


def tiny_controlnet(seed: int = 5):
    """The host's ControlNet class at the tiny UNet's width, random weights."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    from harness_models import reinit_parameters, sd15_unet_config

    config = dict(sd15_unet_config(TINY_CHANNELS))
    config.pop("out_channels")
    config["hint_channels"] = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = comfy.cldm.cldm.ControlNet(**config, device="cpu",
                                           operations=comfy.ops.disable_weight_init)
        reinit_parameters(model)
    return comfy.controlnet.ControlNet(model, load_device=torch.device("cpu"))


def run_with_control(model, controlnet, h=32, w=32):
    """One UNet call with a ControlNet, the way comfy.samplers feeds it."""
    import comfy.model_management
    import comfy.patcher_extension

    g = torch.Generator().manual_seed(1)
    x, ctx, sigma = torch.randn(1, 4, h, w, generator=g), torch.randn(1, 77, 768, generator=g), \
        torch.full((1,), 5.0)
    hint = torch.rand(1, 3, h * 8, w * 8, generator=g)
    cn = controlnet.copy().set_cond_hint(hint, 1.0)
    sampling = model.get_model_object("model_sampling")
    cn.pre_run(model.model, lambda p: sampling.percent_to_sigma(p))
    comfy.model_management.load_models_gpu([model] + cn.get_models())
    options = comfy.patcher_extension.merge_nested_dicts(
        {}, model.model_options.get("transformer_options", {}), copy_dict1=False)
    options.update(cond_or_uncond=[0], uuids=[None], sigmas=sigma)
    with torch.no_grad():
        control = cn.get_control(x, sigma, {"c_crossattn": ctx}, 1, options)
        out = model.model.apply_model(x, sigma, c_crossattn=ctx, control=control,
                                      transformer_options=options)
    cn.cleanup()
    return out


def test_composes_with_a_controlnet(tiny_sd15):
    controlnet = tiny_controlnet()
    state = make_state(tiny_sd15)
    both = run_with_control(patched(tiny_sd15, state), controlnet)
    control_only = run_with_control(tiny_sd15, controlnet)
    assert len(state.fired) == 16  # LocRef fired in the UNet (never inside the ControlNet)
    assert set(state.fired.values()) == {1}
    assert not torch.allclose(control_only, run(tiny_sd15))  # the ControlNet has an effect
    assert not torch.allclose(both, control_only)  # and LocRef still has one on top of it
    assert not torch.allclose(both, run(patched(tiny_sd15, make_state(tiny_sd15))))
