"""benchmarks/shapes_world.py --quick: every stage runs, caches, and reproduces its table."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from harness_env import REPO_ROOT, comfyui_path, load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("shapes_world")


def run(bench, cache, *flags):
    return bench.main(["--comfyui", str(comfyui_path()), "--quick", "--cache", str(cache),
                       *flags])


def test_quick_preset_runs_every_stage_and_a_rerun_reproduces_it(bench, tmp_path, caplog,
                                                                 monkeypatch):
    first = run(bench, tmp_path / "a")
    rows = first["table"].splitlines()[2:]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [
        "base, caption only", "LocRef, trained adapter", "ablation: instance masks off",
        "ablation: composite path off", "ablation: text kept in boxes",
        "regional prompts (box text, no adapter)", "ceiling: the held-out image through the VAE"]
    fgdm_rows = first["table_fgdm"].splitlines()[2:]
    assert [r.split(" | ")[0].lstrip("| ") for r in fgdm_rows] == [
        "base model, caption only", "FG-DM: seg map (N = 1) -> seg ControlNet",
        "FG-DM: SBPC N = 3 -> seg ControlNet",
        "diagnostic: the held-out image's own map -> seg ControlNet"]
    assert fgdm_rows[0].endswith("| — | — |") and fgdm_rows[3].endswith("| — | — |")
    shares = [float(r.split(" | ")[4].split()[0]) for r in fgdm_rows[1:3]]  # N = 1, N = 3
    assert all(0.0 <= v <= 1.0 for v in shares)
    out = tmp_path / "a" / f"quick-seed0-v{bench.RECIPE_VERSION}"
    for name in ("table.md", "table_fgdm.md", "grid.png", "timings.json", "timings_fgdm.json",
                 "base.safetensors", "locref.safetensors", "fgdm_seg.safetensors",
                 "seg_controlnet.safetensors"):
        assert (out / name).is_file(), name
    kept = ("locref_images.safetensors", "fgdm_rows_first.safetensors",
            "fgdm_rows_second.safetensors")
    assert not [name for name in kept if (out / name).exists()]  # dropped once tables are out
    machines = json.loads((out / "machine.json").read_text())["machines"]
    assert len(machines) == 1 and bench.same_machine(machines[0], bench.machine())
    assert set(first["timings"]) == {"data", "base", "locref adapter", "locref images",
                                     "locref table", "waiting for the seg ControlNet",
                                     "fgdm images, second half", "waiting for the FG-DM half",
                                     "tables and grid"}
    assert set(first["timings_fgdm"]) == {"fgdm seg factor", "seg controlnet",
                                          "fgdm images, first half"}
    assert 0 < first["least on 2 cores"] <= first["minutes"]
    need_tensorboard(bench)  # else the run writes no curves to check
    assert {p.parent.name for p in (out / "tb").glob("*/events.out.tfevents.*")} >= {
        "base", "locref", "fgdm"}  # base (with the seg ControlNet), LocRef and factor curves
    weights = ("base", "locref", "fgdm_seg", "seg_controlnet")
    stamps = {w: (out / f"{w}.safetensors").stat().st_mtime_ns for w in weights}
    # again, stopped while it waits for the seg ControlNet (the FG-DM half, in its own
    # process, still draws its first half): the LocRef table is out and the images are kept
    def stopped_waiting(*args, **kwargs):
        raise Stopped

    monkeypatch.setattr(bench, "wait_for_fgdm_models", stopped_waiting)
    with caplog.at_level(logging.INFO), pytest.raises(Stopped):
        run(bench, tmp_path / "a")
    monkeypatch.undo()
    assert "base: cached" in caplog.text and "locref: cached" in caplog.text
    assert (f"LocRef table (quick, seed 0), in {out / 'table.md'} while the FG-DM half goes on:"
            f"\n{first['table']}\n") in caplog.text  # drawn again from the cached models
    assert [(out / name).is_file() for name in kept] == [True, True, False]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cached = run(bench, tmp_path / "a")
    assert "locref images: kept from a run stopped part-way" in caplog.text
    assert "generated " not in caplog.text  # no LocRef image drawn again
    assert not [name for name in kept if (out / name).exists()]
    # the FG-DM half logs in its own process: its stages are cached when their files stay
    assert {w: (out / f"{w}.safetensors").stat().st_mtime_ns for w in weights} == stamps
    assert (cached["table"], cached["table_fgdm"]) == (first["table"], first["table_fgdm"])
    # a seg ControlNet of another recipe (its hint block from torch's default, as every run's
    # before the init was written in the file) is trained again, the old one kept beside it,
    # every other stage cached; trained as the first run's was, so the same tables
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    controlnet = out / "seg_controlnet.safetensors"
    with safe_open(str(controlnet), framework="pt") as f:
        meta = f.metadata()
    assert meta["hint_init"] == bench.fgdm.CONTROLNET_HINT_INIT == "kaiming"
    trained = load_file(controlnet)
    save_file(trained, str(controlnet), metadata={k: v for k, v in meta.items()
                                                  if k != "hint_init"})
    again = run(bench, tmp_path / "a")
    assert (again["table"], again["table_fgdm"]) == (first["table"], first["table_fgdm"])
    assert bench.fgdm.hint_init_of(controlnet) == "kaiming"
    assert bench.fgdm.hint_init_of(out / "seg_controlnet_hint_torch.safetensors") == "torch"
    assert load_file(controlnet).keys() == trained.keys()
    kept_file = out / "seg_controlnet_hint_torch.safetensors"
    assert kept_file.stat().st_mtime_ns < controlnet.stat().st_mtime_ns  # written after it
    stamps.pop("seg_controlnet")
    assert {w: (out / f"{w}.safetensors").stat().st_mtime_ns for w in stamps} == stamps
    # from nothing, same seed: stopped after the base UNet's step 5 of 10, then run again
    train_unet = bench.base.train_unet

    def stopped(*args, on_step, **kwargs):
        def step(s, loss):
            on_step(s, loss)
            if s + 1 == 5:
                raise Stopped
        return train_unet(*args, on_step=step, **kwargs)

    monkeypatch.setattr(bench.base, "train_unet", stopped)
    with pytest.raises(Stopped):
        run(bench, tmp_path / "b")
    monkeypatch.undo()
    out_b = tmp_path / "b" / out.name
    assert (out_b / "base_ckpt" / "unet" / "step_00000005").is_dir()
    with caplog.at_level(logging.INFO):
        again = run(bench, tmp_path / "b")
    assert "resumed from" in caplog.text and "step_00000005 at step 5" in caplog.text
    assert again["timings"]["resumed"] == ["base"]
    assert again["least on 2 cores"] is None  # the base's minutes are only its second part
    assert not (out_b / "base_ckpt").exists()  # base.safetensors holds it all
    assert (again["table"], again["table_fgdm"]) == (first["table"], first["table_fgdm"])


def need_tensorboard(bench) -> None:
    """The run writes TensorBoard curves only where tensorboard is installed; the host tests'
    environment must have it (the README's real-host setup installs it)."""
    if bench.importlib.util.find_spec("tensorboard") is None:
        pytest.fail("tensorboard is not installed in this environment, so the run wrote no "
                    "curves to check: pip install tensorboard, as the README's real-host setup "
                    "does")


class Stopped(Exception):
    """Stands for a run stopped part-way (Ctrl-C, the machine taken back)."""


def cells_by_label(line: str) -> list[tuple[str, dict[str, str]]]:
    """A line drawn by `controlnets_on_validation`, one cell per guidance: the guidance ("CFG
    1") and the cell's figures by label, in the line's order."""
    out = []
    for cell in line.split("image recall: ")[1].split(" | "):
        guidance, rest = cell.split(": ", 1)
        out.append((guidance, dict(part.split(": recall ", 1) for part in rest.split("; "))))
    return out


def same_base_and_run_cells(line: str, lr_line: str, whos: list[str]) -> None:
    """A line drawn by `controlnets_on_validation` (`whos`: its cells' labels, the base's and
    the run's ControlNet's first) beside the controlnet-lr line: at every guidance its base and
    run's cells are that line's own (the same images), under its own labels."""
    cells, lr_cells = cells_by_label(line), cells_by_label(lr_line)
    assert len(cells) == len(lr_cells) == 3  # CFG 1, 2 and the run's
    for (guidance, cell), (lr_guidance, lr_cell) in zip(cells, lr_cells):
        assert guidance == lr_guidance
        assert list(cell) == whos
        (base, run), (lr_base, lr_run) = (list(c.items())[:2] for c in (cell, lr_cell))
        assert base == lr_base
        assert run[1] == lr_run[1]


def test_diagnose_reads_a_finished_quick_run(bench, tmp_path, caplog, monkeypatch):
    diagnose = load_benchmark("shapes_world_diagnose")
    argv = ["--comfyui", str(comfyui_path()), "--quick", "--cache", str(tmp_path)]
    with pytest.raises(SystemExit, match="holds no finished run"):
        diagnose.main(argv)
    run(bench, tmp_path)
    with caplog.at_level("INFO", logger="shapes_world_diagnose"):
        lines = diagnose.main([*argv, "--placement", "--samplers", "--adapter-lr", "3e-4",
                               "1e-4", "--own-map", "--longer", "--adapter-times", "3",
                               "--base-longer", "--adapter-seeds", "1",
                               "--controlnet-lr", "3e-4", "1e-4", "--one-object-map",
                               "--controlnet-null", "0.1", "0.5", "--controlnet-end", "0.3",
                               "1", "--hint-init", "torch", "kaiming", "--factor-offset", "0.5",
                               "0", "--factor-loss-weight", "v", "--mean-control",
                               "--factor-norm-groups", "8", "--unet-on-maps",
                               "--factor-lr", "1e-4", "3e-4", "--factor-times", "2",
                               "--crowding", "--controlnet-times", "2",
                               "--controlnet-strength", "2", "1", "--controlnet-colour",
                               "--controlnet-loss-weight", "v", "--controlnet-positive"])
    assert [line.split(":")[0] for line in lines] == [
        "vae-noise", "probe", "controlnet-eps", "one-object", "sdedit", "placement", "placement",
        "samplers", "adapter-lr", "own-map", "longer", "placement", "longer", "adapter-times",
        "placement", *["base-longer"] * 6, *["adapter-seeds"] * 3, "controlnet-lr",
        "one-object-map", "controlnet-null", "controlnet-end", "hint-init torch",
        "hint-init kaiming (the run's recipe; its weights equal the run's ControlNet",
        "factor-offset", "factor-loss-weight", "mean-control", "factor-norm-groups",
        "unet-on-maps", "factor-lr", "crowding",
        "controlnet-times (the loop's first 4 steps equal the run's ControlNet to the bit",
        "controlnet-strength", "controlnet-colour", "controlnet-loss-weight",
        "controlnet-positive"]
    # each hint init probed before training and after every step (4 steps, 20 checkpoints)
    for line in lines[28:30]:
        steps = re.findall(r"(?:by step: |; )(\d+): ", line)
        assert steps == ["0", "1", "2", "3", "4"], line
        first = re.search(r"by step: 0: ([0-9.]+) / ([0-9.]+) / ([0-9.]+), spread \S+ / (\S+);",
                          line)
        assert first[1] == first[2] == first[3] and float(first[4]) == 0.0  # silent at first
    assert lines[28].startswith("hint-init torch: the seg ControlNet trained 4 steps, 4 "
                                "validation layouts")
    assert ": yes): the seg ControlNet trained 4 steps, 4 validation layouts" in lines[29]
    def factor_cells(k: int, question: str, labels: list[str]) -> list[str]:
        """Line k's cells: the question's factor line, the base's cell first, then `labels`."""
        assert lines[k].startswith(f"{question}: the seg factor at ")
        cells = lines[k].split("validation layouts: ", 1)[1].split(" | ")
        assert [c.split(":")[0] for c in cells] == ["base, no factor", *labels]
        return cells

    # the seg factor trained with offset noise 0.5 beside the run's (0: not trained again), each
    # with its from-noise shares, maps at N = 1 and SBPC's N (3 on the quick preset) and images
    cells = offset_cells = factor_cells(30, "factor-offset",
                                        ["offset 0 (the run's factor)", "offset 0.5"])
    run_factor = offset_cells[1].split(": ", 1)[1]  # the run's factor's cell, without its label
    for cell in cells:
        shares = re.findall(r"t (\d+): ([0-9.]+)", cell.split(";")[0])
        assert [t for t, _ in shares] == ["999", "900", "800"]
        assert all(0.0 <= float(v) <= 1.0 for _, v in shares)
    for cell in cells[1:]:
        assert "; N = 1: maps recall " in cell and "; N = 3: maps recall " in cell
        assert cell.count("world classes ") == 3 and cell.count("images recall ") == 2
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    factor = tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}" / "diagnose"
    with safe_open(str(factor / "fgdm_seg_offset0.5.safetensors"), "pt") as f:
        assert f.metadata()["offset_noise"] == "0.5"
    assert not (factor / "fgdm_seg_offset0.safetensors").exists()
    # the seg factor trained with the v loss weight beside the run's (eps), drawn alike
    cells = factor_cells(31, "factor-loss-weight", ["eps (the run's factor)", "v"])
    assert cells[0] == offset_cells[0]  # the same base, noise, layouts and seeds
    assert cells[1].split(": ", 1)[1] == run_factor  # the same factor
    with safe_open(str(factor / "fgdm_seg_weight-v.safetensors"), "pt") as f:
        assert f.metadata()["loss_weight"] == "v"
    assert not (factor / "fgdm_seg_weight-eps.safetensors").exists()
    # the latents' means, each model's epsilon-mean slope at 4 timesteps, its samples' means
    assert lines[32].startswith("mean-control: 4 validation layouts: per-channel mean of the "
                                "latents (sampler scale): maps [")
    cells = lines[32].split("validation layouts: ", 1)[1].split(" | ")
    assert len(cells) == 4
    slopes = re.findall(r"(base|the run's factor) ([-0-9.]+)/([-0-9.]+)/([-0-9.]+)/([-0-9.]+)",
                        cells[1])
    assert [who for who, *_ in slopes] == ["base", "the run's factor"]
    for cell, who in zip(cells[2:], ("base", "the run's factor")):
        assert cell.startswith(f"{who}'s samples from the tables' seeds")
        corr = float(re.search(r"correlation ([-0-9.]+)", cell)[1])
        assert -1.0 <= corr <= 1.0
        assert re.search(r"nearer the maps' mean than the images' [0-4] of 4$", cell)
    # the seg factor with its adapter's norms in 8 groups beside the run's (the base UNet's 32)
    cells = factor_cells(33, "factor-norm-groups", ["32 groups (the run's factor)", "8 groups"])
    assert cells[:2] == [offset_cells[0], f"32 groups (the run's factor): {run_factor}"]
    from locref_core.fgdm.weights import read_factor_config

    assert read_factor_config(str(factor / "fgdm_seg_groups8.safetensors")).norm_groups == 8
    assert read_factor_config(str(factor.parent / "fgdm_seg.safetensors")).norm_groups == 32
    # the base's whole UNet trained on the maps, drawn beside the run's factor
    cells = factor_cells(34, "unet-on-maps",
                         ["the run's factor", "the base's UNet trained on the maps"])
    assert cells[1].split(": ", 1)[1] == run_factor
    assert "; N = 1: maps recall " in cells[2] and "; N = 3: maps recall " in cells[2]
    assert (factor / "unet_on_maps.safetensors").is_file()
    assert not (factor / "unet_on_maps_ckpt").exists()
    # the seg factor trained at 3e-4 beside the run's (1e-4: not trained again), and each rate
    # twice the run's steps (the quick preset's 4), drawn alike
    cells = factor_cells(35, "factor-lr", ["lr 0.0001 (the run's factor)", "lr 0.0001, 8 steps",
                                           "lr 0.0003", "lr 0.0003, 8 steps"])
    assert lines[35].startswith("factor-lr: the seg factor at 4 steps where its label names no "
                                "other, 4 validation layouts: ")
    assert cells[:2] == [offset_cells[0], f"lr 0.0001 (the run's factor): {run_factor}"]
    for cell in cells[2:]:
        assert "; N = 1: maps recall " in cell and "; N = 3: maps recall " in cell
    from locref_core.train.common import list_checkpoints

    for name, lr, steps in (("lr0.0003", "0.0003", 4), ("lr0.0001_steps8", "0.0001", 8),
                            ("lr0.0003_steps8", "0.0003", 8)):
        with safe_open(str(factor / f"fgdm_seg_{name}.safetensors"), "pt") as f:
            assert f.metadata()["lr"] == lr, name
        newest = list_checkpoints(str(factor / f"fgdm_seg_{name}_ckpt"))[-1]
        assert int(newest.rsplit("step_", 1)[1]) == steps, name
    assert not (factor / "fgdm_seg_lr0.0001.safetensors").exists()
    assert "0.4 x std: AP50" in lines[0] and "colour (8 classes)" in lines[1]
    assert "the latents mirrored, decoded, mirrored back: AP50" in lines[0]
    held = tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}" / "data" / "heldout"
    objects = sum(len(it.objects) for it in bench.load_heldout(bench.synthetic_paths(held)))
    assert f"{objects} captions of one held-out object" in lines[3]
    assert lines[4].count("CFG 1, denoise") == 3 and lines[4].count("CFG 4, denoise") == 3
    assert "base, caption only, AP50 by label" in lines[5] and "no label" in lines[5]
    assert "LocRef, trained adapter, AP50 by label" in lines[6]
    # --placement with --longer and --adapter-times: each longer adapter's images too
    assert "placement: LocRef adapter at 8 steps, AP50 by label" in lines[11]
    assert "placement: LocRef adapter at 12 steps, AP50 by label" in lines[14]
    # appearance by the reference's shape: every held-out box once
    for line in lines[5:7] + [lines[11], lines[14]]:
        assert "appearance: colour " in line and ", shape " in line
        by_shape, whole = line.split("by the reference's shape: ")[1].split(
            "; the reference's shape in the whole image")  # then each box read whole
        for part in (by_shape, whole):
            counts = re.findall(r"(square|disc|triangle) (\d+)/(\d+)", part)
            assert sum(int(n) for _, _, n in counts) == objects
            assert all(int(k) <= int(n) for _, k, n in counts)
    assert lines[7].count("caption recall") == 6 and "while sigma > 1" in lines[7]
    assert (tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}" / "data" / "validation").is_dir()
    rates = re.findall(r"lr ([0-9.e-]+)( \(the run's\))?: AP50", lines[8])
    assert rates == [("0.0001", " (the run's)"), ("0.0003", "")]  # 1e-4: the run's, not retrained
    assert "on 4 validation layouts" in lines[8] and lines[8].count("appearance") == 2
    assert f"own-map: the held-out captions and seeds, {objects} objects" in lines[9]
    # each held-out object in its caption's image and alone: the caption images are the own-map
    # line's base (the tables' seeds), the lone ones the one-object line's (its seeds)
    layouts = len(bench.load_heldout(bench.synthetic_paths(held)))
    assert lines[36].startswith(f"crowding: the base, caption only, {layouts} held-out layouts")
    alone = re.search(r"colour \+ shape ([0-9.]+), shape ([0-9.]+), colour ([0-9.]+)", lines[3])
    every = re.search(r"all (\d+) objects: colour \+ shape ([0-9.]+) in the caption against "
                      r"([0-9.]+) alone, .*; shape [0-9.]+ in the caption against ([0-9.]+) "
                      r"alone, .*; colour [0-9.]+ in the caption against ([0-9.]+) alone",
                      lines[36].split(" | ")[0])  # all objects, before the counts' cells
    assert int(every[1]) == objects
    assert (every[3], every[4], every[5]) == alone.groups()
    own_base = re.search(r"base, caption only: colour \+ shape found ([0-9.]+)", lines[9])
    assert every[2] == own_base[1]
    assert "detections per caption image, by objects named: " in lines[36]
    for cell in lines[9].split(": ", 1)[1].split(" | "):  # base, then own map: every object once
        assert cell.split(": colour + shape found")[0].endswith(
            ("base, caption only", "own map -> seg ControlNet"))
        asked = re.findall(r"(?:square|disc|triangle|nothing) (\d+)", cell.split("; squares")[0])
        assert sum(int(k) for k in asked) == objects
        assert re.search(r"; by objects named: \d named [0-9.]+(, \d named [0-9.]+)*\)$", cell)
    # the seg ControlNet trained twice the run's steps in one loop whose first steps retrace
    # the run's ControlNet, beside the run's: the same base and run's images as controlnet-lr
    assert lines[37].startswith("controlnet-times (the loop's first 4 steps equal the run's "
                                "ControlNet to the bit: yes): the seg ControlNet at the steps "
                                "each label names, 4 validation layouts, image recall: CFG 1: ")
    same_base_and_run_cells(lines[37], lines[24], [
        "base, no map", "4 steps (the run's), own map", "8 steps, own map"])
    # the run's ControlNet at strength 2 beside strength 1 (the run's, asked once), whose cells
    # are the controlnet-lr line's own (the same images)
    assert lines[38].startswith("controlnet-strength: the seg ControlNet at 4 steps, 4 "
                                "validation layouts, image recall: CFG 1: base, no map: recall ")
    same_base_and_run_cells(lines[38], lines[24], [
        "base, no map", "strength 1 (the run's), own map", "strength 2, own map"])
    # the seg ControlNet trained as the run's on colour maps, beside the run's from seg maps
    assert lines[39].startswith("controlnet-colour: the seg ControlNet at 4 steps, 4 "
                                "validation layouts, image recall: CFG 1: base, no map: recall ")
    same_base_and_run_cells(lines[39], lines[24], [
        "base, no map", "seg maps (the run's), own map", "colour maps, own map"])
    run_dir = tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}"
    coloured = run_dir / "diagnose" / "seg_controlnet_colour.safetensors"
    with safe_open(str(coloured), "pt") as f:
        assert f.metadata()["diagnose"] == "colour"
    runs = load_file(str(run_dir / "seg_controlnet.safetensors"))
    # the same recipe and seed; other maps, or another loss weight: other weights
    for other in ("colour", "weight-v"):
        mine = load_file(str(run_dir / "diagnose" / f"seg_controlnet_{other}.safetensors"))
        assert mine.keys() == runs.keys()
        assert not all(torch.equal(v, runs[k]) for k, v in mine.items()), other
    assert lines[40].startswith("controlnet-loss-weight: the seg ControlNet at 4 steps, 4 "
                                "validation layouts, image recall: CFG 1: base, no map: recall ")
    same_base_and_run_cells(lines[40], lines[24], [
        "base, no map", "loss weight eps (the run's), own map", "loss weight v, own map"])
    # each ControlNet on the positive branch alone beside both: the run's from seg maps and the
    # colour one (the colour line's file, its cells that line's own); at CFG 1 the host samples
    # the positive alone, so each pair of cells is equal there
    assert lines[41].startswith("controlnet-positive: the seg ControlNet at 4 steps, 4 "
                                "validation layouts, image recall: CFG 1: base, no map: recall ")
    same_base_and_run_cells(lines[41], lines[24], [
        "base, no map", "seg maps, both branches (the run's), own map",
        "seg maps, positive only, own map", "colour maps, both branches, own map",
        "colour maps, positive only, own map"])

    colour_cells = cells_by_label(lines[39])
    for k, (_, found) in enumerate(cells_by_label(lines[41])):
        assert found["colour maps, both branches, own map"] == colour_cells[k][1][
            "colour maps, own map"]
        if k == 0:  # CFG 1
            assert found["seg maps, positive only, own map"] == found[
                "seg maps, both branches (the run's), own map"]
            assert found["colour maps, positive only, own map"] == found[
                "colour maps, both branches, own map"]
    chain = tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}" / "diagnose"
    for steps in (4, 8):
        with safe_open(str(chain / f"seg_controlnet_steps{steps}.safetensors"), "pt") as f:
            assert f.metadata()["steps"] == str(steps)
    assert int(list_checkpoints(str(chain / "seg_controlnet_steps_ckpt"))[-1].rsplit(
        "step_", 1)[1]) == 8  # kept: a longer K continues the loop
    assert "LocRef adapter at 8 steps" in lines[10] and "seg ControlNet at 8 steps" in lines[12]
    # three times the steps, continued from --longer's twice (its log says so)
    assert lines[13].startswith("adapter-times: LocRef adapter at 12 steps: AP ")
    assert re.search(r"continues to 12 steps from \S*locref_longer_ckpt/step_0+8\b", caplog.text)
    out = tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}" / "diagnose"
    assert (out / "locref_lr0.0003.safetensors").is_file()
    assert not (out / "locref_lr0.0001.safetensors").exists()
    assert (out / "locref_longer.safetensors").is_file()
    assert (out / "seg_controlnet_longer.safetensors").is_file()
    assert (out / "locref_x3.safetensors").is_file()
    # the base trained as many steps again, and an adapter on it, beside the run's: the run's
    # base draws the one-object line of the basics, to the digit (same base, seeds, threads)
    assert lines[15] == "base-longer: " + lines[3].replace(
        "one-object: base,", "one-object: base at 10 steps (the run's),")
    assert lines[18].startswith("base-longer: one-object: base at 20 steps, caption only, "
                                f"{objects} captions")
    for line, who in zip(lines[16:18] + lines[19:21],
                         ["10 steps (the run's)"] * 2 + ["20 steps"] * 2):
        assert line.startswith(f"base-longer: base at {who}, ")
        assert re.search(r"(caption only|trained adapter): AP \S+ \[.*leakage .* recall ", line)
    assert lines[16] != lines[19]  # a base trained on draws other images
    assert (out / "base_longer.safetensors").is_file()
    assert (out / "locref_on_base_longer.safetensors").is_file()
    assert not (out / "base_longer_ckpt").exists()  # base_longer.safetensors holds it all
    assert "base-longer: the base's UNet, 10 more steps" in caplog.text
    # another seed of the adapter's trainer, beside the run's own: its three rows each
    for line, who in zip(lines[21:23], ("seed 0 (the run's)", "seed 1")):
        assert line.startswith(f"adapter-seeds: {who}: LocRef, trained adapter: AP50 ")
        assert " | ablation: instance masks off: AP50 " in line
        assert " | ablation: composite path off: AP50 " in line
    assert lines[23].startswith("adapter-seeds: over 2 seeds of the adapter's training: ")
    assert "outside the intervals for" in lines[23]
    import torch
    from safetensors.torch import load_file

    # the seg ControlNet at another rate beside the run's (1e-4: not retrained), from the
    # validation layouts' own maps at three guidance scales, beside the base without a map
    assert lines[24].startswith("controlnet-lr: the seg ControlNet at 4 steps, 4 validation "
                                "layouts, image recall: CFG 1: base, no map: recall ")
    cells = cells_by_label(lines[24])
    assert [guidance for guidance, _ in cells] == ["CFG 1", "CFG 2", "CFG 4"]
    validation = bench.load_heldout(bench.synthetic_paths(held.parent / "validation"))
    for _, cell in cells:
        assert list(cell) == [
            "base, no map", "lr 0.0001 (the run's), own map", "lr 0.0003, own map"]
        for figures in cell.values():  # every validation object read once, by shape asked
            asked = re.findall(r"(?:square|disc|triangle|nothing) (\d+)",
                               figures.split("(", 1)[1])
            assert sum(int(k) for k in asked) == sum(len(it.objects) for it in validation)
            assert re.search(r", by objects named: \d named [0-9.]+(, \d named [0-9.]+)*\)$",
                             figures)
    # each held-out object alone: the base's cell is the one-object line's (same images)
    assert lines[25].startswith(f"one-object-map: {objects} captions of one held-out object")
    base_cell, map_cell = lines[25].split("that object alone: ", 1)[1].split(" | ")
    figures = re.search(r"colour \+ shape [0-9.]+, shape [0-9.]+, colour [0-9.]+", lines[3])
    assert base_cell.startswith(f"base, caption only: {figures.group(0)} (")
    assert map_cell.startswith("its map alone -> seg ControlNet: colour + shape ")
    asked = re.findall(r"(?:square|disc|triangle|nothing) (\d+)", map_cell.split("(", 1)[1])
    assert sum(int(k) for k in asked) == objects
    # captions dropped in another share of the ControlNet's rows (0.5: the run's, not retrained)
    null_cells = cells_by_label(lines[26])
    assert len(null_cells) == 3
    assert list(null_cells[0][1]) == [
        "base, no map", "captions dropped 0.5 (the run's), own map",
        "captions dropped 0.1, own map"]
    # the run's ControlNet over only the first 0.3 of the steps, beside its whole range (1: the
    # run's, asked once), whose cells are the controlnet-lr line's own (the same images)
    same_base_and_run_cells(lines[27], lines[24], [
        "base, no map", "whole range (the run's), own map", "first 0.3 of the steps, own map"])
    assert (out / "seg_controlnet_null0.1.safetensors").is_file()
    assert not (out / "seg_controlnet_null0.5.safetensors").exists()
    assert (out / "seg_controlnet_lr0.0003.safetensors").is_file()
    assert not (out / "seg_controlnet_lr0.0001.safetensors").exists()
    assert not (out / "seg_controlnet_lr0.0003_ckpt").exists()
    retrained = load_file(out / "seg_controlnet_lr0.0003.safetensors")
    run_own = load_file(tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}"
                        / "seg_controlnet.safetensors")
    assert retrained.keys() == run_own.keys()
    assert any(not torch.equal(retrained[k], run_own[k]) for k in run_own)
    seeded = load_file(out / "locref_seed1.safetensors")
    own = load_file(tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}" / "locref.safetensors")
    assert seeded.keys() == own.keys()
    assert any(not torch.equal(seeded[k], own[k]) for k in own)  # the seed trains other weights
    # only the question asked, from the cache: the same line, none of the five basics
    assert diagnose.main([*argv, "--skip-basics", "--adapter-lr", "3e-4"]) == [lines[8]]
    # --positive-only: the strength line again with every ControlNet on the positive branch
    # alone (each draw's wiring seen); the base's cells are the line's own, and at CFG 1 the
    # ControlNets' too (the host samples the positive alone there)
    wirings, sample_images = [], diagnose.base.sample_images

    def seen(*args, **kwargs):
        if kwargs.get("control_net") is not None:
            wirings.append(kwargs["control_negative"])
        return sample_images(*args, **kwargs)

    monkeypatch.setattr(diagnose.base, "sample_images", seen)
    [positive] = diagnose.main([*argv, "--skip-basics", "--controlnet-strength", "2",
                                "--positive-only"])
    monkeypatch.undo()
    assert wirings == [False] * 6  # strengths 1 and 2 at CFG 1, 2 and 4
    assert positive.startswith("controlnet-strength (every ControlNet on the positive CFG branch "
                               "alone): the seg ControlNet at 4 steps, 4 validation layouts, ")
    both, alone = cells_by_label(lines[38]), cells_by_label(positive)
    assert [(g, list(c)) for g, c in alone] == [(g, list(c)) for g, c in both]
    assert [c["base, no map"] for _, c in alone] == [c["base, no map"] for _, c in both]
    assert alone[0] == both[0]  # CFG 1
    # the drawing lines need only the base: asked without the LocRef adapter or the ControlNet
    for name in ("locref.safetensors", "seg_controlnet.safetensors"):
        (tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}" / name).unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="shapes_world_diagnose"):
        assert diagnose.main([*argv, "--skip-basics", "--drawing"]) == lines[3:5]
    said = [r.getMessage() for r in caplog.records if r.name == "shapes_world_diagnose"]
    one, two = (next(i for i, m in enumerate(said) if m.startswith(f"diagnose: {n} of 2 "))
                for n in (1, 2))
    # each line logged as soon as it is known, before the next question is asked
    assert said.index(lines[3]) < one < said.index(lines[4]) < two
    drawing = [m for m in said[:said.index(lines[3])] if m.startswith("one-object: ")]
    assert drawing[0] == f"one-object: drawing {objects} images, one object each"
    assert drawing[-1] == f"one-object: {objects} of {objects} images, ETA 0 s"
    assert sum(m.startswith("sdedit: ") and "settings done" in m for m in said[one:two]) == 6
    # regional prompts read the base and its CLIP alone: each global prompt, the base and the
    # box texts, and how much the box texts change the image inside the boxes and outside
    [line] = diagnose.main([*argv, "--skip-basics", "--regional"])
    held_out = len(bench.load_heldout(bench.synthetic_paths(held)))
    assert line.startswith(f"regional: {held_out} held-out layouts")
    cells = line.split("empty: ", 1)[1].split(" | ")
    assert len(cells) == 11 and cells[10].startswith("in one UNet call")
    assert [cell.split(":")[0] for cell in cells[:3] + cells[5:8]] == [
        f"{name}, the {prompt}" for prompt in ("caption", "empty prompt") for name in
        ("base", "regional prompts", "the host's mask conditioning")]
    for cell in cells[3:5] + cells[8:10]:  # the texts act: the image changes inside the boxes
        inside = float(re.search(r"change the base's image by ([0-9.]+) inside", cell)[1])
        assert inside > 0
    assert len(re.findall(r"step \d+ \(sigma [0-9.]+\) [0-9.]+ inside", cells[10])) == 3


