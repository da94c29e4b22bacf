// Pure geometry and JSON helpers for the LocRef box canvas. No DOM, no ComfyUI imports, so
// Node's test runner can load this module directly (tests/web/box_geometry.test.mjs).
//
// A box is {x0, y0, x1, y1, label} with coordinates normalised to [0, 1], origin top-left,
// x0 < x1 and y0 < y1. A layout is {width, height, boxes}; later boxes are drawn in front.
// Hit testing works in pixels of the displayed canvas so handle sizes do not depend on the
// canvas aspect ratio.

export const LAYOUT_VERSION = 1;
export const MAX_BOXES = 32; // mirrors locref_core/layout.py MAX_BOXES
export const SNAP_PX = 8; // snapping step in pixels of the layout (latent cells are 8 px)
export const MIN_BOX_PX = 8; // smallest box side in layout pixels
export const CORNERS = ["nw", "ne", "se", "sw"];
export const EDGES = ["n", "e", "s", "w"];
const DECIMALS = 1e6; // normalised coordinates are written with 6 decimals

export function clamp(v, lo, hi) {
  return Math.min(hi, Math.max(lo, v));
}

/** Box with x0 <= x1 and y0 <= y1 (swaps edges when dragged past each other). */
export function orderBox(box) {
  return {
    ...box,
    x0: Math.min(box.x0, box.x1), x1: Math.max(box.x0, box.x1),
    y0: Math.min(box.y0, box.y1), y1: Math.max(box.y0, box.y1),
  };
}

/** Normalised box -> pixel box on a width x height canvas. */
export function denormalise(box, width, height) {
  return { ...box, x0: box.x0 * width, x1: box.x1 * width, y0: box.y0 * height, y1: box.y1 * height };
}

/** Pixel box on a width x height canvas -> normalised box. */
export function normalise(box, width, height) {
  return { ...box, x0: box.x0 / width, x1: box.x1 / width, y0: box.y0 / height, y1: box.y1 / height };
}

/** Round a normalised value to `step` (e.g. 8 / width for 8 px); step <= 0 disables. */
export function snapValue(v, step) {
  if (!(step > 0)) return v;
  return Math.round(v / step) * step;
}

/** Snapping steps in normalised units for a layout of width x height pixels. */
export function snapSteps(enabled, width, height, px = SNAP_PX) {
  return enabled ? { x: px / width, y: px / height } : { x: 0, y: 0 };
}

/** Minimum box side in normalised units (at least MIN_BOX_PX layout pixels). */
export function minSize(width, height, px = MIN_BOX_PX) {
  return { w: Math.min(1, px / width), h: Math.min(1, px / height) };
}

/** Which handle of a pixel box is under point p (within tol px), or "move", or null. */
export function pickHandle(pbox, p, tol) {
  const nearL = Math.abs(p.x - pbox.x0) <= tol;
  const nearR = Math.abs(p.x - pbox.x1) <= tol;
  const nearT = Math.abs(p.y - pbox.y0) <= tol;
  const nearB = Math.abs(p.y - pbox.y1) <= tol;
  const inX = p.x >= pbox.x0 - tol && p.x <= pbox.x1 + tol;
  const inY = p.y >= pbox.y0 - tol && p.y <= pbox.y1 + tol;
  if (!inX || !inY) return null;
  // On a tiny box the edges overlap; prefer the nearer edge on each axis.
  const vert = nearT && nearB ? (Math.abs(p.y - pbox.y0) <= Math.abs(p.y - pbox.y1) ? "n" : "s")
    : nearT ? "n" : nearB ? "s" : "";
  const horiz = nearL && nearR ? (Math.abs(p.x - pbox.x0) <= Math.abs(p.x - pbox.x1) ? "w" : "e")
    : nearL ? "w" : nearR ? "e" : "";
  if (vert || horiz) return vert + horiz;
  return "move";
}

/**
 * Topmost box under point p (canvas pixels), with the handle hit.
 * The selected box is tested first so its handles win over boxes drawn in front of it.
 * Returns {index, handle} or null.
 */
export function hitTest(boxes, p, width, height, tol = 6, selected = -1) {
  const order = [];
  if (selected >= 0 && selected < boxes.length) order.push(selected);
  for (let i = boxes.length - 1; i >= 0; i--) if (i !== selected) order.push(i);
  for (const i of order) {
    const handle = pickHandle(denormalise(boxes[i], width, height), p, tol);
    // Only the selected box offers resize handles from outside its body; others need a
    // real hit inside, so clicking near (not on) an unselected box draws a new one.
    if (handle && (i === selected || insideBox(boxes[i], p, width, height))) {
      return { index: i, handle };
    }
  }
  return null;
}

