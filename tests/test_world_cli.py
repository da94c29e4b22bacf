"""The shapes world's command line (benchmarks/shapes_world.py), without the host: the base's
width and where each run is cached."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """The script `benchmarks/<name>.py` as a module (the folder is not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sw():
    return load_benchmark("shapes_world")


def test_each_width_and_prediction_has_its_own_cache(sw, tmp_path):
    def run_dir(*flags):
        args = sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path), *flags])
        return sw.make_run(args)

    plain = run_dir()
    assert plain["dir"].name == f"full-seed0-v{sw.RECIPE_VERSION}"
    assert sw.world_config(plain).unet_channels == 32
    wide = run_dir("--unet-channels", "64", "--quick", "--prediction", "v")
    assert wide["dir"].name == f"quick-seed0-v{sw.RECIPE_VERSION}-vpred-c64"
    assert sw.world_config(wide).unet_channels == 64 and sw.world_config(wide).prediction == "v"
    assert sw.world_config(plain).downscale == sw.world_config(wide).downscale == 4
    fine = run_dir("--vae-downscale", "2")
    assert fine["dir"].name == f"full-seed0-v{sw.RECIPE_VERSION}-f2"
    assert sw.world_config(fine).downscale == 2 and sw.world_config(fine).unet_channels == 32
    both = run_dir("--unet-channels", "64", "--vae-downscale", "2")
    assert both["dir"].name == f"full-seed0-v{sw.RECIPE_VERSION}-c64-f2"
    grouped = run_dir("--unet-norm-groups", "4")
    assert grouped["dir"].name == f"full-seed0-v{sw.RECIPE_VERSION}-g4"
    assert (sw.world_config(grouped).unet_norm_groups, sw.world_config(plain).unet_norm_groups) \
        == (4, 32)
    with pytest.raises(SystemExit):
        run_dir("--unet-norm-groups", "5")


def test_bf16_trains_in_its_own_cache_and_tells_every_trainer(sw, tmp_path, monkeypatch,
                                                              caplog):
    """--precision bf16: its own folder (fp32 runs keep theirs), the autocast dtype for the
    world's trainers, --mixed-precision bf16 for the pack's; a warning where the CPU has no
    bf16 instructions."""
    import torch

    from locref_core.train import common, fgdm, locref

    def run_of(*flags):
        return sw.make_run(sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path), *flags]))

    argv = lambda run: sw.fgdm.trainer_argv(run, "locref", "locref", "b.safetensors", 30, 2,  # noqa: E731
                                            ["--images", "i", "--instances", "j"])
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)
    plain, half = run_of(), run_of("--precision", "bf16", "--vae-downscale", "2")
    assert plain["amp"] is None and half["amp"] is torch.bfloat16
    assert half["dir"].name == f"full-seed0-v{sw.RECIPE_VERSION}-f2-bf16"
    assert locref.build_parser().parse_args(argv(plain)).mixed_precision == "auto"
    assert locref.build_parser().parse_args(argv(half)).mixed_precision == "bf16"
    factor = sw.fgdm.trainer_argv(half, "fgdm", "fgdm_seg", "b.safetensors", 30, 2,
                                  ["--images", "i", "--conditions", "c", "--kind", "seg"])
    assert fgdm.build_parser().parse_args(factor).mixed_precision == "bf16"
    assert "bf16 instructions" not in caplog.text
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: False)
    run_of("--precision", "bf16")
    assert "--precision bf16 on a CPU without bf16 instructions" in caplog.text
    with pytest.raises(SystemExit):
        sw.parse_args(["--comfyui", "x", "--precision", "fp16"])


def test_only_the_two_vae_downscales_are_offered(sw, capsys):
    with pytest.raises(SystemExit):
        sw.parse_args(["--comfyui", "x", "--vae-downscale", "8"])
    assert "invalid choice: 8 (choose from 2, 4)" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["48", "0", "-32", "wide"])
def test_a_width_groupnorm_cannot_split_is_refused(sw, bad, capsys):
    with pytest.raises(SystemExit):
        sw.parse_args(["--comfyui", "x", "--unet-channels", bad])
    err = capsys.readouterr().err
    assert f"'{bad}' is not a positive multiple of 32" in err and "try 32, 64 or 96" in err


def test_a_stopped_trainer_stage_continues_from_its_checkpoints(sw, tmp_path):
    """The pack's trainers checkpoint a twentieth of the way, and a rerun passes --resume only
    when a complete checkpoint is there (the trainer's own flags, as its parser reads them)."""
    from locref_core.train import locref
    from locref_core.train.common import STATE_FILE

    run = sw.make_run(sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path)]))
    argv = lambda: sw.fgdm.trainer_argv(run, "locref", "locref", "base.safetensors", 3000, 8,  # noqa: E731
                                        ["--images", "i", "--instances", "j"])
    ckpt = run["dir"] / "locref_ckpt"
    first = locref.build_parser().parse_args(argv())
    assert first.resume is None and first.ckpt_every == 150 and first.ckpt_dir == str(ckpt)
    (ckpt / "step_00000150").mkdir(parents=True)  # being written when the run stopped
    assert locref.build_parser().parse_args(argv()).resume is None
    (ckpt / "step_00000150" / STATE_FILE).write_bytes(b"")
    assert locref.build_parser().parse_args(argv()).resume == str(ckpt)
    # a variant's flag (the diagnose's variant_factor) wins over the stage's own
    varied = sw.fgdm.trainer_argv(run, "v", "v", "base.safetensors", 3000, 8,
                                  ["--images", "i", "--instances", "j", "--lr", "1e-3"])
    assert locref.build_parser().parse_args(varied).lr == 1e-3
    assert locref.build_parser().parse_args(argv()).lr == 1e-4


