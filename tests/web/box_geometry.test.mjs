// Unit tests of web/box_geometry.js; run with `node --test tests/web/` (pytest runs this
// through tests/test_web_geometry.py). They live outside web/ because ComfyUI loads every
// .js file under web/ as a front-end extension.
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  MAX_BOXES, boxFromDrag, clamp, denormalise, enforceMin, hitTest, isUsable, minSize,
  moveBox, moveZ, normalise, orderBox, parseLayout, pickHandle, resizeBox, serializeLayout,
  snapSteps, snapValue,
} from "../../web/box_geometry.js";

const close = (a, b, eps = 1e-9) => assert.ok(Math.abs(a - b) <= eps, `${a} != ${b}`);
const closeBox = (a, b, eps = 1e-9) => {
  for (const k of ["x0", "y0", "x1", "y1"]) close(a[k], b[k], eps);
};
const box = (x0, y0, x1, y1, label = "") => ({ x0, y0, x1, y1, label });

test("clamp and orderBox", () => {
  assert.equal(clamp(-1, 0, 1), 0);
  assert.equal(clamp(2, 0, 1), 1);
  assert.equal(clamp(0.5, 0, 1), 0.5);
  assert.deepEqual(orderBox(box(0.5, 0.9, 0.1, 0.2, "a")), box(0.1, 0.2, 0.5, 0.9, "a"));
});

test("normalise and denormalise are inverse", () => {
  const b = box(0.1, 0.2, 0.5, 0.9, "car");
  const px = denormalise(b, 640, 480);
  closeBox(px, box(64, 96, 320, 432));
  assert.equal(px.label, "car");
  closeBox(normalise(px, 640, 480), b);
});

test("snapping to 8 px steps", () => {
  const s = snapSteps(true, 512, 256);
  close(s.x, 8 / 512);
  close(s.y, 8 / 256);
  assert.deepEqual(snapSteps(false, 512, 256), { x: 0, y: 0 });
  close(snapValue(13 / 512, s.x), 16 / 512);
  close(snapValue(11 / 512, s.x), 8 / 512);
  assert.equal(snapValue(0.123, 0), 0.123);
});

test("pickHandle: corners, edges, body, outside", () => {
  const b = { x0: 100, y0: 100, x1: 200, y1: 150 };
  assert.equal(pickHandle(b, { x: 101, y: 99 }, 5), "nw");
  assert.equal(pickHandle(b, { x: 199, y: 151 }, 5), "se");
  assert.equal(pickHandle(b, { x: 203, y: 100 }, 5), "ne");
  assert.equal(pickHandle(b, { x: 100, y: 150 }, 5), "sw");
  assert.equal(pickHandle(b, { x: 150, y: 98 }, 5), "n");
  assert.equal(pickHandle(b, { x: 150, y: 152 }, 5), "s");
  assert.equal(pickHandle(b, { x: 96, y: 125 }, 5), "w");
  assert.equal(pickHandle(b, { x: 204, y: 125 }, 5), "e");
  assert.equal(pickHandle(b, { x: 150, y: 125 }, 5), "move");
  assert.equal(pickHandle(b, { x: 250, y: 125 }, 5), null);
  assert.equal(pickHandle(b, { x: 150, y: 160 }, 5), null);
});

test("pickHandle on a tiny box picks the nearer edge", () => {
  const b = { x0: 100, y0: 100, x1: 104, y1: 104 };
  assert.equal(pickHandle(b, { x: 99, y: 99 }, 6), "nw");
  assert.equal(pickHandle(b, { x: 105, y: 105 }, 6), "se");
});

test("hitTest returns the topmost box; the selected box's handles win", () => {
  const boxes = [box(0.1, 0.1, 0.6, 0.6), box(0.4, 0.4, 0.9, 0.9)];
  // (0.5, 0.5) is inside both: the later (front) box wins.
  assert.deepEqual(hitTest(boxes, { x: 50, y: 50 }, 100, 100, 2), { index: 1, handle: "move" });
  // Box 0's se corner lies inside box 1; with box 0 selected the handle wins.
  assert.deepEqual(hitTest(boxes, { x: 60, y: 60 }, 100, 100, 2, 0), { index: 0, handle: "se" });
  // Just outside an unselected box: no hit (so a drag there draws a new box).
  assert.equal(hitTest([box(0.1, 0.1, 0.2, 0.2)], { x: 21, y: 15 }, 100, 100, 2), null);
  // ...but the selected box offers its handle from just outside.
  assert.deepEqual(hitTest([box(0.1, 0.1, 0.2, 0.2)], { x: 21, y: 15 }, 100, 100, 2, 0),
    { index: 0, handle: "e" });
  assert.equal(hitTest([], { x: 1, y: 1 }, 100, 100), null);
});