function insideBox(box, p, width, height) {
  const b = denormalise(box, width, height);
  return p.x >= b.x0 && p.x <= b.x1 && p.y >= b.y0 && p.y <= b.y1;
}

/** Move a box by (dx, dy) normalised, keeping its size and keeping it on the canvas. */
export function moveBox(box, dx, dy, snap = { x: 0, y: 0 }) {
  const w = box.x1 - box.x0;
  const h = box.y1 - box.y0;
  const x0 = clamp(snapValue(box.x0 + dx, snap.x), 0, 1 - w);
  const y0 = clamp(snapValue(box.y0 + dy, snap.y), 0, 1 - h);
  return { ...box, x0, y0, x1: x0 + w, y1: y0 + h };
}

/**
 * Resize a box by dragging `handle` ("n", "se", ...) to point q (normalised).
 * The opposite edges stay fixed; the result is clamped to the canvas and to `min` size,
 * and may flip when dragged past the opposite edge.
 */
export function resizeBox(box, handle, q, min = { w: 0, h: 0 }, snap = { x: 0, y: 0 }) {
  let { x0, y0, x1, y1 } = box;
  const qx = clamp(snapValue(q.x, snap.x), 0, 1);
  const qy = clamp(snapValue(q.y, snap.y), 0, 1);
  if (handle.includes("w")) x0 = qx;
  if (handle.includes("e")) x1 = qx;
  if (handle.includes("n")) y0 = qy;
  if (handle.includes("s")) y1 = qy;
  const ordered = orderBox({ ...box, x0, y0, x1, y1 });
  const fixedX = handle.includes("w") ? box.x1 : handle.includes("e") ? box.x0 : null;
  const fixedY = handle.includes("n") ? box.y1 : handle.includes("s") ? box.y0 : null;
  return enforceMin(ordered, min, fixedX, fixedY);
}

/** Box spanned by a drag from a to b (normalised), clamped and snapped. */
export function boxFromDrag(a, b, snap = { x: 0, y: 0 }, label = "") {
  const p = { x: clamp(snapValue(a.x, snap.x), 0, 1), y: clamp(snapValue(a.y, snap.y), 0, 1) };
  const q = { x: clamp(snapValue(b.x, snap.x), 0, 1), y: clamp(snapValue(b.y, snap.y), 0, 1) };
  return orderBox({ x0: p.x, y0: p.y, x1: q.x, y1: q.y, label });
}

/** Grow a box to at least min.w x min.h, away from the fixed edge, staying on the canvas. */
export function enforceMin(box, min, fixedX = null, fixedY = null) {
  const [x0, x1] = growSpan(box.x0, box.x1, min.w, fixedX);
  const [y0, y1] = growSpan(box.y0, box.y1, min.h, fixedY);
  return { ...box, x0, x1, y0, y1 };
}

function growSpan(a, b, min, fixed) {
  if (b - a >= min) return [a, b];
  if (fixed === a || (fixed === null && a + min <= 1)) {
    const start = Math.min(a, 1 - min);
    return [start, start + min];
  }
  const end = Math.max(b, min);
  return [end - min, end];
}

/** True when a drawn box is big enough to keep (a click is not a box). */
export function isUsable(box, min) {
  return box.x1 - box.x0 >= min.w - 1e-9 && box.y1 - box.y0 >= min.h - 1e-9;
}

/** Move box `index` by `delta` places in z-order (+1 = forward). Returns {boxes, index}. */
export function moveZ(boxes, index, delta) {
  if (index < 0 || index >= boxes.length) return { boxes: boxes.slice(), index };
  const target = clamp(index + delta, 0, boxes.length - 1);
  const out = boxes.slice();
  const [box] = out.splice(index, 1);
  out.splice(target, 0, box);
  return { boxes: out, index: target };
}

function round(v) {
  return Math.round(v * DECIMALS) / DECIMALS;
}

