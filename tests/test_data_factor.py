"""FG-DM factor samples: pairing by stem, palette-painted seg conditions, other kinds, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from locref_core.data import DataError, FactorDataset, collate_factor, make_synthetic_coco
from locref_core.fgdm.maps import encode, resize_nearest
from locref_core.fgdm.palettes import ADE20K, COCO_STUFF


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), n_images=4, seed=2)


def to_rgb255(x):
    """(3, S, S) in [-1, 1] -> (S, S, 3) uint8."""
    return ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_shapes_captions_and_collate(synth):
    ds = FactorDataset(synth["images"], synth["labels"], synth["captions"], size=64)
    assert len(ds) == 4
    item = ds[0]
    assert item["image"].shape == item["condition"].shape == (3, 64, 64)
    for key in ("image", "condition"):
        assert item[key].min() >= -1 and item[key].max() <= 1
    captions = json.loads(synth["captions"].read_text())["annotations"]
    assert item["caption"] in {c["caption"] for c in captions if c["image_id"] == 1}
    batch = collate_factor([ds[i] for i in range(3)])
    assert batch["image"].shape == batch["condition"].shape == (3, 3, 64, 64)
    assert len(batch["caption"]) == 3
    assert FactorDataset(synth["images"], synth["labels"], size=64)[0]["caption"] == ""


def test_seg_condition_is_the_label_painted_with_the_palette(synth):
    ds = FactorDataset(synth["images"], synth["labels"], size=64)
    for i in range(len(ds)):
        label = np.asarray(Image.open(synth["labels"] / f"{i + 1:06d}.png")).astype(np.int64)
        ids = np.where(label == 255, 0, label + 1)  # pixel = id - 1, 255 = void
        assert np.array_equal(to_rgb255(ds[i]["condition"]), encode(ids, COCO_STUFF))
        assert (to_rgb255(ds[i]["condition"])[0] == 255).all()  # the void frame is white


def test_seg_condition_is_resized_by_nearest_only(synth):
    ds = FactorDataset(synth["images"], synth["labels"], size=96)
    label = np.asarray(Image.open(synth["labels"] / "000002.png")).astype(np.int64)
    ids = resize_nearest(np.where(label == 255, 0, label + 1), 96, 96)
    rgb = to_rgb255(ds[1]["condition"])
    assert np.array_equal(rgb, encode(ids, COCO_STUFF))
    colours = {tuple(c) for c in COCO_STUFF.color_table().tolist()}
    assert {tuple(c) for c in rgb.reshape(-1, 3).tolist()} <= colours  # no blended colours


def test_seg_condition_in_another_palette(synth):
    ds = FactorDataset(synth["images"], synth["labels"], palette="ade150", size=64)
    rgb = to_rgb255(ds[0]["condition"])
    colours = {tuple(c) for c in ADE20K.color_table().tolist()}
    assert {tuple(c) for c in rgb.reshape(-1, 3).tolist()} <= colours
    assert tuple(rgb[0, 0]) == (0, 0, 0)  # COCO-stuff void -> ADE void, painted black


def test_depth_condition_and_centre_crop(tmp_path):
    images, depth = tmp_path / "images", tmp_path / "depth"
    images.mkdir(), depth.mkdir()
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[:, 20:60] = 255  # the centre 40 x 40 is white, the sides black
    Image.fromarray(img).save(images / "a.jpg", quality=100)
    d = np.tile(np.linspace(0, 255, 80).astype(np.uint8), (40, 1))  # (40, 80) grey ramp
    Image.fromarray(d, "L").save(depth / "a.png")
    item = FactorDataset(images, depth, kind="depth", size=40)[0]
    assert (item["image"] > 0.9).all()  # only the white centre is kept
    cond = item["condition"]
    assert torch.equal(cond[0], cond[1]) and torch.equal(cond[1], cond[2])
    expected = torch.from_numpy(d[:, 20:60]).float() / 127.5 - 1
    assert torch.allclose(cond[0], expected, atol=1e-5)


def test_file_map_pairs_other_names(synth, tmp_path):
    cond = tmp_path / "cond"
    cond.mkdir()
    for i in (1, 2):
        (cond / f"label_{i}.png").write_bytes((synth["labels"] / f"{i:06d}.png").read_bytes())
    mapping = {"000001.png": "label_1.png", "000002.png": "label_2.png"}
    ds = FactorDataset(synth["images"], cond, size=64, file_map=mapping)
    ref = FactorDataset(synth["images"], synth["labels"], size=64)
    assert len(ds) == 2 and torch.equal(ds[1]["condition"], ref[1]["condition"])
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    assert len(FactorDataset(synth["images"], cond, size=64, file_map=tmp_path / "map.json")) == 2
    with pytest.raises(DataError, match=r"label_3\.png \(file map entry '000003\.png'\)"):
        FactorDataset(synth["images"], cond, size=64, file_map={"000003.png": "label_3.png"})


def test_missing_pair_and_empty_folder(synth, tmp_path):
    labels = copy_dir(synth["labels"], tmp_path / "labels")
    (labels / "000003.png").unlink()
    with pytest.raises(DataError, match=r"image .*000003\.png has no condition file with stem "
                                         r"'000003' in .*labels"):
        FactorDataset(synth["images"], labels, size=64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"conditions folder .*empty holds no image files"):
        FactorDataset(synth["images"], empty, size=64)
    with pytest.raises(DataError, match=r"images folder .*nowhere does not exist"):
        FactorDataset(tmp_path / "nowhere", labels, size=64)


def test_unreadable_and_malformed_files(synth, tmp_path):
    labels = copy_dir(synth["labels"], tmp_path / "labels")
    (labels / "000001.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"label file .*000001\.png cannot be read"):
        FactorDataset(synth["images"], labels, size=64)  # the first pair is read up front
    (labels / "000001.png").write_bytes((synth["labels"] / "000001.png").read_bytes())
    (labels / "000004.png").write_bytes(b"garbage")
    ds = FactorDataset(synth["images"], labels, size=64)
    with pytest.raises(DataError, match=r"000004\.png cannot be read"):
        ds[3]
    Image.new("RGB", (64, 64)).save(labels / "000004.png")
    with pytest.raises(DataError, match=r"000004\.png is mode RGB"):
        ds[3]
    Image.fromarray(np.full((64, 64), 200, dtype=np.uint8)).save(labels / "000004.png")
    with pytest.raises(DataError, match=r"000004\.png has pixel value 200"):
        ds[3]
    Image.fromarray(np.zeros((64, 32), dtype=np.uint8)).save(labels / "000004.png")
    with pytest.raises(DataError, match=r"000004\.png is 32x64 but its image is 64x64"):
        ds[3]


def test_bad_arguments_are_refused(synth):
    with pytest.raises(ValueError, match="kind='canny'"):
        FactorDataset(synth["images"], synth["labels"], kind="canny")
    with pytest.raises(ValueError, match="unknown palette"):
        FactorDataset(synth["images"], synth["labels"], palette="voc")
    for size in (4, 10000):
        with pytest.raises(ValueError, match=rf"size={size} must be in 8\.\.8192 pixels"):
            FactorDataset(synth["images"], synth["labels"], size=size)
    with pytest.raises(ValueError, match="collate_factor needs at least one item"):
        collate_factor([])


def test_two_files_with_one_stem_and_file_maps_that_are_not_maps(synth, tmp_path):
    labels = copy_dir(synth["labels"], tmp_path / "labels")
    (labels / "000002.jpg").write_bytes((labels / "000002.png").read_bytes())
    (labels / "notes.txt").write_text("not an image")  # other files are passed over
    with pytest.raises(DataError, match=r"conditions folder .*labels has two files with stem "
                                        r"'000002' \(000002\.jpg, 000002\.png\); keep one"):
        FactorDataset(synth["images"], labels, size=64)
    (tmp_path / "map.json").write_text(json.dumps([["000001.png", "000001.png"]]))
    with pytest.raises(DataError, match=r"file map .*map\.json must be a JSON object"):
        FactorDataset(synth["images"], synth["labels"], size=64, file_map=tmp_path / "map.json")
    with pytest.raises(DataError, match=r"the file map is empty; list \{image file: condition"):
        FactorDataset(synth["images"], synth["labels"], size=64, file_map={})


def test_captions_of_another_split_or_of_some_images(synth, tmp_path, caplog):
    data = json.loads(synth["captions"].read_text())
    other = tmp_path / "captions_other.json"
    other.write_text(json.dumps({**data, "annotations": [{"image_id": 999, "caption": "a cat"}]}))
    with pytest.raises(DataError, match=r"captions_other\.json: no caption refers to any image in"):
        FactorDataset(synth["images"], synth["labels"], other, size=64)
    first = data["images"][0]["id"]
    some = {**data, "annotations": [a for a in data["annotations"] if a["image_id"] == first]}
    other.write_text(json.dumps(some))
    with caplog.at_level("WARNING"):
        ds = FactorDataset(synth["images"], synth["labels"], other, size=64)
    assert "3 of 4 images have no caption in" in caplog.text
    assert [ds[i]["caption"] == "" for i in range(4)] == [False, True, True, True]
    other.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match=r"a COCO captions file needs an 'annotations' list"):
        FactorDataset(synth["images"], synth["labels"], other, size=64)
    other.write_text(json.dumps({**data, "annotations": [{"image_id": first, "caption": 7}]}))
    with pytest.raises(DataError, match=r"caption entry .* needs 'image_id' and a string"):
        FactorDataset(synth["images"], synth["labels"], other, size=64)