test("hitTest uses pixel tolerance on non-square canvases", () => {
  const boxes = [box(0.25, 0.25, 0.75, 0.75)];
  // 400 x 100 canvas: the left edge is at x = 100 px.
  assert.equal(hitTest(boxes, { x: 104, y: 50 }, 400, 100, 5, 0).handle, "w");
  assert.equal(hitTest(boxes, { x: 110, y: 50 }, 400, 100, 5, 0).handle, "move");
});

test("moveBox keeps size and stays on the canvas", () => {
  const b = box(0.1, 0.1, 0.3, 0.4, "x");
  closeBox(moveBox(b, 0.2, 0.1), box(0.3, 0.2, 0.5, 0.5));
  closeBox(moveBox(b, 5, 5), box(0.8, 0.7, 1, 1));
  closeBox(moveBox(b, -5, -5), box(0, 0, 0.2, 0.3));
  assert.equal(moveBox(b, 0, 0).label, "x");
  const snapped = moveBox(b, 0.013, 0, snapSteps(true, 100, 100, 5));
  close(snapped.x0, 0.1);
  close(snapped.x1 - snapped.x0, 0.2);
});

test("resizeBox moves only the dragged edges and clamps", () => {
  const b = box(0.2, 0.2, 0.6, 0.6);
  closeBox(resizeBox(b, "se", { x: 0.8, y: 0.9 }), box(0.2, 0.2, 0.8, 0.9));
  closeBox(resizeBox(b, "n", { x: 0.0, y: 0.1 }), box(0.2, 0.1, 0.6, 0.6));
  closeBox(resizeBox(b, "w", { x: -0.5, y: 0.3 }), box(0, 0.2, 0.6, 0.6));
  closeBox(resizeBox(b, "e", { x: 1.5, y: 0.3 }), box(0.2, 0.2, 1, 0.6));
  // dragged past the opposite edge: flips
  closeBox(resizeBox(b, "e", { x: 0.1, y: 0.3 }), box(0.1, 0.2, 0.2, 0.6));
});

test("resizeBox enforces the minimum size away from the fixed edge", () => {
  const b = box(0.2, 0.2, 0.6, 0.6);
  const min = { w: 0.1, h: 0.1 };
  closeBox(resizeBox(b, "e", { x: 0.21, y: 0.3 }, min), box(0.2, 0.2, 0.3, 0.6));
  closeBox(resizeBox(b, "w", { x: 0.59, y: 0.3 }, min), box(0.5, 0.2, 0.6, 0.6));
  closeBox(resizeBox(b, "s", { x: 0.3, y: 0.2 }, min), box(0.2, 0.2, 0.6, 0.3));
});

test("enforceMin near the canvas border stays on the canvas", () => {
  closeBox(enforceMin(box(0.98, 0.5, 0.99, 0.9), { w: 0.1, h: 0.1 }), box(0.89, 0.5, 0.99, 0.9));
  closeBox(enforceMin(box(0.0, 0.0, 0.01, 0.01), { w: 0.1, h: 0.1 }), box(0, 0, 0.1, 0.1));
});

test("boxFromDrag orders, clamps and snaps", () => {
  const b = boxFromDrag({ x: 0.7, y: 1.2 }, { x: 0.2, y: 0.3 }, { x: 0, y: 0 }, "dog");
  closeBox(b, box(0.2, 0.3, 0.7, 1));
  assert.equal(b.label, "dog");
  const s = boxFromDrag({ x: 0.11, y: 0.11 }, { x: 0.49, y: 0.52 }, { x: 0.1, y: 0.1 });
  closeBox(s, box(0.1, 0.1, 0.5, 0.5));
  const m = minSize(512, 512);
  assert.equal(isUsable(box(0.1, 0.1, 0.1 + 2 / 512, 0.5), m), false);
  assert.equal(isUsable(box(0.1, 0.1, 0.1 + 8 / 512, 0.5), m), true);
});

