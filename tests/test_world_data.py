"""The shapes world's data stage writes its images once per cache (no host)."""

from tests.host.harness_env import load_benchmark  # host-free: the loader the host tests use


def test_the_world_data_is_written_once_and_a_half_written_folder_is_redone(tmp_path):
    sw = load_benchmark("shapes_world")
    (tmp_path / "train.partial").mkdir()
    (tmp_path / "train.partial" / "stale.png").write_bytes(b"left by a killed run")
    paths = sw.written_once(tmp_path / "train", n_images=3, seed=0)
    assert paths["root"] == tmp_path / "train" and not (tmp_path / "train.partial").exists()
    images = sorted(paths["images"].glob("*.png"))
    assert [p.name for p in images] == ["000001.png", "000002.png", "000003.png"]
    stamps = [p.stat().st_mtime_ns for p in images] + [paths["captions"].stat().st_mtime_ns]
    again = sw.written_once(tmp_path / "train", n_images=3, seed=0)
    assert again == paths
    assert [p.stat().st_mtime_ns for p in images] + [paths["captions"].stat().st_mtime_ns] == stamps


def test_a_v_prediction_run_has_its_own_cache_folder(tmp_path):
    sw = load_benchmark("shapes_world")
    runs = [sw.make_run(sw.parse_args(["--comfyui", "unused", "--cache", str(tmp_path), *extra]))
            for extra in ([], ["--prediction", "v"])]
    assert [r["dir"].name for r in runs] == [f"full-seed0-v{sw.RECIPE_VERSION}",
                                             f"full-seed0-v{sw.RECIPE_VERSION}-vpred"]
    assert [r["prediction"] for r in runs] == ["eps", "v"]
