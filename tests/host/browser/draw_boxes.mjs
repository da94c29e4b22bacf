// Real-browser test of the LocRef box canvas, driven by tests/host/test_host_browser.py.
//
//   node draw_boxes.mjs <server url> <output folder> <reference image name in input/>
//
// Opens the ComfyUI front end in Debian's chromium and builds Boxes -> Reference (box 0, image
// from Load Image) -> Layout Preview -> Preview Image, plus a second Boxes node that must stay
// untouched. Zooms and pans the editor, draws two boxes with real mouse drags, moves one,
// resizes one, labels both through the label field (whose placeholder and tooltip must say
// that the text steers the box), checks Ctrl+Z, queues the prompt like the UI does and waits
// for the run; checks that the canvas shows the reference thumbnail in box 0.
// Reloads the page and checks that the boxes are restored; changes the width widget and
// checks the canvas aspect and the stored coordinates; types invalid JSON into the shown
// boxes_json text, queues, checks the error dialog and that the canvas keeps the last valid
// layout, then restores the JSON and queues again. Runs a 1x1 reference and checks LocRef
// Reference shows its warning, and opens the Boxes node's help page (feedback.mjs). Writes result.json (the gestures in screen
// pixels, the canvas rectangle and the prompt ids, for the pytest side), screenshots, and
// exits non-zero on any failed check.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { checkHelpPage, checkWarningOnNode } from "./feedback.mjs";

const [url, outDir, referenceName, tinyName] = process.argv.slice(2);
if (!url || !outDir || !referenceName || !tinyName) {
  console.error("usage: node draw_boxes.mjs <server url> <output folder> <reference image name> "
    + "<1x1 image name>");
  process.exit(2);
}
const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"];
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)} s]`, ...a);

function check(cond, message) {
  if (!cond) throw new Error(`check failed: ${message}`);
}

/** Settings that keep first-run dialogs off the canvas. */
async function prepareSettings() {
  for (const [id, value] of [["Comfy.TutorialCompleted", true]]) {
    const resp = await fetch(`${url}/settings/${id}`, { method: "POST", body: JSON.stringify(value) });
    check(resp.ok, `POST /settings/${id}: ${resp.status}`);
  }
}

async function waitForApp(page) {
  await page.waitForFunction(
    () => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.LocRefBoxes,
    null, { timeout: 90000 });
  await page.waitForTimeout(500);
}

/** Build the graph in the page; returns node ids. Zooms to 1.25 and pans, to test both. */
async function buildGraph(page) {
  return page.evaluate((reference) => {
    const app = window.comfyAPI.app.app;
    const LG = window.LiteGraph;
    app.graph.clear();
    const add = (type, pos) => {
      const node = LG.createNode(type);
      node.pos = pos;
      app.graph.add(node);
      return node;
    };
    const boxes = add("LocRefBoxes", [40, 40]);
    boxes.widgets.find((w) => w.name === "width").value = 512;
    boxes.widgets.find((w) => w.name === "height").value = 384;
    boxes.setSize([440, 440]); // the canvas (512x384) fills the width with little to spare
    const other = add("LocRefBoxes", [520, 420]);
    const load = add("LoadImage", [520, 40]);
    load.widgets.find((w) => w.name === "image").value = reference;
    const attach = add("LocRefReference", [800, 40]);
    attach.widgets.find((w) => w.name === "box_index").value = 0;
    const preview = add("LocRefLayoutPreview", [800, 240]);
    const image = add("PreviewImage", [1060, 40]);
    boxes.connect(0, attach, 0);
    load.connect(0, attach, 1);
    attach.connect(0, preview, 0);
    preview.connect(0, image, 0);
    app.canvas.ds.scale = 1.25;
    app.canvas.ds.offset = [30, 20];
    app.graph.setDirtyCanvas(true, true);
    return { boxes: boxes.id, other: other.id, load: load.id, attach: attach.id };
  }, referenceName);
}

/** Screen rectangle of a node's box canvas (after the DOM widgets caught up). */
async function canvasRect(page, id) {
  await page.waitForTimeout(300);
  return page.evaluate((nodeId) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(nodeId);
    const r = node.locrefBoxCanvas.dom.canvas.getBoundingClientRect();
    return { left: r.left, top: r.top, width: r.width, height: r.height };
  }, id);
}

const boxesJson = (page, id) => page.evaluate((nodeId) => {
  const node = window.comfyAPI.app.app.graph.getNodeById(nodeId);
  return node.widgets.find((w) => w.name === "boxes_json").value;
}, id);

async function drag(page, from, to) {
  await page.mouse.move(from.x, from.y);
  await page.mouse.down();
  for (let i = 1; i <= 8; i++) {
    await page.mouse.move(from.x + ((to.x - from.x) * i) / 8, from.y + ((to.y - from.y) * i) / 8);
  }
  await page.mouse.up();
}

async function typeLabel(page, id, at, text) {
  await page.mouse.click(at.x, at.y); // select the box
  const label = await page.evaluateHandle((nodeId) =>
    window.comfyAPI.app.app.graph.getNodeById(nodeId).locrefBoxCanvas.dom.label, id);
  // The field says that the text steers the box (LocRef Apply's regional prompts).
  const { placeholder, title, selected } = await label.evaluate((el, nodeId) => ({
    placeholder: el.placeholder, title: el.title,
    selected: window.comfyAPI.app.app.graph.getNodeById(nodeId).locrefBoxCanvas.selected,
  }), id);
  check(placeholder === `text for box ${selected} (steers its region)`,
    `the label field's placeholder names the box and its role: ${JSON.stringify(placeholder)}`);
  check(title.includes("steer what is drawn inside the box") && title.includes("CLIP"),
    `the label field's tooltip explains the regional text: ${JSON.stringify(title)}`);
  await label.click();
  await page.keyboard.type(text);
  await page.keyboard.press("Enter");
}

