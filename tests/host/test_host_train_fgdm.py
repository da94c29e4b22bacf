"""FG-DM factor trainer on the host's tiny SD-1.5 (CPU, synthetic shapes): the loss goes down,
a resumed run continues the uninterrupted one, the export loads in FGDM Factor Loader, and
torchrun with two gloo ranks ends with identical weights."""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfy_harness import apply_patched_model
from harness_env import REPO_ROOT, comfyui_path
from locref_core.data.synthetic import make_synthetic_coco
from locref_core.fgdm.weights import load_factor
from locref_core.train import fgdm
from locref_core.train.common import weights_digest

LOG = logging.getLogger(__name__)
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return make_synthetic_coco(tmp_path_factory.mktemp("shapes"), n_images=8, size=64, seed=0)


def argv(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--comfyui", str(comfyui_path()), "--tiny-unet", "--device", "cpu",
            "--images", str(data["images"]), "--conditions", str(data["labels"]),
            "--captions", str(data["captions"]), "--size", "64", "--batch-size", "2",
            "--num-workers", "0", "--lr", "1e-3", "--seed", "0", "--log-every", "10",
            "--out", str(out), "--ckpt-dir", str(out.with_suffix("")) + "_ckpt", *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fgdm_out") / "factor.safetensors"
    return fgdm.main(argv(data, out, "--steps", "50", "--ckpt-every", "25"))


def test_fifty_steps_lower_the_training_loss(trained, data, tmp_path):
    losses = trained["losses"]
    assert len(losses) == 50 and all(torch.isfinite(torch.tensor(losses)))
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    # control: the same 50 steps (same batches, noise and timesteps) with a learning rate of 0
    frozen = fgdm.main(argv(data, tmp_path / "lr0.safetensors", "--steps", "50", "--lr", "0"))
    control = statistics.mean(frozen["losses"][-5:])
    LOG.info("FG-DM tiny run, seed 0: mean loss of steps 1-5 %.4f, of steps 46-50 %.4f "
             "(lr 0: %.4f)", first, last, control)
    assert last < 0.9 * first  # measured: 1.2013 -> 0.9763
    assert last < 0.9 * control  # measured: 0.9763 vs 1.1699


def test_the_exported_factor_loads_in_the_factor_loader_and_runs(trained, tiny_sd15):
    import folder_paths
    from test_host_nodes_inprocess import load_pack

    pack = load_pack()
    out = Path(trained["out"])
    folder_paths.add_model_folder_path("fgdm", str(out.parent))
    [factor] = pack.NODE_CLASS_MAPPINGS["FGDMFactorLoader"]().load(out.name)
    assert factor.cfg.kind == "seg" and factor.cfg.channels == (32, 64, 128, 128)
    assert weights_digest(factor) == trained["digest"]
    [model] = pack.NODE_CLASS_MAPPINGS["FGDMApplyFactor"]().apply(tiny_sd15, factor, 1.0)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    sigma = torch.full((1,), 3.0)
    patched = apply_patched_model(model, x, sigma, ctx)
    assert torch.isfinite(patched).all()
    assert not torch.allclose(patched, apply_patched_model(tiny_sd15, x, sigma, ctx))


def test_resume_continues_the_same_run(data, tmp_path):
    common = ("--distill-every", "2", "--ckpt-every", "3")
    full = fgdm.main(argv(data, tmp_path / "full.safetensors", "--steps", "6", *common))
    part_out = tmp_path / "part.safetensors"
    fgdm.main(argv(data, part_out, "--steps", "3", *common))
    ckpts = str(part_out.with_suffix("")) + "_ckpt"
    rest = fgdm.main(argv(data, part_out, "--steps", "6", "--resume", ckpts, *common))
    assert rest["losses"] == full["losses"][3:]
    assert rest["digest"] == full["digest"]
    exported = tmp_path / "exported.safetensors"
    fgdm.main(["--export", ckpts, "--out", str(exported)])
    assert weights_digest(load_factor(str(exported))) == full["digest"]


def test_resume_with_other_flags_is_refused(data, tmp_path):
    out = tmp_path / "a.safetensors"
    fgdm.main(argv(data, out, "--steps", "1"))
    ckpts = str(out.with_suffix("")) + "_ckpt"
    with pytest.raises(ValueError, match="resume with the same flags"):
        fgdm.main(argv(data, out, "--steps", "2", "--resume", ckpts, "--no-time-conditioned"))
    with pytest.raises(ValueError, match=r"trained with --offset-noise 0, this run asks 0\.1"):
        fgdm.main(argv(data, out, "--steps", "2", "--resume", ckpts, "--offset-noise", "0.1"))
    with pytest.raises(ValueError, match=r"trained with --loss-weight eps, this run asks v"):
        fgdm.main(argv(data, out, "--steps", "2", "--resume", ckpts, "--loss-weight", "v"))


def test_gradient_checkpointing_gives_the_same_losses(data, tmp_path):
    flags = ("--steps", "2", "--distill-every", "1")
    plain = fgdm.main(argv(data, tmp_path / "a.safetensors", *flags))
    ckpt = fgdm.main(argv(data, tmp_path / "b.safetensors", *flags, "--grad-checkpointing"))
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    a = load_factor(str(tmp_path / "a.safetensors"))
    b = load_factor(str(tmp_path / "b.safetensors"))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_the_text_cache_gives_the_same_losses_and_weights(data, tmp_path):
    flags = ("--steps", "3", "--null-prob", "0.5")  # the empty caption comes back from the cache
    plain = fgdm.main(argv(data, tmp_path / "a.safetensors", *flags))
    cached = fgdm.main(argv(data, tmp_path / "b.safetensors", *flags, "--text-cache", "64"))
    assert cached["losses"] == plain["losses"] and cached["digest"] == plain["digest"]
    with pytest.raises(ValueError, match="--text-cache -1"):
        fgdm.main(argv(data, tmp_path / "c.safetensors", "--steps", "1", "--text-cache", "-1"))


def test_offset_noise_is_drawn_only_when_asked(data, tmp_path):
    """--offset-noise 0 keeps the default run's draws (losses and weights to the bit); a
    non-zero offset changes every step's noise, hence the losses."""
    flags = ("--steps", "3", "--distill-weight", "0")
    plain = fgdm.main(argv(data, tmp_path / "a.safetensors", *flags))
    zero = fgdm.main(argv(data, tmp_path / "b.safetensors", *flags, "--offset-noise", "0"))
    assert zero["losses"] == plain["losses"] and zero["digest"] == plain["digest"]
    offset = fgdm.main(argv(data, tmp_path / "c.safetensors", *flags, "--offset-noise", "0.5"))
    assert all(torch.isfinite(torch.tensor(offset["losses"])))
    assert all(a != b for a, b in zip(offset["losses"], plain["losses"]))
    noise = {name: safe_open(str(tmp_path / name), "pt").metadata()["offset_noise"]
             for name in ("a.safetensors", "c.safetensors")}
    assert noise == {"a.safetensors": "0", "c.safetensors": "0.5"}  # the file says how
    exported = tmp_path / "exported.safetensors"  # and so does one exported from a checkpoint
    fgdm.main(["--export", str(tmp_path / "c_ckpt"), "--out", str(exported)])
    assert safe_open(str(exported), "pt").metadata()["offset_noise"] == "0.5"


def test_the_v_loss_weight_keeps_the_draws_and_reweighs_the_rows(data, tmp_path):
    """--loss-weight v draws the same batches, timesteps and noise as the default (the
    weights are all that differ: with a learning rate of 0 and no distillation the two runs'
    weights stay equal) and changes every step's loss; the file, and a file exported from its
    checkpoint, say how it was trained."""
    flags = ("--steps", "3", "--distill-weight", "0", "--lr", "0")
    plain = fgdm.main(argv(data, tmp_path / "a.safetensors", *flags))
    v = fgdm.main(argv(data, tmp_path / "b.safetensors", *flags, "--loss-weight", "v"))
    assert v["digest"] == plain["digest"]
    assert all(torch.isfinite(torch.tensor(v["losses"])))
    assert all(a != b for a, b in zip(v["losses"], plain["losses"]))
    weight = {name: safe_open(str(tmp_path / name), "pt").metadata()["loss_weight"]
              for name in ("a.safetensors", "b.safetensors")}
    assert weight == {"a.safetensors": "eps", "b.safetensors": "v"}
    exported = tmp_path / "exported.safetensors"
    fgdm.main(["--export", str(tmp_path / "b_ckpt"), "--out", str(exported)])
    assert safe_open(str(exported), "pt").metadata()["loss_weight"] == "v"
    trained = fgdm.main(argv(data, tmp_path / "c.safetensors", "--steps", "3", "--distill-weight",
                             "0", "--loss-weight", "v"))
    assert trained["digest"] != plain["digest"]  # it trains


def test_bad_data_stops_before_any_step(data, tmp_path):
    args = argv(data, tmp_path / "x.safetensors", "--steps", "1")
    args[args.index("--conditions") + 1] = str(tmp_path / "no_such_labels")
    with pytest.raises(ValueError, match="no_such_labels"):
        fgdm.main(args)
    assert not (tmp_path / "x_ckpt").exists()


def test_torchrun_two_cpu_ranks_end_with_identical_weights(data, tmp_path):
    out = tmp_path / "ddp.safetensors"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m",
           "locref_core.train.fgdm", *argv(data, out, "--steps", "4", "--distill-every", "2")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = proc.stdout + proc.stderr
    assert "identical on 2 rank(s)" in logs, logs[-4000:]
    assert "4 steps/epoch" not in logs and "2 steps/epoch x 2 rank(s)" in logs  # sharded
    digest = weights_digest(load_factor(str(out)))
    assert f"weights digest {digest[:16]}" in logs


def test_attention_recorder_equals_the_host_attention_and_kl_reaches_the_adapter(tiny_sd15):
    from locref_core.fgdm.adapter import FactorAdapter, FactorConfig
    from locref_core.train.attention_maps import AttentionRecorder
    from locref_core.train.host import load_host, predict_eps
    from locref_core.train.losses import attention_kl

    host = load_host(comfyui_path())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    sigma = torch.full((2,), 2.0)
    teacher_rec = AttentionRecorder()
    teacher = teacher_rec.install(tiny_sd15.clone())
    with torch.no_grad():
        plain = predict_eps(host, tiny_sd15, x, sigma, ctx)
        recorded = predict_eps(host, teacher, x, sigma, ctx)
    assert torch.allclose(plain, recorded, atol=1e-5)  # same attention, materialised
    t_self, g_self = teacher_rec.take("self")
    t_cross, g_cross = teacher_rec.take("cross")
    assert g_self == [(8, 4)] * 5 and len(t_cross) == 16  # 1/2-grid self sites, all 16 cross
    assert t_self[0].shape == (2, 32, 32) and t_cross[0].shape == (2, 128, 77)
    assert torch.allclose(t_cross[6].sum(-1), torch.ones(()), atol=1e-5)

    torch.manual_seed(0)
    adapter = FactorAdapter(FactorConfig(channels=(32, 64, 128, 128), emb_channels=128))
    student_rec = AttentionRecorder()
    student = tiny_sd15.clone()
    host.patcher_extension.add_wrapper_with_key(
        host.patcher_extension.WrappersMP.DIFFUSION_MODEL, fgdm.WRAPPER_KEY,
        fgdm.TrainableFactorWrapper(adapter), student.model_options, is_model_options=True)
    predict_eps(host, student_rec.install(student), x, sigma, ctx)
    s_self, _ = student_rec.take("self")
    s_cross, _ = student_rec.take("cross")
    loss = attention_kl(t_self, s_self, grids=g_self) + attention_kl(t_cross, s_cross,
                                                                     grids=g_cross)
    assert loss.item() > 0
    loss.backward()
    assert adapter.conv_in.weight.grad.abs().sum() > 0
    tiny_sd15.model.zero_grad(set_to_none=True)  # the shared fixture is not frozen
