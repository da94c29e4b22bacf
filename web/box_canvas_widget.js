// The box canvas of one node: DOM, state, pointer and keyboard handling.
// All state lives on the instance (one per node); the layout itself lives in the node's
// hidden `boxes_json` STRING widget, which is what the workflow saves and the prompt sends.
import {
  MAX_BOXES, boxFromDrag, hitTest, isUsable, minSize, moveBox, moveZ, parseLayout,
  resizeBox, serializeLayout, snapSteps,
} from "./box_geometry.js";
import { HANDLE_PX, cursorFor, renderCanvas } from "./box_canvas_view.js";
import { LABEL_PLACEHOLDER_NONE, buildDom, labelPlaceholder } from "./box_canvas_dom.js";

const UNDO_LIMIT = 100;
const NUDGE_PX = 1; // arrow-key step in layout pixels (the snap step when snapping is on)

export class BoxCanvas {
  /**
   * @param {object} node the LiteGraph node
   * @param {object} jsonWidget its boxes_json STRING widget (kept, hidden)
   * @param {object} hooks {onJsonToggle(show), onChange(), forwardPointer(e), forwardWheel(e)};
   *   onChange tells the host's change tracker (workflow undo, autosave) about an edit
   */
  constructor(node, jsonWidget, hooks = {}) {
    this.node = node;
    this.jsonWidget = jsonWidget;
    this.hooks = hooks;
    this.layout = { width: 512, height: 512, boxes: [] };
    this.lastText = null; // boxes_json text the canvas last showed or wrote
    this.error = "";
    this.selected = -1;
    this.drag = null;
    this.undoStack = [];
    this.redoStack = [];
    this.labelEditing = false;
    this.thumbs = [];
    this.background = null;
    this.dom = buildDom(this);
    this.element = this.dom.root;
    this.ctx = this.dom.canvas.getContext("2d");
    this.cssSize = { w: 1, h: 1 };
    new ResizeObserver(() => this.fit()).observe(this.dom.stage);
    this.bindPointer();
  }

  // ---- sync with the node's widgets -------------------------------------------------

  sizeFromWidgets() {
    const get = (name, fallback) => {
      const v = Number(this.node.widgets?.find((w) => w.name === name)?.value);
      return Number.isFinite(v) && v > 0 ? v : fallback;
    };
    return { width: get("width", 512), height: get("height", 512) };
  }

  /** Re-read width/height and boxes_json; cheap when nothing changed (called every draw). */
  sync() {
    const { width, height } = this.sizeFromWidgets();
    const text = String(this.jsonWidget.value ?? "");
    const sizeChanged = width !== this.layout.width || height !== this.layout.height;
    if (text === this.lastText && !sizeChanged) return;
    if (text !== this.lastText) {
      this.lastText = text;
      const parsed = parseLayout(text, width, height);
      if (parsed.ok) {
        this.layout = parsed.layout;
        this.error = "";
        if (this.selected >= this.layout.boxes.length) this.selected = -1;
      } else {
        // Keep showing the last valid layout; Python reports the error on queue.
        this.error = `boxes_json is invalid (${parsed.error}); showing the last valid layout`;
      }
    }
    this.layout = { ...this.layout, width, height };
    if (sizeChanged) this.fit();
    this.refreshControls();
    this.render();
  }

  /** Write the layout into boxes_json; push the previous text on the undo stack. */
  commit(previousText = this.lastText) {
    const text = serializeLayout(this.layout);
    if (text === this.jsonWidget.value) return;
    if (previousText !== null && previousText !== text) this.pushUndo(previousText);
    this.lastText = text;
    this.error = "";
    this.jsonWidget.value = text; // the widget's setter also runs its callback
    this.node.setDirtyCanvas?.(true, true);
    this.refreshControls();
    if (!this.labelEditing) this.hooks.onChange?.(); // a label edit reports when it ends
  }

  pushUndo(text) {
    this.undoStack.push(text);
    if (this.undoStack.length > UNDO_LIMIT) this.undoStack.shift();
    this.redoStack.length = 0;
  }

  /** Undo (or redo) one edit of this node's layout. */
  undo(redo = false) {
    const from = redo ? this.redoStack : this.undoStack;
    const to = redo ? this.undoStack : this.redoStack;
    const text = from.pop();
    if (text === undefined) return;
    to.push(String(this.jsonWidget.value ?? ""));
    this.jsonWidget.value = text;
    this.sync();
    this.hooks.onChange?.();
  }

  // ---- geometry helpers --------------------------------------------------------------

  /** Pointer position in CSS pixels of the canvas, correct under the editor's zoom/pan. */
  pointerPx(e) {
    const r = this.dom.canvas.getBoundingClientRect();
    return {
      x: ((e.clientX - r.left) / r.width) * this.cssSize.w,
      y: ((e.clientY - r.top) / r.height) * this.cssSize.h,
    };
  }