/** The gestures, in fractions of the canvas rectangle. */
const GESTURES = {
  drawA: [[0.10, 0.10], [0.45, 0.50]],
  drawB: [[0.55, 0.30], [0.90, 0.80]],
  moveA: [[0.275, 0.30], [0.325, 0.50]], // from A's centre by (+0.05, +0.2)
  resizeB: [[0.90, 0.80], [0.95, 0.90]], // B's bottom-right corner
  junk: [[0.20, 0.85], [0.35, 0.95]], // drawn, then undone with Ctrl+Z
};

async function drawEverything(page, ids, rect) {
  const at = ([fx, fy]) => ({ x: rect.left + fx * rect.width, y: rect.top + fy * rect.height });
  const gestures = {};
  for (const name of ["drawA", "drawB", "moveA", "resizeB"]) {
    const [a, b] = GESTURES[name].map(at);
    await drag(page, a, b);
    gestures[name] = [a, b];
  }
  await typeLabel(page, ids.boxes, at([0.32, 0.5]), "a red car");
  await typeLabel(page, ids.boxes, at([0.75, 0.6]), "a blue bird");
  const before = await boxesJson(page, ids.boxes);
  const [j0, j1] = GESTURES.junk.map(at);
  await drag(page, j0, j1);
  check(JSON.parse(await boxesJson(page, ids.boxes)).boxes.length === 3, "third box drawn");
  await page.keyboard.press("Control+z");
  await page.waitForTimeout(300);
  check(await boxesJson(page, ids.boxes) === before, "Ctrl+Z in the canvas undoes the last box");
  return gestures;
}

