// Drawing of the LocRef box canvas: background, reference thumbnails, boxes, labels, handles.
// Pure rendering onto a 2D context; all state comes in as arguments.
import { denormalise } from "./box_geometry.js";

// Same colours, in the same order, as the Python preview (locref_core/preview.py) so a box
// has one colour in the editor and in the Layout Preview image.
const BOX_COLOURS = [
  [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
  [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195],
  [128, 128, 0],
];
export const HANDLE_PX = 7; // drawn handle size and hit tolerance, in canvas CSS pixels

export function boxColour(index, alpha = 1) {
  const [r, g, b] = BOX_COLOURS[index % BOX_COLOURS.length];
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}

function inkFor(index) {
  const [r, g, b] = BOX_COLOURS[index % BOX_COLOURS.length];
  return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#000" : "#fff";
}

/** Draw `img` into rect (x, y, w, h) keeping its aspect ratio (contain), if it has loaded. */
function drawContained(ctx, img, x, y, w, h) {
  if (!img || !img.complete || !img.naturalWidth) return;
  const s = Math.min(w / img.naturalWidth, h / img.naturalHeight);
  const dw = img.naturalWidth * s;
  const dh = img.naturalHeight * s;
  ctx.drawImage(img, x + (w - dw) / 2, y + (h - dh) / 2, dw, dh);
}

function drawBackdrop(ctx, w, h, view) {
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(0, 0, w, h);
  if (view.background && view.showBackground) {
    ctx.globalAlpha = 0.75;
    drawContained(ctx, view.background, 0, 0, w, h);
    ctx.globalAlpha = 1;
  }
  // A faint grid every 64 layout pixels (8 latent cells) helps judge sizes.
  ctx.strokeStyle = "rgba(255, 255, 255, 0.07)";
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (let x = 64; x < view.layout.width; x += 64) {
    const px = Math.round((x / view.layout.width) * w) + 0.5;
    ctx.moveTo(px, 0);
    ctx.lineTo(px, h);
  }
  for (let y = 64; y < view.layout.height; y += 64) {
    const py = Math.round((y / view.layout.height) * h) + 0.5;
    ctx.moveTo(0, py);
    ctx.lineTo(w, py);
  }
  ctx.stroke();
}

function drawLabel(ctx, i, box, b) {
  const text = box.label ? `${i}: ${box.label}` : `${i}`;
  ctx.font = "12px sans-serif";
  const tw = Math.min(ctx.measureText(text).width + 6, Math.max(14, b.x1 - b.x0));
  ctx.fillStyle = boxColour(i, 0.9);
  ctx.fillRect(b.x0, b.y0, tw, 16);
  ctx.fillStyle = inkFor(i);
  ctx.save();
  ctx.beginPath();
  ctx.rect(b.x0, b.y0, tw, 16);
  ctx.clip();
  ctx.fillText(text, b.x0 + 3, b.y0 + 12);
  ctx.restore();
}

function drawHandles(ctx, b) {
  const xs = { w: b.x0, e: b.x1, c: (b.x0 + b.x1) / 2 };
  const ys = { n: b.y0, s: b.y1, c: (b.y0 + b.y1) / 2 };
  const s = HANDLE_PX;
  ctx.fillStyle = "#fff";
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 1;
  for (const [hx, hy] of [["w", "n"], ["c", "n"], ["e", "n"], ["e", "c"], ["e", "s"], ["c", "s"], ["w", "s"], ["w", "c"]]) {
    ctx.fillRect(xs[hx] - s / 2, ys[hy] - s / 2, s, s);
    ctx.strokeRect(xs[hx] - s / 2 + 0.5, ys[hy] - s / 2 + 0.5, s - 1, s - 1);
  }
}

/**
 * Render the whole canvas. `view` = {layout, selected, draft, thumbs, background,
 * showBackground, focused}; w x h are CSS pixels (the context is pre-scaled).
 */
export function renderCanvas(ctx, w, h, view) {
  drawBackdrop(ctx, w, h, view);
  const boxes = view.layout.boxes;
  boxes.forEach((box, i) => {
    const b = denormalise(box, w, h);
    const thumb = view.thumbs?.[i];
    if (thumb) {
      ctx.globalAlpha = 0.85;
      drawContained(ctx, thumb, b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0);
      ctx.globalAlpha = 1;
    }
    ctx.fillStyle = boxColour(i, thumb ? 0.08 : 0.2);
    ctx.fillRect(b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0);
    ctx.strokeStyle = boxColour(i);
    ctx.lineWidth = i === view.selected ? 3 : 2;
    ctx.strokeRect(b.x0 + 1, b.y0 + 1, b.x1 - b.x0 - 2, b.y1 - b.y0 - 2);
    drawLabel(ctx, i, box, b);
  });
  if (view.selected >= 0 && view.selected < boxes.length) {
    drawHandles(ctx, denormalise(boxes[view.selected], w, h));
  }
  if (view.draft) {
    const b = denormalise(view.draft, w, h);
    ctx.setLineDash([5, 4]);
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 1.5;
    ctx.strokeRect(b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0);
    ctx.setLineDash([]);
  }
  if (!boxes.length && !view.draft) {
    ctx.fillStyle = "rgba(255, 255, 255, 0.45)";
    ctx.font = "13px sans-serif";
    ctx.textAlign = "center";
    ctx.fillText("Drag to draw a box", w / 2, h / 2);
    ctx.textAlign = "left";
  }
}

/** CSS cursor for a handle name from hitTest ("nw", "e", "move", ...). */
export function cursorFor(handle) {
  if (!handle) return "crosshair";
  if (handle === "move") return "move";
  return { n: "ns", s: "ns", e: "ew", w: "ew", nw: "nwse", se: "nwse", ne: "nesw", sw: "nesw" }[handle] + "-resize";
}
