"""The loop pieces both trainers share: flags, one optimizer step, the checkpoint cadence."""

import argparse
import json
import os

import pytest
import torch

from locref_core.train.common import DistEnv, list_checkpoints, load_checkpoint
from locref_core.train.loop import (
    add_optimizer_flags,
    add_output_flags,
    add_precision_flags,
    checkpoint_if_due,
    ckpt_dir,
    optimizer_step,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    g = p.add_argument_group("optimisation")
    add_optimizer_flags(g, steps=7, lr_help=" (note)")
    add_precision_flags(g)
    add_output_flags(p, "thing.safetensors", "models/thing")
    return p


def test_flags_and_defaults():
    args = parser().parse_args([])
    assert (args.steps, args.batch_size, args.lr, args.warmup_steps) == (7, 8, 1e-4, 0)
    assert (args.mixed_precision, args.grad_checkpointing) == ("auto", False)
    assert (args.out, args.ckpt_every, args.keep_checkpoints) == ("thing.safetensors", 1000, 2)
    assert ckpt_dir(args) == "thing_checkpoints"
    assert ckpt_dir(parser().parse_args(["--ckpt-dir", "runs/a"])) == "runs/a"
    assert "(note)" in parser().format_help()


def step_once(args, step, grad):
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=123.0)  # the step sets the real lr
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer_step((w * grad).sum(), opt, scaler, [w], args, step)
    return w.detach(), opt.param_groups[0]["lr"]


@pytest.mark.parametrize("step, lr", [(0, 0.025), (1, 0.05), (3, 0.1), (10, 0.1)])
def test_linear_warmup(step, lr):
    args = parser().parse_args(["--lr", "0.1", "--warmup-steps", "4"])
    w, used = step_once(args, step, torch.tensor([1.0, -2.0]))
    assert used == pytest.approx(lr)
    assert torch.allclose(w, -lr * torch.tensor([1.0, -2.0]))


def test_gradient_norm_is_clipped_only_when_asked():
    grad = torch.tensor([3.0, 4.0])  # norm 5
    w, _ = step_once(parser().parse_args(["--lr", "1", "--max-grad-norm", "1"]), 0, grad)
    assert torch.allclose(w, -grad / 5, atol=1e-6)
    w, _ = step_once(parser().parse_args(["--lr", "1"]), 0, grad)
    assert torch.allclose(w, -grad)


def test_checkpoints_every_n_steps_and_at_the_end(tmp_path):
    args = parser().parse_args(["--steps", "5", "--ckpt-every", "2", "--keep-checkpoints", "0",
                                "--ckpt-dir", str(tmp_path / "ck")])
    args.start_step = 0  # set by the trainers; not saved with the flags
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(net.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(args.steps):
        checkpoint_if_due(DistEnv(), args, step, net, '{"c": 1}', opt, scaler)
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "ck"))]
    assert names == ["step_00000002", "step_00000004", "step_00000005"]
    saved = load_checkpoint(str(tmp_path / "ck"), net, opt, '{"c": 1}')
    assert saved["step"] == 5 and "scaler" in saved["extra"]


