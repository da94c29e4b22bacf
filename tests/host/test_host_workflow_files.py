"""The example workflows as the real front end reads them.

For every UI-format workflow in ``workflows/*.json``, ``browser/workflows.mjs`` loads it into
ComfyUI's own front end (Debian's chromium through npm's ``playwright-core``, the same set-up
as ``test_host_browser.py``) with ``app.loadGraphData``, lets the page settle, takes a
screenshot and asks the front end for the prompt it would queue (``app.graphToPrompt()``).
That prompt must equal ``workflows/api/<name>.api.json``: the same node ids, class types and
inputs (links as ``[node id, output slot]``, widget values equal; ``_meta`` ignored), except
that an input the front end sends and the file lacks is accepted when it is an optional input
whose value is the default ``/object_info`` declares for it: a widget added to a node after the
file was written (the server runs an API prompt without it exactly as with the default). Loading
must report no missing node types and leave no dialog open, the pack's front-end code must
raise no errors, the front end must save back the ``widgets_values`` the file has, and no two
nodes may overlap as drawn (after the front end grew them to their minimum size).

Combo values that are not in the server's lists (the models named in the files are not in
the test server's folders, ``example.png`` is not in its input folder) are kept by the loader
and sent as they are; the test compares them with the file like any other value and logs
which ones were not in the list.

Skipped, with the reason, when chromium, node or playwright-core is missing.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import comfy_harness
from test_host_browser import BROWSER_DIR, _browser_skip_reason

LOG = logging.getLogger(__name__)
WORKFLOW_DIR = comfy_harness.REPO_ROOT / "workflows"
API_DIR = WORKFLOW_DIR / "api"
UI_FILES = sorted(WORKFLOW_DIR.glob("*.json"))
#: Drawn rectangles may share this much (canvas units) in either direction: borders touching.
OVERLAP_TOLERANCE = 2.0


def _same(a: Any, b: Any) -> bool:
    """JSON equality, numbers by value (1 == 1.0) but never a bool for a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _norm_input(value: Any) -> Any:
    """A link ``[id, slot]`` with the id as a string (the API's form); anything else as is."""
    if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int)
            and not isinstance(value[1], bool)):
        return [str(value[0]), value[1]]
    return value


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _show_pair(ui: Any, api: Any) -> str:
    """``UI x vs API y``; for two long strings, the part around the first difference."""
    if isinstance(ui, str) and isinstance(api, str) and max(len(ui), len(api)) > 120:
        i = next((k for k, (a, b) in enumerate(zip(ui, api)) if a != b), min(len(ui), len(api)))
        lo = max(0, i - 40)

        def cut(s: str) -> str:
            return ("..." if lo else "") + json.dumps(s[lo:i + 40])[1:-1] + (
                "..." if i + 40 < len(s) else "")

        return (f"UI \"{cut(ui)}\" vs API \"{cut(api)}\" (first difference at character {i}, "
                f"lengths {len(ui)} and {len(api)})")
    return f"UI {_show(ui)} vs API {_show(api)}"


Defaults = dict[str, dict[str, Any]]


def optional_defaults(object_info: dict[str, Any]) -> Defaults:
    """Per node type, its optional inputs that declare a default, with that default."""
    found: Defaults = {}
    for kind, info in object_info.items():
        for name, spec in info.get("input", {}).get("optional", {}).items():
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                found.setdefault(kind, {})[name] = spec[1]["default"]
    return found


def is_default(defaults: Defaults, kind: str, name: str, value: Any) -> bool:
    """``value`` is what the server uses for optional input ``name`` of ``kind`` when the prompt
    leaves it out (its declared default)."""
    known = defaults.get(kind, {})
    return name in known and _same(value, known[name])


def prompt_differences(ui_output: dict[str, Any], api: dict[str, Any],
                       defaults: Defaults | None = None) -> list[str]:
    """Every difference between the front end's prompt and the API file, one line each.

    An input in the prompt but not in the file is no difference when ``defaults`` says it is
    an optional input at its declared default."""
    defaults = defaults or {}
    diffs: list[str] = []
    for node_id in sorted(set(ui_output) | set(api), key=lambda k: (len(k), k)):
        if node_id not in ui_output:
            diffs.append(f"node {node_id} ({api[node_id]['class_type']}): in the API file only")
            continue
        if node_id not in api:
            diffs.append(f"node {node_id} ({ui_output[node_id]['class_type']}): "
                         "in the UI prompt only")
            continue
        got, want = ui_output[node_id], api[node_id]
        if got["class_type"] != want["class_type"]:
            diffs.append(f"node {node_id}: class_type UI {got['class_type']!r} "
                         f"vs API {want['class_type']!r}")
        kind = want["class_type"]
        g_in, w_in = got.get("inputs", {}), want.get("inputs", {})
        for name in list(w_in) + [k for k in g_in if k not in w_in]:
            if name not in g_in:
                diffs.append(f"node {node_id} ({kind}) input {name!r}: missing in the UI "
                             f"prompt, API {_show(w_in[name])}")
            elif name not in w_in:
                if is_default(defaults, kind, name, g_in[name]):
                    continue
                diffs.append(f"node {node_id} ({kind}) input {name!r}: UI {_show(g_in[name])}, "
                             "not in the API file (and not an optional input at its default)")
            elif not _same(_norm_input(g_in[name]), _norm_input(w_in[name])):
                diffs.append(f"node {node_id} ({kind}) input {name!r}: "
                             + _show_pair(g_in[name], w_in[name]))
    return diffs


