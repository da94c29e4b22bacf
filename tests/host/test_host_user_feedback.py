"""What the user at the screen sees, through a real server: warnings sent to the node that
raised them (read from the websocket, as the front end receives them), wrong values refused at
POST /prompt before anything loads, and wrong weight files named. The server keeps serving."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from comfy_harness import queue_prompt, upload_image, wait_for_history
from comfy_harness import validation_refusal as refused
from harness_fgdm import FACTOR_NAME, cached_factor, install_fgdm_models
from harness_locref import cached_ip_adapter
from harness_ws import run_listening
from PIL import Image
from safetensors.torch import save_file

from locref_core.adapter import AdapterConfig, LocRefAdapter
from locref_core.fgdm.palettes import get_palette
from locref_core.fgdm.recall import lookup_class
from locref_core.weights import save_adapter

ONE_BOX = '{"version": 1, "boxes": [{"x0": 0.1, "y0": 0.1, "x1": 0.6, "y1": 0.9, "label": ""}]}'


@pytest.fixture(scope="module")
def server(comfy_server):
    install_fgdm_models(comfy_server.base_dir)
    upload_image(comfy_server, Image.new("RGB", (96, 64), (200, 120, 40)), "fb_ref.png")
    upload_image(comfy_server, Image.new("RGB", (1, 1), (0, 200, 0)), "fb_tiny.png")
    upload_image(comfy_server, Image.new("RGBA", (32, 32), (0, 0, 0, 0)), "fb_mask.png")
    pal = get_palette("coco183")
    colours = pal.color_table()
    ids = np.full((64, 64), lookup_class(pal, "grass"))
    ids[20:44, 20:44] = lookup_class(pal, "dog")
    upload_image(comfy_server, Image.fromarray(colours[ids].astype(np.uint8)), "fb_map.png")
    return comfy_server


def apply_prompt(ckpt: str, **apply) -> dict:
    """Checkpoint -> LocRef Boxes (one unlabelled box) -> LocRef Apply (node "3") -> Preview Any."""
    inputs = {"model": ["1", 0], "layout": ["2", 0], "strength": 1.0, "text_in_boxes": 0.0,
              "start_percent": 0.0, "end_percent": 1.0, **apply}
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "LocRefBoxes",
                  "inputs": {"width": 512, "height": 512, "boxes_json": ONE_BOX}},
            "3": {"class_type": "LocRefApply", "inputs": inputs},
            "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}


def reference_nodes(image: str, mask_from: str | None = None) -> dict:
    """Load Image -> LocRef Reference (node "6") on box 0 of node "2"."""
    nodes = {"5": {"class_type": "LoadImage", "inputs": {"image": image}},
             "6": {"class_type": "LocRefReference", "inputs": {
                 "layout": ["2", 0], "image": ["5", 0], "box_index": 0, "label": ""}}}
    if mask_from:
        nodes["7"] = {"class_type": "LoadImage", "inputs": {"image": mask_from}}
        nodes["6"]["inputs"]["mask"] = ["7", 1]
    return nodes


def shown(texts: dict, node: str) -> str:
    """What the node shows now: the last text it was sent."""
    assert texts.get(node), f"node {node} was sent nothing: {texts}"
    return texts[node][-1]


def succeeded(server, prompt_id: str) -> None:
    entry = wait_for_history(server, prompt_id, timeout=60)
    assert entry["status"]["status_str"] == "success", entry["status"]


# ------------------------------------------------------------------ warnings on the node


def test_unpatched_apply_warns_on_its_node_and_a_clean_rerun_clears_it(server,
                                                                      sd15_checkpoint_name):
    prompt_id, texts = run_listening(server, apply_prompt(sd15_checkpoint_name))
    succeeded(server, prompt_id)
    assert "no box has a reference or a label" in shown(texts, "3")
    assert "returned unpatched" in shown(texts, "3") and shown(texts, "3").startswith("\u26a0")
    assert set(texts) == {"3"}, texts  # only the node that raised it
    labelled = apply_prompt(sd15_checkpoint_name, clip=["1", 1])
    labelled["2"]["inputs"]["boxes_json"] = ONE_BOX.replace('"label": ""', '"label": "a cat"')
    prompt_id, texts = run_listening(server, labelled)
    succeeded(server, prompt_id)
    assert texts["3"] == [" "], texts  # the old warning is replaced by a blank


def test_strength_zero_warns_on_apply(server, sd15_checkpoint_name):
    prompt = {**apply_prompt(sd15_checkpoint_name, strength=0.0, layout=["6", 0]),
              **reference_nodes("fb_ref.png")}
    prompt_id, texts = run_listening(server, prompt)
    succeeded(server, prompt_id)
    assert "strength is 0 and no box has text" in shown(texts, "3")
    assert "6" not in texts  # a 96x64 reference without a mask: nothing to say


def test_tiny_reference_and_mismatched_mask_warn_on_the_reference_node(server):
    prompt = {"2": {"class_type": "LocRefBoxes",
                    "inputs": {"width": 512, "height": 512, "boxes_json": ONE_BOX}},
              **reference_nodes("fb_tiny.png", mask_from="fb_mask.png"),
              "8": {"class_type": "LocRefLayoutPreview", "inputs": {"layout": ["6", 0]}},
              "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}}
    prompt_id, texts = run_listening(server, prompt)
    succeeded(server, prompt_id)
    text = shown(texts, "6")  # both warnings of the node, together
    assert "the reference is 1x1; it is upscaled" in text
    assert "the mask is 32x32 but the image is 1x1; the mask is stretched" in text


def test_canvas_aspect_warning_while_sampling_shows_on_apply(server, sd15_checkpoint_name):
    prompt = apply_prompt(sd15_checkpoint_name, clip=["1", 1])
    prompt["2"]["inputs"]["boxes_json"] = ONE_BOX.replace('"label": ""', '"label": "a dog"')
    del prompt["4"]
    prompt.update({
        "10": {"class_type": "CLIPTextEncode", "inputs": {"text": "a park", "clip": ["1", 1]}},
        "11": {"class_type": "EmptyLatentImage",
               "inputs": {"width": 128, "height": 64, "batch_size": 1}},
        "12": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "positive": ["10", 0], "negative": ["10", 0],
            "latent_image": ["11", 0], "seed": 1, "steps": 1, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "13": {"class_type": "PreviewAny", "inputs": {"source": ["12", 0]}}})
    prompt_id, texts = run_listening(server, prompt)
    succeeded(server, prompt_id)
    assert "the latent is 128x64 (aspect 2.00) but the layout canvas is 512x512" in shown(
        texts, "3")
    assert "12" not in texts


def test_move_off_the_map_warns_on_mask_edit(server):
    ops = {"version": 1, "operations": [{"op": "move", "object": "dog", "dx": 5.0, "dy": 0}]}
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "fb_map.png"}},
              "2": {"class_type": "FGDMDecodeMap", "inputs": {
                  "image": ["1", 0], "palette": "coco183", "batch_index": 0,
                  "color_cutoff": 60.0, "mode_filter": 3}},
              "3": {"class_type": "FGDMMaskEdit", "inputs": {
                  "class_map": ["2", 0], "operations": json.dumps(ops), "if_missing": "skip"}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}}}
    prompt_id, texts = run_listening(server, prompt)
    succeeded(server, prompt_id)
    assert "move of dog by (5.0, 0.0) puts it entirely off the map; it is removed" in shown(
        texts, "3")


def test_sbpc_with_min_area_one_warns_that_the_choice_means_nothing(server, sd15_checkpoint_name):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple",
                    "inputs": {"ckpt_name": sd15_checkpoint_name}},
              "2": {"class_type": "FGDMFactorLoader", "inputs": {"factor_name": FACTOR_NAME}},
              "3": {"class_type": "FGDMApplyFactor",
                    "inputs": {"model": ["1", 0], "factor": ["2", 0], "strength": 1.0}},
              "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["1", 1]}},
              "5": {"class_type": "FGDMSBPCSelect", "inputs": {
                  "model": ["3", 0], "positive": ["4", 0], "negative": ["4", 0], "vae": ["1", 2],
                  "n": 2, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                  "scheduler": "normal", "map_width": 64, "map_height": 64, "seed": 3,
                  "objects": "dog", "palette": "coco183", "output_width": 64,
                  "output_height": 64, "min_area": 1.0}},
              "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}
    prompt_id, texts = run_listening(server, prompt)
    succeeded(server, prompt_id)
    text = shown(texts, "5")
    assert "no candidate map has any required object (recall 0 in all 2); candidate " in text
    kept = re.search(r"candidate (\d) \(seed (\d+)\) was kept because", text)
    assert kept and int(kept[2]) == 3 + int(kept[1]), text  # candidate i has seed + i
    assert "min_area 1 asks every object to cover 100% of the map" in text


# ------------------------------------------------------------------ refused when queued


def edit_prompt(operations: str) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "fb_map.png"}},
            "2": {"class_type": "FGDMDecodeMap", "inputs": {
                "image": ["1", 0], "palette": "coco183", "batch_index": 0,
                "color_cutoff": 60.0, "mode_filter": 3}},
            "3": {"class_type": "FGDMMaskEdit", "inputs": {
                "class_map": ["2", 0], "operations": operations, "if_missing": "skip"}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}}}


def sbpc_prompt(ckpt: str, **inputs) -> dict:
    """Checkpoint -> FGDM SBPC Select (node "5", two 64 px candidates, one step) -> Preview."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["1", 1]}},
            "5": {"class_type": "FGDMSBPCSelect", "inputs": {
                "model": ["1", 0], "positive": ["4", 0], "negative": ["4", 0], "vae": ["1", 2],
                "n": 2, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                "map_width": 64, "map_height": 64, "seed": 3, "output_width": 64,
                "output_height": 64, **inputs}},
            "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}