def test_only_rank_0_writes(tmp_path):
    args = parser().parse_args(["--steps", "1", "--ckpt-dir", str(tmp_path / "ck")])
    args.start_step = 0
    net = torch.nn.Linear(2, 1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoint_if_due(DistEnv(rank=1, world_size=1), args, 0, net, "{}",
                      torch.optim.AdamW(net.parameters()), scaler)
    assert not (tmp_path / "ck").exists()


def test_tensorboard_without_the_package_is_a_clear_error(monkeypatch):
    import sys

    from locref_core.train.loop import TrainLog, check_tensorboard

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
        check_tensorboard(argparse.Namespace(tensorboard="runs/tb"))
    check_tensorboard(argparse.Namespace(tensorboard=None))  # off: nothing to check
    off = TrainLog(DistEnv(), argparse.Namespace(tensorboard=None, preview_every=1), "x")
    assert off.writer is None and not off.preview_due(0)
    off.scalars(1, {"loss": 1.0})  # no-ops without a writer
    off.close()


@pytest.mark.parametrize("bad", ["-0.1", "2"])
def test_the_factor_trainer_refuses_an_offset_noise_outside_0_1(bad, tmp_path):
    from locref_core.train import fgdm

    args = fgdm.build_parser().parse_args([
        "--comfyui", str(tmp_path), "--tiny-unet", "--images", str(tmp_path),
        "--conditions", str(tmp_path), "--offset-noise", bad])
    with pytest.raises(ValueError, match=rf"--offset-noise {bad}\b.*\[0, 1\]"):
        fgdm.check_args(args, have_dataset=False)


def test_the_factor_losses_v_weight_is_one_plus_sigma_squared_with_mean_1_over_the_schedule():
    from locref_core.train import fgdm

    sigmas = torch.tensor([0.1, 1.0, 3.0])  # 1 + s^2: 1.01, 2, 10; mean 13.01 / 3
    assert fgdm.loss_weights(sigmas, sigmas, "eps") is None  # the plain MSE, as before
    w = fgdm.loss_weights(sigmas, torch.tensor([3.0, 0.1]), "v")
    assert torch.allclose(w, torch.tensor([10.0, 1.01]) * 3 / 13.01)
    assert torch.allclose(fgdm.loss_weights(sigmas, sigmas, "v").mean(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="--loss-weight 'snr': use one of eps, v"):
        fgdm.loss_weights(sigmas, sigmas, "snr")
    with pytest.raises(SystemExit):  # argparse refuses it first
        fgdm.build_parser().parse_args(["--loss-weight", "snr"])


def test_factor_export_metadata_from_flags_or_a_checkpoints_record():
    """One list of training flags in an exported factor: the run's own (vars(args)) and a
    checkpoint's recorded args give the same metadata; a record from before the flags gets
    their defaults."""
    from locref_core.train import fgdm

    args = fgdm.build_parser().parse_args(
        ["--comfyui", "c", "--checkpoint", "/m/sd15.safetensors", "--images", "i",
         "--conditions", "k", "--offset-noise", "0.5", "--loss-weight", "v", "--lr", "3e-4"])
    meta = fgdm._export_meta(1500, vars(args))
    assert meta == {"trainer": "locref_core.train.fgdm", "trained_steps": "1500",
                    "offset_noise": "0.5", "loss_weight": "v", "lr": "0.0003",
                    "base_model": "sd15.safetensors"}
    recorded = json.loads(json.dumps(vars(args), default=str))  # as save_checkpoint writes it
    assert fgdm._export_meta("1500", recorded) == meta
    old = fgdm._export_meta("75", {"steps": 75})
    assert (old["offset_noise"], old["loss_weight"], "base_model" in old) == ("0", "eps", False)
    assert "lr" not in old  # a record without the rate says nothing of it


def test_the_factors_norms_follow_the_unets_unless_asked():
    """factor_config: the adapter's widths from the UNet, its GroupNorm groups the UNet's own
    (32 for SD-1.5) or --norm-groups."""
    from locref_core.train import fgdm

    class TinyUNet(torch.nn.Module):
        model_channels, channel_mult = 32, (1, 2, 4, 4)

        def __init__(self, groups):
            super().__init__()
            self.norms = torch.nn.ModuleList([torch.nn.GroupNorm(groups, 32),
                                              torch.nn.GroupNorm(groups, 64)])
            self.time_embed = torch.nn.Sequential(torch.nn.Linear(32, 128))

    flags = ["--comfyui", "c", "--images", "i", "--conditions", "k"]
    args = fgdm.build_parser().parse_args(flags)
    for groups in (32, 4):
        cfg = fgdm.factor_config(args, TinyUNet(groups))
        assert (cfg.channels, cfg.emb_channels, cfg.norm_groups) == ((32, 64, 128, 128), 128,
                                                                     groups)
    asked = fgdm.build_parser().parse_args([*flags, "--norm-groups", "8"])
    assert fgdm.factor_config(asked, TinyUNet(32)).norm_groups == 8
    with pytest.raises(ValueError, match="norm_groups=3 must divide"):
        fgdm.factor_config(fgdm.build_parser().parse_args([*flags, "--norm-groups", "3"]),
                           TinyUNet(32))


def test_a_checkpoint_from_before_norm_groups_resumes_a_run_that_means_the_same(tmp_path):
    """Its config JSON lacks norm_groups (32 by default): the same adapter, so it resumes; a
    run asking 4 groups gets the checkpoint refused by load_checkpoint."""
    from locref_core.fgdm.adapter import FactorAdapter, FactorConfig
    from locref_core.train import fgdm
    from locref_core.train.common import load_checkpoint, save_checkpoint

    cfg = FactorConfig(channels=(32, 64, 128, 128), emb_channels=128)
    old = json.loads(cfg.to_json())
    del old["norm_groups"]
    adapter = FactorAdapter(cfg)
    opt = torch.optim.AdamW(adapter.parameters())
    save_checkpoint(str(tmp_path), 5, adapter, opt, json.dumps(old, sort_keys=True), {}, {})
    said = fgdm.resumed_config(str(tmp_path), cfg)
    assert said == json.dumps(old, sort_keys=True)
    assert load_checkpoint(str(tmp_path), FactorAdapter(cfg), None, said)["step"] == 5
    four = FactorConfig(channels=(32, 64, 128, 128), emb_channels=128, norm_groups=4)
    with pytest.raises(ValueError, match="same flags"):
        load_checkpoint(str(tmp_path), FactorAdapter(four), None,
                        fgdm.resumed_config(str(tmp_path), four))
