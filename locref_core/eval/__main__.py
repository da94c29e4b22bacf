"""`python -m locref_core.eval {boxes,clip-i,recall}`: the papers' metrics on a folder.

    python -m locref_core.eval boxes  --layouts out/ --detections det.json --out ap.json
    python -m locref_core.eval boxes  --layouts out/ --detector my_det.py:detect
    python -m locref_core.eval clip-i --layouts out/ --encoder my_clip.py:make_encoder
    python -m locref_core.eval recall --maps maps/ --palette coco183 --objects "person, dog"

The layouts folder holds img_0001.png + img_0001.json pairs (see `locref_core.eval.folder`).
Each command writes a table to stdout and, with --out, the full results as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..fgdm.recall import DEFAULT_MIN_AREA
from . import folder
from .boxes import COCO_IOU_THRESHOLDS, MAX_DETS, box_ap
from .clip_i import CLIP_SIZE, clip_i_scores, layout_pairs
from .recall import folder_recall, load_prompts

log = logging.getLogger("locref_core.eval")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its three subcommands."""
    parser = argparse.ArgumentParser(prog="python -m locref_core.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{boxes,clip-i,recall}")

    p = sub.add_parser("boxes", help="COCO box AP/AP50/AP75 of a detector's boxes vs the layouts")
    p.add_argument("--layouts", type=pathlib.Path, required=True,
                   help="folder of generated images, each with its layout JSON "
                        "(img_0001.png + img_0001.json); the box labels are the classes")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--detections", type=pathlib.Path,
                     help='COCO results JSON: [{"file_name" or "image_id", "bbox": [x, y, w, h] '
                          'in pixels, "score", "label" or "category_id"}]; an integer image_id '
                          "is the number at the end of the image's name (img_0007 -> 7)")
    src.add_argument("--detector", metavar="MODULE:FUNCTION",
                     help="a function (module:function or file.py:function) that takes an image "
                          'path and returns [{"bbox": [x, y, w, h], "score", "label"}] in pixels')
    p.add_argument("--label-map", default="",
                   help='rename labels before matching: a JSON file {"1": "person"} or inline '
                        "'1=person, 18=dog' (applies to detections and layout labels; "
                        "labels are compared in lower case)")
    p.add_argument("--max-dets", type=int, default=MAX_DETS,
                   help="detections kept per image and class, best score first (COCO: 100)")
    p.add_argument("--out", type=pathlib.Path, help="write the results as JSON to this file")

    p = sub.add_parser("clip-i", help="CLIP-I: cosine of CLIP embeddings, box crop vs reference")
    p.add_argument("--layouts", type=pathlib.Path, required=True,
                   help='folder of generated images and layout JSONs; a box\'s reference is its '
                        '"reference" path (relative to the folder) or img_0001_ref<box>.png')
    p.add_argument("--encoder", metavar="MODULE:FUNCTION", required=True,
                   help="a function (module:function or file.py:function) that returns encode: "
                        "(B, 3, S, S) float [0, 1] -> (B, D) embeddings (see eval/clip_i.py "
                        "for open_clip and ComfyUI CLIP vision wrappers)")
    p.add_argument("--size", type=int, default=CLIP_SIZE,
                   help="crops and references are resized to size x size before encoding")
    p.add_argument("--out", type=pathlib.Path, help="write the results as JSON to this file")

    p = sub.add_parser("recall", help="FG-DM object recall of palette segmentation maps")
    p.add_argument("--maps", type=pathlib.Path, required=True,
                   help="folder of palette RGB map PNGs")
    p.add_argument("--palette", default="coco183",
                   help="palette of the maps: coco183 (FG-DM) or ade150 (seg ControlNet)")
    req = p.add_mutually_exclusive_group(required=True)
    req.add_argument("--objects", help="required objects of every map, e.g. 'person, dog'")
    req.add_argument("--prompts", type=pathlib.Path,
                     help='JSON {"img_0001.png": "a prompt" or ["person", "dog"]}: per-map '
                          "prompt (objects matched in it) or object list")
    p.add_argument("--min-area", type=float, default=DEFAULT_MIN_AREA,
                   help="fraction of the map an object must cover to count as present")
    p.add_argument("--out", type=pathlib.Path, help="write the results as JSON to this file")
    return parser


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: floats with 4 decimals, None as '-'."""
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines) + "\n"


def run_boxes(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Box AP of detections against the layouts' boxes."""
    label_map = folder.parse_label_map(args.label_map)
    detect = folder.load_callable(args.detector, "--detector") if args.detector else None
    images = folder.list_images(args.layouts)
    gt = folder.ground_truth(images, label_map)  # every layout is checked before detection
    if detect is None:
        dets = folder.detections_from_json(args.detections, images, label_map)
    else:
        dets = folder.detections_from_callable(detect, images, label_map)
    gt_labels = {lab for g in gt.values() for lab in g.labels}
    det_labels = {lab for d in dets.values() for lab in d.labels}
    if det_labels and not det_labels & gt_labels:
        log.warning("no detection label matches a layout label (detections: %s; layouts: %s); "
                    "map them with --label-map", sorted(det_labels)[:5], sorted(gt_labels)[:5])
    result = box_ap(gt, dets, COCO_IOU_THRESHOLDS, args.max_dets)
    rows = [(label, c["num_gt"], c["num_det"], c["AP"], c["AP50"], c["AP75"])
            for label, c in result["per_class"].items()]
    rows.append(("all", sum(r[1] for r in rows), sum(r[2] for r in rows),
                 result["AP"], result["AP50"], result["AP75"]))
    return result, format_table(("class", "gt", "dets", "AP", "AP50", "AP75"), rows)