/** Queue like the Run button does; wait for the new history entry. Returns {id, status}. */
async function queueAndWait(page) {
  const history = async () => (await fetch(`${url}/history`)).json();
  const known = new Set(Object.keys(await history()));
  await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0));
  const deadline = Date.now() + 120000;
  while (Date.now() < deadline) {
    const done = Object.entries(await history()).filter(([id, e]) => !known.has(id)
      && (e.status?.completed || e.status?.status_str === "error"));
    if (done.length) return { id: done[0][0], status: done[0][1].status.status_str };
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error("the queued prompt did not finish within 120 s");
}

/** boxes_json as the host's change tracker last recorded it (what autosave and undo see). */
const trackedJson = (page, id) => page.evaluate((nodeId) => {
  const state = window.comfyAPI.app.app.extensionManager.workflow.activeWorkflow.changeTracker.activeState;
  return state.nodes.find((n) => n.id === nodeId).widgets_values[2];
}, id);

/** The canvas of node `id`: boxes, status, aspect, thumbnails, picture, centre pixels. */
const canvasState = (page, id) => page.evaluate((nodeId) => {
  const c = window.comfyAPI.app.app.graph.getNodeById(nodeId).locrefBoxCanvas;
  c.render();
  const r = c.dom.canvas.getBoundingClientRect();
  const el = c.dom.canvas;
  const centre = (b) => Array.from(c.ctx.getImageData(
    Math.round(((b.x0 + b.x1) / 2) * el.width), Math.round(((b.y0 + b.y1) / 2) * el.height), 1, 1).data);
  return {
    boxes: c.layout.boxes, size: [c.layout.width, c.layout.height], aspect: r.width / r.height,
    error: el.closest(".locref-box-canvas").querySelector(".locref-status.locref-error") !== null,
    status: c.dom.status.textContent, picture: el.toDataURL(), centres: c.layout.boxes.map(centre),
    thumbs: c.thumbs.map((t) => (t ? { src: t.src, width: t.naturalWidth, height: t.naturalHeight } : null)),
  };
}, id);

/** After the run: box 0 shows the reference (orange) thumbnail, box 1 none. */
async function checkThumbnail(page, id) {
  await page.waitForFunction((nodeId) => {
    const t = window.comfyAPI.app.app.graph.getNodeById(nodeId).locrefBoxCanvas.thumbs;
    return t[0]?.complete && t[0].naturalWidth > 0;
  }, id, { timeout: 30000 });
  const s = await canvasState(page, id);
  check(s.thumbs.length === 2 && s.thumbs[0].width > 0 && s.thumbs[1] === null,
    `thumbnail for box 0 only: ${JSON.stringify(s.thumbs)}`);
  const [[r0, g0, b0], [r1]] = s.centres;
  check(r0 > 150 && g0 > 80 && b0 < 90, `box 0 shows the orange reference, centre pixel ${s.centres[0]}`);
  check(r1 < 120, `box 1 has no thumbnail, centre pixel ${s.centres[1]}`);
  return { thumbs: s.thumbs, centres: s.centres };
}

/** Set a widget as a link or the number prompt would, and let the editor draw a frame. */
async function setWidget(page, id, name, value) {
  await page.evaluate(([nodeId, widgetName, v]) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(nodeId);
    const widget = node.widgets.find((w) => w.name === widgetName);
    widget.value = v;
    widget.callback?.(v, app.canvas, node);
    node.setDirtyCanvas(true, true);
  }, [id, name, value]);
  await page.waitForTimeout(400);
}

/** Width 512 -> 1024 -> 512: the canvas follows the aspect; boxes_json does not change. */
async function checkWidthChange(page, id) {
  const json = await boxesJson(page, id);
  const before = await canvasState(page, id);
  await setWidget(page, id, "width", 1024);
  const wide = await canvasState(page, id);
  await page.screenshot({ path: join(outDir, "width_1024.png") });
  const near = (a, b) => Math.abs(a - b) / b < 0.02;
  check(near(before.aspect, 512 / 384), `canvas aspect ${before.aspect} at 512x384`);
  check(near(wide.aspect, 1024 / 384), `canvas aspect ${wide.aspect} at 1024x384`);
  check(wide.size[0] === 1024, "the canvas read the new width");
  check(await boxesJson(page, id) === json, "a width change leaves boxes_json unchanged");
  check(JSON.stringify(wide.boxes) === JSON.stringify(before.boxes), "normalised boxes unchanged");
  await setWidget(page, id, "width", 512);
  const back = await canvasState(page, id);
  check(near(back.aspect, 512 / 384) && back.picture === before.picture, "width back to 512: same picture");
  return { aspect_512: before.aspect, aspect_1024: wide.aspect };
}

