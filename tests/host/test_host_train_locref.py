"""LocRef trainer on the host's tiny SD-1.5 (CPU, synthetic shapes, a 2-layer CLIP vision tower
of the host's class): the training patch equals the inference patch row by row, the loss goes
down, a resumed run continues the uninterrupted one, the export loads in LocRef Adapter Loader
and runs in LocRef Apply, torchrun with two gloo ranks ends with identical weights, and bad data
stops the trainer before any step."""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_harness import apply_patched_model
from harness_env import REPO_ROOT, comfyui_path
from test_host_locref_patch import patched
from locref_core.adapter import AdapterConfig, LocRefAdapter
from locref_core.data.coco import DataError
from locref_core.data.synthetic import make_synthetic_coco
from locref_core.grid import SD15_SITES
from locref_core.layout import Box, Layout, Reference
from locref_core.patch import LocRefState, LocRefTrainState, PatchSettings
from locref_core.train import locref
from locref_core.train.common import weights_digest
from locref_core.train.host import load_host, unet_denoised
from locref_core.weights import load_adapter

LOG = logging.getLogger(__name__)
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return make_synthetic_coco(tmp_path_factory.mktemp("shapes"), n_images=8, size=64, seed=0)


def argv(data: dict[str, Path], out: Path, *extra: str, models: tuple[str, ...] = ("--tiny-unet",)
         ) -> list[str]:
    return ["--comfyui", str(comfyui_path()), *models, "--device", "cpu",
            "--images", str(data["images"]), "--instances", str(data["instances"]),
            "--captions", str(data["captions"]), "--size", "64", "--ref-size", "32",
            "--batch-size", "2", "--num-workers", "0", "--lr", "1e-3", "--seed", "0",
            "--log-every", "10", "--out", str(out),
            "--ckpt-dir", str(out.with_suffix("")) + "_ckpt", *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("locref_out") / "locref.safetensors"
    return locref.main(argv(data, out, "--steps", "50", "--ckpt-every", "25"))


def test_training_state_equals_the_inference_state_row_by_row(tiny_sd15):
    """Two rows with different layouts in one training call give what two inference runs (one
    layout each) give; a row with zero embeddings gets the inference uncond (null) output; the
    loss reaches the projection and every site's keys/values."""
    torch.manual_seed(0)
    adapter = LocRefAdapter(AdapterConfig(tokens=2, hidden_dim=64, model_channels=32))
    unet = tiny_sd15.get_model_object("diffusion_model")
    red = Reference(torch.ones(3, 8, 8))
    rows = [[(0.0, 0.0, 0.5, 1.0), (0.5, 0.25, 1.0, 0.75)], [(0.25, 0.25, 0.75, 0.75)]]
    boxes, valid = torch.zeros(2, 2, 4), torch.zeros(2, 2, dtype=torch.bool)
    for b, row in enumerate(rows):
        for k, bx in enumerate(row):
            boxes[b, k], valid[b, k] = torch.tensor(bx), True
    ri_embeds, ci_embeds = torch.randn(2, 2, 1024), torch.randn(2, 1024)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 768, generator=g)
    sigma = torch.full((2,), 4.0)

    state = LocRefTrainState(adapter, unet)
    state.set_batch(locref.ReferenceKV(adapter)(ri_embeds, ci_embeds), boxes, valid)
    out = apply_patched_model(patched(tiny_sd15, state), x, sigma, ctx)
    assert sorted(state.fired) == sorted(SD15_SITES)
    for b, row in enumerate(rows):
        layout = Layout(512, 512, tuple(Box(*boxes[b, k].tolist(), reference=red)
                                        for k in range(len(row))))
        with torch.no_grad():
            ri = adapter.project(ri_embeds[b, :len(row)])
            ci = adapter.project(ci_embeds[b:b + 1])[0]
        inference = LocRefState(adapter, layout, ri, ci, PatchSettings(), unet)
        for kind in (0, 1):  # cond, and uncond (null reference)
            want = apply_patched_model(patched(tiny_sd15, inference), x[b:b + 1], sigma[:1],
                                       ctx[b:b + 1], [kind])
            if kind == 0:
                torch.testing.assert_close(out[b:b + 1].detach(), want, atol=2e-5, rtol=1e-4)
            else:
                state.set_batch(locref.ReferenceKV(adapter)(torch.zeros(1, 2, 1024),
                                                            torch.zeros(1, 1024)),
                                boxes[b:b + 1], valid[b:b + 1])
                null = apply_patched_model(patched(tiny_sd15, state), x[b:b + 1], sigma[:1],
                                           ctx[b:b + 1])
                torch.testing.assert_close(null.detach(), want, atol=2e-5, rtol=1e-4)

    state.set_batch(locref.ReferenceKV(adapter)(ri_embeds, ci_embeds), boxes, valid)
    host = load_host(comfyui_path())
    unet_denoised(host, patched(tiny_sd15, state), x, sigma, ctx).square().mean().backward()
    assert adapter.appearance.hidden.weight.grad.abs().sum() > 0
    for path in (adapter.kv_ri, adapter.kv_ci):
        assert all(kv.to_k.weight.grad.abs().sum() > 0 for kv in path.values())
    tiny_sd15.model.zero_grad(set_to_none=True)  # the shared fixture is not frozen


