"""`python -m locref_core.eval` end to end on temporary folders, and FG-DM folder recall."""

import argparse
import json
import math

import numpy as np
import pytest
from PIL import Image

from locref_core.eval.__main__ import build_parser, main
from locref_core.eval.recall import folder_recall, map_recall
from locref_core.fgdm.maps import encode
from locref_core.fgdm.palettes import COCO_STUFF

PERSON, DOG, GRASS = 1, 18, 124

# Two 64 x 64 images. img_0001: a dog (top-left quarter, red) and a cat (bottom-right, blue);
# img_0002: one dog (left half, red). Pixel boxes: dog1 [0,0,32,32], cat [32,32,64,64],
# dog2 [0,0,32,64].
LAYOUTS = {
    "img_0001": {"version": 1, "boxes": [
        {"x0": 0, "y0": 0, "x1": 0.5, "y1": 0.5, "label": "Dog", "reference": "refs/red.png"},
        {"x0": 0.5, "y0": 0.5, "x1": 1, "y1": 1, "label": "cat"}]},
    "img_0002": {"version": 1, "boxes": [{"x0": 0, "y0": 0, "x1": 0.5, "y1": 1, "label": "dog"}]},
}  # fmt: skip
DETECTOR = '''
def detect(path):
    if path.endswith("img_0001.png"):
        return [{"bbox": [0, 0, 32, 32], "score": 0.9, "label": "dog"}]
    return [{"bbox": [0, 0, 32, 64], "score": 0.8, "category_id": 18}]
'''
ENCODER = '''
def make_encoder():
    return lambda batch: batch.mean(dim=(2, 3))
'''


def save_rgb(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), "RGB").save(path)


@pytest.fixture
def layouts(tmp_path):
    folder = tmp_path / "out"
    one = np.zeros((64, 64, 3), np.uint8)
    one[:32, :32] = (255, 0, 0)
    one[32:, 32:] = (0, 0, 255)
    two = np.zeros((64, 64, 3), np.uint8)
    two[:, :32] = (255, 0, 0)
    save_rgb(folder / "img_0001.png", one)
    save_rgb(folder / "img_0002.png", two)
    for stem, data in LAYOUTS.items():
        (folder / f"{stem}.json").write_text(json.dumps(data))
    save_rgb(folder / "refs" / "red.png", np.full((10, 10, 3), (255, 0, 0)))
    save_rgb(folder / "img_0002_ref0.png", np.full((12, 8, 3), (255, 255, 0)))  # yellow
    return folder