async function nodeScreenshot(page, id, path) {
  const clip = await page.evaluate((nodeId) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(nodeId);
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
    const r = app.canvas.canvas.getBoundingClientRect();
    const s = app.canvas.ds.scale;
    return { x: r.left + x - 4, y: r.top + y - 4, width: node.size[0] * s + 8, height: (node.size[1] + title) * s + 8 };
  }, id);
  await page.screenshot({ path, clip });
}

const INVALID_JSON = '{"version": 1, "boxes": [';

/**
 * Show boxes_json through the JSON toggle and type invalid JSON: the canvas keeps the last
 * valid layout; queueing is refused (HTTP 400, VALIDATE_INPUTS) and the host's error dialog
 * shows the Python message. Then restore the JSON and queue again. Returns whether the prompt
 * was refused without a history entry, the fixed prompt's id and the dialog's text.
 */
async function checkInvalidJson(page, id, valid) {
  const handle = (what) => page.evaluateHandle(([nodeId, w]) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(nodeId);
    return w === "toggle" ? node.locrefBoxCanvas.dom.json
      : node.widgets.find((x) => x.name === "boxes_json").inputEl;
  }, [id, what]);
  await (await handle("toggle")).click();
  await page.waitForTimeout(300);
  const textarea = await handle("textarea");
  check(await textarea.isVisible(), "the JSON toggle shows boxes_json");
  const before = await canvasState(page, id); // the node grew a text box: measure after
  await textarea.fill(INVALID_JSON);
  await page.waitForTimeout(300);
  const keeps = async (when) => {
    const s = await canvasState(page, id);
    check(s.error && s.status.includes("invalid"), `${when}: the status line reports the bad JSON`);
    check(JSON.stringify(s.boxes) === JSON.stringify(before.boxes) && s.picture === before.picture,
      `${when}: the canvas still shows the last valid layout`);
  };
  await keeps("typed");
  const historySize = async () => Object.keys(await (await fetch(`${url}/history`)).json()).length;
  const before400 = await historySize();
  const accepted = await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0));
  check(accepted === false, "the prompt with invalid JSON was refused when queued");
  const dialog = page.getByRole("dialog").filter({ hasText: "boxes_json" });
  await dialog.waitFor({ state: "visible", timeout: 15000 });
  const dialogText = await dialog.innerText();
  check(dialogText.includes("boxes_json is not valid JSON") && dialogText.includes("LocRefBoxes"),
    `the error dialog shows the Python error: ${dialogText}`);
  check(await historySize() === before400, "the refused prompt never ran");
  await keeps("after the refused prompt");
  await page.screenshot({ path: join(outDir, "invalid_json.png") });
  await page.keyboard.press("Escape");
  await dialog.waitFor({ state: "hidden", timeout: 10000 });
  await textarea.fill(valid);
  await (await handle("toggle")).click();
  await page.waitForTimeout(300);
  const fixedState = await canvasState(page, id);
  check(!fixedState.error && !(await textarea.isVisible()), "valid JSON again: no error, JSON hidden");
  const fixed = await queueAndWait(page);
  check(fixed.status === "success", `the prompt after restoring the JSON ran (${fixed.status})`);
  return { refused: accepted === false, fixed_prompt_id: fixed.id, dialog_text: dialogText };
}

