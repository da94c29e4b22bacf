"""The shapes world's FG-DM parts: the seg ControlNet in the host's class (ControlNet's
initialisation, training with the base frozen, exact save/load, sampling through the host's
sampler as ControlNetApplyAdvanced wires it) and the pack's SBPC node on a /4 VAE."""

from __future__ import annotations

import pytest
import torch

from harness_env import comfyui_path
from locref_core.train.host import encode_text, load_host, predict_eps
from locref_core.world import base
from locref_core.world import controlnet as wcn
from locref_core.world.models import WorldConfig, build_world

CAPTIONS = [["a red square"], ["a blue disc and a green triangle"]]


@pytest.fixture(scope="module")
def host():
    return load_host(comfyui_path(), cpu=True)


@pytest.fixture(scope="module")
def world(host):
    cfg = WorldConfig()
    return build_world(host, cfg), cfg


def maps_and_latents(n=2):
    g = torch.Generator().manual_seed(0)
    maps = torch.zeros(n, 3, 64, 64)
    maps[:, 0] = 0.8  # a background colour, one square per map in another
    for i in range(n):
        x = 8 + 20 * i
        maps[i, :, 10:30, x:x + 20] = torch.tensor([0.1, 0.9, 0.2])[:, None, None]
    return maps, torch.randn(n, 4, 16, 16, generator=g)


def test_a_new_controlnet_copies_the_encoder_and_changes_nothing(host, world):
    parts, _ = world
    model = wcn.build_controlnet(host, parts, seed=0)
    unet = parts.unet.state_dict()
    own = model.state_dict()
    assert torch.equal(own["input_blocks.1.0.in_layers.2.weight"],
                       unet["input_blocks.1.0.in_layers.2.weight"])
    assert torch.equal(own["middle_block.0.in_layers.2.weight"],
                       unet["middle_block.0.in_layers.2.weight"])
    maps, x = maps_and_latents()
    sigma = torch.full((2,), 2.0)
    ctx = encode_text(parts.clip, ["a red square", ""])
    hint = wcn.hint_for(host, maps, 16)
    assert hint.shape == (2, 3, 128, 128)
    with torch.no_grad():
        control = wcn.control_of(parts, model, x, sigma, hint, ctx)
        assert len(control["output"]) == 12 and len(control["middle"]) == 1
        assert all(float(c.abs().max()) == 0.0 for c in control["output"] + control["middle"])
        assert torch.equal(predict_eps(host, parts.patcher, x, sigma, ctx, control=control),
                           predict_eps(host, parts.patcher, x, sigma, ctx))


def test_each_hint_init_starts_silent_and_kaiming_keeps_the_maps_apart(host, world):
    parts, _ = world
    maps, latents = maps_and_latents()
    hints = wcn.hint_for(host, maps, 16)
    models, spread = {}, {}
    for init in wcn.HINT_INITS:
        models[init] = wcn.build_controlnet(host, parts, seed=0, hint_init=init)
        spread[init] = wcn.hint_spread(models[init], hints)
        assert spread[init]["out"] == 0.0  # the hint block's last layer starts at zero
        use = wcn.map_use(host, parts, models[init], latents, maps)
        assert use["own"] == use["other"] == use["none"] > 0  # zero convolutions: no residual
    # only the hint block's convolutions but the last differ between the inits
    torch_init, kaiming = (m.state_dict() for m in models.values())
    differ = {k for k, v in torch_init.items() if not torch.equal(v, kaiming[k])}
    convs = [i for i, m in enumerate(models["torch"].input_hint_block)
             if isinstance(m, torch.nn.Conv2d)][:-1]
    assert differ == {f"input_hint_block.{i}.{p}" for i in convs for p in ("weight", "bias")}
    assert spread["kaiming"]["penultimate"] > 10 * spread["torch"]["penultimate"], spread
    # three steps on: which one tells the two maps apart in its prediction (torch's default
    # loses their difference in the hint block, below float precision here)
    gap = {}
    for init, model in models.items():
        wcn.train_controlnet(host, parts, model, latents, maps, CAPTIONS, steps=3, batch=2,
                             lr=1e-3, null_prob=0.0)
        use = wcn.map_use(host, parts, model, latents, maps)
        gap[init] = abs(use["other"] - use["own"])
    assert gap["kaiming"] > gap["torch"], gap
    with pytest.raises(ValueError, match="hint_init 'xavier': use one of torch, kaiming"):
        wcn.build_controlnet(host, parts, hint_init="xavier")


@pytest.fixture(scope="module")
def trained(host, world, tmp_path_factory):
    parts, _ = world
    model = wcn.build_controlnet(host, parts, seed=0)
    before_unet = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps, latents = maps_and_latents()
    losses = wcn.train_controlnet(host, parts, model, latents, maps, CAPTIONS, steps=3, batch=2,
                                  lr=1e-3, null_prob=0.0)
    path = str(tmp_path_factory.mktemp("cn") / "seg_controlnet.safetensors")
    wcn.save_controlnet(path, model, {"test": "1"})
    return model, path, losses, before, before_unet