def widgets_values_differences(saved: dict[str, Any], ui_file: dict[str, Any],
                               loaded: list[dict[str, Any]],
                               defaults: Defaults | None = None) -> list[str]:
    """Widget values the front end would save differently from the file, one line each.

    ``loaded`` are the nodes as the script saw them: their serialised widgets name the
    positions of ``widgets_values``. A value saved after the file's last one is no difference
    when ``defaults`` says its widget is an optional input at its declared default (a widget
    the node gained after the file was written)."""
    defaults = defaults or {}
    by_id = {n["id"]: n for n in saved["nodes"]}
    names = {n["id"]: [w["name"] for w in n["widgets"] if w["in_workflow"]] for n in loaded}
    diffs = []
    for node in ui_file["nodes"]:
        back = by_id.get(node["id"])
        if back is None:
            diffs.append(f"node {node['id']} ({node['type']}): lost on load")
            continue
        want, got = node.get("widgets_values", []), back.get("widgets_values", [])
        if _same(got, want):
            continue
        if not isinstance(want, list) or not isinstance(got, list):
            diffs.append(f"node {node['id']} ({node['type']}) widgets_values: file "
                         f"{_show(want)} saved back as {_show(got)}")
            continue
        widget_names = names.get(node["id"], [])
        for i in range(max(len(want), len(got))):
            if i < len(want) and i < len(got) and _same(got[i], want[i]):
                continue
            label = widget_names[i] if i < len(widget_names) else "?"
            if i >= len(want) and is_default(defaults, node["type"], label, got[i]):
                continue
            w = _show(want[i]) if i < len(want) else "nothing"
            g = _show(got[i]) if i < len(got) else "nothing"
            diffs.append(f"node {node['id']} ({node['type']}) widgets_values[{i}] ({label}): "
                         f"file {w}, saved back as {g}")
    return diffs


def overlaps(nodes: list[dict[str, Any]]) -> list[str]:
    """Pairs of nodes whose drawn rectangles (title bar included) intersect."""
    found = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ax, ay, aw, ah = a["rect"]
            bx, by, bw, bh = b["rect"]
            w = min(ax + aw, bx + bw) - max(ax, bx)
            h = min(ay + ah, by + bh) - max(ay, by)
            if w > OVERLAP_TOLERANCE and h > OVERLAP_TOLERANCE:
                found.append(f"node {a['id']} ({a['type']}) at {a['rect']} and node {b['id']} "
                             f"({b['type']}) at {b['rect']} overlap by {w:.0f} x {h:.0f}")
    return found


def _strip_meta(api: dict[str, Any]) -> dict[str, Any]:
    return {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in api.items()}


