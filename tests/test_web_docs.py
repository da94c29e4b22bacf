"""Every node of the pack has a help page for the front end's node docs panel.

The front end fetches `/extensions/<pack>/docs/<NodeId>.md` (or `docs/<NodeId>/<locale>.md`)
from the pack's WEB_DIRECTORY, `web/`. Node ids are read from the `NODE_CLASS_MAPPINGS` dict
literals of `nodes/*.py` (no host needed); tests/host checks each page names every input.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "web" / "docs"
SECTIONS = ("## Inputs", "## Outputs", "## Example", "## More")


def node_ids() -> list[str]:
    ids = []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                    and any(getattr(t, "id", None) == "NODE_CLASS_MAPPINGS" for t in node.targets)):
                ids += [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
    return ids


def test_the_walk_finds_every_node_module():
    ids = node_ids()
    assert len(ids) == len(set(ids)) >= 13
    assert {"LocRefBoxes", "LocRefApply", "FGDMSBPCSelect", "FGDMMaskEdit"} <= set(ids)


def test_every_node_has_a_help_page():
    missing = [i for i in node_ids() if not (DOCS / f"{i}.md").is_file()]
    assert missing == [], f"no web/docs/<NodeId>.md for {missing}"


def test_help_pages_have_the_sections_and_no_page_is_orphaned():
    ids = set(node_ids())
    for page in sorted(DOCS.glob("*.md")):
        assert page.stem in ids, f"{page.name} documents no node of the pack"
        text = page.read_text(encoding="utf-8")
        assert text.startswith("# ") and f"`{page.stem}`" in text, page.name
        absent = [s for s in SECTIONS if f"\n{s}\n" not in text]
        assert absent == [], f"{page.name} lacks {absent}"
