// Example workflows in the real front end, driven by tests/host/test_host_workflow_files.py.
//
//   node workflows.mjs <server url> <output folder> <workflow.json>...
//
// Opens the ComfyUI front end in Debian's chromium and, for each UI-format workflow file,
// loads it as the editor does (app.loadGraphData, missing-node and missing-model dialogs on),
// lets the page settle, fits the view and takes a screenshot (<output folder>/<name>.png), and
// asks the front end for the prompt it would queue (app.graphToPrompt()). Writes
// <output folder>/result.json: per workflow the prompt's `output`, the re-serialised
// workflow, the missing node types the loader reported, the dialogs it left open, every
// combo widget (value, whether the value is in its list), the nodes' rectangles as drawn,
// and the page errors raised while it was loaded. The pytest side compares all that with
// the files; this script only fails (non-zero exit) when the page itself could not be driven.
import { readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { chromium } from "playwright-core";

const [url, outDir, ...files] = process.argv.slice(2);
if (!url || !outDir || !files.length) {
  console.error("usage: node workflows.mjs <server url> <output folder> <workflow.json>...");
  process.exit(2);
}
const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"];
const PACK_PATH = "/extensions/ComfyUI-LocRef/";
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)} s]`, ...a);

/** Settings that keep first-run dialogs off the canvas (as draw_boxes.mjs does) and the
 * minimap off the screenshots. Returns the previous values, for restoreSettings. */
async function prepareSettings() {
  const previous = {};
  for (const [id, value] of [["Comfy.TutorialCompleted", true], ["Comfy.Minimap.Visible", false]]) {
    const old = await fetch(`${url}/settings/${id}`);
    previous[id] = old.ok ? await old.json() : null;
    const resp = await fetch(`${url}/settings/${id}`, { method: "POST", body: JSON.stringify(value) });
    if (!resp.ok) throw new Error(`POST /settings/${id}: ${resp.status}`);
  }
  return previous;
}

/** Put the minimap setting back (the server is shared with the other browser test). */
async function restoreSettings(previous) {
  const value = previous["Comfy.Minimap.Visible"] ?? true; // unset means the default, shown
  await fetch(`${url}/settings/Comfy.Minimap.Visible`, { method: "POST", body: JSON.stringify(value) });
}

async function waitForApp(page) {
  await page.waitForFunction(
    () => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.LocRefBoxes,
    null, { timeout: 90000 });
  await page.waitForTimeout(500);
  // The loader hands the missing node types it found to afterConfigureGraph: record them.
  await page.evaluate(() => {
    window.__locrefMissing = null;
    window.comfyAPI.app.app.registerExtension({
      name: "LocRef.Test.WorkflowFiles",
      afterConfigureGraph(missing) {
        window.__locrefMissing = (missing ?? []).map((m) => (typeof m === "string" ? m : m.type));
      },
    });
  });
}

/** Visible dialogs (their text), e.g. the missing-node-types or missing-models dialog. */
const openDialogs = (page) => page.evaluate(() => Array.from(document.querySelectorAll("[role=dialog]"))
  .filter((d) => d.offsetParent !== null || d.getClientRects().length > 0)
  .map((d) => d.innerText.trim().slice(0, 2000)));

async function closeDialogs(page) {
  for (let i = 0; i < 3 && (await openDialogs(page)).length; i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
}

const nextFrames = (page) => page.evaluate(
  () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));

/** Load one workflow as the editor does; return what the front end made of it. */
async function loadWorkflow(page, workflow) {
  await page.evaluate(async (data) => {
    window.__locrefMissing = null;
    await window.comfyAPI.app.app.loadGraphData(data, true, true, null,
      { showMissingNodesDialog: true, showMissingModelsDialog: true });
  }, workflow);
  // Settle: DOM widgets, extensions' deferred work and a few frames.
  await nextFrames(page);
  await page.waitForTimeout(800);
  return page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = app.graph.nodes.map((n) => ({
      id: n.id,
      type: n.type,
      title: n.title,
      // as drawn: the title bar sits above pos
      rect: [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title],
      collapsed: !!n.flags?.collapsed,
      widgets: (n.widgets ?? []).map((w) => ({
        name: w.name,
        type: w.type,
        in_workflow: w.serialize !== false, // saved in widgets_values
        in_prompt: w.serialize !== false && w.options?.serialize !== false,
        value: typeof w.value === "object" ? null : w.value,
        ...(w.type === "combo" && Array.isArray(w.options?.values)
          ? { in_list: w.options.values.includes(w.value), n_values: w.options.values.length }
          : {}),
      })),
    }));
    const registered = Object.keys(window.LiteGraph.registered_node_types);
    return { missing: window.__locrefMissing, nodes, registered };
  });
}

/** Fit every node into the viewport and draw text at any zoom (for the screenshot only; the
 * prompt does not care). */
async function fitView(page) {
  await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    app.canvas.min_font_size_for_lod = 0; // this page only, not saved
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = app.graph.nodes;
    if (!nodes.length) return;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 20;
    const y0 = Math.min(...nodes.map((n) => n.pos[1] - title)) - 20;
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 20;
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 20;
    const el = app.canvas.canvas.getBoundingClientRect();
    const scale = Math.min(1, el.width / (x1 - x0), el.height / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [-x0 + (el.width / scale - (x1 - x0)) / 2,
      -y0 + (el.height / scale - (y1 - y0)) / 2];
    app.graph.setDirtyCanvas(true, true);
  });
  await nextFrames(page);
  await page.waitForTimeout(400);
}

async function main() {
  const previousSettings = await prepareSettings();
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium", args: CHROMIUM_ARGS });
  const results = [];
  let current = null; // page errors raised while this workflow is loaded go to its record
  const startupErrors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
    page.on("pageerror", (e) => (current?.page_errors ?? startupErrors).push(String(e.stack || e)));
    page.on("console", (m) => {
      if (m.type() !== "error") return;
      const where = m.location()?.url ?? "";
      const text = `${m.text()}${where ? ` (at ${where})` : ""}`;
      (current?.console_errors ?? startupErrors).push(text);
    });
    await page.goto(url);
    await waitForApp(page);
    log("front end ready");
    for (const file of files) {
      const name = basename(file, ".json");
      const workflow = JSON.parse(readFileSync(file, "utf8"));
      current = { name, file, page_errors: [], console_errors: [] };
      results.push(current);
      const loaded = await loadWorkflow(page, workflow);
      const fileTypes = [...new Set(workflow.nodes.map((n) => n.type))];
      current.unregistered_types = fileTypes.filter((t) => !loaded.registered.includes(t));
      current.missing_node_types = loaded.missing;
      current.nodes = loaded.nodes;
      current.dialogs = await openDialogs(page);
      await closeDialogs(page);
      await fitView(page);
      current.screenshot = join(outDir, `${name}.png`);
      await page.screenshot({ path: current.screenshot });
      const prompt = await page.evaluate(() => window.comfyAPI.app.app.graphToPrompt());
      current.output = prompt.output;
      current.serialized = prompt.workflow;
      log(`${name}: ${Object.keys(prompt.output).length} nodes in the prompt, `
        + `missing types ${JSON.stringify(loaded.missing)}, dialogs ${current.dialogs.length}, `
        + `page errors ${current.page_errors.length}`);
      current = null;
    }
  } finally {
    await browser.close();
    await restoreSettings(previousSettings);
  }
  for (const r of results) {
    r.our_errors = [...r.page_errors, ...r.console_errors].filter((e) => e.includes(PACK_PATH));
  }
  writeFileSync(join(outDir, "result.json"), JSON.stringify({
    workflows: results, startup_errors: startupErrors, seconds: (Date.now() - t0) / 1000,
  }, null, 2));
  log("done");
}

main().catch((err) => {
  console.error(err.stack || String(err));
  process.exit(1);
});