def test_a_cached_factor_in_other_groups_than_the_base_is_trained_again(sw, tmp_path):
    """The trainer's adapter now normalises in the base UNet's groups: a cached factor made
    in 32 groups for a 4-group base is moved aside (kept), one that matches stays."""
    from locref_core.fgdm.adapter import FactorAdapter, FactorConfig
    from locref_core.fgdm.weights import save_factor

    small = dict(channels=(32, 64, 128, 128), emb_channels=128)
    for groups, made, stale in ((4, 32, True), (4, 4, False), (32, 32, False)):
        run = sw.make_run(sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path / str(made)),
                                         "--unet-norm-groups", str(groups)]))
        run["dir"].mkdir(parents=True, exist_ok=True)
        path = run["dir"] / "fgdm_seg.safetensors"
        assert sw.fgdm.retire_stale_factor(run) is None  # nothing cached
        save_factor(FactorAdapter(FactorConfig(norm_groups=made, **small)), str(path))
        assert sw.fgdm.stale_factor_groups(run) == (made if stale else None)
        kept = sw.fgdm.retire_stale_factor(run)
        assert (kept is not None) == stale and path.is_file() != stale
        if stale:
            assert kept == run["dir"] / "fgdm_seg_groups32.safetensors" and kept.is_file()


def test_a_variant_factor_beside_a_stale_run_factor_says_so(diagnose, sw, tmp_path,
                                                            monkeypatch, caplog):
    """The diagnose's factor variants train in the base UNet's groups (the trainer's default):
    beside a cached run factor made in other groups, the warning says they differ there too,
    unless the variant asks for its groups itself."""
    from locref_core.fgdm.adapter import FactorAdapter, FactorConfig
    from locref_core.fgdm.weights import save_factor

    run = sw.make_run(sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path),
                                     "--unet-norm-groups", "4"]))
    run["dir"].mkdir(parents=True, exist_ok=True)
    run["data"] = {"train": {k: tmp_path / k for k in ("images", "labels", "captions")}}
    flags_seen = []
    monkeypatch.setattr(diagnose.fg, "cached_training",
                        lambda *a, **k: flags_seen.append(a[-1][-2:]) or "trained")
    small = dict(channels=(32, 64, 128, 128), emb_channels=128)
    path = run["dir"] / "fgdm_seg.safetensors"
    for made, warned in ((4, False), (32, True)):
        save_factor(FactorAdapter(FactorConfig(norm_groups=made, **small)), str(path))
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert diagnose.variant_factor(run, "b", "lr0.001", ["--lr", "0.001"]) == "trained"
        assert ("the run's own normalises in 32 groups, this one in the base UNet's 4" in
                caplog.text) == warned
        assert ("as well as in --lr 0.001" in caplog.text) == warned
    caplog.clear()
    with caplog.at_level("WARNING"):  # the groups asked for: nothing to say
        diagnose.variant_factor(run, "b", "groups8", ["--norm-groups", "8"])
    assert "normalises" not in caplog.text
    assert flags_seen == [["--lr", "0.001"], ["--lr", "0.001"], ["--norm-groups", "8"]]


def test_factor_times_trains_each_rate_longer_beside_the_run_factor(diagnose, sw, tmp_path,
                                                                    monkeypatch):
    """--factor-times K trains the factor K times the run's steps at the run's rate and at each
    --factor-lr rate, named by rate and steps; the run's own (its rate, its steps) is not
    trained again, and a rate alone keeps the name --factor-lr gave it."""
    run = sw.make_run(sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path)]))
    run["dir"].mkdir(parents=True, exist_ok=True)
    run["data"] = {"train": {k: tmp_path / k for k in ("images", "labels", "captions")}}
    trained = []
    monkeypatch.setattr(diagnose.fg, "cached_training", lambda r, tag, name, main, base, steps,
                        batch, args: trained.append((name, steps, args[-2:])) or name)
    monkeypatch.setattr(diagnose, "factor_variants",
                        lambda run, host, parts, cfg, paths, question: paths)
    steps = run["preset"]["factor_steps"]
    paths = diagnose.factor_lr(run, None, None, None, "b", [3e-3], [2])
    longer = 2 * steps
    assert paths == {"lr 0.0001 (the run's factor)": str(run["dir"] / "fgdm_seg.safetensors"),
                     f"lr 0.0001, {longer} steps": f"diagnose/fgdm_seg_lr0.0001_steps{longer}",
                     "lr 0.003": "diagnose/fgdm_seg_lr0.003",
                     f"lr 0.003, {longer} steps": f"diagnose/fgdm_seg_lr0.003_steps{longer}"}
    assert [(s, a) for _, s, a in trained] == [(2 * steps, ["--lr", "0.0001"]),
                                               (steps, ["--lr", "0.003"]),
                                               (2 * steps, ["--lr", "0.003"])]
    trained.clear()
    assert list(diagnose.factor_lr(run, None, None, None, "b", [1e-3], [])) == [
        "lr 0.0001 (the run's factor)", "lr 0.001"]  # --factor-lr alone, as before


def test_controlnet_times_trains_one_loop_saved_at_each_length(diagnose, sw, tmp_path,
                                                              monkeypatch, caplog):
    """--controlnet-times: one loop from nothing saved as it passes the run's steps and each K's;
    lengths already saved are not trained again, a longer K continues the loop's checkpoints,
    and checkpoints past a length whose weights are missing are dropped (with a warning)."""
    from locref_core.train.common import STATE_FILE

    run = sw.make_run(sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path)]))
    run["dir"].mkdir(parents=True, exist_ok=True)
    run["data"] = {}
    steps = run["preset"]["controlnet_steps"]
    folder = run["dir"] / f"{diagnose.CHAIN}_ckpt"
    loops = []

    def train_on_world(r, host, parts, data, model, checkpoints, steps, any_length, on_step):
        assert any_length and checkpoints == f"{diagnose.CHAIN}_ckpt"
        done = diagnose.list_checkpoints(str(folder))
        start = int(Path(done[-1]).name.split("_")[-1]) if done else 0
        loops.append((start, steps))
        for step in range(start, steps):
            with torch.no_grad():
                model.weight.fill_(step + 1)  # the weights say how far the loop went
            on_step(step, 0.0)
        (folder / f"step_{steps:08d}").mkdir(parents=True, exist_ok=True)
        (folder / f"step_{steps:08d}" / STATE_FILE).touch()  # a complete checkpoint
        return []

    monkeypatch.setattr(diagnose.world_cn, "build_controlnet",
                        lambda host, parts, seed, hint_init: torch.nn.Linear(1, 1))
    monkeypatch.setattr(diagnose.fg, "train_on_world", train_on_world)
    from safetensors.torch import load_file

    def saved_at(total: int) -> float:
        return load_file(str(run["dir"] / f"{diagnose.CHAIN}{total}.safetensors"))[
            "weight"].item()

    files = diagnose.chained_controlnets(run, None, None, [3 * steps, 2 * steps])
    assert sorted(files) == [steps, 2 * steps, 3 * steps] and loops == [(0, 3 * steps)]
    assert [saved_at(s) for s in files] == [steps, 2 * steps, 3 * steps]
    loops.clear()
    assert sorted(diagnose.chained_controlnets(run, None, None, [2 * steps])) == [steps, 2 * steps]
    assert loops == []  # cached
    diagnose.chained_controlnets(run, None, None, [4 * steps])  # continues from 3 x steps
    assert loops == [(3 * steps, 4 * steps)] and saved_at(4 * steps) == 4 * steps
    loops.clear()
    (run["dir"] / f"{diagnose.CHAIN}{2 * steps}.safetensors").unlink()
    with caplog.at_level("WARNING"):
        diagnose.chained_controlnets(run, None, None, [2 * steps])
    assert f"is past step {2 * steps}, whose weights are not saved" in caplog.text
    assert loops == [(0, 2 * steps)] and saved_at(2 * steps) == 2 * steps