def test_training_moves_only_the_controlnet(host, world, trained):
    parts, _ = world
    model, _, losses, before, before_unet = trained
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("zero_convs.") for k in changed)
    assert all(torch.equal(v, before_unet[k]) for k, v in parts.unet.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())  # frozen after training
    maps, latents = maps_and_latents()
    use = wcn.map_use(host, parts, model, latents, maps)
    assert use["own"] != use["none"]  # its residuals act now


def test_saved_controlnet_loads_exactly_and_other_files_are_refused(host, world, trained,
                                                                    tmp_path):
    from safetensors.torch import save_file

    parts, _ = world
    model, path, *_ = trained
    loaded = wcn.load_controlnet(host, parts, path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not a shapes-world seg ControlNet"):
        wcn.load_controlnet(host, parts, str(other))


def test_sampling_with_the_controlnet_follows_its_map(host, world, trained):
    parts, cfg = world
    control_net = wcn.wrap(host, trained[0])
    maps, _ = maps_and_latents()
    hints = [m.permute(1, 2, 0)[None] for m in maps]  # (1, H, W, 3) as IMAGE
    kw = {"steps": 2, "control_net": control_net}
    a = base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg,
                           maps=[hints[0]], **kw)
    again = base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg,
                               maps=[hints[0]], **kw)
    other_map = base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg,
                                   maps=[hints[1]], **kw)
    plain = base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg, steps=2)
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, again)
    assert not torch.equal(a, other_map) and not torch.equal(a, plain)
    # end_percent as ControlNetApplyAdvanced's: over none of the steps it is the plain image;
    # over the first 0.3 (of 2 steps, the first alone) neither the plain nor the whole range's
    never = base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg,
                               maps=[hints[0]], control_percent=(0.0, 0.0), **kw)
    early = base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg,
                               maps=[hints[0]], control_percent=(0.0, 0.3), **kw)
    assert torch.equal(never, plain)
    assert not torch.equal(early, plain) and not torch.equal(early, a)
    # strength as ControlNetApplyAdvanced's: its residuals scaled, 0 adding nothing
    silent = base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg,
                                maps=[hints[0]], control_strength=0.0, **kw)
    louder = base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg,
                                maps=[hints[0]], control_strength=2.0, **kw)
    assert torch.equal(silent, plain)
    assert not torch.equal(louder, plain) and not torch.equal(louder, a)
    # on the positive branch alone: another image at CFG 4 (the sampler's default here); at
    # CFG 1 the host samples the positive alone, so both wirings draw the same image
    positive = base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg,
                                  maps=[hints[0]], control_negative=False, **kw)
    assert not torch.equal(positive, a) and not torch.equal(positive, plain)
    at_1 = {negative: base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg,
                                         maps=[hints[0]], control_negative=negative,
                                         guidance=1.0, **kw) for negative in (True, False)}
    assert torch.equal(at_1[True], at_1[False]) and not torch.equal(at_1[True], a)
    given = [[encode_text(parts.clip, [""]), {}]]
    _, negative = wcn.with_control(control_net, [[given[0][0], {}]], given, hints[0],
                                   negative_too=False)
    assert negative is given and "control" not in negative[0][1]
    with pytest.raises(ValueError, match=r"percent range \(0.5, 0.2\) must satisfy"):
        base.sample_images(host, parts.patcher, parts, ["a red square"], [3], cfg,
                           maps=[hints[0]], control_percent=(0.5, 0.2), **kw)


def test_training_feeds_the_unet_what_the_host_wrapper_feeds_it(host, world, trained):
    """control_of (what train_controlnet adds to the UNet) and the host's own get_control (what
    the sampler adds once ControlNetApplyAdvanced has wired the map) give the same residuals:
    the ControlNet learns on exactly the inputs it is later run on (hint size and upscaling,
    c_in, sigma -> timestep, residual order)."""
    import comfy.model_management

    parts, _ = world
    model = trained[0]
    maps, latents = maps_and_latents()
    ctx = encode_text(parts.clip, ["a red square", "a blue disc and a green triangle"])
    positive, _ = wcn.with_control(wcn.wrap(host, model), [[ctx, {}]], [[ctx, {}]],
                                   maps.permute(0, 2, 3, 1))
    c_net = positive[0][1]["control"]
    sampling = parts.patcher.get_model_object("model_sampling")
    c_net.pre_run(parts.patcher.model, lambda p: sampling.percent_to_sigma(p))
    comfy.model_management.load_models_gpu([parts.patcher] + c_net.get_models())
    try:
        for s in (0.5, 8.0):
            sigma = torch.full((2,), s)
            x = latents * (1 + s)
            with torch.no_grad():
                ours = wcn.control_of(parts, model, x, sigma, wcn.hint_for(host, maps, 16), ctx)
                hosts = c_net.get_control(x, sigma, {"c_crossattn": ctx}, 1,
                                          {"cond_or_uncond": [0], "uuids": [None],
                                           "sigmas": sigma})
            assert [len(hosts[k]) for k in ("input", "middle", "output")] == [0, 1, 12]
            for key in ("middle", "output"):
                for a, b in zip(ours[key], hosts[key], strict=True):
                    assert torch.allclose(a, b, atol=1e-6), (s, key)
            assert any(float(r.abs().max()) > 0 for r in ours["output"])  # trained: not zero
    finally:
        c_net.cleanup()


