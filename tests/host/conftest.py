"""Fixtures for the real-host tests in ``tests/host`` (skipped unless COMFYUI_PATH is set).

Fixtures (all session-scoped):

* ``sd15_checkpoint`` -- path of the cached random-weight SD-1.5 checkpoint.
* ``sd15_checkpoint_name`` -- its name as ``CheckpointLoaderSimple`` sees it.
* ``comfy_server`` -- a running :class:`comfy_harness.ComfyServer` with this pack.
* ``tiny_sd15`` -- in-process ``ModelPatcher`` around a narrow SD-1.5 UNet;
  ``clone()`` it before adding patches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import comfy_harness
from harness_env import comfyui_skip_reason, ensure_comfy_importable

LOG = logging.getLogger(__name__)
HOST_DIR = Path(__file__).resolve().parent

# Only with a usable checkout: make ``import comfy...`` work (checkout appended to
# sys.path, CPU forced) before test modules of this folder are imported.
if comfyui_skip_reason() is None:
    ensure_comfy_importable()


def _in_host_dir(item: pytest.Item) -> bool:
    return HOST_DIR in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark items in this folder ``host`` (and ``server`` if they start the server); skip
    them all when there is no usable ComfyUI checkout.  Items elsewhere are untouched."""
    reason = comfyui_skip_reason()
    for item in items:
        if not _in_host_dir(item):
            continue
        item.add_marker(pytest.mark.host)
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def sd15_checkpoint() -> Path:
    """The cached random-weight SD-1.5 checkpoint (generated on first use, ~25 s)."""
    return comfy_harness.cached_checkpoint()


@pytest.fixture(scope="session")
def sd15_checkpoint_name() -> str:
    """File name of the checkpoint as listed by ``CheckpointLoaderSimple``."""
    return comfy_harness.CHECKPOINT_NAME


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory,
                 sd15_checkpoint: Path) -> Iterator[comfy_harness.ComfyServer]:
    """One ComfyUI server for the whole session, stopped at the end."""
    server = comfy_harness.ComfyServer(base_dir=tmp_path_factory.mktemp("comfy_base"),
                                       checkpoint=sd15_checkpoint)
    try:
        try:
            server.start()
        except comfy_harness.ServerError as exc:
            pytest.fail(f"ComfyUI did not start: {exc}", pytrace=False)
        LOG.info("ComfyUI at %s, log %s", server.url, server.log_path)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_sd15() -> Any:
    """A narrow random SD-1.5 model in a ``ModelPatcher`` (clone before patching)."""
    return comfy_harness.build_tiny_sd15_model()