def test_crowding_counts_each_object_in_its_caption_and_alone(diagnose, sw):
    """Per layout: the caption image's finds by colour + shape, shape (at most as many as
    asked, as the tables count) and colour, against each object's image asked alone."""
    import torch
    from locref_core.world.evaluate import HeldOut

    def item(*objects):
        n = len(objects)
        return HeldOut(" and ".join(f"a {c} {s}" for c, s in objects),
                       ((0.0, 0.0, 0.5, 0.5),) * n, objects, (torch.zeros(3, 2, 2),) * n,
                       (torch.ones(2, 2),) * n)

    items = [item(("red", "square")),
             item(("blue", "disc"), ("green", "disc"), ("red", "triangle"))]
    caption_found = [[],  # the lone square not drawn at all
                     [("blue", "disc"), ("red", "disc"), ("red", "disc"), ("green", "square")]]
    alone_found = [[("red", "square")],
                   [("blue", "disc")], [("green", "square")], [("yellow", "triangle")]]
    counts = diagnose.crowding_counts(items, caption_found, alone_found)
    assert counts["objects"] == [1, 3] and counts["detections"] == [0, 4]
    assert counts["caption colour + shape"] == [0, 1]
    assert counts["caption shape"] == [0, 2]  # two discs asked, three drawn: two count
    assert counts["caption colour"] == [0, 3]
    assert counts["alone colour + shape"] == [1, 1]
    assert counts["alone shape"] == [1, 2]
    assert counts["alone colour"] == [1, 2]
    run = {"preset": {"bootstrap": 50}, "seed": 0}
    line = diagnose.crowding_figures(run, counts)
    assert line.startswith("all 4 objects: colour + shape 0.250 in the caption against 0.500 "
                           "alone, difference -0.250 [")
    assert ("by objects named: 1 named (1 layout): colour + shape 0.000 in the caption against "
            "1.000 alone, difference -1.000 [-1.000, -1.000]") in line
    assert "| 3 named (1 layout): colour + shape 0.333 in the caption against 0.333 alone" in line
    assert line.endswith("detections per caption image, by objects named: 1 named: 0.00, "
                         "3 named: 4.00")
    with pytest.raises(ValueError, match="2 caption images and 3 one-object images for 2 "
                                         "layouts of 4 objects"):
        diagnose.crowding_counts(items, caption_found, alone_found[:3])


def test_a_resumed_stage_keeps_its_minutes_apart(sw, tmp_path):
    run = {"dir": tmp_path}
    timings = sw.Timings(run)
    timings.mark("base", resumed=True)
    timings.mark("locref adapter")
    assert timings.minutes["resumed"] == ["base"]
    rerun = sw.Timings(run)  # cached stages keep the minutes they took, and are not resumed
    rerun.mark("base", cached=True, resumed=True)
    assert "resumed" not in rerun.minutes
    assert rerun.minutes["base"] == timings.minutes["base"]


RUN_MINUTES = {"data": 0.2, "base": 60.0, "locref adapter": 22.0, "locref images": 6.0,
               "locref table": 0.5, "waiting for the seg ControlNet": 9.0,
               "fgdm images, second half": 5.5, "waiting for the FG-DM half": 0.3,
               "tables and grid": 0.1}
BRANCH_MINUTES = {"fgdm seg factor": 14.0, "seg controlnet": 23.0,
                  "fgdm images, first half": 5.5}


def test_least_on_two_cores_halves_the_work_after_the_base(sw):
    one_core = 22.0 + 6.0 + 0.5 + 5.5 + 14.0 + 23.0 + 5.5  # the waits are not work
    assert sw.least_on_two_cores(RUN_MINUTES, BRANCH_MINUTES) == pytest.approx(
        0.2 + 60.0 + one_core / 2 + 0.1)
    assert sw.least_on_two_cores({**RUN_MINUTES, "resumed": ["base"]}, BRANCH_MINUTES) is None
    assert sw.least_on_two_cores(RUN_MINUTES, {**BRANCH_MINUTES,
                                               "resumed": ["seg controlnet"]}) is None


@pytest.fixture(scope="module")
def diagnose(sw):
    return load_benchmark("shapes_world_diagnose")