def run_clip_i(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """CLIP-I over every box with a reference; the mean over boxes of all images."""
    if args.size < 16:
        raise ValueError(f"--size {args.size} is too small; CLIP models take 224")
    encode = folder.load_callable(args.encoder, "--encoder")()
    if not callable(encode):
        raise ValueError(f"--encoder {args.encoder} returned {type(encode).__name__}, not a "
                         "callable; make the function return encode(batch) -> embeddings")
    per_image: dict[str, dict[str, Any]] = {}
    for path in folder.list_images(args.layouts):
        layout = folder.layout_with_references(path)
        crops, refs, index = layout_pairs(folder.load_image(path), layout)
        if not crops:
            log.info("%s: no box has a reference; skipped", path.name)
            continue
        scores = clip_i_scores(crops, refs, encode, args.size)
        per_image[path.name] = {"clip_i": float(scores.mean()),
                                "boxes": {str(i): float(s) for i, s in zip(index, scores)}}
        log.info("%s: CLIP-I %.4f over %d boxes", path.name, scores.mean(), len(scores))
    if not per_image:
        raise ValueError(f"no box in {args.layouts} has a reference image; add \"reference\" "
                         "paths to the layout JSONs or img_0001_ref0.png files")
    all_scores = [s for r in per_image.values() for s in r["boxes"].values()]
    result = {"clip_i": float(np.mean(all_scores)), "num_boxes": len(all_scores),
              "num_images": len(per_image), "images": per_image}
    rows = [(name, len(r["boxes"]), r["clip_i"]) for name, r in per_image.items()]
    rows.append(("all", len(all_scores), result["clip_i"]))
    return result, format_table(("image", "boxes", "CLIP-I"), rows)


def run_recall(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Mean object recall of the maps."""
    prompts = load_prompts(args.prompts) if args.prompts is not None else None
    result = folder_recall(args.maps, args.palette, args.objects or "", prompts, args.min_area)
    rows = [(name, ", ".join(o for o, v in m["objects"].items() if v["present"]) or "-",
             ", ".join(o for o, v in m["objects"].items() if not v["present"]) or "-", m["recall"])
            for name, m in result["maps"].items()]
    rows.append(("all", "", "", result["recall"]))
    return result, format_table(("map", "present", "missing", "recall"), rows)


COMMANDS = {"boxes": run_boxes, "clip-i": run_clip_i, "recall": run_recall}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; errors in the inputs exit with a message naming the file and fix."""
    args = build_parser().parse_args(argv)
    try:
        result, table = COMMANDS[args.command](args)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
            log.info("wrote %s", args.out)
    except ValueError as err:
        raise SystemExit(f"python -m locref_core.eval {args.command}: error: {err}") from None
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sys.exit(main())