@pytest.fixture(scope="module")
def front_end_result(request: pytest.FixtureRequest,
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the browser script once over all UI workflows; its result.json, by name."""
    reason = _browser_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    # Only now: no server start when the browser is missing.
    comfy_server: comfy_harness.ComfyServer = request.getfixturevalue("comfy_server")
    out = tmp_path_factory.mktemp("workflow_files")
    start = time.monotonic()
    proc = subprocess.run(  # noqa: S603 - our own script
        ["node", "workflows.mjs", comfy_server.url, str(out), *map(str, UI_FILES)],
        cwd=BROWSER_DIR, capture_output=True, text=True, timeout=300, check=False)
    LOG.info("browser script: %.1f s, screenshots in %s\n%s", time.monotonic() - start, out,
             proc.stdout)
    assert proc.returncode == 0, (
        f"workflows.mjs exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
        f"--- stderr ---\n{proc.stderr}\n--- server log tail ---\n"
        + "\n".join(comfy_server.log_text().splitlines()[-40:]))
    result = json.loads((out / "result.json").read_text())
    startup = [e for e in result["startup_errors"] if "/extensions/ComfyUI-LocRef/" in e]
    assert not startup, f"errors in the pack's front-end code at start-up: {startup}"
    return {w["name"]: w for w in result["workflows"]}


@pytest.fixture(scope="module")
def declared_defaults(front_end_result: dict[str, Any],
                      request: pytest.FixtureRequest) -> Defaults:
    """Optional inputs' defaults from the server's /object_info (after the browser ran)."""
    server: comfy_harness.ComfyServer = request.getfixturevalue("comfy_server")
    return optional_defaults(comfy_harness.get_object_info(server))


def test_every_ui_workflow_has_an_api_twin() -> None:
    assert UI_FILES, f"no workflows in {WORKFLOW_DIR}"
    ui = {p.stem for p in UI_FILES}
    api = {p.name.removesuffix(".api.json") for p in API_DIR.glob("*.api.json")}
    assert ui == api, f"UI only: {sorted(ui - api)}, API only: {sorted(api - ui)}"


def test_an_input_missing_from_the_file_passes_only_at_its_optional_default() -> None:
    info = {"N": {"input": {"required": {"a": ["FLOAT", {"default": 1.0}]},
                            "optional": {"b": ["FLOAT", {"default": 0.8}], "c": ["MODEL", {}]}}}}
    defaults = optional_defaults(info)
    assert defaults == {"N": {"b": 0.8}}
    api = {"1": {"class_type": "N", "inputs": {"a": 1.0}}}

    def ui(**inputs: Any) -> dict[str, Any]:
        return {"1": {"class_type": "N", "inputs": {"a": 1.0, **inputs}}}

    assert prompt_differences(ui(b=0.8), api, defaults) == []
    assert prompt_differences(ui(b=0.5), api, defaults), "another value than the default"
    assert prompt_differences(ui(b=0.8), api), "no defaults given"
    assert prompt_differences(ui(c=["2", 0]), api, defaults), "a link has no default"
    assert prompt_differences(ui(z=0.8), api, defaults), "an input the node does not declare"
    assert prompt_differences({"1": {"class_type": "N", "inputs": {}}}, api, defaults), (
        "a required input missing from the front end's prompt")
    assert prompt_differences(ui(), {"1": {"class_type": "N", "inputs": {"a": 1.0, "b": 0.8}}},
                              defaults), "an input in the API file only"

    loaded = [{"id": 1, "widgets": [{"name": "a", "in_workflow": True},
                                    {"name": "b", "in_workflow": True}]}]
    file = {"nodes": [{"id": 1, "type": "N", "widgets_values": [1.0]}]}

    def saved(*values: Any) -> dict[str, Any]:
        return {"nodes": [{"id": 1, "widgets_values": list(values)}]}

    assert widgets_values_differences(saved(1.0, 0.8), file, loaded, defaults) == []
    assert widgets_values_differences(saved(1.0, 0.5), file, loaded, defaults)
    assert widgets_values_differences(saved(1.0, 0.8), file, loaded)
    assert widgets_values_differences(saved(2.0, 0.8), file, loaded, defaults)


@pytest.mark.server  # starts the server through front_end_result (when the browser is there)
@pytest.mark.parametrize("ui_file", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_front_end_prompt_equals_api_file(front_end_result: dict[str, Any],
                                          declared_defaults: Defaults, ui_file: Path) -> None:
    name = ui_file.stem
    got = front_end_result[name]
    ui = json.loads(ui_file.read_text())
    api = _strip_meta(json.loads((API_DIR / f"{name}.api.json").read_text()))

    assert not got["unregistered_types"], (
        f"node types unknown to the server's front end: {got['unregistered_types']}")
    assert not got["missing_node_types"], (
        f"the loader reported missing node types: {got['missing_node_types']}")
    assert not got["dialogs"], f"loading {name} left dialogs open: {got['dialogs']}"
    assert not got["our_errors"], f"errors in the pack's front-end code: {got['our_errors']}"
    if got["page_errors"]:  # the host front end's own: only logged
        LOG.warning("%s: page errors outside the pack: %s", name, got["page_errors"])

    off_list = [f"node {n['id']} ({n['type']}) {w['name']}={w['value']!r}"
                for n in got["nodes"] for w in n["widgets"] if w.get("in_list") is False]
    if off_list:  # kept by the loader and sent as they are (checked with the prompt below)
        LOG.info("%s: combo values not in the server's lists: %s", name, off_list)

    extra = [f"node {k} ({v['class_type']}) {key}={v['inputs'][key]!r}"
             for k, v in got["output"].items() if k in api
             for key in v.get("inputs", {}) if key not in api[k]["inputs"]]
    if extra:  # accepted below only at their declared defaults
        LOG.info("%s: inputs not in the API file (each must be at its default): %s", name, extra)
    diffs = prompt_differences(_strip_meta(got["output"]), api, declared_defaults)
    assert not diffs, (f"{name}: app.graphToPrompt() of {ui_file.name} differs from "
                       f"api/{name}.api.json:\n  " + "\n  ".join(diffs)
                       + ("\n(combo values not in the server's lists: " + "; ".join(off_list)
                          + ")" if off_list else ""))

    saved = widgets_values_differences(got["serialized"], ui, got["nodes"], declared_defaults)
    assert not saved, (f"{name}: the front end saves other widgets_values than the file "
                       "has:\n  " + "\n  ".join(saved))

    bad = overlaps(got["nodes"])
    assert not bad, f"{name}: nodes overlap as drawn:\n  " + "\n  ".join(bad)

    shot = Path(got["screenshot"])
    assert shot.is_file() and shot.stat().st_size > 1000, shot