def test_diagnose_skips_the_basics_only_for_a_question(diagnose, capsys):
    args = diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--adapter-lr", "3e-4"])
    assert args.skip_basics and args.adapter_lr == [3e-4]
    assert not diagnose.parse_args(["--comfyui", "x"]).skip_basics
    with pytest.raises(SystemExit):
        diagnose.parse_args(["--comfyui", "x", "--skip-basics"])
    err = capsys.readouterr().err
    assert "--skip-basics leaves nothing to do" in err and "--adapter-lr LR" in err
    assert "--factor-times K or --crowding" in err  # every question is named
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--hint-init", "torch",
                                "kaiming"]).hint_init == ["torch", "kaiming"]
    with pytest.raises(SystemExit):
        diagnose.parse_args(["--comfyui", "x", "--hint-init", "xavier"])
    assert "invalid choice: 'xavier'" in capsys.readouterr().err
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--drawing"]).drawing
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--base-longer"]).base_longer
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--controlnet-lr", "3e-4",
                                "1e-3"]).controlnet_lr == [3e-4, 1e-3]
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--controlnet-null",
                                "0.1"]).controlnet_null == [0.1]
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--controlnet-end", "0.5",
                                "1"]).controlnet_end == [0.5, 1.0]
    for bad in ("0", "1.5", "-0.2"):
        with pytest.raises(SystemExit):
            diagnose.parse_args(["--comfyui", "x", "--controlnet-end", "0.5", bad])
        assert f"--controlnet-end 0.5 {float(bad)}: each F is a share" in capsys.readouterr().err
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--factor-offset", "0.1",
                                "0"]).factor_offset == [0.1, 0.0]
    with pytest.raises(SystemExit):
        diagnose.parse_args(["--comfyui", "x", "--factor-offset", "1.5"])
    assert "--factor-offset 1.5: each S is the offset noise" in capsys.readouterr().err
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--factor-loss-weight",
                                "v"]).factor_loss_weight == ["v"]
    with pytest.raises(SystemExit):
        diagnose.parse_args(["--comfyui", "x", "--factor-loss-weight", "snr"])
    assert "invalid choice: 'snr'" in capsys.readouterr().err
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--mean-control",
                                "--unet-norm-groups", "4"]).unet_norm_groups == "4"
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--factor-norm-groups", "4",
                                "8"]).factor_norm_groups == [4, 8]
    with pytest.raises(SystemExit):
        diagnose.parse_args(["--comfyui", "x", "--factor-norm-groups", "0"])
    assert "--factor-norm-groups 0: each G is a number of GroupNorm groups" in (
        capsys.readouterr().err)
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--unet-on-maps"]).unet_on_maps
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--factor-lr", "1e-3",
                                "3e-3"]).factor_lr == [1e-3, 3e-3]
    for bad in ("0", "1", "2"):
        with pytest.raises(SystemExit):
            diagnose.parse_args(["--comfyui", "x", "--factor-lr", "1e-3", bad])
        assert f"--factor-lr 0.001 {float(bad):g}: each LR is a learning rate in (0, 1)" in (
            capsys.readouterr().err)
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--factor-times",
                                "2"]).factor_times == [2]
    with pytest.raises(SystemExit):
        diagnose.parse_args(["--comfyui", "x", "--factor-times", "2", "1"])
    assert "--factor-times 2 1: each K is a multiple of the run's factor steps" in (
        capsys.readouterr().err)
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--controlnet-times", "2",
                                "4"]).controlnet_times == [2, 4]
    with pytest.raises(SystemExit):
        diagnose.parse_args(["--comfyui", "x", "--controlnet-times", "1"])
    assert "--controlnet-times 1: each K is a multiple of the run's ControlNet steps" in (
        capsys.readouterr().err)
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--controlnet-strength",
                                "0.5", "2"]).controlnet_strength == [0.5, 2.0]
    for bad in ("0", "-1", "11"):
        with pytest.raises(SystemExit):
            diagnose.parse_args(["--comfyui", "x", "--controlnet-strength", "2", bad])
        assert f"--controlnet-strength 2 {float(bad):g}: each S is ControlNetApplyAdvanced's" in (
            capsys.readouterr().err)
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--controlnet-loss-weight",
                                "v"]).controlnet_loss_weight == ["v"]
    with pytest.raises(SystemExit):
        diagnose.parse_args(["--comfyui", "x", "--controlnet-loss-weight", "x0"])
    assert "--controlnet-loss-weight: invalid choice: 'x0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        diagnose.parse_args(["--comfyui", "x", "--prediction", "v", "--controlnet-loss-weight",
                             "v"])
    assert "a v base's ControlNet already trains on v's error" in capsys.readouterr().err
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--controlnet-colour"]
                               ).controlnet_colour
    # every ControlNet-drawing line but --controlnet-positive takes --positive-only
    for flags in (["--controlnet-lr", "3e-4"], ["--controlnet-times", "2"],
                  ["--controlnet-colour"], ["--controlnet-loss-weight", "v"]):
        assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", *flags,
                                    "--positive-only"]).positive_only
    assert not diagnose.parse_args(["--comfyui", "x", "--skip-basics",
                                    "--controlnet-colour"]).positive_only
    with pytest.raises(SystemExit):
        diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--controlnet-positive",
                             "--positive-only"])
    assert "--positive-only with --controlnet-positive: that line draws both wirings" in (
        capsys.readouterr().err)
    for flags in (["--skip-basics", "--crowding"], ["--placement"]):  # no ControlNet line
        with pytest.raises(SystemExit):
            diagnose.parse_args(["--comfyui", "x", *flags, "--positive-only"])
        assert ("--positive-only changes how --controlnet-lr, --controlnet-null, "
                "--controlnet-end, --controlnet-times, --controlnet-strength, "
                "--controlnet-colour and --controlnet-loss-weight draw their ControlNets: ask "
                "one of them too") in capsys.readouterr().err
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--controlnet-positive"]
                               ).controlnet_positive
    assert diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--crowding"]).crowding
    with pytest.raises(SystemExit):  # the basics hold the drawing lines already
        diagnose.parse_args(["--comfyui", "x", "--drawing"])
    assert "add --skip-basics to ask only --drawing" in capsys.readouterr().err