def test_fifty_steps_lower_the_training_loss(trained, data, tmp_path):
    losses = trained["losses"]
    assert len(losses) == 50 and all(torch.isfinite(torch.tensor(losses)))
    assert sorted(trained["fired"]) == sorted(SD15_SITES)
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    # control: the same 50 steps (same batches, noise, timesteps, dropout) with lr 0
    frozen = locref.main(argv(data, tmp_path / "lr0.safetensors", "--steps", "50", "--lr", "0"))
    control = statistics.mean(frozen["losses"][-5:])
    # paired over the last 10 steps: same batches and noise in both runs, only the weights differ
    paired = statistics.mean(losses[-10:]) / statistics.mean(frozen["losses"][-10:])
    LOG.info("LocRef tiny run, seed 0: mean loss of steps 1-5 %.4f, of steps 46-50 %.4f "
             "(lr 0: %.4f); steps 41-50 trained / lr 0 = %.3f", first, last, control, paired)
    assert last < 0.9 * first  # measured: 0.6564 -> 0.5324
    assert paired < 0.95  # measured: 0.884


def test_the_exported_adapter_loads_in_the_loader_and_runs_in_apply(trained, tiny_sd15):
    import folder_paths
    from test_host_nodes_inprocess import load_pack

    pack = load_pack()
    out = Path(trained["out"])
    folder_paths.add_model_folder_path("locref", str(out.parent))
    [adapter] = pack.NODE_CLASS_MAPPINGS["LocRefAdapterLoader"]().load(out.name)
    assert adapter.cfg.model_channels == 32 and adapter.cfg.embed_dim == 1024
    assert weights_digest(adapter) == trained["digest"]
    clip_vision = locref.load_clip_vision(load_host(comfyui_path()), None, seed=0)
    g = torch.Generator().manual_seed(0)
    boxes = '{"version": 1, "boxes": [{"x0": 0.1, "y0": 0.1, "x1": 0.6, "y1": 0.9}]}'
    [layout] = pack.NODE_CLASS_MAPPINGS["LocRefBoxes"]().build(64, 64, boxes)
    [layout] = pack.NODE_CLASS_MAPPINGS["LocRefReference"]().attach(
        layout, torch.rand(1, 24, 24, 3, generator=g), 0, "")
    [model] = pack.NODE_CLASS_MAPPINGS["LocRefApply"]().apply(
        tiny_sd15, adapter, clip_vision, layout, 1.0, 0.0, 0.0, 1.0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    sigma = torch.full((1,), 3.0)
    patched = apply_patched_model(model, x, sigma, ctx)
    assert torch.isfinite(patched).all()
    assert not torch.allclose(patched, apply_patched_model(tiny_sd15, x, sigma, ctx))


def test_init_from_a_locref_file_starts_from_its_weights(trained, data, tmp_path):
    out = tmp_path / "init.safetensors"
    # lr 0 (AdamW's decay is lr * weight_decay): the export is the --init-from file, bit for bit
    locref.main(argv(data, out, "--steps", "1", "--lr", "0", "--tokens", "2",
                     "--init-from", trained["out"]))
    assert weights_digest(load_adapter(str(out))) == trained["digest"]


def test_init_from_an_adapter_for_another_unet_width_is_refused(data, tmp_path):
    from harness_locref import cached_ip_adapter

    with pytest.raises(ValueError, match="width 320, this one is 32"):
        locref.main(argv(data, tmp_path / "x.safetensors", "--steps", "1",
                         "--init-from", str(cached_ip_adapter())))


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_full_size_files_train_from_an_ip_adapter_file(sd15_checkpoint, data, tmp_path,
                                                       precision):
    """The files users have (SD-1.5 checkpoint in the original layout, CLIP ViT-H/14 as
    CLIPVisionLoader reads it, ip-adapter_sd15; random weights), through the command line as
    users run it (its own process: ~8 GB at full width): one step at lr 0 from --init-from the
    IP-Adapter file runs through the full-width UNet at all 16 sites and exports exactly the
    IP-Adapter's weights as a LocRef file that LocRef Adapter Loader's loader reads. On a CPU
    auto is fp32, and bf16 loads the UNet in bfloat16 and autocasts (the adapter stays fp32)."""
    from harness_locref import cached_clip_vision_h, cached_ip_adapter

    out = tmp_path / "from_ip.safetensors"
    models = ("--checkpoint", str(sd15_checkpoint), "--clip-vision", str(cached_clip_vision_h()))
    cmd = [sys.executable, "-m", "locref_core.train.locref",
           *argv(data, out, "--steps", "1", "--lr", "0", "--batch-size", "1", "--log-every", "1",
                 "--init-from", str(cached_ip_adapter()), "--mixed-precision", precision,
                 models=models)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "step 1/1 loss" in logs and "initialised from" in logs, logs[-4000:]
    assert "the LocRef patch ran at 16 of 16 cross-attention sites" in logs
    exported, source = load_adapter(str(out)), load_adapter(str(cached_ip_adapter()))
    assert exported.cfg == source.cfg and exported.cfg.shared_kv and exported.cfg.hidden_dim is None
    theirs = source.state_dict()
    # equal values (a -0.0 of the fp16 file may come back +0.0 from AdamW's lr-0 update)
    assert all(torch.equal(t, theirs[k]) for k, t in exported.state_dict().items())


def test_resume_continues_the_same_run(data, tmp_path):
    common = ("--ckpt-every", "3", "--ref-dropout", "0.5")
    full = locref.main(argv(data, tmp_path / "full.safetensors", "--steps", "6", *common))
    part_out = tmp_path / "part.safetensors"
    locref.main(argv(data, part_out, "--steps", "3", *common))
    ckpts = str(part_out.with_suffix("")) + "_ckpt"
    rest = locref.main(argv(data, part_out, "--steps", "6", "--resume", ckpts, *common))
    assert rest["losses"] == full["losses"][3:]
    assert rest["digest"] == full["digest"]
    exported = tmp_path / "exported.safetensors"
    locref.main(["--export", ckpts, "--out", str(exported)])
    assert weights_digest(load_adapter(str(exported))) == full["digest"]


def test_resume_with_other_flags_is_refused(data, tmp_path):
    out = tmp_path / "a.safetensors"
    locref.main(argv(data, out, "--steps", "1"))
    ckpts = str(out.with_suffix("")) + "_ckpt"
    with pytest.raises(ValueError, match="resume with the same flags"):
        locref.main(argv(data, out, "--steps", "2", "--resume", ckpts, "--tokens", "2"))


def test_gradient_checkpointing_gives_the_same_losses(data, tmp_path):
    plain = locref.main(argv(data, tmp_path / "a.safetensors", "--steps", "2"))
    ckpt = locref.main(argv(data, tmp_path / "b.safetensors", "--steps", "2",
                            "--grad-checkpointing"))
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    a = load_adapter(str(tmp_path / "a.safetensors")).state_dict()
    b = load_adapter(str(tmp_path / "b.safetensors")).state_dict()
    for name, pa in a.items():
        assert torch.allclose(pa, b[name], atol=1e-6), name


def test_the_text_cache_gives_the_same_losses_and_weights(data, tmp_path):
    plain = locref.main(argv(data, tmp_path / "a.safetensors", "--steps", "3"))
    cached = locref.main(argv(data, tmp_path / "b.safetensors", "--steps", "3",
                              "--text-cache", "2"))  # small: captions are dropped and re-encoded
    assert cached["losses"] == plain["losses"] and cached["digest"] == plain["digest"]
    with pytest.raises(ValueError, match="--text-cache -1"):
        locref.main(argv(data, tmp_path / "c.safetensors", "--steps", "1", "--text-cache", "-1"))
    assert not (tmp_path / "c.safetensors").exists()


def _broken_copy(data: dict[str, Path], tmp_path: Path, edit) -> list[str]:
    root = tmp_path / "broken"
    shutil.copytree(data["root"], root)
    instances = root / "annotations" / "instances_train.json"
    coco = json.loads(instances.read_text())
    edit(coco, root)
    instances.write_text(json.dumps(coco))
    paths = {**data, "images": root / "images", "instances": instances,
             "captions": root / "annotations" / "captions_train.json"}
    return argv(paths, tmp_path / "x.safetensors", "--steps", "1")


def _drop_first_image(coco: dict, root: Path) -> None:
    (root / "images" / coco["images"][0]["file_name"]).unlink()


def _box_outside(coco: dict, root: Path) -> None:
    coco["annotations"][0]["bbox"][0] = coco["images"][0]["width"] + 5.0


def _no_annotations(coco: dict, root: Path) -> None:
    coco["annotations"] = []


@pytest.mark.parametrize("edit, expected", [
    (_drop_first_image, r"images/.*does not exist"),
    (_box_outside, r"instances_train\.json.*annotation"),
    (_no_annotations, r"instances_train\.json.*no annotations"),
])
def test_bad_data_stops_before_any_step(data, tmp_path, edit, expected):
    args = _broken_copy(data, tmp_path, edit)
    with pytest.raises(DataError, match=expected):
        locref.main(args)
    assert not (tmp_path / "x_ckpt").exists() and not (tmp_path / "x.safetensors").exists()


def test_torchrun_two_cpu_ranks_end_with_identical_weights(data, tmp_path):
    out = tmp_path / "ddp.safetensors"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m",
           "locref_core.train.locref", *argv(data, out, "--steps", "4")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = proc.stdout + proc.stderr
    assert "identical on 2 rank(s)" in logs, logs[-4000:]
    assert "2 steps/epoch x 2 rank(s)" in logs  # each rank sees half of the 8 images
    digest = weights_digest(load_adapter(str(out)))
    assert f"weights digest {digest[:16]}" in logs