def test_estimate_times_every_stage_and_keeps_no_model(bench, tmp_path):
    out = bench.main(["--comfyui", str(comfyui_path()), "--quick", "--cache", str(tmp_path),
                      "--estimate"])
    est, folder = out["estimate"], tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}"
    assert set(est["seconds"]) == {
        "data", "VAE step", "latents", "UNet step", "LocRef step", "seg factor step",
        "seg ControlNet step", "LocRef layout", "FG-DM layout", "image scored", "table row"}
    assert all(v > 0 for v in est["seconds"].values()), est["seconds"]
    assert set(est["fingerprint"]) == {"VAE", "UNet"} and not est["portable"]
    m = est["minutes"]
    halves = max(m["LocRef half"], m["FG-DM half"])
    assert m["total"] == pytest.approx(m["data"] + m["VAE"] + m["UNet"] + halves + m["tables"],
                                       abs=0.3)  # each minute rounded to 0.1
    both = m["LocRef half"] + m["FG-DM half"]
    assert m["least on 2 cores"] == pytest.approx(
        m["data"] + m["VAE"] + m["UNet"] + both / 2 + m["tables"], abs=0.3)
    assert m["least on 2 cores"] <= m["total"] + 0.1
    assert json.loads((folder / "estimate.json").read_text()) == est
    assert (folder / "data" / "train").is_dir()  # the run reuses the world's data
    assert not (folder / "estimate").exists()
    for name in ("base", "locref", "fgdm_seg", "seg_controlnet"):
        assert not (folder / f"{name}.safetensors").exists(), name
    assert not (folder / "timings.json").exists() and not (folder / "machine.json").exists()