def test_diagnose_adapter_times(diagnose, capsys, tmp_path):
    args = diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--adapter-times", "4", "2",
                                "4"])
    assert args.adapter_times == [2, 4]  # each continues the one before, so in this order
    longer = diagnose.parse_args(["--comfyui", "x", "--longer", "--adapter-times", "2", "3"])
    assert longer.adapter_times == [3]  # --longer's line is K = 2's already
    for bad in ("1", "0"):
        with pytest.raises(SystemExit):
            diagnose.parse_args(["--comfyui", "x", "--adapter-times", "3", bad])
        assert f"--adapter-times 3 {bad}: each K is a multiple" in capsys.readouterr().err
    assert diagnose.continued_name(2) == "diagnose/locref_longer"  # --longer's, as it was
    assert diagnose.continued_name(4) == "diagnose/locref_x4"
    assert diagnose.continued_from(tmp_path, 4) == tmp_path / "locref_ckpt"  # the run's own
    (tmp_path / "diagnose" / "locref_longer_ckpt").mkdir(parents=True)
    assert diagnose.continued_from(tmp_path, 2) == tmp_path / "locref_ckpt"  # never itself
    assert diagnose.continued_from(tmp_path, 4) == tmp_path / "diagnose" / "locref_longer_ckpt"
    (tmp_path / "diagnose" / "locref_x3_ckpt").mkdir()
    assert diagnose.continued_from(tmp_path, 4) == tmp_path / "diagnose" / "locref_x3_ckpt"
    assert diagnose.continued_from(tmp_path, 3) == tmp_path / "diagnose" / "locref_longer_ckpt"


def test_diagnose_adapter_seeds_spread_and_claims(diagnose, sw, tmp_path):
    args = diagnose.parse_args(["--comfyui", "x", "--skip-basics", "--adapter-seeds", "1", "2"])
    assert args.adapter_seeds == [1, 2]
    locref, masks_off, composite_off = diagnose.SEED_ROWS

    def seed(ap50, leakage, off_leakage, off_ap50):
        stat = lambda v, half=0.05: (v, v - half, v + half)  # noqa: E731
        return {locref: {"AP50": stat(ap50), "appearance": stat(0.4), "leakage": stat(leakage)},
                masks_off: {"AP50": stat(0.03), "appearance": stat(0.15),
                            "leakage": stat(off_leakage)},
                composite_off: {"AP50": stat(off_ap50), "appearance": stat(0.3),
                                "leakage": stat(0.04)}}

    line = diagnose.seed_spread({0: seed(0.217, 0.027, 0.158, 0.057),  # apart both ways
                                 1: seed(0.150, 0.030, 0.070, 0.120),  # higher / lower, inside
                                 2: seed(0.180, 0.060, 0.050, 0.200)})  # neither
    assert line.startswith("adapter-seeds: over 3 seeds of the adapter's training: ")
    assert (f"{locref}: AP50 0.150 to 0.217 (its intervals 0.100 wide on average), appearance "
            "0.400 to 0.400") in line
    assert f"{masks_off}: AP50 0.030 to 0.030" in line
    assert line.endswith("instance masks off raise leakage for 2 of 3 seeds, outside the "
                         "intervals for 1; composite path off lower AP50 for 2 of 3 seeds, "
                         "outside the intervals for 1")
    # the trainer's seed reaches its flags; by default the run's
    run = sw.make_run(sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path)]))
    fgdm = load_benchmark("shapes_world_fgdm")
    flags = fgdm.trainer_argv(run, "t", "diagnose/x", "b", 10, 2, [])
    assert flags[flags.index("--seed") + 1] == "0"
    flags = fgdm.trainer_argv(run, "t", "diagnose/x", "b", 10, 2, [], seed=3)
    assert flags[flags.index("--seed") + 1] == "3"


def test_diagnose_interval_text(diagnose):
    assert diagnose.interval("AP50", (0.3071, 0.2349, 0.39749)) == "AP50 0.307 [0.235, 0.397]"
    assert diagnose.interval("no label", (1, 0, 1)) == "no label 1.000 [0.000, 1.000]"


def test_diagnose_needs_only_the_models_its_questions_read(sw, diagnose, tmp_path):
    def missing(*flags):
        args = diagnose.parse_args(["--comfyui", "x", "--cache", str(tmp_path), *flags])
        run = sw.make_run(sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path)]))
        return diagnose.missing_models(run, args)

    everything = ["base.safetensors", "seg_controlnet.safetensors"]
    assert missing() == everything
    assert missing("--placement") == [everything[0], "locref.safetensors", everything[1]]
    folder = tmp_path / f"full-seed0-v{sw.RECIPE_VERSION}"
    folder.mkdir(exist_ok=True)  # make_run makes it
    (folder / "base.safetensors").touch()
    assert missing("--skip-basics", "--samplers") == []
    assert missing("--skip-basics", "--drawing") == []  # the base alone
    assert missing("--skip-basics", "--regional") == []  # the base and its CLIP alone
    assert missing("--skip-basics", "--adapter-lr", "3e-4") == ["locref.safetensors"]
    assert missing("--skip-basics", "--adapter-times", "4") == ["locref.safetensors"]
    assert missing("--skip-basics", "--base-longer") == ["locref.safetensors"]  # the run's, beside
    assert missing("--skip-basics", "--adapter-seeds", "1") == ["locref.safetensors"]
    (folder / "locref.safetensors").touch()
    assert missing("--skip-basics", "--adapter-lr", "3e-4", "--placement") == []
    assert missing("--skip-basics", "--longer") == ["seg_controlnet.safetensors"]
    assert missing("--adapter-lr", "3e-4") == ["seg_controlnet.safetensors"]
    # the run's seg ControlNet is drawn beside those trained at other rates
    assert missing("--skip-basics", "--controlnet-lr", "3e-4") == ["seg_controlnet.safetensors"]
    assert missing("--skip-basics", "--one-object-map") == ["seg_controlnet.safetensors"]
    assert missing("--skip-basics", "--controlnet-null", "0.1") == ["seg_controlnet.safetensors"]
    assert missing("--skip-basics", "--controlnet-end", "0.5") == ["seg_controlnet.safetensors"]
    assert missing("--skip-basics", "--controlnet-times", "2") == ["seg_controlnet.safetensors"]
    assert missing("--skip-basics", "--controlnet-strength", "2") == [
        "seg_controlnet.safetensors"]
    assert missing("--skip-basics", "--controlnet-colour") == ["seg_controlnet.safetensors"]
    assert missing("--skip-basics", "--controlnet-positive") == ["seg_controlnet.safetensors"]
    assert missing("--skip-basics", "--controlnet-loss-weight", "v") == [
        "seg_controlnet.safetensors"]
    # the run's factor is drawn beside those trained with offset noise, through its ControlNet
    assert missing("--skip-basics", "--factor-offset", "0.1") == [
        "fgdm_seg.safetensors", "seg_controlnet.safetensors"]
    assert missing("--skip-basics", "--factor-loss-weight", "v") == [
        "fgdm_seg.safetensors", "seg_controlnet.safetensors"]
    assert missing("--skip-basics", "--mean-control") == ["fgdm_seg.safetensors"]
    assert missing("--skip-basics", "--crowding") == []  # the base alone
    for question in (["--factor-norm-groups", "4"], ["--unet-on-maps"],
                     ["--factor-lr", "1e-3"], ["--factor-times", "2"]):  # beside the run's
        assert missing("--skip-basics", *question) == [
            "fgdm_seg.safetensors", "seg_controlnet.safetensors"]
    (folder / "seg_controlnet.safetensors").touch()
    assert missing("--longer") == []
    (folder / "fgdm_seg.safetensors").touch()
    assert missing("--skip-basics", "--factor-offset", "0.1") == []


