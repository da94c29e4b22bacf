"""The shapes world's command line (benchmarks/shapes_world.py), without the host: the base's
width and where each run is cached."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sw():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("shapes_world",
                                                  ROOT / "benchmarks" / "shapes_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.parametrize("bad", ["48", "0", "-32", "wide"])
def test_a_width_groupnorm_cannot_split_is_refused(sw, bad, capsys):
    with pytest.raises(SystemExit):
        sw.parse_args(["--comfyui", "x", "--unet-channels", bad])
    err = capsys.readouterr().err
    assert f"'{bad}' is not a positive multiple of 32" in err and "try 32, 64 or 96" in err