def write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_every_flag_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"boxes", "clip-i", "recall"}
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_boxes_from_a_coco_results_file(layouts, tmp_path, capsys):
    # dog: both found exactly -> AP 1. cat: no detection -> AP 0. Mean AP 0.5.
    # The second detection names its image by number (image_id 2 -> img_0002) and class by id.
    dets = write(tmp_path / "det.json", [
        {"file_name": "img_0001.png", "bbox": [0, 0, 32, 32], "score": 0.9, "label": "DOG"},
        {"image_id": 2, "bbox": [0, 0, 32, 64], "score": 0.8, "category_id": 18}])
    out = tmp_path / "res" / "ap.json"
    argv = ["boxes", "--layouts", str(layouts), "--detections", str(dets),
            "--label-map", "18=dog", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["AP"] == pytest.approx(0.5) and result["AP50"] == pytest.approx(0.5)
    assert result["per_class"]["dog"]["AP"] == 1.0 and result["per_class"]["cat"]["AP"] == 0.0
    table = capsys.readouterr().out
    assert "AP50" in table and "cat" in table and "0.5000" in table.splitlines()[-1]


def test_boxes_from_a_detector_callable(layouts, tmp_path, capsys):
    module = write(tmp_path / "my_detector.py", DETECTOR)
    out = tmp_path / "ap.json"
    main(["boxes", "--layouts", str(layouts), "--detector", f"{module}:detect",
          "--label-map", write(tmp_path / "labels.json", {"18": "dog"}).as_posix(),
          "--out", str(out)])
    assert json.loads(out.read_text())["per_class"]["dog"]["AP"] == 1.0


def test_a_detection_that_is_no_object_and_an_unreadable_image_are_named(layouts, tmp_path):
    module = write(tmp_path / "lists.py", "def detect(path):\n    return [[0, 0, 4, 4]]\n")
    with pytest.raises(SystemExit, match=r"must be an object with bbox, score and label, got "
                                         r"\[0, 0, 4, 4\]"):
        main(["boxes", "--layouts", str(layouts), "--detector", f"{module}:detect"])
    (layouts / "img_0002.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"cannot read image .*img_0002\.png"):
        main(["boxes", "--layouts", str(layouts), "--detector", f"{module}:detect"])


def test_boxes_without_label_map_scores_unmatched_class_ids_as_misses(layouts, tmp_path, caplog):
    # category_id 18 is not "dog" without the label map: dog AP = 1 of 2 found = 51/101.
    dets = write(tmp_path / "det.json", [
        {"file_name": "img_0001", "bbox": [0, 0, 32, 32], "score": 0.9, "label": "dog"},
        {"file_name": "img_0002.png", "bbox": [0, 0, 32, 64], "score": 0.8, "category_id": 18}])
    out = tmp_path / "ap.json"
    main(["boxes", "--layouts", str(layouts), "--detections", str(dets), "--out", str(out)])
    assert json.loads(out.read_text())["per_class"]["dog"]["AP"] == pytest.approx(51 / 101)


@pytest.mark.parametrize(
    "content, match",
    [("[{", r"det\.json is not valid JSON"),
     ({"bbox": []}, "list of detections"),
     ([{"file_name": "img_0009.png", "bbox": [0, 0, 1, 1], "score": 1, "label": "dog"}],
      r"entry 0 refers to image 'img_0009\.png'"),
     ([{"file_name": "img_0001.png", "bbox": [0, 0, 1], "score": 1, "label": "dog"}],
      r"\[x, y, width, height\]"),
     ([{"file_name": "img_0001.png", "bbox": [0, 0, 1, 1], "score": 1}], "category_id"),
     (["img_0001.png"], r"entry 0 must be an object, got 'img_0001\.png'"),
     ([{"bbox": [0, 0, 1, 1], "score": 1, "label": "dog"}],
      r"entry 0 has neither file_name nor image_id; name the image"),
     ([{"image_id": 2, "bbox": [0, 0, 1, 1], "score": "high", "label": "dog"}],
      r'entry 0: "score" must be a number, got \'high\''),
     ([{"image_id": 1, "bbox": [0, 0, -4, 1], "score": 1, "label": "dog"}],
      r"entry 0: bbox width/height are negative \(-4.0, 1.0\)")],
)  # fmt: skip
def test_bad_detection_files_exit_naming_the_file(layouts, tmp_path, content, match):
    dets = write(tmp_path / "det.json", content)
    with pytest.raises(SystemExit, match=match):
        main(["boxes", "--layouts", str(layouts), "--detections", str(dets)])


def test_missing_or_bad_layouts_exit_naming_the_file(layouts, tmp_path):
    dets = write(tmp_path / "det.json", [])
    save_rgb(layouts / "img_0003.png", np.zeros((64, 64, 3)))
    with pytest.raises(SystemExit, match=r"img_0003\.json"):
        main(["boxes", "--layouts", str(layouts), "--detections", str(dets)])
    write(layouts / "img_0003.json", '{"version": 1, "boxes": [{"x0": 0.5, "y0": 0}]}')
    with pytest.raises(SystemExit, match=r"img_0003\.json.*missing x1, y1"):
        main(["boxes", "--layouts", str(layouts), "--detections", str(dets)])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["boxes", "--layouts", str(tmp_path / "nope"), "--detections", str(dets)])
    with pytest.raises(SystemExit, match="module:function"):
        main(["boxes", "--layouts", str(layouts), "--detector", "no_colon"])
    with pytest.raises(SystemExit, match=r"--detector: .*absent\.py does not exist; give an "
                                         r"existing \.py file"):
        main(["boxes", "--layouts", str(layouts), "--detector", f"{tmp_path}/absent.py:detect"])
    with pytest.raises(SystemExit, match=r"--detector: cannot import 'no_such_module_here'"):
        main(["boxes", "--layouts", str(layouts), "--detector", "no_such_module_here:detect"])
    (layouts / "img_0003.png").unlink()  # the folder's images have their layouts again
    (layouts / "img_0003.json").unlink()
    odd = write(tmp_path / "odd_detector.py", "def detect(path):\n    return 'a dog'\n")
    with pytest.raises(SystemExit, match=r"the detector returned str for img_0001\.png; return a "
                                         r"list of"):
        main(["boxes", "--layouts", str(layouts), "--detector", f"{odd}:detect"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"layouts folder .*empty holds no image"):
        main(["boxes", "--layouts", str(empty), "--detections", str(dets)])


def test_label_maps_inline_or_in_a_file_and_their_errors(tmp_path):
    from locref_core.eval.folder import parse_label_map

    assert parse_label_map("1=person, 18 = Dog") == parse_label_map(
        str(write(tmp_path / "labels.json", {"1": "person", "18": "dog"})))
    with pytest.raises(ValueError, match=r"label map entry '18:dog' needs the form from=to"):
        parse_label_map("1=person, 18:dog")
    with pytest.raises(ValueError, match=r"label map .*labels\.json must be a JSON object"):
        parse_label_map(str(write(tmp_path / "labels.json", [["1", "person"]])))
    with pytest.raises(ValueError, match=r"absent\.json does not exist; give the path of a label "
                                         r"map"):
        parse_label_map(str(tmp_path / "absent.json"))


def test_clip_i_over_the_folder(layouts, tmp_path, capsys):
    # img_0001 box 0: red crop vs refs/red.png -> 1; box 1 (cat) has no reference -> skipped.
    # img_0002 box 0: red crop vs img_0002_ref0.png (yellow) -> 1/sqrt 2.
    # Mean over the two scored boxes: (1 + 1/sqrt 2) / 2.
    module = write(tmp_path / "toy_clip.py", ENCODER)
    out = tmp_path / "clip.json"
    main(["clip-i", "--layouts", str(layouts), "--encoder", f"{module}:make_encoder",
          "--size", "32", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["num_boxes"] == 2
    assert result["images"]["img_0001.png"]["boxes"] == {"0": pytest.approx(1.0, abs=1e-5)}
    assert result["clip_i"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-5)
    assert "CLIP-I" in capsys.readouterr().out


def test_clip_i_errors(layouts, tmp_path):
    module = write(tmp_path / "toy_clip.py", ENCODER)
    data = dict(LAYOUTS["img_0001"])
    data["boxes"] = [dict(data["boxes"][0], reference="refs/missing.png")]
    write(layouts / "img_0001.json", data)
    with pytest.raises(SystemExit, match=r"refs/missing\.png"):
        main(["clip-i", "--layouts", str(layouts), "--encoder", f"{module}:make_encoder"])
    with pytest.raises(SystemExit, match="has no function 'nope'"):
        main(["clip-i", "--layouts", str(layouts), "--encoder", f"{module}:nope"])
    with pytest.raises(SystemExit, match="--size 8 is too small; CLIP models take 224"):
        main(["clip-i", "--layouts", str(layouts), "--encoder", f"{module}:make_encoder",
              "--size", "8"])
    not_callable = write(tmp_path / "not_callable.py", "def make():\n    return 3\n")
    with pytest.raises(SystemExit, match=r"returned int, not a callable; make the function "
                                         r"return encode\(batch\) -> embeddings"):
        main(["clip-i", "--layouts", str(layouts), "--encoder", f"{not_callable}:make"])


def test_clip_i_without_any_reference_names_the_fix(layouts, tmp_path):
    module = write(tmp_path / "toy_clip.py", ENCODER)
    data = {"version": 1, "boxes": [dict(LAYOUTS["img_0001"]["boxes"][1])]}  # no reference
    write(layouts / "img_0001.json", data)
    (layouts / "img_0002_ref0.png").unlink()
    with pytest.raises(SystemExit, match="no box in .* has a reference image; add "
                                         "\"reference\" paths to the layout JSONs"):
        main(["clip-i", "--layouts", str(layouts), "--encoder", f"{module}:make_encoder",
              "--size", "32"])


# ------------------------------------------------------------------ FG-DM recall


@pytest.fixture
def maps(tmp_path):
    """a.png: person on grass (no dog); b.png: a dog on grass."""
    folder = tmp_path / "maps"
    a = np.full((32, 32), GRASS)
    a[8:24, 8:24] = PERSON
    b = np.full((32, 32), GRASS)
    b[:16, :16] = DOG
    save_rgb(folder / "a.png", encode(a, COCO_STUFF))
    save_rgb(folder / "b.png", encode(b, COCO_STUFF))
    return folder


def test_map_recall_on_a_synthetic_map():
    m = np.full((32, 32), GRASS)
    m[:4, :4] = DOG  # 16 / 1024 = 1.6 % of the map: present at the default 0.5 %
    assert map_recall(encode(m, COCO_STUFF), "coco183", "dog, person").recall == 0.5
    assert map_recall(encode(m, COCO_STUFF), "coco183", "dog", min_area=0.02).recall == 0.0
    assert map_recall(encode(m, COCO_STUFF), "coco183", prompt="a dog on grass").recall == 1.0


def test_folder_recall_with_an_object_list(maps):
    r = folder_recall(maps, "coco183", "person, dog")
    assert r["maps"]["a.png"]["recall"] == 0.5 and r["maps"]["b.png"]["recall"] == 0.5
    assert r["recall"] == 0.5 and r["num_maps"] == 2


def test_recall_cli_with_prompts(maps, tmp_path, capsys):
    # a: "a person on the grass" -> person, grass: 2/2. b: ["dog", "person"] -> 1/2. Mean 0.75.
    prompts = write(tmp_path / "prompts.json", {"a.png": "a person on the grass",
                                               "b": ["dog", "person"]})
    out = tmp_path / "recall.json"
    main(["recall", "--maps", str(maps), "--palette", "coco183", "--prompts", str(prompts),
          "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["recall"] == pytest.approx(0.75)
    assert result["maps"]["b.png"]["objects"]["person"]["present"] is False
    assert "missing" in capsys.readouterr().out


def test_recall_cli_errors(maps, tmp_path):
    prompts = write(tmp_path / "prompts.json", {"a.png": "a person"})
    with pytest.raises(SystemExit, match=r"no entry for map b\.png"):
        main(["recall", "--maps", str(maps), "--prompts", str(prompts)])
    with pytest.raises(SystemExit, match="unknown object 'dgo'"):
        main(["recall", "--maps", str(maps), "--objects", "dgo"])
    with pytest.raises(SystemExit, match=r"prompts\.json is not valid JSON"):
        main(["recall", "--maps", str(maps), "--prompts", str(write(prompts, "{"))])
    with pytest.raises(SystemExit):  # --objects or --prompts is required (argparse)
        main(["recall", "--maps", str(maps)])
    absent = tmp_path / "nowhere.json"
    with pytest.raises(SystemExit, match=r"nowhere\.json does not exist; give the path of a JSON"):
        main(["recall", "--maps", str(maps), "--prompts", str(absent)])
    with pytest.raises(SystemExit, match=r"must hold an object \{file name: prompt\}, got list"):
        main(["recall", "--maps", str(maps), "--prompts", str(write(prompts, ["a dog"]))])
    with pytest.raises(SystemExit, match=r"entry 'a\.png' must be a prompt string or a list of "
                                         r"object names, got \['dog', 3\]"):
        main(["recall", "--maps", str(maps), "--prompts",
              str(write(prompts, {"a.png": ["dog", 3]}))])
    with pytest.raises(SystemExit, match=r"maps folder .*nothing does not exist"):
        main(["recall", "--maps", str(tmp_path / "nothing"), "--objects", "dog"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a map")
    with pytest.raises(SystemExit, match=r"maps folder .*empty holds no \.png map"):
        main(["recall", "--maps", str(empty), "--objects", "dog"])
    (empty / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"cannot read image .*broken\.png: .*is it a PNG/JPEG"):
        main(["recall", "--maps", str(empty), "--objects", "dog"])
    with pytest.raises(ValueError, match="give the required objects"):
        folder_recall(maps, "coco183", "  ")