def test_diagnose_slope_and_channel_means(diagnose):
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert diagnose.slope(x, 2 * x + 1) == pytest.approx(2.0)
    assert diagnose.slope(x, torch.full_like(x, 5.0)) == 0.0
    latents = torch.arange(32.0).view(1, 2, 4, 4)  # channel 0 holds 0..15, channel 1 16..31
    assert diagnose.channel_means(latents).tolist() == [[7.5, 23.5]]


def test_diagnose_counts_squares_by_the_side_drawn(diagnose):
    from test_eval_shapes import draw

    # two small squares (12 px; one painted as a disc), one large (24 px), a large disc, and a
    # square asked for in a colour the image lacks (counted as "nothing", with no side)
    images = [draw([("square", "red", 10, 10, 12)]), draw([("disc", "red", 10, 10, 12)]),
              draw([("square", "blue", 20, 20, 24)]), draw([("disc", "green", 5, 5, 24)]),
              draw([("square", "red", 10, 10, 12)])]
    objects = [("red", "square"), ("red", "square"), ("blue", "square"), ("green", "disc"),
               ("blue", "square")]
    tally = diagnose.one_object_tally(images, objects)
    assert tally["both"] == 3
    assert tally[("square", "small", "square")] == 1 and tally[("square", "small", "disc")] == 1
    assert tally[("square", "large", "square")] == 1 and tally[("disc", "large", "disc")] == 1
    assert tally[("square", "nothing")] == 1
    text = diagnose.squares_by_side(tally)
    assert text.endswith("small 1 of 2, large 1 of 1")
    assert diagnose.side_class((0.1, 0.1, 0.1 + 18 / 64, 0.3)) == "small"
    assert diagnose.side_class((0.1, 0.1, 0.3, 0.1 + 19 / 64)) == "large"


def test_diagnose_recall_by_objects_named(diagnose):
    import torch
    from locref_core.world.evaluate import HeldOut

    from test_eval_shapes import draw

    def item(*objects):
        n = len(objects)
        return HeldOut(" and ".join(f"a {c} {s}" for c, s in objects),
                       ((0.0, 0.0, 0.5, 0.5),) * n, objects, (torch.zeros(3, 2, 2),) * n,
                       (torch.ones(2, 2),) * n)

    # one-object layouts: one found, one drawn in the wrong colour; a two-object layout with
    # one of its two found
    images = [draw([("square", "red", 10, 10, 16)]), draw([("disc", "blue", 10, 10, 16)]),
              draw([("triangle", "green", 4, 4, 20), ("disc", "red", 40, 40, 16)])]
    items = [item(("red", "square")), item(("green", "disc")),
             item(("green", "triangle"), ("yellow", "disc"))]
    scores = [diagnose.score_image(im, it) for im, it in zip(images, items)]
    assert diagnose.recall_by_named(scores) == "1 named 0.500, 2 named 0.500"


def test_diagnose_reads_a_shape_drawn_past_its_box_whole(diagnose):
    from types import SimpleNamespace

    from test_eval_shapes import draw

    # a 24 px disc in a 20 px box: its crop cuts the round edge off and reads as a square, the
    # whole image reads a disc; a square in its own box reads as a square both ways; a box whose
    # colour is drawn nowhere near it reads as nothing whole
    image = draw([("disc", "red", 20, 20, 24), ("square", "blue", 50, 4, 10),
                  ("triangle", "green", 2, 44, 16)])
    boxes = [(22 / 64, 22 / 64, 42 / 64, 42 / 64), (50 / 64, 4 / 64, 60 / 64, 14 / 64),
             (40 / 64, 44 / 64, 56 / 64, 60 / 64)]
    objects = [("red", "disc"), ("blue", "square"), ("green", "triangle")]
    found = diagnose.detect_shapes(image)
    assert [diagnose.overlapping_shape(found, c, b) for (c, _), b in zip(objects, boxes)] == [
        "disc", "square", "nothing"]
    assert diagnose.overlapping_shape(found, "yellow", boxes[0]) == "nothing"
    text = diagnose.appearance_by_shape([image], [SimpleNamespace(boxes=boxes, objects=objects)])
    assert "both, by the reference's shape: square 1/1, disc 0/1, triangle 0/1;" in text
    assert text.endswith("not the box's crop): square 1/1, disc 1/1, triangle 0/1")


def test_diagnose_splits_a_change_by_the_boxes(diagnose):
    import torch
    from types import SimpleNamespace

    # one box over the left half: a change there, then a change of another size on the right
    item = SimpleNamespace(boxes=[(0.0, 0.0, 0.5, 1.0)], label=lambda i: "red square")
    mask = diagnose.inside_boxes(item, 8)
    assert mask.sum() == 32 and mask[:, :4].all() and not mask[:, 4:].any()
    base = torch.zeros(3, 8, 8)
    left, right = base.clone(), base.clone()
    left[:, :, :4] = 0.5
    right[:, :, 4:] = 0.25
    assert diagnose.change_by_region([left, right], [base, base], [item, item]) == (0.25, 0.125)
    # a box over the whole canvas leaves nothing outside: no change counted there
    whole = SimpleNamespace(boxes=[(0.0, 0.0, 1.0, 1.0)], label=lambda i: "red square")
    assert diagnose.change_by_region([left], [base], [whole]) == (0.25, 0.0)