  toNorm(p) {
    return { x: p.x / this.cssSize.w, y: p.y / this.cssSize.h };
  }

  snap() {
    return snapSteps(this.dom.snap.checked, this.layout.width, this.layout.height);
  }

  // ---- pointer handling --------------------------------------------------------------

  bindPointer() {
    const c = this.dom.canvas;
    c.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    c.addEventListener("pointermove", (e) => this.onPointerMove(e));
    c.addEventListener("pointerup", (e) => this.onPointerUp(e));
    c.addEventListener("pointercancel", () => this.cancelDrag());
    c.addEventListener("wheel", (e) => this.hooks.forwardWheel?.(e), { passive: false });
    c.addEventListener("contextmenu", (e) => e.preventDefault());
  }

  onPointerDown(e) {
    if (e.button !== 0) {
      this.hooks.forwardPointer?.(e); // middle button pans the graph as elsewhere
      return;
    }
    e.preventDefault();
    e.stopPropagation();
    this.dom.keys.focus({ preventScroll: true });
    this.dom.canvas.setPointerCapture(e.pointerId);
    const p = this.pointerPx(e);
    const hit = hitTest(this.layout.boxes, p, this.cssSize.w, this.cssSize.h, HANDLE_PX, this.selected);
    const start = this.toNorm(p);
    const before = this.lastText;
    if (hit) {
      this.selected = hit.index;
      this.drag = { mode: hit.handle === "move" ? "move" : "resize", handle: hit.handle,
        index: hit.index, start, orig: { ...this.layout.boxes[hit.index] }, before };
    } else {
      this.selected = -1;
      this.drag = { mode: "draw", start, draft: null, before };
    }
    this.refreshControls();
    this.render();
  }

  onPointerMove(e) {
    if (!this.drag) {
      if (e.buttons === 0) {
        const hit = hitTest(this.layout.boxes, this.pointerPx(e), this.cssSize.w, this.cssSize.h,
          HANDLE_PX, this.selected);
        this.dom.canvas.style.cursor = cursorFor(hit?.handle);
      } else if (e.buttons & 4) {
        this.hooks.forwardPointer?.(e);
      }
      return;
    }
    e.stopPropagation();
    const q = this.toNorm(this.pointerPx(e));
    const d = this.drag;
    if (d.mode === "draw") {
      d.draft = boxFromDrag(d.start, q, this.snap());
    } else {
      const boxes = this.layout.boxes.slice();
      boxes[d.index] = d.mode === "move"
        ? moveBox(d.orig, q.x - d.start.x, q.y - d.start.y, this.snap())
        : resizeBox(d.orig, d.handle, q, minSize(this.layout.width, this.layout.height), this.snap());
      this.layout = { ...this.layout, boxes };
      d.changed = true;
    }
    this.render();
  }

  onPointerUp(e) {
    const d = this.drag;
    if (!d) {
      if (e.button === 1) this.hooks.forwardPointer?.(e);
      return;
    }
    e.stopPropagation();
    this.drag = null;
    if (d.mode === "draw") {
      const min = minSize(this.layout.width, this.layout.height);
      if (d.draft && isUsable(d.draft, min)) this.addBox(d.draft, d.before);
    } else if (d.changed) {
      this.commit(d.before);
    }
    this.refreshControls();
    this.render();
  }

  cancelDrag() {
    if (!this.drag) return;
    this.drag = null;
    this.lastText = null; // re-read boxes_json: drops a half-done move
    this.sync();
  }

  // ---- edits -------------------------------------------------------------------------

  addBox(box, before) {
    if (this.layout.boxes.length >= MAX_BOXES) {
      this.flash(`At most ${MAX_BOXES} boxes`);
      return;
    }
    this.layout = { ...this.layout, boxes: [...this.layout.boxes, { ...box, label: "" }] };
    this.selected = this.layout.boxes.length - 1;
    this.commit(before);
  }

  deleteSelected() {
    if (this.selected < 0) return;
    const boxes = this.layout.boxes.filter((_, i) => i !== this.selected);
    this.thumbs = this.thumbs.filter((_, i) => i !== this.selected); // thumbnails follow boxes
    this.layout = { ...this.layout, boxes };
    this.selected = Math.min(this.selected, boxes.length - 1);
    this.commit();
    this.render();
  }

  reorder(delta) {
    if (this.selected < 0) return;
    const { boxes, index } = moveZ(this.layout.boxes, this.selected, delta);
    const thumbs = Array.from(boxes, (_, i) => this.thumbs[i] ?? null);
    this.thumbs = moveZ(thumbs, this.selected, delta).boxes;
    this.layout = { ...this.layout, boxes };
    this.selected = index;
    this.commit();
    this.render();
  }

