"""Run the box-canvas geometry tests (``tests/web/*.test.mjs``) with Node's built-in runner.

Skipped when ``node`` is not installed, except in CI (env var ``CI`` set), where a missing
``node`` is a failure: the geometry tests must run there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WEB_TESTS = REPO_ROOT / "tests" / "web"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not on PATH; CI must run the web geometry tests "
                        "(install Node 20+)")
        pytest.skip("node is not on PATH: the web geometry tests need Node.js 20+")
    return node


def test_web_geometry_with_node_test_runner() -> None:
    node = _node()
    assert sorted(WEB_TESTS.glob("*.test.mjs")), f"no web tests found in {WEB_TESTS}"
    proc = subprocess.run(  # noqa: S603 - our own test files
        [node, "--test", "tests/web/"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300, check=False)
    assert proc.returncode == 0, (
        f"node --test tests/web/ exited with {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