@pytest.mark.parametrize("operations, message", [
    ('{"version": 1, "operations": [', "edit operations are not valid JSON"),
    ('[{"op": "explode", "object": "dog"}]', "'explode'"),
    ('[{"op": "flip", "object": "dgo"}]', "unknown object 'dgo' for palette coco183; did you mean"),
])
def test_bad_operations_are_refused_at_post_prompt(server, operations, message):
    assert message in refused(server, edit_prompt(operations), "3")


def test_bad_layouts_sbpc_objects_and_percent_order_are_refused(server, sd15_checkpoint_name):
    prompt = apply_prompt(sd15_checkpoint_name)
    prompt["2"]["inputs"]["boxes_json"] = '{"version": 1, "boxes": [{"x0": 0.5'
    assert "boxes_json - boxes_json is not valid JSON" in refused(server, prompt, "2")
    prompt = apply_prompt(sd15_checkpoint_name, start_percent=0.8, end_percent=0.2)
    assert "start_percent 0.8 is after end_percent 0.2; swap them" in refused(server, prompt, "3")
    prompt = apply_prompt(sd15_checkpoint_name, end_percent=1.5)
    assert "end_percent is 1.5; it must be in 0.0..1.0" in refused(server, prompt, "3")
    sbpc = sbpc_prompt(sd15_checkpoint_name, objects="dog, flying saucer", palette="ade150")
    assert "unknown object 'flying saucer' for palette ade150" in refused(server, sbpc, "5")
    sbpc["5"]["inputs"]["palette"] = "coco999"
    assert "palette 'coco999' is not one of" in refused(server, sbpc, "5")


