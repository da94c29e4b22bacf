"""The shapes world's base model in the host's classes: trains, saves, loads exactly, samples
through the host's sampler, and the pack's two trainers adapt it (--world-base)."""

from __future__ import annotations

import dataclasses
import glob
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from harness_env import comfyui_path
from locref_core.data.locref_dataset import load_rgb
from locref_core.data.synthetic import make_synthetic_coco
from locref_core.train import fgdm, locref
from locref_core.train.host import encode_text, load_host, predict_eps, unet_denoised
from locref_core.world import base
from locref_core.world.models import WorldConfig, build_world, load_world, save_world


@pytest.fixture(scope="module")
def host():
    return load_host(comfyui_path(), cpu=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("world"), n_images=8, size=64, seed=0)


@pytest.fixture(scope="module")
def world(host, data, tmp_path_factory):
    """A base trained for a few steps and saved: (path, parts, config, losses)."""
    files = sorted(glob.glob(str(data["images"] / "*.png")))
    images = torch.stack([load_rgb(f) * 2 - 1 for f in files])  # (N, 3, 64, 64) in [-1, 1]
    cfg = WorldConfig()
    parts = build_world(host, cfg)
    vae_losses = base.train_vae(parts, images, steps=4, batch=4)
    latents = base.encode_latents(parts, images)
    cfg = dataclasses.replace(cfg, latent_scale=base.fit_latent_scale(parts, latents))
    captions = [["a red square"], ["a blue disc"]] * 4
    unet_losses = base.train_unet(host, parts, latents, captions, steps=4, batch=4)
    path = str(tmp_path_factory.mktemp("base") / "base.safetensors")
    save_world(path, parts, cfg, {"test": "1"})
    return path, parts, cfg, vae_losses + unet_losses, latents


def test_base_trains_on_a_quarter_size_latent(world):
    _, parts, cfg, losses, latents = world
    assert all(np.isfinite(losses)) and len(losses) == 8
    assert latents.shape == (8, 4, 16, 16) and cfg.downscale == 4
    assert cfg.latent_scale == pytest.approx(1 / latents.std().item())
    assert not any(p.requires_grad for p in parts.unet.parameters())  # frozen after training
    assert not any(p.requires_grad for p in parts.vae.first_stage_model.parameters())


def test_saved_base_loads_exactly(host, world):
    path, parts, cfg, _, latents = world
    loaded, loaded_cfg = load_world(host, path)
    assert loaded_cfg == cfg and cfg.prediction == "eps"
    assert loaded.patcher.model.model_type == host.model_base.ModelType.EPS
    assert loaded.patcher.model.latent_format.scale_factor == pytest.approx(cfg.latent_scale)
    x, sigma = torch.randn(2, 4, 16, 16), torch.full((2,), 3.0)
    ctx = encode_text(parts.clip, ["a red square", ""])
    assert torch.equal(encode_text(loaded.clip, ["a red square", ""]), ctx)
    assert torch.equal(predict_eps(host, loaded.patcher, x, sigma, ctx),
                       predict_eps(host, parts.patcher, x, sigma, ctx))
    ae, ae2 = parts.vae.first_stage_model, loaded.vae.first_stage_model
    assert torch.equal(ae.decode(latents[:2]), ae2.decode(latents[:2]))


