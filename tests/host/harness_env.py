"""Locating the ComfyUI checkout and making its ``comfy`` package importable on CPU.

Nothing here imports torch or ComfyUI at module import time, so the unit-test
environment (which has neither ``requests`` nor a ComfyUI checkout) can collect
the host tests and skip them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

LOG = logging.getLogger(__name__)

#: Environment variable naming the ComfyUI checkout used by the real-host tests.
COMFYUI_PATH_ENV = "COMFYUI_PATH"
#: Environment variable overriding the cache directory for generated test models.
CACHE_ENV = "LOCREF_TEST_CACHE"
#: Directory name the pack gets inside ``custom_nodes/`` of the test host.
PACK_DIR_NAME = "ComfyUI-LocRef"
#: Repository root == custom node package root.
REPO_ROOT = Path(__file__).resolve().parents[2]

SKIP_REASON_UNSET = (
    "COMFYUI_PATH is not set: real-host tests need a ComfyUI checkout (see README)"
)


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def comfyui_skip_reason() -> str | None:
    """Return why host tests cannot run here, or ``None`` when they can."""
    raw = os.environ.get(COMFYUI_PATH_ENV, "").strip()
    if not raw:
        return SKIP_REASON_UNSET
    root = Path(raw).expanduser()
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        return (
            f"COMFYUI_PATH={raw!r} is not a ComfyUI checkout "
            "(expected main.py and comfy/ inside it)"
        )
    return None


def comfyui_path() -> Path:
    """Return the validated ComfyUI checkout path; raise if it is unusable."""
    reason = comfyui_skip_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return Path(os.environ[COMFYUI_PATH_ENV]).expanduser().resolve()


def cache_dir() -> Path:
    """Return (and create) the cache directory for generated test checkpoints."""
    raw = os.environ.get(CACHE_ENV, "").strip()
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "comfyui-locref-tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_comfy_importable() -> Path:
    """Put the checkout on ``sys.path``, force ComfyUI onto the CPU, pick SDPA attention.

    The checkout is *appended* to ``sys.path`` so that it never shadows the
    pack's own top-level names (the pack has ``nodes/``, ComfyUI has
    ``nodes.py``).  ``comfy.cli_args`` parses an empty argv unless
    ``comfy.options.enable_args_parsing()`` was called, so pytest's argv is
    never seen by it; we then set ``args.cpu`` before ``comfy.model_management``
    is imported (that import probes CUDA).  We also set
    ``args.use_pytorch_cross_attention`` (same as the server's
    ``--use-pytorch-cross-attention``): on CPU the host otherwise picks
    sub-quadratic attention, ~15x slower at 72x128 latents.  Idempotent.
    """
    root = comfyui_path()
    if str(root) not in sys.path:
        sys.path.append(str(root))
    import comfy.cli_args  # noqa: PLC0415 - deferred on purpose

    # ``comfy`` is a namespace package (no __init__.py): check a real module.
    origin = Path(comfy.cli_args.__file__).resolve().parent
    if origin != root / "comfy":
        raise RuntimeError(f"'comfy' resolved to {origin}, not to the checkout at {root}")
    if not comfy.cli_args.args.cpu and "comfy.model_management" in sys.modules:
        raise RuntimeError(
            "comfy.model_management was imported before the CPU option was set; "
            "call ensure_comfy_importable() before importing comfy modules"
        )
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    return root


def comfyui_version() -> str:
    """Return the checkout's ``comfyui_version.__version__`` without importing it."""
    text = (comfyui_path() / "comfyui_version.py").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` next to `path`, then move tmp onto path (no half-written cache files)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