def run_error(server, prompt: dict) -> dict:
    """The one execution_error of a queued prompt (the server keeps running)."""
    entry = wait_for_history(server, queue_prompt(server, prompt), timeout=120)
    [error] = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["exception_type"] == "ValueError", error
    return error


def test_run_time_refusals_name_the_value_and_the_fix(server, sd15_checkpoint_name):
    """What only the run can know: a 33rd box added to a full layout, a source map of another
    palette, an SBPC map size the VAE cannot encode. Each a ValueError on its node."""
    full = json.dumps({"version": 1, "boxes": [
        {"x0": (i % 8) / 8, "y0": (i // 8) / 4, "x1": (i % 8 + 1) / 8, "y1": (i // 8 + 1) / 4,
         "label": f"box {i}"} for i in range(32)]})
    region = {"2": {"class_type": "LocRefBoxes",
                    "inputs": {"width": 512, "height": 512, "boxes_json": full}},
              "7": {"class_type": "LoadImage", "inputs": {"image": "fb_mask.png"}},
              "8": {"class_type": "LocRefRegionMask", "inputs": {
                  "layout": ["2", 0], "mask": ["7", 1], "box_index": 0, "label": "one more",
                  "add_new_box": True}},
              "9": {"class_type": "LocRefLayoutPreview", "inputs": {"layout": ["8", 0]}},
              "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}}
    error = run_error(server, region)
    assert error["node_id"] == "8" and ("the layout already has 32 boxes, the most supported; "
                                        "shape an existing box instead of adding one"
                                        ) in error["exception_message"], error
    prompt = edit_prompt('[{"op": "paste", "object": "dog", "box": [0, 0, 0.5, 0.5]}]')
    prompt["5"] = {"class_type": "FGDMDecodeMap", "inputs": {
        "image": ["1", 0], "palette": "ade150", "batch_index": 0, "color_cutoff": 60.0,
        "mode_filter": 3}}
    prompt["3"]["inputs"]["source_map"] = ["5", 0]
    error = run_error(server, prompt)
    assert error["node_id"] == "3" and ("source_map is in palette ade150 but the map is in "
                                        "coco183; convert it with FGDM Palette Convert first"
                                        ) in error["exception_message"], error
    sbpc = sbpc_prompt(sd15_checkpoint_name, objects="dog", palette="coco183", map_width=100)
    error = run_error(server, sbpc)
    assert error["node_id"] == "5", error
    assert ("map size 100x64 must be a multiple of 8 (the VAE's factor); e.g. 256x256"
            in error["exception_message"]), error


# ------------------------------------------------------------------ wrong weight files


def sdxl_ip_adapter() -> dict:
    t = {"image_proj.proj.weight": torch.zeros(8192, 8), "image_proj.proj.bias": torch.zeros(8192),
         "image_proj.norm.weight": torch.zeros(2048), "image_proj.norm.bias": torch.zeros(2048)}
    for i in range(1, 141, 2):
        t[f"ip_adapter.{i}.to_k_ip.weight"] = torch.zeros(4, 2048)
        t[f"ip_adapter.{i}.to_v_ip.weight"] = torch.zeros(4, 2048)
    return t


def make_weight_files(base) -> None:
    locref, fgdm = base / "models" / "locref", base / "models" / "fgdm"
    locref.mkdir(parents=True, exist_ok=True)
    fgdm.mkdir(parents=True, exist_ok=True)
    torch.save({"image_proj": {"proj.weight": torch.zeros(2)}}, locref / "fb_pickle.safetensors")
    (locref / "fb_empty.safetensors").write_bytes(b"")
    ip = cached_ip_adapter().read_bytes()
    (locref / "fb_cut.safetensors").write_bytes(ip[: len(ip) // 3])
    save_file(sdxl_ip_adapter(), str(locref / "fb_sdxl.safetensors"))
    plus = {"image_proj.latents": torch.zeros(1, 16, 768), "ip_adapter.1.to_k_ip.weight":
            torch.zeros(320, 768)}
    save_file(plus, str(locref / "fb_plus.safetensors"))
    shutil.copyfile(cached_factor(), locref / "fb_factor.safetensors")
    small = AdapterConfig(tokens=2, hidden_dim=None, embed_dim=8, model_channels=8,
                          sites=(("middle", 0),))
    save_adapter(LocRefAdapter(small), str(fgdm / "fb_locref.safetensors"))
    shutil.copyfile(cached_ip_adapter(), fgdm / "fb_ip_sd15.safetensors")


@pytest.mark.parametrize("loader, name, message", [
    ("locref", "fb_pickle.safetensors", ("fb_pickle.safetensors is a PyTorch pickle (the zip "
     "archive torch.save writes), renamed to .safetensors. The pack never loads pickles")),
    ("locref", "fb_empty.safetensors", "fb_empty.safetensors is an empty file (0 bytes)"),
    ("locref", "fb_cut.safetensors", ("fb_cut.safetensors is cut short: its header says the file "
     "holds {full} bytes, but it has {cut}")),
    ("locref", "fb_sdxl.safetensors", "fb_sdxl.safetensors is an IP-Adapter for SDXL"),
    ("locref", "fb_plus.safetensors", ("fb_plus.safetensors is IP-Adapter Plus (Resampler "
     "projection). LocRef supports IP-Adapter SD-1.5 files with a linear projection")),
    ("locref", "fb_factor.safetensors", ("fb_factor.safetensors is an FG-DM factor adapter. It "
     "belongs in models/fgdm, loaded by FGDM Factor Loader")),
    ("fgdm", "fb_locref.safetensors", ("fb_locref.safetensors is a LocRef adapter. It belongs in "
     "models/locref, loaded by LocRef Adapter Loader")),
    ("fgdm", "fb_ip_sd15.safetensors", ("fb_ip_sd15.safetensors is an IP-Adapter SD-1.5 file. It "
     "belongs in models/ipadapter")),
])
def test_each_wrong_weight_file_gets_its_own_message(server, loader, name, message):
    if not (server.base_dir / "models" / "fgdm" / "fb_locref.safetensors").exists():
        make_weight_files(server.base_dir)
    node = ({"class_type": "LocRefAdapterLoader", "inputs": {"adapter_name": name}}
            if loader == "locref" else
            {"class_type": "FGDMFactorLoader", "inputs": {"factor_name": name}})
    prompt = {"1": node, "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    error = run_error(server, prompt)
    assert error["node_id"] == "1", error
    full = cached_ip_adapter().stat().st_size
    assert message.format(full=full, cut=full // 3) in error["exception_message"]
