"""The shapes world's time estimate (benchmarks/shapes_world_estimate.py): its clocks and the
projection from seconds per step to minutes per stage (no host; the timing itself runs in
tests/host/test_host_shapes_world.py)."""

import importlib.util
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def est():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "shapes_world_estimate", ROOT / "benchmarks" / "shapes_world_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRESET = {"heldout": 64, "vae_steps": 1500, "unet_steps": 4000, "locref_steps": 3000,
          "factor_steps": 1500, "controlnet_steps": 1500}
RATE = {"data": 60.0, "VAE step": 0.4, "latents": 6.0, "UNet step": 0.6, "LocRef step": 0.5,
        "seg factor step": 0.5, "seg ControlNet step": 0.9, "LocRef layout": 8.0,
        "FG-DM layout": 30.0, "image scored": 0.05, "table row": 3.0}


def test_projection_adds_the_base_and_the_longer_half(est):
    m = est.project(PRESET, RATE)
    assert m["VAE"] == pytest.approx((1500 * 0.4 + 6) / 60)
    assert m["UNet"] == pytest.approx(40.0)
    # LocRef half: adapter 25, its images 64 x 8 s, the FG-DM images of the second 32 layouts
    assert m["LocRef half"] == pytest.approx(25 + 64 * 8 / 60 + 32 * 30 / 60)
    # FG-DM half: factor 12.5, ControlNet 22.5, the first 32 layouts' images
    assert m["FG-DM half"] == pytest.approx(12.5 + 22.5 + 32 * 30 / 60)
    assert m["tables"] == pytest.approx((64 * 10 * 0.05 + 7 * 3) / 60)
    assert m["total"] == pytest.approx(1 + m["VAE"] + 40 + m["FG-DM half"] + m["tables"])
    slower = est.project(PRESET, {**RATE, "LocRef step": 1.5})  # now the LocRef half is longer
    assert slower["total"] == pytest.approx(1 + m["VAE"] + 40 + slower["LocRef half"]
                                            + m["tables"])


def test_least_on_two_cores_shares_the_work_after_the_base(est):
    m = est.project(PRESET, RATE)
    halves = m["LocRef half"] + m["FG-DM half"]
    assert m["least on 2 cores"] == pytest.approx(1 + m["VAE"] + 40 + halves / 2 + m["tables"])
    assert m["least on 2 cores"] < m["total"]  # the halves differ: the run's order waits
    even = est.project(PRESET, {**RATE, "seg ControlNet step": 0.9 - (
        m["FG-DM half"] - m["LocRef half"]) * 60 / 1500})  # the halves made equal
    assert even["least on 2 cores"] == pytest.approx(even["total"])


def test_the_estimate_line_says_the_least_on_two_cores(est):
    result = {"minutes": est.project(PRESET, RATE), "seconds": RATE}
    line = est.format_estimate(result)
    assert line.startswith(f"about {result['minutes']['total']:.0f} min from nothing")
    assert line.endswith("No order of these stages on 2 cores takes less than "
                         f"{result['minutes']['least on 2 cores']:.0f} min")


def test_odd_layout_counts_split_as_the_run_splits_them(est):
    m = est.project({**PRESET, "heldout": 5}, RATE)
    assert m["FG-DM images, first half"] == pytest.approx(3 * 30 / 60)
    assert m["FG-DM images, second half"] == pytest.approx(2 * 30 / 60)


def test_step_clock_skips_the_warmup(est):
    clock = est.StepClock(warmup=2)
    clock.stamps.extend([0.0, 5.0, 6.0, 7.0, 8.0])  # the first step is slow
    assert clock.seconds == pytest.approx(1.0)
    with pytest.raises(ValueError, match="time at least 3"):
        est.StepClock(warmup=2).seconds  # noqa: B018


def test_per_call_cancels_the_setup_and_the_first_runs_extra(est):
    calls = []

    def fake_trainer(steps):
        first = 0.2 if not calls else 0.0  # what only the first run in a process pays
        calls.append(steps)
        time.sleep(first + 0.05 + 0.01 * steps)  # 50 ms of setup, 10 ms a step

    assert est.per_call(fake_trainer, 2, 8) == pytest.approx(0.01, abs=0.006)
    assert calls == [2, 2, 8]
