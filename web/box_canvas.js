// ComfyUI front-end extension "LocRef.BoxCanvas": a box-drawing canvas on the pack's
// box-bearing nodes. The canvas drives the node's `boxes_json` STRING widget, which stays on
// the node (hidden) so workflows save it and prompts send it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { BoxCanvas } from "./box_canvas_widget.js";

/** Node types that get the canvas: {node type: name of its layout JSON widget}. */
export const BOX_NODE_TYPES = { LocRefBoxes: "boxes_json" };
/** Nodes whose `locref_thumbs` output carries per-box reference thumbnails. */
const THUMB_SOURCES = new Set(["LocRefLayoutPreview"]);
/** Nodes whose images are annotated previews, never used as a canvas background. */
const NOT_BACKGROUND = new Set(["LocRefLayoutPreview"]);
const CANVAS_MIN_HEIGHT = 220;
const DEFAULT_NODE_SIZE = [400, 520];

function nodeType(node) {
  return node?.comfyClass ?? node?.type;
}

function setJsonVisible(node, widget, visible) {
  widget.hidden = !visible;
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas?.(true, true);
}

/** Attach the canvas to one node (called once per node instance). */
function attachCanvas(node) {
  const jsonName = BOX_NODE_TYPES[nodeType(node)];
  const jsonWidget = node.widgets?.find((w) => w.name === jsonName);
  if (!jsonWidget || node.locrefBoxCanvas) return;
  const canvas = new BoxCanvas(node, jsonWidget, {
    onJsonToggle: (on) => setJsonVisible(node, jsonWidget, on),
    // Keyboard edits are followed by no mouse-up, which is when the host's change tracker
    // normally looks: report each edit so workflow undo and autosave see it at once.
    onChange: () => {
      app.canvas?.emitBeforeChange?.();
      app.canvas?.emitAfterChange?.();
    },
    forwardPointer: (e) => {
      if (e.type === "pointerdown") app.canvas?.processMouseDown(e);
      else if (e.type === "pointermove") app.canvas?.processMouseMove(e);
      else if (e.type === "pointerup") app.canvas?.processMouseUp(e);
    },
    forwardWheel: (e) => {
      e.preventDefault();
      app.canvas?.processMouseWheel(e); // zoom the graph as over any other part of the node
    },
  });
  node.locrefBoxCanvas = canvas;
  jsonWidget.hidden = true; // hidden, not removed: its value is saved and sent
  // The host's layout still gives a hidden DOM widget its minimum height (a blank gap);
  // report no height while hidden.
  const layoutSize = jsonWidget.computeLayoutSize?.bind(jsonWidget);
  if (layoutSize) {
    jsonWidget.computeLayoutSize = (n) =>
      (jsonWidget.hidden ? { minHeight: 0, maxHeight: 0, minWidth: 0 } : layoutSize(n));
  }
  const previous = jsonWidget.callback;
  jsonWidget.callback = function (...args) {
    const r = previous?.apply(this, args);
    canvas.sync();
    return r;
  };
  const widget = node.addDOMWidget("box_canvas", "locref_box_canvas", canvas.element, {
    serialize: false, // not part of the prompt
    hideOnZoom: false,
    getMinHeight: () => CANVAS_MIN_HEIGHT,
    getValue: () => undefined,
    setValue: () => {},
    // Called on every frame the node is drawn: picks up width/height/boxes_json changes
    // from any source (typing, loading a workflow, links) at the cost of two comparisons.
    onDraw: () => canvas.sync(),
  });
  widget.serialize = false; // not in the workflow's widgets_values either
  node.setSize([Math.max(node.size[0], DEFAULT_NODE_SIZE[0]), Math.max(node.size[1], DEFAULT_NODE_SIZE[1])]);
  canvas.sync();
}

/** Upstream nodes of `start` (breadth first over input links), excluding `start`. */
function upstream(start, stopAt = () => false) {
  const seen = new Set([start.id]);
  const queue = [start];
  const found = [];
  while (queue.length) {
    const node = queue.shift();
    (node.inputs ?? []).forEach((_, slot) => {
      const up = node.getInputNode?.(slot);
      if (!up || seen.has(up.id)) return;
      seen.add(up.id);
      found.push(up);
      if (!stopAt(up)) queue.push(up);
    });
  }
  return found;
}

function viewUrl(image) {
  const params = new URLSearchParams({
    filename: image.filename, subfolder: image.subfolder ?? "", type: image.type ?? "output",
    rand: String(Math.random()),
  });
  return api.apiURL(`/view?${params}`);
}

/** After a node ran: thumbnails and backgrounds for the canvases upstream of it. */
function onExecuted({ detail }) {
  const id = detail?.display_node ?? detail?.node;
  const node = app.graph?.getNodeById(id) ?? app.graph?.getNodeById(Number(id));
  const output = detail?.output;
  if (!node || !output) return;
  const type = nodeType(node);
  const canvases = (stop) => upstream(node, stop).map((n) => n.locrefBoxCanvas).filter(Boolean);
  if (THUMB_SOURCES.has(type) && Array.isArray(output.locref_thumbs)) {
    const urls = output.locref_thumbs.map((t) => (t && t.filename ? viewUrl(t) : null));
    for (const c of canvases((n) => BOX_NODE_TYPES[nodeType(n)])) c.setThumbnails(urls);
  }
  const images = Array.isArray(output.images) ? output.images : [];
  if (images.length && !NOT_BACKGROUND.has(type)) {
    // Do not look through a Layout Preview: its image already shows the boxes.
    const stop = (n) => NOT_BACKGROUND.has(nodeType(n));
    for (const c of canvases(stop)) c.setBackground(viewUrl(images[0]));
  }
}

app.registerExtension({
  name: "LocRef.BoxCanvas",
  async setup() {
    api.addEventListener("executed", onExecuted);
  },
  async nodeCreated(node) {
    if (BOX_NODE_TYPES[nodeType(node)]) attachCanvas(node);
  },
});
