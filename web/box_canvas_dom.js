// DOM of the box canvas: toolbar (label field, z-order, delete, snap, background, JSON
// toggle), the drawing stage, and a status line. Events are forwarded to the BoxCanvas.

const STYLE_ID = "locref-box-canvas-style";
const CSS = `
.locref-box-canvas { display: flex; flex-direction: column; gap: 4px; width: 100%; height: 100%;
  box-sizing: border-box; font: 12px sans-serif; color: var(--input-text, #ddd); }
.locref-box-canvas .locref-toolbar { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
.locref-box-canvas input[type=text] { flex: 1 1 90px; min-width: 60px; padding: 2px 4px;
  background: var(--comfy-input-bg, #222); color: inherit; border: 1px solid #555; border-radius: 4px; }
.locref-box-canvas button { padding: 1px 6px; background: var(--comfy-input-bg, #222); color: inherit;
  border: 1px solid #555; border-radius: 4px; cursor: pointer; }
.locref-box-canvas button:disabled { opacity: 0.4; cursor: default; }
.locref-box-canvas label { display: flex; align-items: center; gap: 2px; user-select: none; }
.locref-box-canvas .locref-stage { position: relative; flex: 1 1 auto; min-height: 64px;
  display: flex; align-items: flex-start; justify-content: center; overflow: hidden; }
/* An inset outline, not a border: a border would shift the drawing against the element's
   bounding rectangle, which maps pointer positions. */
.locref-box-canvas canvas { touch-action: none; outline: 1px solid #444; outline-offset: -1px; }
.locref-box-canvas:focus-within canvas { outline-color: #6af; }
.locref-box-canvas .locref-keys { position: absolute; left: 0; top: 0; width: 1px; height: 1px;
  opacity: 0; resize: none; border: 0; padding: 0; pointer-events: none; }
.locref-box-canvas .locref-status { opacity: 0.75; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.locref-box-canvas .locref-status.locref-error { color: #f77; opacity: 1; }
`;

/** The label field's tooltip: the text is a regional prompt, not only a name. */
export const LABEL_TITLE = "This box's text: LocRef Apply makes it steer what is drawn inside the box "
  + "(connect the checkpoint's CLIP to LocRef Apply). Also its label for references and the preview.";
/** The label field's placeholder with no box selected (the field is disabled then). */
export const LABEL_PLACEHOLDER_NONE = "select a box";
/** The label field's placeholder for selected box `index`. */
export const labelPlaceholder = (index) => `text for box ${index} (steers its region)`;

function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}

function el(tag, props = {}, parent = null) {
  const node = Object.assign(document.createElement(tag), props);
  parent?.appendChild(node);
  return node;
}

function button(parent, text, title, onClick) {
  const b = el("button", { type: "button", textContent: text, title }, parent);
  b.addEventListener("click", (e) => {
    e.stopPropagation();
    onClick();
  });
  return b;
}

function checkbox(parent, text, title, checked, onChange) {
  const wrap = el("label", { title }, parent);
  const box = el("input", { type: "checkbox", checked }, wrap);
  wrap.append(text);
  box.addEventListener("change", () => onChange(box.checked));
  return box;
}

/** Build the widget's DOM for `canvas` (a BoxCanvas); returns the named elements. */
export function buildDom(canvas) {
  ensureStyle();
  const root = el("div", { className: "locref-box-canvas" });
  const bar = el("div", { className: "locref-toolbar" }, root);
  const label = el("input", {
    type: "text", className: "locref-label", placeholder: LABEL_PLACEHOLDER_NONE, disabled: true,
    title: LABEL_TITLE,
  }, bar);
  label.addEventListener("input", () => canvas.setLabel(label.value));
  label.addEventListener("change", () => canvas.endLabelEdit());
  label.addEventListener("blur", () => canvas.endLabelEdit());
  label.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === "Escape") {
      e.preventDefault();
      dom.keys.focus({ preventScroll: true });
    }
  });
  const forward = button(bar, "▲", "Bring the selected box forward (drawn later, in front)", () => canvas.reorder(1));
  const back = button(bar, "▼", "Send the selected box backward", () => canvas.reorder(-1));
  const del = button(bar, "✕", "Delete the selected box (Delete / Backspace)", () => canvas.deleteSelected());
  const snap = checkbox(bar, "snap", "Snap edges to 8 px (one latent cell)", false, () => {});
  const bg = checkbox(bar, "bg", "Show the last generated image behind the boxes", true, () => canvas.render());
  bg.parentElement.style.display = "none"; // shown once a run produced a background
  const json = checkbox(bar, "JSON", "Show the boxes_json text (advanced)", false, (on) => canvas.hooks.onJsonToggle?.(on));
  const stage = el("div", { className: "locref-stage" }, root);
  const cnv = el("canvas", {
    className: "locref-canvas",
    title: "Drag on empty space: draw a box. Drag a box: move. Drag a handle: resize. "
      + "Delete: remove. Ctrl+Z / Ctrl+Y: undo / redo. Arrows: nudge.",
  }, stage);
  // Keyboard focus goes to this invisible read-only textarea rather than to the canvas:
  // the host skips its graph-wide Ctrl+Z and single-key shortcuts while a textarea has
  // focus, so Delete and Ctrl+Z act on this node's boxes only.
  const keys = el("textarea", { className: "locref-keys", readOnly: true, tabIndex: 0,
    ariaLabel: "Box canvas keyboard input" }, stage);
  keys.addEventListener("keydown", (e) => canvas.onKeyDown(e));
  const status = el("div", { className: "locref-status" }, root);
  const dom = { root, label, forward, back, del, snap, bg, json, stage, canvas: cnv, keys, status };
  return dom;
}
