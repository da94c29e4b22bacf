"""The real-host harness itself works: checkpoint, tiny in-process model, server, API."""

from __future__ import annotations

import gc
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from comfy_harness import (
    CHECKPOINT_NAME,
    PACK_DIR_NAME,
    REPO_ROOT,
    SD15_ATTN2_BLOCKS,
    ComfyServer,
    PromptRejected,
    ServerError,
    build_tiny_sd15_model,
    fetch_image,
    get_object_info,
    history_output_images,
    pack_import_failures,
    queue_prompt,
    run_quick_test,
    txt2img_prompt,
    upload_image,
    wait_for_history,
)
from harness_models import TINY_MODEL_CHANNELS, record_attn2_sites

LOG = logging.getLogger(__name__)

# Resolution level (number of 2x downsamplings) of each SD-1.5 attn2 site.
SITE_LEVEL = {("input", 1): 0, ("input", 2): 0, ("input", 4): 1, ("input", 5): 1,
              ("input", 7): 2, ("input", 8): 2, ("middle", 0): 3,
              ("output", 3): 2, ("output", 4): 2, ("output", 5): 2,
              ("output", 6): 1, ("output", 7): 1, ("output", 8): 1,
              ("output", 9): 0, ("output", 10): 0, ("output", 11): 0}
CHANNEL_MULT = (1, 2, 4, 4)
LOAD_PROBLEMS = ("unet missing", "unet unexpected", "clip missing", "Missing VAE keys",
                 "not a checkpoint file")


def _ceil_halve(size: int, times: int) -> int:
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


# ---------------------------------------------------------------- checkpoint


def test_cached_checkpoint_loads_as_sd15_with_every_key_used(
        sd15_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    import comfy.sd
    import comfy.supported_models
    import torch
    from safetensors import safe_open

    with safe_open(str(sd15_checkpoint), framework="pt") as f:
        file_keys = set(f.keys())
        probe = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert probe.dtype == torch.float16

    caplog.set_level(logging.WARNING)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint))
    problems = [r.getMessage() for r in caplog.records
                if any(p in r.getMessage() for p in LOAD_PROBLEMS)]
    assert problems == []
    assert type(model.model.model_config) is comfy.supported_models.SD15

    unet = model.model.diffusion_model
    expected = {f"model.diffusion_model.{k}" for k in unet.state_dict()}
    expected |= {f"first_stage_model.{k}" for k in vae.first_stage_model.state_dict()}
    expected |= {"cond_stage_model." + k.removeprefix("clip_l.")
                 for k in clip.cond_stage_model.state_dict()
                 if not k.endswith(("text_projection.weight", "logit_scale"))}
    assert file_keys - expected == set(), "keys in the file that the host does not use"
    assert expected - file_keys == set(), "keys the host needs that the file lacks"

    loaded = unet.input_blocks[0][0].weight.detach().float()
    assert torch.equal(loaded, probe.float())
    assert all(torch.isfinite(p).all() for p in unet.parameters())
    assert loaded.std() > 0
    del model, clip, vae, unet
    gc.collect()


def test_random_models_are_seeded() -> None:
    import torch

    a = build_tiny_sd15_model(seed=3).model.state_dict()
    b = build_tiny_sd15_model(seed=3).model.state_dict()
    c = build_tiny_sd15_model(seed=4).model.state_dict()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])


# ---------------------------------------------------------------- tiny model


@pytest.mark.parametrize("latent_hw", [(64, 96), (72, 128), (68, 100)])
def test_tiny_model_attn2_fires_at_the_16_sd15_sites(tiny_sd15: Any,
                                                     latent_hw: tuple[int, int]) -> None:
    h, w = latent_hw
    records = record_attn2_sites(tiny_sd15, h, w, batch=2)
    table = [(r["block"], r["transformer_index"], r["activations_shape"]) for r in records]
    LOG.info("attn2 sites for latent %dx%d:\n%s", h, w, "\n".join(map(str, table)))

    assert [r["block"] for r in records] == SD15_ATTN2_BLOCKS
    assert [r["transformer_index"] for r in records] == list(range(16))
    for r in records:
        level = SITE_LEVEL[r["block"]]
        channels = TINY_MODEL_CHANNELS * CHANNEL_MULT[level]
        size = [_ceil_halve(h, level), _ceil_halve(w, level)]
        assert r["activations_shape"] == [2, channels, *size], r
        assert r["tokens"] == size[0] * size[1]
        assert r["original_shape"] == [2, 4, h, w]
        assert r["cond_or_uncond"] == [0]
        assert (r["n_heads"], r["dim_head"]) == (8, channels // 8)


def test_attn2_patch_changes_the_output_and_stays_on_the_clone(tiny_sd15: Any) -> None:
    import torch
    from harness_models import apply_patched_model

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 32, 32, generator=gen)
    ctx = torch.randn(1, 77, 768, generator=gen)
    sigma = torch.tensor([2.0])
    base = apply_patched_model(tiny_sd15, x, sigma, ctx)

    patched = tiny_sd15.clone()
    patched.set_model_attn2_patch(lambda n, c, v, extra: (n, torch.zeros_like(c), v))
    changed = apply_patched_model(patched, x, sigma, ctx)
    again = apply_patched_model(tiny_sd15, x, sigma, ctx)

    assert torch.isfinite(base).all() and torch.isfinite(changed).all()
    assert not torch.allclose(base, changed), "the attn2 patch had no effect"
    assert torch.equal(base, again), "patching the clone leaked into the original"
    assert record_attn2_sites(tiny_sd15, 16, 16)  # sanity: the helper still records