def test_sbpc_node_samples_latents_at_the_vae_own_factor(host, world):
    """SBPC on a /4 VAE: 64 px maps are 16 x 16 latents (it used to assume SD's /8)."""
    from locref_core.fgdm.adapter import FactorAdapter, FactorConfig
    from test_host_nodes_inprocess import load_pack

    parts, _ = world
    unet = parts.unet
    factor = FactorAdapter(FactorConfig(
        kind="seg", palette="coco183", in_channels=4, time_conditioned=True,
        channels=tuple(unet.model_channels * m for m in unet.channel_mult),
        emb_channels=unet.time_embed[-1].out_features))
    nodes = load_pack().NODE_CLASS_MAPPINGS
    model = nodes["FGDMApplyFactor"]().apply(parts.patcher, factor, 1.0)[0]
    pos = [[encode_text(parts.clip, ["a tv"]), {}]]
    neg = [[encode_text(parts.clip, [""]), {}]]
    out = nodes["FGDMSBPCSelect"]().select(model, pos, neg, parts.vae, 2, 1, 2.0, "euler",
                                          "normal", 64, 64, 0, "tv", "coco183", 64, 64)
    image, _, _, recall, seed, _, latent = out["result"]
    assert latent["samples"].shape == (1, 4, 16, 16)
    assert image.shape == (1, 64, 64, 3) and 0.0 <= recall <= 1.0 and seed in (0, 1)
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        nodes["FGDMSBPCSelect"]().select(model, pos, neg, parts.vae, 1, 1, 2.0, "euler",
                                         "normal", 66, 64, 0, "tv", "coco183", 64, 64)


class Stopped(Exception):
    """Stands for a run stopped part-way."""


def test_a_stopped_controlnet_continues_from_its_checkpoints_to_the_same_weights(host, world,
                                                                                 tmp_path):
    from locref_core.train.common import weights_digest

    parts, _ = world
    maps, latents = maps_and_latents()
    kw = {"steps": 3, "batch": 2, "lr": 1e-3, "null_prob": 0.5}
    never = wcn.build_controlnet(host, parts, seed=0)
    losses = wcn.train_controlnet(host, parts, never, latents, maps, CAPTIONS, **kw)

    def stop_after_2(step, loss):
        if step + 1 == 2:
            raise Stopped

    ckpt = lambda: base.LoopCheckpoints(tmp_path, 1, {"steps": 3})  # noqa: E731
    with pytest.raises(Stopped):
        wcn.train_controlnet(host, parts, wcn.build_controlnet(host, parts, seed=0), latents,
                             maps, CAPTIONS, checkpoints=ckpt(), on_step=stop_after_2, **kw)
    model = wcn.build_controlnet(host, parts, seed=1)  # the checkpoint replaces these weights
    assert wcn.train_controlnet(host, parts, model, latents, maps, CAPTIONS,
                                checkpoints=ckpt(), **kw) == losses
    assert weights_digest(model) == weights_digest(never)


def test_a_v_weighted_loss_weighs_each_row_by_its_noise_level(host, world):
    """loss_weight "v": one row's loss is its epsilon MSE times the FG-DM trainer's v weight at
    the row's sigma (the same draws as the plain loss, from the same seed); other weights are
    refused by name."""
    from locref_core.train.fgdm import loss_weights

    parts, _ = world
    maps, latents = maps_and_latents()
    kw = {"steps": 1, "batch": 1, "lr": 1e-3}
    plain = wcn.train_controlnet(host, parts, wcn.build_controlnet(host, parts, seed=0), latents,
                                 maps, CAPTIONS, **kw)
    weighed = wcn.train_controlnet(host, parts, wcn.build_controlnet(host, parts, seed=0),
                                   latents, maps, CAPTIONS, loss_weight="v", **kw)
    sigmas = parts.patcher.model.model_sampling.sigmas
    ratios = loss_weights(sigmas, sigmas, "v")  # each level's weight
    ratio = weighed[0] / plain[0]
    assert ratio != pytest.approx(1.0, rel=1e-3)
    assert (ratios - ratio).abs().min() <= 1e-4 * ratio  # the row's own level's weight
    with pytest.raises(ValueError, match="loss_weight 'x0': use one of eps, v"):
        wcn.train_controlnet(host, parts, wcn.build_controlnet(host, parts, seed=0), latents,
                             maps, CAPTIONS, loss_weight="x0", **kw)
