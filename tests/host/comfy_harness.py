"""Real-host test harness: run the ComfyUI checkout with this pack installed.

Public API (import by name from tests in ``tests/host``)::

    ComfyServer, ServerError, PromptRejected, run_quick_test, prepare_base_dir,
    queue_prompt, wait_for_history, fetch_image, upload_image, get_object_info,
    history_output_images, txt2img_prompt, pack_import_failures,
    make_sd15_checkpoint, cached_checkpoint, build_tiny_sd15_model,
    apply_patched_model, record_attn2_sites, reinit_parameters,
    ensure_comfy_importable, SD15_ATTN2_BLOCKS, CHECKPOINT_NAME, PACK_DIR_NAME

``requests`` is imported lazily: the unit-test environment does not have it.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from harness_env import (  # noqa: F401 - re-exported
    PACK_DIR_NAME,
    REPO_ROOT,
    comfyui_path,
    comfyui_skip_reason,
    ensure_comfy_importable,
)
from harness_models import (  # noqa: F401 - re-exported
    SD15_ATTN2_BLOCKS,
    apply_patched_model,
    build_tiny_sd15_model,
    cached_checkpoint,
    make_sd15_checkpoint,
    record_attn2_sites,
    reinit_parameters,
)

LOG = logging.getLogger(__name__)

#: Name under which the cached checkpoint appears to ``CheckpointLoaderSimple``.
CHECKPOINT_NAME = "locref_test_sd15.safetensors"
#: Flags passed to ``main.py`` besides --listen/--port/--base-directory/--database-url.
#: --disable-api-nodes: no partner-API nodes (offline, faster start);
#: --use-pytorch-cross-attention: on CPU the host otherwise uses sub-quadratic
#: attention, which is far slower.  --disable-metadata is deliberately absent.
HOST_FLAGS: tuple[str, ...] = (
    "--cpu", "--disable-auto-launch", "--disable-api-nodes", "--use-pytorch-cross-attention",
)
_FAILURE_MARKERS = ("Cannot import", "IMPORT FAILED", "module for custom nodes",
                    "comfy_entrypoint", "PRESTARTUP FAILED")


class ServerError(RuntimeError):
    """The ComfyUI process failed to start or died."""


class PromptRejected(RuntimeError):
    """``POST /prompt`` answered HTTP 400; ``body`` is the server's JSON."""

    def __init__(self, body: Any) -> None:
        super().__init__(f"prompt rejected by the server: {body}")
        self.body = body


def _requests() -> Any:
    import requests  # noqa: PLC0415 - not installed in the unit-test environment

    return requests


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_base_dir(base: Path, checkpoint: Path | None,
                     checkpoint_name: str = CHECKPOINT_NAME) -> Path:
    """Lay out a ComfyUI base directory holding this pack (only) and the checkpoint."""
    base = Path(base)
    for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    pack_link = base / "custom_nodes" / PACK_DIR_NAME
    if not pack_link.is_symlink():
        pack_link.symlink_to(REPO_ROOT, target_is_directory=True)
    if checkpoint is not None:
        ckpt_link = base / "models" / "checkpoints" / checkpoint_name
        if not ckpt_link.is_symlink():
            ckpt_link.symlink_to(Path(checkpoint).resolve())
    return base


