"""locref_core must stay host-free: importing it never imports ComfyUI."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST_MODULES = ("comfy", "comfy_extras", "comfy_execution", "folder_paths", "server", "execution")


def test_importing_core_does_not_import_the_host():
    code = (
        "import sys, locref_core, locref_core.layout_json, locref_core.preview\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {HOST_MODULES!r}]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_importing_the_trainers_does_not_import_the_host():
    """The host is loaded only when a trainer runs (locref_core.train.host.load_host)."""
    code = (
        "import sys, locref_core.train, locref_core.train.losses, locref_core.train.common, "
        "locref_core.train.host, locref_core.train.attention_maps, locref_core.train.fgdm, "
        "locref_core.world.models, locref_core.world.base, locref_core.eval.shapes\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {HOST_MODULES!r}]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_no_core_source_file_imports_the_host():
    offenders = []
    for path in sorted((ROOT / "locref_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in HOST_MODULES]
    assert offenders == []
    assert len(list((ROOT / "locref_core").rglob("*.py"))) >= 5  # the walk saw the package


def test_no_print_in_package_code():
    for folder in ("locref_core", "nodes"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    raise AssertionError(f"{path}:{node.lineno} uses print; use logging")
