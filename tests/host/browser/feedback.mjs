// What the pack tells the user in the real front end, for draw_boxes.mjs: a warning drawn on
// the node that raised it (the host's progress text), and the node's help page in the docs panel.

function check(cond, message) {
  if (!cond) throw new Error(`check failed: ${message}`);
}

const TEXT_PREVIEW = "$$node-text-preview"; // the front end's widget for a node's progress text

/**
 * Point the reference's Load Image at a 1x1 picture and run: LocRef Reference must show its
 * warning on itself (a text widget holding the Python warning, visible in the page).
 */
export async function checkWarningOnNode(page, ids, tinyImage, queueAndWait) {
  await page.evaluate(([loadId, name]) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(loadId);
    node.widgets.find((w) => w.name === "image").value = name;
  }, [ids.load, tinyImage]);
  const run = await queueAndWait(page);
  check(run.status === "success", `the prompt with the 1x1 reference ran (${run.status})`);
  await page.waitForFunction(([nodeId, name]) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(nodeId);
    return String(node.widgets?.find((w) => w.name === name)?.value ?? "").includes("1x1");
  }, [ids.attach, TEXT_PREVIEW], { timeout: 30000 });
  const text = await page.evaluate(([nodeId, name]) => window.comfyAPI.app.app.graph
    .getNodeById(nodeId).widgets.find((w) => w.name === name).value, [ids.attach, TEXT_PREVIEW]);
  const shown = page.getByText("the reference is 1x1", { exact: false }).first();
  await shown.waitFor({ state: "visible", timeout: 15000 });
  return { prompt_id: run.id, node_id: ids.attach, text };
}

/** Select the Boxes node, press the selection toolbox's info button: the docs panel shows the
 * pack's web/docs/LocRefBoxes.md (its README line is in no generic description). */
export async function checkHelpPage(page, nodeId, screenshotPath) {
  const title = await page.evaluate((id) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    app.canvas.ds.offset = [60, 220]; // room above the node for the selection toolbox
    app.graph.setDirtyCanvas(true, true);
    const [x, y] = app.canvas.ds.convertOffsetToCanvas(
      [node.pos[0] + 60, node.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT / 2]);
    const r = app.canvas.canvas.getBoundingClientRect();
    return { x: r.left + x, y: r.top + y };
  }, nodeId);
  await page.waitForTimeout(300);
  await page.mouse.click(title.x, title.y);
  const info = page.locator('[data-testid="info-button"]');
  await info.waitFor({ state: "visible", timeout: 15000 });
  await info.click();
  const marker = page.getByText("The pack's README, section", { exact: false }).first();
  await marker.waitFor({ state: "visible", timeout: 15000 });
  const panel = await marker.evaluate((el) => el.closest("div")?.parentElement?.innerText ?? "");
  check(panel.includes("Inputs") && panel.includes("boxes_json"),
    `the docs panel shows the page's inputs: ${panel.slice(0, 300)}`);
  await page.screenshot({ path: screenshotPath });
  return { text: panel.slice(0, 2000) };
}