def test_a_busy_machine_is_named_before_a_run(sw, caplog):
    def ticks(*samples):
        it = iter(samples)
        return lambda: next(it)

    # 90 of 100 ticks busy over the window: other work (this process slept through it)
    assert sw.busy_share(0.0, ticks((1000, 5000), (1090, 5100))) == pytest.approx(0.9, abs=0.05)
    assert sw.busy_share(0.0, ticks((1000, 5000), (1010, 5100))) == pytest.approx(0.1, abs=0.05)
    assert sw.busy_share(0.0, ticks(None, None)) is None  # no /proc/stat
    assert sw.busy_share(0.0, ticks((1, 5), (1, 5))) is None  # no tick passed
    with caplog.at_level("WARNING", logger="shapes_world"):
        assert sw.warn_if_busy("diagnose", share=0.98)
    assert "diagnose: the machine is busy" in caplog.text and "use 98 % of its" in caplog.text
    caplog.clear()
    assert not sw.warn_if_busy("diagnose", share=0.1) and not caplog.text
    ticks_now = sw.cpu_ticks()  # this machine's /proc/stat, where there is one
    assert ticks_now is None or 0 <= ticks_now[0] <= ticks_now[1]


def test_a_run_records_the_machine_its_weights_were_trained_on(sw, tmp_path, caplog,
                                                                 monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n")
    assert sw.cpu_model(str(info)) == "AMD EPYC 9B14"
    assert isinstance(sw.cpu_model(str(tmp_path / "none")), str)  # no file: platform's word
    for name in sw.ISA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    here = sw.machine(str(info))
    assert here["cpu"] == "AMD EPYC 9B14" and here["torch"] == sw.torch.__version__
    assert here["isa variables"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert here["convolution libraries"] == {"oneDNN": sw.torch.backends.mkldnn.enabled,
                                             "NNPACK": sw.torch._C._get_nnpack_enabled()}
    with sw.torch.backends.mkldnn.flags(enabled=False), sw.torch.backends.nnpack.flags(False):
        assert sw.machine(str(info))["convolution libraries"] == {"oneDNN": False,
                                                                  "NNPACK": False}
    run = {"dir": tmp_path}
    with caplog.at_level("INFO", logger="shapes_world"):
        assert sw.record_machine(run, here) == [here]
    assert "machine: " in caplog.text and "were made on" not in caplog.text
    assert sw.json.loads((tmp_path / "machine.json").read_text()) == {"machines": [here]}
    caplog.clear()
    with caplog.at_level("INFO", logger="shapes_world"):  # the same machine again: no warning
        assert sw.record_machine(run, {**here, "cores": 99}) == [here]
    assert "were made on" not in caplog.text
    other = {**here, "cpu capability": "AVX512", "isa variables": {}}
    with caplog.at_level("WARNING", logger="shapes_world"):
        assert sw.record_machine(run, other) == [here, other]
    assert "were made on" in caplog.text and '"AVX2"' in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="shapes_world"):  # the first machine's stages remain
        assert sw.recorded_machines(run, other, "diagnose") == [here, other]
    assert "diagnose: stages cached in" in caplog.text


def test_the_machine_record_tells_cpus_of_one_name_apart(sw, tmp_path, caplog):
    """Two "AMD EPYC"s with AVX2 trained other weights (2026-12-07): the record holds the
    family, model and stepping and the caches; a record made before it had them is not
    contradicted (no warning) nor taken for this machine (this one is added beside it)."""
    info = tmp_path / "cpuinfo"
    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {f}\n"
             "model\t\t: 1\nmodel name\t: AMD EPYC\nstepping\t: 1\n\n")
    info.write_text(block.format(n=0, f=25) + block.format(n=1, f=23))  # the first one counts
    assert sw.cpu_id(str(info)) == "family 25 model 1 stepping 1"
    assert sw.cpu_model(str(info)) == "AMD EPYC"
    bare = tmp_path / "bare"
    bare.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert sw.cpu_id(str(bare)) == "" and sw.cpu_id(str(tmp_path / "none")) == ""
    caches = tmp_path / "cache"
    for index, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "512K")]):
        folder = caches / f"index{index}"
        folder.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(f"{value}\n")
    (caches / "index9").mkdir()  # unreadable entries are skipped
    assert sw.cpu_caches(str(caches)) == {"L1 Data": "32K", "L1 Instruction": "32K",
                                          "L2 Unified": "512K"}
    assert sw.cpu_caches(str(tmp_path / "none")) == {}
    here = sw.machine(str(info), str(caches))
    assert here["cpu id"] == "family 25 model 1 stepping 1"
    assert here["caches"]["L2 Unified"] == "512K"
    older = {k: v for k, v in here.items() if k not in sw.MACHINE_KEYS_SINCE}
    assert sw.same_machine(older, here) and sw.same_machine(here, older)
    zen2 = {**here, "cpu id": "family 23 model 49 stepping 0"}
    assert not sw.same_machine(zen2, here)
    assert not sw.same_machine({**here, "caches": {"L2 Unified": "1024K"}}, here)
    run = {"dir": tmp_path}
    (tmp_path / "machine.json").write_text(sw.json.dumps({"machines": [older]}))
    with caplog.at_level("INFO", logger="shapes_world"):
        assert sw.record_machine(run, here) == [older, here]
        assert sw.record_machine(run, here) == [older, here]  # now known: not added again
    assert "were made on" not in caplog.text
    with caplog.at_level("WARNING", logger="shapes_world"):
        assert sw.record_machine(run, zen2) == [older, here, zen2]
    assert "were made on" in caplog.text and "family 25 model 1" in caplog.text