def host_command(base: Path, port: int | None, extra: tuple[str, ...] = ()) -> list[str]:
    """The ``main.py`` command line for a base directory (everything stays inside it)."""
    base = Path(base).resolve()
    cmd = [sys.executable, "main.py", *HOST_FLAGS, "--listen", "127.0.0.1",
           "--base-directory", str(base),
           # the default database lives in <checkout>/user/: keep it out of the checkout
           "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd + list(extra)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "DO_NOT_TRACK": "1"})
    return env


def die_with_parent() -> None:
    """preexec_fn: on Linux the child gets SIGTERM when the test process dies, also by SIGKILL
    (the OOM killer), which skips fixture teardown and would leave a server holding ~6 GB."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 with this pack as its only custom node."""

    def __init__(self, base_dir: Path | None = None, checkpoint: Path | None = None,
                 checkpoint_name: str = CHECKPOINT_NAME, extra_args: tuple[str, ...] = (),
                 startup_timeout: float = 300.0) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="locref-comfy-"))
        self.checkpoint = checkpoint
        self.checkpoint_name = checkpoint_name
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = self.base_dir / "comfyui.log"
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._final_log: str | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123``."""
        if self.port is None:
            raise ServerError("server not started")
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Everything the process wrote to stdout/stderr so far."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> ComfyServer:
        """Launch ``main.py`` and wait until the HTTP API answers; retry on port clashes."""
        self._final_log = None
        prepare_base_dir(self.base_dir, self.checkpoint, self.checkpoint_name)
        for attempt in range(3):
            self._launch(free_port())
            try:
                self._wait_ready()
                return self
            except ServerError:
                self._terminate()
                if "address already in use" not in self.log_text().lower() or attempt == 2:
                    raise
                LOG.warning("port clash, retrying with another port")
        raise AssertionError("unreachable")

    def _launch(self, port: int) -> None:
        self.port = port
        cmd = host_command(self.base_dir, port, self.extra_args)
        LOG.info("starting ComfyUI: %s", " ".join(cmd))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                cmd, cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=_child_env(), start_new_session=True,
                preexec_fn=die_with_parent)
        self._started_at = time.monotonic()

    def _wait_ready(self) -> None:
        requests = _requests()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(f"ComfyUI exited with {code} during startup; log tail:\n"
                                  + _tail(self.log_text()))
            try:
                if requests.get(f"{self.url}/system_stats", timeout=5).status_code == 200:
                    LOG.info("ComfyUI ready after %.1f s", time.monotonic() - self._started_at)
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise ServerError(f"ComfyUI not ready after {self.startup_timeout:.0f} s; log tail:\n"
                          + _tail(self.log_text()))

    def _terminate(self) -> None:
        """End the process: SIGINT (graceful), then SIGTERM, then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop(self) -> None:
        """Stop the process and keep its log readable; safe to call twice."""
        self._terminate()
        if self._final_log is None:
            self._final_log = self.log_text()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_quick_test(base_dir: Path, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run ``main.py --quick-test-for-ci`` (load every node, then exit) on ``base_dir``.

    Uses its own temp and database paths so a server running on the same base
    directory is not disturbed (the host wipes its temp dir on start).
    """
    scratch = Path(tempfile.mkdtemp(prefix="locref-quick-test-"))
    try:
        cmd = host_command(base_dir, None, ("--quick-test-for-ci",
                                            "--temp-directory", str(scratch)))
        cmd[cmd.index("--database-url") + 1] = f"sqlite:///{scratch / 'quick-test.db'}"
        return subprocess.run(  # noqa: S603
            cmd, cwd=comfyui_path(), env=_child_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout, check=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def pack_import_failures(log_text: str, pack_dir_name: str = PACK_DIR_NAME) -> list[str]:
    """Lines of a host log that report a failed import/registration of the pack."""
    return [line for line in log_text.splitlines()
            if pack_dir_name in line and any(m in line for m in _FAILURE_MARKERS)]


def get_object_info(server: ComfyServer, node_class: str | None = None) -> dict[str, Any]:
    """``GET /object_info`` (or ``/object_info/<node_class>``)."""
    suffix = f"/{node_class}" if node_class else ""
    resp = _requests().get(f"{server.url}/object_info{suffix}", timeout=60)
    resp.raise_for_status()
    return resp.json()


def queue_prompt(server: ComfyServer, prompt: dict[str, Any], client_id: str | None = None) -> str:
    """``POST /prompt``; return the prompt id, raise :class:`PromptRejected` on HTTP 400."""
    payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
    resp = _requests().post(f"{server.url}/prompt", json=payload, timeout=60)
    if resp.status_code == 400:
        try:
            body: Any = resp.json()
        except ValueError:
            body = resp.text
        raise PromptRejected(body)
    resp.raise_for_status()
    return str(resp.json()["prompt_id"])


def validation_refusal(server: ComfyServer, prompt: dict[str, Any], node: str) -> str:
    """``POST /prompt`` must answer HTTP 400 with only the pack's ``VALIDATE_INPUTS`` refusals
    (``custom_validation_failed``) for ``node``; return their details, joined by newlines."""
    try:
        queue_prompt(server, prompt)
    except PromptRejected as err:
        problems = err.body["node_errors"][node]["errors"]
    else:
        raise AssertionError(f"POST /prompt accepted the prompt; node {node} should refuse it")
    assert {p["type"] for p in problems} == {"custom_validation_failed"}, problems
    return "\n".join(p["details"] for p in problems)


def wait_for_history(server: ComfyServer, prompt_id: str, timeout: float = 300.0) -> dict[str, Any]:
    """Poll ``/history/<id>`` until the prompt completed or errored; return its entry."""
    requests = _requests()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = requests.get(f"{server.url}/history/{prompt_id}", timeout=30)
        resp.raise_for_status()
        entry = resp.json().get(prompt_id)
        status = (entry or {}).get("status") or {}
        if status.get("completed") or status.get("status_str") == "error":
            return entry
        if server.proc is None or server.proc.poll() is not None:
            raise ServerError("ComfyUI died while running the prompt; log tail:\n"
                              + _tail(server.log_text()))
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s; log tail:\n"
                       + _tail(server.log_text()))


def history_output_images(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """All ``{"filename", "subfolder", "type"}`` image records of a history entry."""
    return [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]


def fetch_image(server: ComfyServer, image_info: dict[str, Any]) -> Any:
    """Download an output image via ``GET /view``; return a loaded ``PIL.Image``."""
    from PIL import Image  # noqa: PLC0415

    params = {"filename": image_info["filename"], "subfolder": image_info.get("subfolder", ""),
              "type": image_info.get("type", "output")}
    resp = _requests().get(f"{server.url}/view", params=params, timeout=60)
    resp.raise_for_status()
    image = Image.open(io.BytesIO(resp.content))
    image.load()
    return image


def upload_image(server: ComfyServer, image: Any, name: str, overwrite: bool = True) -> str:
    """``POST /upload/image`` a ``PIL.Image`` or a file path; return the stored name."""
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    files = {"image": (name, data, "image/png")}
    form = {"overwrite": "true" if overwrite else "false", "type": "input"}
    resp = _requests().post(f"{server.url}/upload/image", files=files, data=form, timeout=60)
    resp.raise_for_status()
    body = resp.json()
    return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else str(body["name"])


def txt2img_prompt(ckpt_name: str, width: int = 256, height: int = 256, steps: int = 1,
                   seed: int = 0, prefix: str = "locref_harness") -> dict[str, Any]:
    """API-format workflow: CheckpointLoaderSimple -> CLIPTextEncode x2 ->
    EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage (node ids "1".."7")."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
