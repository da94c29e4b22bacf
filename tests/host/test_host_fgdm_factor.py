"""FG-DM factor adapters inside the host's tiny SD-1.5 UNet, through the real node classes."""

from __future__ import annotations

import pytest
import torch

from comfy_harness import apply_patched_model
from locref_core.fgdm.adapter import FactorAdapter, FactorConfig
from test_host_locref_patch import run_with_control, tiny_controlnet

TINY = dict(channels=(32, 64, 128, 128), emb_channels=128)  # tiny_sd15: model_channels=32


@pytest.fixture(scope="module")
def apply_node():
    from test_host_nodes_inprocess import load_pack

    return load_pack().NODE_CLASS_MAPPINGS["FGDMApplyFactor"]()


def adapter(zero=False, timed=True, seed=0):
    torch.manual_seed(seed)
    a = FactorAdapter(FactorConfig(time_conditioned=timed, **TINY)).eval()
    with torch.no_grad():
        for p in a.parameters():
            p.zero_() if zero else p.normal_(0, 0.05)
    return a


def run(model, sigma=5.0, seed=1, rows=2):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(rows, 4, 24, 40, generator=g), torch.randn(rows, 77, 768, generator=g)
    return apply_patched_model(model, x, torch.full((rows,), sigma), ctx, [1, 0][:rows])


def test_zero_adapter_gives_the_unpatched_output(tiny_sd15, apply_node):
    [m] = apply_node.apply(tiny_sd15, adapter(zero=True), 1.0)
    assert torch.equal(run(m), run(tiny_sd15))


@pytest.mark.parametrize("timed", [True, False])
def test_adapter_changes_the_output_and_follows_the_timestep(tiny_sd15, apply_node, timed):
    [m] = apply_node.apply(tiny_sd15, adapter(timed=timed), 1.0)
    assert not torch.allclose(run(m), run(tiny_sd15))
    delta_hi = run(m, sigma=10.0) - run(tiny_sd15, sigma=10.0)
    delta_lo = run(m, sigma=0.5) - run(tiny_sd15, sigma=0.5)
    assert not torch.allclose(delta_hi, delta_lo)
    assert "wrappers" not in tiny_sd15.model_options.get("transformer_options", {})


def test_features_are_recomputed_every_call_for_all_rows(tiny_sd15, apply_node):
    calls = []
    a = adapter()
    original = a.forward
    a.forward = lambda x, emb=None: (calls.append(tuple(x.shape)), original(x, emb))[1]
    [m] = apply_node.apply(tiny_sd15, a, 1.0)
    run(m, seed=1), run(m, seed=2)
    assert calls == [(2, 4, 24, 40), (2, 4, 24, 40)]


def test_strength_zero_and_clones(tiny_sd15, apply_node):
    [m] = apply_node.apply(tiny_sd15, adapter(), 0.0)
    assert torch.equal(run(m), run(tiny_sd15))
    [m] = apply_node.apply(tiny_sd15, adapter(), 1.0)
    wrapper = m.model_options["transformer_options"]["wrappers"]["diffusion_model"]
    clone = m.clone()
    assert clone.model_options["transformer_options"]["wrappers"]["diffusion_model"] == wrapper
    assert list(wrapper.values())[0][0] is list(clone.model_options["transformer_options"][
        "wrappers"]["diffusion_model"].values())[0][0]


def test_a_controlnet_on_the_same_model_keeps_working(tiny_sd15, apply_node):
    controlnet = tiny_controlnet()
    [m] = apply_node.apply(tiny_sd15, adapter(), 1.0)
    both = run_with_control(m, controlnet, 24, 40)
    control_only = run_with_control(tiny_sd15, controlnet, 24, 40)
    factor_only = run(m, rows=1)  # same latent and context draws as run_with_control
    plain = run(tiny_sd15, rows=1)
    assert not torch.allclose(both, control_only)  # the factor acts with the ControlNet present
    assert not torch.allclose(both, factor_only)  # and the ControlNet still acts
    assert not torch.allclose(control_only, plain) and not torch.allclose(factor_only, plain)