def test_a_portable_run_has_its_own_numerics_and_folder(sw, diagnose, tmp_path, monkeypatch):
    """--portable: cached apart; its variables set by the command line, which starts itself
    again with them, and never over a value the user set; a process without them refuses."""
    args = sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path), "--portable", "--quick"])
    run = sw.make_run(args)
    assert run["dir"].name == f"quick-seed0-v{sw.RECIPE_VERSION}-portable" and run["portable"]
    assert not sw.make_run(sw.parse_args(["--comfyui", "x", "--cache", str(tmp_path)]))[
        "portable"]
    for name in sw.PORTABLE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert sw.portable_environment({"HOME": "/h"}) == {"HOME": "/h", **sw.PORTABLE_VARIABLES}
    assert sw.portable_environment(dict(sw.PORTABLE_VARIABLES)) == sw.PORTABLE_VARIABLES
    with pytest.raises(ValueError, match="sets ATEN_CPU_CAPABILITY=default: unset it"):
        sw.portable_environment({"ATEN_CPU_CAPABILITY": "default"})
    with pytest.raises(RuntimeError, match="set ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 before"):
        sw.enter_portable()  # torch in this process already chose its code
    started = []
    monkeypatch.setattr(sw.os, "execve", lambda *a: started.append(a))
    sw.restart_if_portable("benchmarks/shapes_world.py", ["--comfyui", "x"])
    assert started == []  # not asked
    sw.restart_if_portable("benchmarks/shapes_world.py", ["--portable"])
    (exe, argv, env), = started
    assert exe == sys.executable and argv[-1] == "--portable"
    assert argv[1] == str((Path("benchmarks") / "shapes_world.py").resolve())
    assert {k: env[k] for k in sw.PORTABLE_VARIABLES} == sw.PORTABLE_VARIABLES
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    with pytest.raises(SystemExit, match="MKL_CBWR=COMPATIBLE: unset it"):
        sw.restart_if_portable("benchmarks/shapes_world.py", ["--portable"])
    for name, value in sw.PORTABLE_VARIABLES.items():
        monkeypatch.setenv(name, value)
    sw.restart_if_portable("benchmarks/shapes_world.py", ["--portable"])
    assert len(started) == 1  # already set: this process goes on
    assert diagnose.parse_args(["--comfyui", "x", "--portable"]).portable
    for parse in (sw.parse_args, diagnose.parse_args):  # an abbreviation would not restart
        with pytest.raises(SystemExit):
            parse(["--comfyui", "x", "--portab"])


def test_lone_object_map_keeps_one_object_and_the_frame(diagnose):
    import torch
    from locref_core.world.evaluate import HeldOut

    side, frame, ground = 16, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([-0.5, -0.8, 0.5])
    square, disc = torch.tensor([0.2, 0.1, 0.1]), torch.tensor([-1.0, -1.0, 0.5])
    true_map = frame[:, None, None].repeat(1, side, side)
    true_map[:, 1:-1, 1:-1] = ground[:, None, None]
    true_map[:, 3:7, 2:6] = square[:, None, None]  # a 4 x 4 square in box x 2..6, y 3..7
    disc_mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]]).float()
    window = true_map[:, 9:13, 10:14]
    window[:] = torch.where(disc_mask.bool(), disc[:, None, None], window)
    item = HeldOut("a red square and a blue disc",
                   ((2 / side, 3 / side, 6 / side, 7 / side),
                    (10 / side, 9 / side, 14 / side, 13 / side)),
                   (("red", "square"), ("blue", "disc")),
                   (torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)), (torch.ones(4, 4), disc_mask))
    first, second = (diagnose.lone_object_map(true_map, item, k) for k in (0, 1))
    for lone in (first, second):  # the void frame as it was
        assert torch.equal(lone[:, 0], true_map[:, 0]) and torch.equal(lone[:, :, -1],
                                                                       true_map[:, :, -1])
    assert torch.equal(first[:, 3:7, 2:6], true_map[:, 3:7, 2:6])
    assert (first[:, 9:13, 10:14] == ground[:, None, None]).all()  # the disc painted over
    assert torch.equal(second[:, 9:13, 10:14], true_map[:, 9:13, 10:14])
    assert (second[:, 3:7, 2:6] == ground[:, None, None]).all()
    inside = second[:, 1:-1, 1:-1]
    assert ((inside == ground[:, None, None]).all(0).sum()
            == (side - 2) ** 2 - int(disc_mask.sum()))  # nothing else left
    crowded = HeldOut("a red square", ((0.0, 0.0, 1.0, 1.0),), (("red", "square"),),
                      (torch.zeros(3, side, side),), (torch.ones(side, side),))
    with pytest.raises(ValueError, match="no background cell outside its boxes"):
        diagnose.lone_object_map(true_map, crowded, 0)


def test_colour_maps_paint_each_object_in_its_image_colour(diagnose, sw, tmp_path):
    """--controlnet-colour's hint: the seg map with each object's pixels in the colour its
    image (and caption) gives it; the background and the void frame as the seg map has them."""
    import json

    from locref_core.data.coco import polygon_mask
    from locref_core.data.synthetic import COLOURS, make_synthetic_coco

    fg = load_benchmark("shapes_world_fgdm")
    paths = make_synthetic_coco(tmp_path / "w", n_images=6, size=64, seed=5, max_objects=4)
    seg, images = fg.read_maps(paths), sw.read_images(paths["images"])
    coloured = diagnose.colour_maps(paths, seg, images)
    assert coloured.shape == seg.shape
    rgb = {name: torch.tensor(c) / 127.5 - 1 for name, c in COLOURS.items()}
    captions = sw.read_captions(paths, len(seg))  # each image's, in image order
    objects = torch.zeros(seg.shape[0], 64, 64, dtype=torch.bool)
    anns = json.loads(Path(paths["instances"]).read_text())["annotations"]
    for ann in anns:
        i = ann["image_id"] - 1
        mask = torch.from_numpy(polygon_mask(ann["segmentation"], 64, 64))
        objects[i] |= mask
        pixels = coloured[i][:, mask]  # (3, n): one flat colour of the world's, in the caption
        name = next(n for n, c in rgb.items() if torch.allclose(pixels[:, 0], c, atol=1e-3))
        assert torch.allclose(pixels, rgb[name][:, None].expand_as(pixels), atol=1e-3)
        assert all(name in caption for caption in captions[i])
        assert not torch.allclose(seg[i][:, mask], pixels)  # the seg map paints its class
    assert len(anns) >= 6
    outside = ~objects[:, None].expand_as(seg)
    assert torch.equal(coloured[outside], seg[outside])  # background and void frame kept
    with pytest.raises(ValueError, match="do not match the seg maps"):
        diagnose.colour_maps(paths, seg[:, :, :32, :32], images)