test("moveZ reorders and reports the new index", () => {
  const boxes = ["a", "b", "c"].map((l, i) => box(0, 0, 0.1 * (i + 1), 0.1, l));
  const fwd = moveZ(boxes, 0, 1);
  assert.deepEqual(fwd.boxes.map((b) => b.label), ["b", "a", "c"]);
  assert.equal(fwd.index, 1);
  const back = moveZ(boxes, 2, -1);
  assert.deepEqual(back.boxes.map((b) => b.label), ["a", "c", "b"]);
  assert.equal(moveZ(boxes, 2, 1).index, 2); // already in front
  assert.equal(moveZ(boxes, 0, -1).index, 0);
  assert.deepEqual(boxes.map((b) => b.label), ["a", "b", "c"]); // input untouched
});

test("serializeLayout writes version-1 normalised JSON that parseLayout reads back", () => {
  const layout = { width: 640, height: 384, boxes: [box(0.1, 0.2, 0.5, 0.9, "a red car"), box(1 / 3, 0, 1, 2 / 3)] };
  const text = serializeLayout(layout);
  const data = JSON.parse(text);
  assert.equal(data.version, 1);
  assert.equal(data.width, 640);
  assert.equal(data.height, 384);
  assert.equal(data.boxes[1].x0, 0.333333);
  assert.equal(data.boxes[1].label, "");
  const back = parseLayout(text, 640, 384);
  assert.ok(back.ok);
  closeBox(back.layout.boxes[0], layout.boxes[0]);
  closeBox(back.layout.boxes[1], layout.boxes[1], 1e-6);
  assert.equal(back.layout.boxes[0].label, "a red car");
});

test("parseLayout accepts the Python side's other forms", () => {
  assert.deepEqual(parseLayout("", 512, 512), { ok: true, layout: { width: 512, height: 512, boxes: [] } });
  assert.deepEqual(parseLayout('{"version": 1, "boxes": []}', 64, 64).layout.boxes, []);
  const px = parseLayout('{"units": "pixels", "width": 200, "height": 100, "boxes": [{"x0": 20, "y0": 10, "x1": 100, "y1": 100, "text": "t"}]}', 512, 512);
  closeBox(px.layout.boxes[0], box(0.1, 0.1, 0.5, 1));
  assert.equal(px.layout.boxes[0].label, "t");
  const xywh = parseLayout('{"width": 100, "height": 100, "boxes": [{"x": 10, "y": 20, "width": 30, "height": 40}]}', 512, 512);
  closeBox(xywh.layout.boxes[0], box(0.1, 0.2, 0.4, 0.6));
  const bb = parseLayout('[{"x": 0, "y": 0, "width": 256, "height": 128, "metadata": {"label": "sky"}}]', 512, 256);
  closeBox(bb.layout.boxes[0], box(0, 0, 0.5, 0.5));
  assert.equal(bb.layout.boxes[0].label, "sky");
  const clipped = parseLayout('{"boxes": [{"x0": -0.1, "y0": 0.5, "x1": 0.5, "y1": 1.2}]}', 64, 64);
  closeBox(clipped.layout.boxes[0], box(0, 0.5, 0.5, 1));
});

test("parseLayout rejects what the Python side rejects, without throwing", () => {
  const bad = [
    "{not json",
    '"a string"',
    '{"version": 2, "boxes": []}',
    '{"units": "inches", "boxes": []}',
    '{"boxes": {}}',
    '{"boxes": [{"x0": 0.1, "y0": 0.1, "x1": 0.5}]}',
    '{"boxes": [{"x0": 0.5, "y0": 0.1, "x1": 0.5, "y1": 0.4}]}',
    '{"boxes": [{"x0": 1.1, "y0": 0.1, "x1": 1.5, "y1": 0.4}]}',
    '{"boxes": [{"x0": "0", "y0": 0.1, "x1": 0.5, "y1": 0.4}]}',
    '{"boxes": [{"x0": 0, "y0": 0.1, "x1": 0.5, "y1": 0.4, "label": 3}]}',
    '{"width": 0, "boxes": []}',
    JSON.stringify({ boxes: Array.from({ length: MAX_BOXES + 1 }, () => box(0, 0, 1, 1)) }),
  ];
  for (const text of bad) {
    const r = parseLayout(text, 512, 512);
    assert.equal(r.ok, false, text);
    assert.equal(typeof r.error, "string");
    assert.ok(r.error.length > 0);
  }
});
