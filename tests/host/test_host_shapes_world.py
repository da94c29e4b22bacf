"""benchmarks/shapes_world.py --quick: every stage runs, caches, and reproduces its table."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from harness_env import REPO_ROOT, comfyui_path


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("shapes_world",
                                                  REPO_ROOT / "benchmarks" / "shapes_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(bench, cache):
    return bench.main(["--comfyui", str(comfyui_path()), "--quick", "--cache", str(cache)])


def test_quick_preset_runs_every_stage_and_a_rerun_reproduces_it(bench, tmp_path, caplog):
    first = run(bench, tmp_path / "a")
    rows = first["table"].splitlines()[2:]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [
        "base, caption only", "LocRef, trained adapter", "ablation: instance masks off",
        "ablation: composite path off", "ablation: text kept in boxes",
        "regional prompts (box text, no adapter)"]
    out = tmp_path / "a" / "quick-seed0"
    for name in ("table.md", "grid.png", "base.safetensors", "locref.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("*/events.out.tfevents.*"))  # base and LocRef curves
    with caplog.at_level(logging.INFO):
        cached = run(bench, tmp_path / "a")
    assert "base: cached" in caplog.text and "locref: cached" in caplog.text
    assert cached["table"] == first["table"]
    assert run(bench, tmp_path / "b")["table"] == first["table"]  # from nothing, same seed