  nudge(dxPx, dyPx) {
    if (this.selected < 0) return;
    const boxes = this.layout.boxes.slice();
    boxes[this.selected] = moveBox(boxes[this.selected], dxPx / this.layout.width,
      dyPx / this.layout.height, this.snap());
    this.layout = { ...this.layout, boxes };
    this.commit();
    this.render();
  }

  /** The label field lost focus or took Enter: the editing session is one change. */
  endLabelEdit() {
    if (!this.labelEditing) return;
    this.labelEditing = false;
    this.hooks.onChange?.();
  }

  /** Label typed into the label field: one undo step per editing session. */
  setLabel(text) {
    if (this.selected < 0) return;
    if (!this.labelEditing) {
      this.labelEditing = true;
      this.pushUndo(this.lastText);
    }
    const boxes = this.layout.boxes.slice();
    boxes[this.selected] = { ...boxes[this.selected], label: text };
    this.layout = { ...this.layout, boxes };
    this.commit(null);
    this.render();
  }

  onKeyDown(e) {
    const mod = e.ctrlKey || e.metaKey;
    const key = e.key.toLowerCase();
    let handled = true;
    if (mod && key === "z") this.undo(e.shiftKey);
    else if (mod && key === "y") this.undo(true);
    else if (mod) handled = false; // e.g. Ctrl+Enter still queues the prompt
    else if (e.key === "Delete" || e.key === "Backspace") this.deleteSelected();
    else if (e.key === "Escape") this.select(-1);
    else if (e.key.startsWith("Arrow")) {
      const step = this.dom.snap.checked ? 8 : NUDGE_PX;
      const dx = { ArrowLeft: -step, ArrowRight: step }[e.key] ?? 0;
      const dy = { ArrowUp: -step, ArrowDown: step }[e.key] ?? 0;
      this.nudge(dx, dy);
    } else if (e.key !== "Tab") e.preventDefault(); // keep other keys out of the key sink
    else handled = false;
    if (handled) {
      e.preventDefault();
      e.stopPropagation();
    }
  }

  select(index) {
    this.selected = index;
    this.refreshControls();
    this.render();
  }

  // ---- run results -------------------------------------------------------------------

  /** Reference thumbnails per box index (image URLs, or null), from a run. */
  setThumbnails(urls) {
    this.thumbs = urls.map((url) => (url ? this.loadImage(url) : null));
    this.render();
  }

  setBackground(url) {
    this.background = url ? this.loadImage(url) : null;
    this.dom.bg.parentElement.style.display = url ? "" : "none";
    this.render();
  }

  loadImage(url) {
    const img = new Image();
    img.onload = () => this.render();
    img.src = url;
    return img;
  }

  // ---- view --------------------------------------------------------------------------

  /** Size the canvas to the largest rectangle of the layout's aspect ratio in the stage. */
  fit() {
    const stage = this.dom.stage;
    const sw = Math.max(stage.clientWidth, 16);
    const sh = Math.max(stage.clientHeight, 16);
    const aspect = this.layout.width / this.layout.height;
    const w = Math.floor(Math.min(sw, sh * aspect));
    const h = Math.floor(w / aspect);
    const c = this.dom.canvas;
    c.style.width = `${w}px`;
    c.style.height = `${h}px`;
    // Backing store at 2x device pixels so the canvas stays sharp when the editor zooms in.
    const k = (window.devicePixelRatio || 1) * 2;
    c.width = Math.max(1, Math.round(w * k));
    c.height = Math.max(1, Math.round(h * k));
    this.cssSize = { w: Math.max(w, 1), h: Math.max(h, 1), k };
    this.render();
  }

  render() {
    const { w, h, k } = this.cssSize;
    if (!k) return;
    this.ctx.setTransform(k, 0, 0, k, 0, 0);
    renderCanvas(this.ctx, w, h, {
      layout: this.layout, selected: this.selected, draft: this.drag?.draft ?? null,
      thumbs: this.thumbs, background: this.background, showBackground: this.dom.bg.checked,
    });
  }

  refreshControls() {
    const d = this.dom;
    const box = this.layout.boxes[this.selected];
    d.label.disabled = !box;
    if (document.activeElement !== d.label || !box) d.label.value = box?.label ?? "";
    d.label.placeholder = box ? labelPlaceholder(this.selected) : LABEL_PLACEHOLDER_NONE;
    for (const b of [d.del, d.forward, d.back]) b.disabled = !box;
    const n = this.layout.boxes.length;
    d.status.textContent = this.error
      || `${n} box${n === 1 ? "" : "es"} on ${this.layout.width}×${this.layout.height}`;
    d.status.classList.toggle("locref-error", !!this.error);
  }

  flash(message) {
    this.dom.status.textContent = message;
  }
}