# ---------------------------------------------------------------- server


def test_pack_import_failures_finds_only_pack_failures() -> None:
    log = "\n".join([
        f"Cannot import /x/custom_nodes/{PACK_DIR_NAME} module for custom nodes: boom",
        "Cannot import /x/comfy_extras/nodes_audio.py module for custom nodes: no torchaudio",
        f"   0.0 seconds (IMPORT FAILED): /x/custom_nodes/{PACK_DIR_NAME}",
        f"   0.0 seconds: /x/custom_nodes/{PACK_DIR_NAME}",
    ])
    assert pack_import_failures(log) == [log.splitlines()[0], log.splitlines()[2]]


def test_failed_startup_raises_with_the_log_tail() -> None:
    server = ComfyServer(extra_args=("--no-such-flag",), startup_timeout=120)
    with pytest.raises(ServerError, match="no-such-flag"):
        with server:
            pass
    assert server.proc is None
    assert not server.base_dir.exists(), "a server-owned temp dir must be removed"
    assert "unrecognized arguments" in server.log_text()


def test_a_child_of_the_harness_dies_with_a_killed_test_process() -> None:
    """A SIGKILLed pytest (the OOM killer) runs no teardown; the server must not outlive it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    here = str(Path(__file__).resolve().parent)
    parent = subprocess.Popen([sys.executable, "-c", (
        f"import subprocess, sys, time; sys.path.insert(0, {here!r})\n"
        "from comfy_harness import die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                         preexec_fn=die_with_parent, start_new_session=True)\n"
        "print(child.pid, flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())

    def alive() -> bool:
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    assert alive()
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive():
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its SIGKILLed parent")


def test_server_uses_this_pack_and_the_checkpoint(comfy_server: Any) -> None:
    custom = comfy_server.base_dir / "custom_nodes"
    assert [p.name for p in custom.iterdir()] == [PACK_DIR_NAME]
    assert (custom / PACK_DIR_NAME).resolve() == REPO_ROOT
    assert f"custom_nodes/{PACK_DIR_NAME}" in comfy_server.log_text()

    info = get_object_info(comfy_server)
    assert {"KSampler", "CheckpointLoaderSimple", "SaveImage", "VAEDecode"} <= set(info)
    ckpt_spec = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    options = ckpt_spec[0] if isinstance(ckpt_spec[0], list) else ckpt_spec[1]["options"]
    assert options == [CHECKPOINT_NAME]


def test_txt2img_workflow_runs_and_image_comes_back(comfy_server: Any,
                                                    sd15_checkpoint_name: str) -> None:
    import numpy as np

    prompt_id = queue_prompt(comfy_server, txt2img_prompt(sd15_checkpoint_name))
    entry = wait_for_history(comfy_server, prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    [info] = history_output_images(entry)
    assert info["type"] == "output"
    image = fetch_image(comfy_server, info)
    assert image.size == (256, 256)
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 0, "decoded image is a single flat colour"


def test_invalid_prompt_is_rejected_with_node_errors(comfy_server: Any) -> None:
    with pytest.raises(PromptRejected) as caught:
        queue_prompt(comfy_server, txt2img_prompt("no_such_model.safetensors"))
    assert "1" in caught.value.body["node_errors"]


def test_upload_then_view_round_trip(comfy_server: Any) -> None:
    from PIL import Image

    picture = Image.new("RGB", (40, 24), (10, 200, 30))
    name = upload_image(comfy_server, picture, "harness_upload.png")
    assert name == "harness_upload.png"
    assert (comfy_server.base_dir / "input" / name).is_file()
    back = fetch_image(comfy_server, {"filename": name, "subfolder": "", "type": "input"})
    assert back.size == (40, 24) and back.convert("RGB").getpixel((5, 5)) == (10, 200, 30)


def test_quick_test_for_ci_exits_zero(comfy_server: Any) -> None:
    result = run_quick_test(comfy_server.base_dir)
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"custom_nodes/{PACK_DIR_NAME}" in result.stdout
    assert pack_import_failures(result.stdout) == []