def test_norm_groups_reach_every_unet_norm_the_saved_file_and_the_controlnet(host, world,
                                                                            tmp_path):
    """--unet-norm-groups 4: the same weights normalised in 4 groups (another function of the
    input), kept through save and load, and the seg ControlNet copied from it normalises alike."""
    from locref_core.world import controlnet as world_cn
    from locref_core.world.models import norm_groups

    path, parts, cfg, _, latents = world
    grouped = dataclasses.replace(cfg, unet_norm_groups=4)
    other = build_world(host, grouped)
    other.unet.load_state_dict(parts.unet.state_dict())
    norms = [m for m in other.unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 20 and {m.num_groups for m in norms} == {4}
    assert norm_groups(parts.unet) == 32
    context = encode_text(parts.clip, ["a red square"])
    sigma = torch.tensor([1.0])
    same_weights = [unet_denoised(host, p.patcher, latents[:1], sigma, context)
                    for p in (parts, other)]
    assert not torch.allclose(*same_weights, atol=1e-4)  # the groups change the function
    saved = str(tmp_path / "g4.safetensors")
    save_world(saved, other, grouped, {})
    loaded, loaded_cfg = load_world(host, saved)
    assert loaded_cfg.unet_norm_groups == 4 and norm_groups(loaded.unet) == 4
    assert torch.equal(unet_denoised(host, loaded.patcher, latents[:1], sigma, context),
                       same_weights[1])
    assert norm_groups(world_cn.build_controlnet(host, loaded)) == 4
    assert norm_groups(world_cn.build_controlnet(host, parts)) == 32


def test_sampling_through_the_host_sampler(host, world):
    _, parts, cfg, _, _ = world
    images = base.sample_images(host, parts.patcher, parts, ["a red square", "a blue disc"],
                                [0, 1], cfg, steps=2)
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    again = base.sample_images(host, parts.patcher, parts, ["a red square"], [0], cfg, steps=2)
    assert torch.equal(again[0], images[0])  # a seed gives the same image
    # a region over the whole canvas leaves the image's own text no room: its text alone speaks
    whole, left = torch.ones(64, 64), torch.zeros(64, 64)
    left[:, :32] = 1
    masked = base.sample_images(host, parts.patcher, parts, ["a blue disc", "a blue disc"], [0, 0],
                                cfg, steps=2, regions=[[("a red square", whole)],
                                                       [("a red square", left)]])
    assert torch.allclose(masked[0], images[0], atol=1e-5)
    blue = base.sample_images(host, parts.patcher, parts, ["a blue disc"], [0], cfg, steps=2)[0]
    for other in (images[0], blue):  # a region over half of it: neither text's image
        assert not torch.allclose(masked[1], other, atol=1e-3)


def test_the_unet_trains_on_the_mse_of_what_it_predicts(host, world, tmp_path):
    """A v base (--prediction v) runs on the host's V_PREDICTION maths and its training loss
    is the error of the raw v output (recovered here from the host's denoised); an epsilon
    base's loss is the plain epsilon MSE, computed as before the option existed."""
    _, eps_parts, _, _, latents = world
    parts = build_world(host, WorldConfig(prediction="v"))
    assert isinstance(parts.patcher.model.model_sampling, host.model_sampling.V_PREDICTION)
    path = str(tmp_path / "v.safetensors")
    save_world(path, parts, WorldConfig(prediction="v"), {})
    model_type = load_world(host, path)[0].patcher.model.model_type
    assert model_type == host.model_base.ModelType.V_PREDICTION
    x0 = parts.patcher.model.latent_format.process_in(latents[:3])
    noise, sigma = torch.randn(x0.shape), torch.tensor([0.1, 1.5, 14.0])
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    ctx = encode_text(parts.clip, ["a red square", "", "a blue disc"])
    denoised = unet_denoised(host, parts.patcher, x, sigma, ctx)
    s, root = sigma.view(-1, 1, 1, 1), (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
    v_out = (x / root ** 2 - denoised) * root / s  # the UNet's raw output
    v_target = (noise - s * x0) / root
    error = ((x - denoised) / s - noise).square()
    assert base.objective(host, parts, error, sigma).item() == pytest.approx(
        (v_out - v_target).square().mean().item(), rel=1e-4)
    assert not isinstance(eps_parts.patcher.model.model_sampling, host.model_sampling.V_PREDICTION)
    assert torch.equal(base.objective(host, eps_parts, error, sigma), error.mean())


def test_a_file_that_is_not_a_world_base_is_refused(host, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not a shapes-world base"):
        load_world(host, str(path))


def test_the_pack_trainers_adapt_the_world_base(world, data, tmp_path):
    path = world[0]
    common = ["--comfyui", str(comfyui_path()), "--world-base", path, "--device", "cpu",
              "--images", str(data["images"]), "--captions", str(data["captions"]),
              "--size", "64", "--batch-size", "2", "--num-workers", "0", "--steps", "2",
              "--log-every", "1"]
    out = locref.main(common + ["--instances", str(data["instances"]), "--ref-size", "32",
                                "--out", str(tmp_path / "locref.safetensors"),
                                "--tensorboard", str(tmp_path / "tb_locref"),
                                "--preview-every", "2"])
    assert len(out["losses"]) == 2 and len(out["fired"]) == 16
    events = read_events(tmp_path / "tb_locref")
    assert events["scalars"]["locref/loss"] == pytest.approx(out["losses"])
    assert events["images"] == {"locref/target": [2], "locref/denoised": [2]}
    out = fgdm.main(common + ["--conditions", str(data["labels"]), "--kind", "seg",
                              "--out", str(tmp_path / "seg.safetensors"),
                              "--tensorboard", str(tmp_path / "tb_fgdm")])
    assert len(out["losses"]) == 2 and np.isfinite(out["losses"]).all()
    events = read_events(tmp_path / "tb_fgdm")
    assert events["scalars"]["fgdm_seg/loss"] == pytest.approx(out["losses"])
    assert set(events["scalars"]) == {"fgdm_seg/loss", "fgdm_seg/eps", "fgdm_seg/kl"}
    assert events["images"] == {}  # --preview-every 500: none in 2 steps


def test_bf16_autocast_trains_every_stage_on_fp32_weights(host, data, world, tmp_path):
    """--precision bf16: the VAE, the UNet and the seg ControlNet train with their forward passes
    in bfloat16 (each first loss near fp32's and not equal to it, the weights still fp32 and
    other than fp32's), and the pack's trainers take
    --mixed-precision bf16 on a CPU. fp32 (amp None) is what every run before it trained."""
    from locref_core.world import controlnet as wcn

    files = sorted(glob.glob(str(data["images"] / "*.png")))
    images = torch.stack([load_rgb(f) * 2 - 1 for f in files])
    captions = [["a red square"], ["a blue disc"]] * 4
    runs = {}
    for amp in (None, torch.bfloat16):
        parts = build_world(host, WorldConfig())
        vae = base.train_vae(parts, images, steps=2, batch=4, amp=amp)
        latents = base.encode_latents(parts, images)
        unet = base.train_unet(host, parts, latents, captions, steps=2, batch=4, ema=0.0,
                               amp=amp)
        model = wcn.build_controlnet(host, parts, seed=0)
        control = wcn.train_controlnet(host, parts, model, latents, (images + 1) / 2, captions,
                                       2, batch=2, amp=amp)
        runs[amp] = (vae, unet, control, parts, model)
    for i, name in enumerate(("VAE", "UNet", "ControlNet")):
        fp32, bf16 = runs[None][i][0], runs[torch.bfloat16][i][0]
        assert np.isfinite(runs[torch.bfloat16][i]).all(), name
        assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.1), name
    parts, model = runs[torch.bfloat16][3:]
    for module in (parts.vae.first_stage_model, parts.unet, model):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert not torch.equal(parts.unet.out[2].weight, runs[None][3].unet.out[2].weight)
    out = locref.main(["--comfyui", str(comfyui_path()), "--world-base", world[0],
                       "--device", "cpu", "--images", str(data["images"]),
                       "--captions", str(data["captions"]), "--instances", str(data["instances"]),
                       "--ref-size", "32", "--size", "64", "--batch-size", "2",
                       "--num-workers", "0", "--steps", "2", "--mixed-precision", "bf16",
                       "--out", str(tmp_path / "locref.safetensors")])
    assert len(out["losses"]) == 2 and np.isfinite(out["losses"]).all()


def read_events(folder):
    """TensorBoard's own reader: scalar values per tag, image steps per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    return {"scalars": {t: [e.value for e in acc.Scalars(t)] for t in tags["scalars"]},
            "images": {t: [e.step for e in acc.Images(t)] for t in tags["images"]}}


class Stopped(Exception):
    """Stands for a run stopped part-way (Ctrl-C, the machine taken back)."""


def stop_after(n: int):
    def on_step(step: int, loss: float) -> None:
        if step + 1 == n:
            raise Stopped
    return on_step


def test_a_stopped_base_continues_from_its_checkpoints_to_the_same_weights(host, data,
                                                                           tmp_path):
    from locref_core.train.common import list_checkpoints, weights_digest

    files = sorted(glob.glob(str(data["images"] / "*.png")))
    images = torch.stack([load_rgb(f) * 2 - 1 for f in files])
    captions = [["a red square"], ["a blue disc"]] * 4
    ckpt = lambda name, steps: base.LoopCheckpoints(tmp_path / name, 2, {"steps": steps})  # noqa: E731

    never = build_world(host, WorldConfig())  # a run never stopped
    vae_losses = base.train_vae(never, images, steps=4, batch=4)
    unet_losses = base.train_unet(host, never, base.encode_latents(never, images), captions,
                                  steps=5, batch=4)

    first = build_world(host, WorldConfig())  # stopped in the VAE after its step 3
    with pytest.raises(Stopped):
        base.train_vae(first, images, 4, 4, checkpoints=ckpt("vae", 4), on_step=stop_after(3))
    second = build_world(host, WorldConfig())  # a new process: the VAE from its step 2 ...
    assert base.train_vae(second, images, 4, 4, checkpoints=ckpt("vae", 4)) == vae_losses
    with pytest.raises(Stopped):  # ... then stopped in the UNet after its step 3
        base.train_unet(host, second, base.encode_latents(second, images), captions, 5, 4,
                        checkpoints=ckpt("unet", 5), on_step=stop_after(3))
    assert [Path(c).name for c in list_checkpoints(str(tmp_path / "unet"))] == ["step_00000002"]
    third = build_world(host, WorldConfig())  # the VAE done, the UNet from its step 2, EMA too
    assert base.train_vae(third, images, 4, 4, checkpoints=ckpt("vae", 4)) == vae_losses
    latents = base.encode_latents(third, images)
    assert base.train_unet(host, third, latents, captions, 5, 4,
                           checkpoints=ckpt("unet", 5)) == unet_losses
    for name, part in (("unet", lambda p: p.unet), ("vae", lambda p: p.vae.first_stage_model)):
        assert weights_digest(part(third)) == weights_digest(part(never)), name
    with pytest.raises(ValueError, match=r"another run: delete .*unet to train this stage"):
        base.train_unet(host, build_world(host, WorldConfig()), latents, captions, 6, 4,
                        checkpoints=ckpt("unet", 6))


def _train_shared(rank: int, world: int, comfyui: str, store: str, images: torch.Tensor,
                  captions: list, out: str) -> None:
    """One of `world` processes training a base together (base.Share); each saves its weights
    and losses to `out` + its rank."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        host = load_host(comfyui, cpu=True)
        parts, share = build_world(host, WorldConfig()), base.Share(rank, world)
        vae = base.train_vae(parts, images, 4, 4, maps=images.flip(-1), share=share)
        latents = base.encode_latents(parts, images)
        unet = base.train_unet(host, parts, latents, captions, 4, 4, share=share)
        tensors = {f"unet.{k}": v for k, v in parts.unet.state_dict().items()}
        tensors.update({f"vae.{k}": v for k, v in
                        parts.vae.first_stage_model.state_dict().items()})
        tensors["losses"] = torch.tensor(vae + unet)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_train_the_batches_one_process_trains(host, data, tmp_path):
    """Two processes training the base together (base.Share, each computing half of every
    batch, as benchmarks/base_processes.py times them) end with the same weights as each other,
    and with one process's weights and losses up to the sums' rounding (a process computing the
    wrong rows would see other images)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    files = sorted(glob.glob(str(data["images"] / "*.png")))
    images = torch.stack([load_rgb(f) * 2 - 1 for f in files])
    captions = [["a red square"], ["a blue disc", "a blue disc and a red square"]] * 4
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        alone = build_world(host, WorldConfig())
        losses = base.train_vae(alone, images, 4, 4, maps=images.flip(-1))
        losses += base.train_unet(host, alone, base.encode_latents(alone, images), captions,
                                  4, 4)
    mp.spawn(_train_shared, args=(2, str(comfyui_path()), (tmp_path / "store").as_uri(), images,
                                  captions, str(tmp_path / "rank")), nprocs=2)
    ranks = [load_file(str(tmp_path / f"rank{r}")) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # bit for bit
    assert ranks[0]["losses"].tolist() == pytest.approx(losses, rel=1e-4)
    for prefix, module in (("unet.", alone.unet), ("vae.", alone.vae.first_stage_model)):
        state = module.state_dict()
        apart = torch.cat([(ranks[0][prefix + k] - v).reshape(-1) for k, v in state.items()])
        whole = torch.cat([v.reshape(-1) for v in state.values()])
        # Adam moves a weight whose gradient is near zero by about lr a step whatever its sign,
        # so single weights may differ by that; the whole differs by 5e-5 (UNet), 1.2e-4 (VAE)
        assert apart.norm() <= 1e-3 * whole.norm(), prefix
    with pytest.raises(ValueError, match="batch 5 cannot be shared by 2 processes"):
        base.Share(1, 2).rows(5)
    with pytest.raises(ValueError, match="the rank must be in 0..world - 1"):
        base.Share(2, 2)


def test_base_processes_benchmark_times_both_sides():
    """benchmarks/base_processes.py: one process on two threads against two sharing processes,
    each a fresh process (or two) that trains; a timing per round and side, and their ratio."""
    from harness_env import load_benchmark

    bench = load_benchmark("base_processes")
    out = bench.main(["--comfyui", str(comfyui_path()), "--stage", "vae", "--steps", "3",
                      "--warmup", "1", "--rounds", "1"])
    assert [len(v) for v in out["times"].values()] == [1, 1]
    one, two = (v[0] for v in out["times"].values())
    assert one > 0 and two > 0 and out["ratio"] == pytest.approx(one / two)
    with pytest.raises(SystemExit):
        bench.parse_args(["--comfyui", "x", "--steps", "2", "--warmup", "1"])


def test_base_processes_benchmark_times_the_compiled_side(caplog):
    """--versus compile: the other side is one process on two threads through torch.compile (its
    first step, compiling, left out of the timing and logged)."""
    from harness_env import load_benchmark

    bench = load_benchmark("base_processes")
    with caplog.at_level(logging.INFO, logger="base_processes"):
        out = bench.main(["--comfyui", str(comfyui_path()), "--stage", "vae", "--steps", "3",
                          "--warmup", "1", "--rounds", "1", "--versus", "compile"])
    assert list(out["times"]) == ["one process, two threads", "one process, two threads, compiled"]
    one, compiled = (v[0] for v in out["times"].values())
    assert one > 0 and compiled > 0 and out["ratio"] == pytest.approx(one / compiled)
    assert "compiled side: its first step (compiling) took" in caplog.text
    assert "one process, two threads, compiled: " in caplog.text