def without_isa_variables(bench) -> dict[str, str]:
    """This process's environment less the variables that choose the vector code."""
    return {k: v for k, v in os.environ.items() if k not in bench.ISA_VARIABLES}


def estimate_in_a_process(bench, cache, *flags, **variables) -> dict:
    """`--quick --estimate` as a command line (the vector code is chosen as a process starts),
    with none of the ISA variables set but `variables`: its estimate.json."""
    env = without_isa_variables(bench)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "shapes_world.py"),
                           "--comfyui", str(comfyui_path()), "--quick", "--cache", str(cache),
                           "--estimate", *flags], env={**env, **variables},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fingerprint (" in done.stderr
    (folder,) = cache.iterdir()
    return json.loads((folder / "estimate.json").read_text())


CONVOLUTION_DIGEST = """
import hashlib, torch
torch.manual_seed(0)
x = torch.randn(16, 8, 16, 16, requires_grad=True)
conv = torch.nn.Conv2d(8, 8, 3, padding=1)
conv(x).square().sum().backward()
print(hashlib.sha256(x.grad.numpy().tobytes() + conv.weight.grad.numpy().tobytes()).hexdigest())
"""


def test_portable_numerics_leave_the_cpus_convolution_code_out(bench, tmp_path):
    """oneDNN's vector code changes what a convolution's gradients sum to here, and leaves the
    weights the --portable estimate's VAE and UNet steps train (its fingerprint) as they are."""
    if bench.torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("--portable needs torch's AVX2 code, which this CPU cannot run")
    env = without_isa_variables(bench)
    digests = [subprocess.run([sys.executable, "-c", CONVOLUTION_DIGEST], env={**env, **extra},
                              capture_output=True, text=True, check=True).stdout
               for extra in ({}, {"ONEDNN_MAX_CPU_ISA": "SSE41"})]
    if digests[0] == digests[1]:
        pytest.skip("ONEDNN_MAX_CPU_ISA=SSE41 changes no bit of a convolution on this CPU, so "
                    "it cannot show that --portable leaves oneDNN out")
    portable = estimate_in_a_process(bench, tmp_path / "a", "--portable")
    portable_sse = estimate_in_a_process(bench, tmp_path / "b", "--portable",
                                         ONEDNN_MAX_CPU_ISA="SSE41")
    assert set(portable["fingerprint"]) == {"VAE", "UNet"}
    assert all(len(v) == 16 for v in portable["fingerprint"].values())
    assert portable["fingerprint"] == portable_sse["fingerprint"]
    assert portable["portable"] and portable["threads"] == bench.PORTABLE_THREADS


@pytest.mark.parametrize(("flag", "value", "suffix", "field", "saved"), [
    ("--unet-channels", "64", "-c64", "unet_channels", 64),
    ("--vae-downscale", "2", "-f2", "vae_mult", [1, 2])])
def test_another_base_runs_every_stage_in_its_own_folder(bench, tmp_path, flag, value, suffix,
                                                         field, saved):
    """A wider UNet, or a VAE that keeps 32 x 32 latents of the 64 px images."""
    from safetensors import safe_open

    out = run(bench, tmp_path, flag, value)
    folder = tmp_path / f"quick-seed0-v{bench.RECIPE_VERSION}{suffix}"
    assert out["dir"] == str(folder)
    with safe_open(str(folder / "base.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["config"])[field] == saved
    assert len(out["table"].splitlines()) == 2 + 7 and len(out["table_fgdm"].splitlines()) == 2 + 4
    for name in ("locref", "fgdm_seg", "seg_controlnet"):  # each adapter fits that base
        assert (folder / f"{name}.safetensors").is_file(), name