async function main() {
  await prepareSettings();
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: CHROMIUM_ARGS });
  const errors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on("pageerror", (e) => errors.push(String(e.stack || e)));
    page.on("console", (m) => m.type() === "error" && log("console error:", m.text()));
    await page.goto(url);
    await waitForApp(page);
    log("front end ready");
    const ids = await buildGraph(page);
    const rect = await canvasRect(page, ids.boxes);
    log("canvas rect", JSON.stringify(rect));
    const otherBefore = await boxesJson(page, ids.other);
    const gestures = await drawEverything(page, ids, rect);
    const sent = await boxesJson(page, ids.boxes);
    check(await trackedJson(page, ids.boxes) === sent,
      "the host's change tracker saw the keyboard Ctrl+Z (autosave and workflow undo)");
    check(await boxesJson(page, ids.other) === otherBefore, "the second Boxes node is untouched");
    log("boxes_json", sent);
    const run = await queueAndWait(page);
    check(run.status === "success", `the prompt ran (${run.status})`);
    log("prompt finished", run.id);
    const thumbnail = await checkThumbnail(page, ids.boxes);
    log("thumbnail", JSON.stringify(thumbnail));
    // Select box 1 for the picture (handles and label field); a click changes nothing.
    await page.mouse.click(rect.left + 0.75 * rect.width, rect.top + 0.6 * rect.height);
    check(await boxesJson(page, ids.boxes) === sent, "selecting a box does not edit it");
    await page.waitForTimeout(300);
    await nodeScreenshot(page, ids.boxes, join(outDir, "box_canvas.png"));
    await page.screenshot({ path: join(outDir, "after_run.png") });
    // Give the front end a moment to persist the workflow, then reload.
    await page.waitForTimeout(1500);
    await page.reload();
    await waitForApp(page);
    const restored = await page.evaluate(() => {
      const app = window.comfyAPI.app.app;
      return app.graph.nodes.filter((n) => n.type === "LocRefBoxes").map((n) => ({
        id: n.id,
        json: n.widgets.find((w) => w.name === "boxes_json").value,
        canvasBoxes: n.locrefBoxCanvas?.layout.boxes.length ?? -1,
        jsonHidden: !!n.widgets.find((w) => w.name === "boxes_json").hidden,
      }));
    });
    log("restored", JSON.stringify(restored));
    const mine = restored.find((n) => n.id === ids.boxes);
    check(mine && mine.json === sent, "boxes_json restored exactly after reload");
    check(mine.canvasBoxes === 2, "the canvas shows the restored boxes");
    check(mine.jsonHidden, "boxes_json stays hidden after reload");
    await page.screenshot({ path: join(outDir, "reloaded.png") });
    const width = await checkWidthChange(page, ids.boxes);
    log("width change", JSON.stringify(width));
    const invalid = await checkInvalidJson(page, ids.boxes, sent);
    log("invalid JSON", JSON.stringify(invalid));
    const warning = await checkWarningOnNode(page, ids, tinyName, queueAndWait);
    log("warning on the node", JSON.stringify(warning));
    await page.screenshot({ path: join(outDir, "warning.png") });
    const help = await checkHelpPage(page, ids.boxes, join(outDir, "help_page.png"));
    log("help page", help.text.slice(0, 200));
    writeFileSync(join(outDir, "result.json"), JSON.stringify({
      prompt_id: run.id, node_id: ids.boxes, rect, gestures, boxes_json: sent,
      restored: mine.json, thumbnail, width, invalid_json: INVALID_JSON, ...invalid, warning, help,
      page_errors: errors,
      // errors raised in (or through) this pack's code; the host's own are only reported
      our_errors: errors.filter((e) => e.includes("/extensions/ComfyUI-LocRef/")), seconds: (Date.now() - t0) / 1000,
    }, null, 2));
    log("done");
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  console.error(err.stack || String(err));
  process.exit(1);
});