/** The layout as version-1 JSON with normalised coordinates (what the Python side reads). */
export function serializeLayout(layout) {
  const boxes = layout.boxes.map((b) => ({
    x0: round(b.x0), y0: round(b.y0), x1: round(b.x1), y1: round(b.y1), label: b.label ?? "",
  }));
  return JSON.stringify({ version: LAYOUT_VERSION, width: layout.width, height: layout.height, boxes });
}

const LABEL_KEYS = ["label", "text", "prompt", "name", "class"];

function fail(message) {
  throw new Error(message);
}

function finite(v, what) {
  if (typeof v !== "number" || !Number.isFinite(v)) fail(`${what} must be a finite number, got ${JSON.stringify(v)}`);
  return v;
}

function labelOf(raw) {
  const sources = [raw, raw.metadata && typeof raw.metadata === "object" ? raw.metadata : {}];
  for (const src of sources) {
    for (const key of LABEL_KEYS) {
      if (src[key] === undefined || src[key] === null) continue;
      if (typeof src[key] !== "string") fail(`${key} must be text`);
      return src[key];
    }
  }
  return "";
}

/** One raw JSON box -> normalised box; pixel forms use the reference size refW x refH. */
function boxFromRaw(raw, i, pixels, refW, refH) {
  if (!raw || typeof raw !== "object" || Array.isArray(raw)) fail(`box ${i} must be an object`);
  let e;
  if (!("x0" in raw) && ["x", "y", "width", "height"].every((k) => k in raw)) {
    const [x, y, w, h] = ["x", "y", "width", "height"].map((k) => finite(raw[k], `box ${i}: ${k}`));
    e = [x / refW, y / refH, (x + w) / refW, (y + h) / refH];
  } else {
    const missing = ["x0", "y0", "x1", "y1"].filter((k) => !(k in raw));
    if (missing.length) fail(`box ${i} is missing ${missing.join(", ")}`);
    e = ["x0", "y0", "x1", "y1"].map((k) => finite(raw[k], `box ${i}: ${k}`));
    if (pixels) e = [e[0] / refW, e[1] / refH, e[2] / refW, e[3] / refH];
  }
  const [x0, y0, x1, y1] = e;
  if (x1 <= x0 || y1 <= y0) fail(`box ${i} has zero or negative size`);
  if (x1 <= 0 || y1 <= 0 || x0 >= 1 || y0 >= 1) fail(`box ${i} lies outside the canvas`);
  // Overhanging boxes are clipped, as the Python side does (with a warning there).
  return { x0: clamp(x0, 0, 1), y0: clamp(y0, 0, 1), x1: clamp(x1, 0, 1), y1: clamp(y1, 0, 1), label: labelOf(raw) };
}

/**
 * Parse layout JSON as the Python side does (loosely): version 1 objects with normalised or
 * pixel units, per-box {x, y, width, height} in pixels, or a BOUNDING_BOX list in pixels of
 * the canvas. Returns {ok: true, layout} or {ok: false, error}; never throws.
 * An empty string is an empty layout.
 */
export function parseLayout(text, width, height) {
  try {
    if (text === undefined || text === null || !String(text).trim()) {
      return { ok: true, layout: { width, height, boxes: [] } };
    }
    let data = JSON.parse(text);
    if (Array.isArray(data) && data.length === 1 && Array.isArray(data[0])) data = data[0];
    if (Array.isArray(data)) data = { units: "pixels", width, height, boxes: data };
    if (!data || typeof data !== "object") fail("the layout must be a JSON object or a list of boxes");
    const version = data.version ?? LAYOUT_VERSION;
    if (version !== LAYOUT_VERSION) fail(`unsupported layout version ${JSON.stringify(version)}`);
    const units = data.units ?? "normalized";
    if (!["normalized", "normalised", "pixels"].includes(units)) fail(`unknown units ${JSON.stringify(units)}`);
    const refW = finite(data.width ?? width, "width");
    const refH = finite(data.height ?? height, "height");
    if (refW <= 0 || refH <= 0) fail("width and height must be positive");
    const raw = data.boxes ?? [];
    if (!Array.isArray(raw)) fail('"boxes" must be a list');
    if (raw.length > MAX_BOXES) fail(`${raw.length} boxes; at most ${MAX_BOXES} are supported`);
    const boxes = raw.map((b, i) => boxFromRaw(b, i, units === "pixels", refW, refH));
    return { ok: true, layout: { width, height, boxes } };
  } catch (err) {
    return { ok: false, error: err instanceof Error ? err.message : String(err) };
  }
}
