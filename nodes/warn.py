"""Warnings the user sees: each is logged and shown on the node that raised it.

The host's progress-text channel (`PromptServer.send_progress_text(text, node_id)`) makes the
front end draw a text block on that node. `warn` is the pack's one way to warn from a node;
warnings the core logs (`locref_core` uses plain `logging`) while a node function decorated by
`shows_warnings` runs are shown on that node too. A node's warnings of one prompt are shown
together; the next run of the node replaces them (with a blank when it has none: the front end
ignores empty text).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from .. import locref_core

log = logging.getLogger(__name__)
CORE_LOG = logging.getLogger(locref_core.__name__)
BLANK = " "
PREFIX = "\u26a0 "  # a warning sign in front of each warning on the node

# node id -> (prompt id, the warnings shown on it in that prompt)
_shown: dict[str, tuple[str | None, list[str]]] = {}


def executing() -> tuple[str | None, str | None]:
    """(prompt id, node id) of the node the host is running now; (None, None) outside a run."""
    from comfy_execution.utils import get_executing_context  # the host's, when used

    context = get_executing_context()
    return (None, None) if context is None else (context.prompt_id, str(context.node_id))


def warn(message: str, *args: Any, node_id: str | None = None) -> None:
    """Log a warning (%-style args) and show it on `node_id`, by default the running node."""
    text = message % args if args else message
    log.warning(text)
    show(text, node_id)


def show(text: str, node_id: str | None = None) -> None:
    """Show `text` under the node's other warnings of this prompt (logging is the caller's)."""
    prompt_id, running = executing()
    node = node_id or running
    if node is None:
        return  # called outside the host's execution (a script, a test): the log has it
    shown_in, texts = _shown.get(node, (None, []))
    texts = texts if shown_in == prompt_id else []
    if text not in texts:
        texts.append(text)
    _shown[node] = (prompt_id, texts)
    send("\n".join(PREFIX + t for t in texts), node)


def send(text: str, node_id: str) -> None:
    """The host's progress text to the node, for the client that queued the prompt."""
    from server import PromptServer  # the host's, when used

    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_progress_text(text, node_id, getattr(server, "client_id", None))


class _ShowOnNode(logging.Handler):
    """Shows the core's warnings, logged while a node function runs, on that node."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            show(record.getMessage())
        except Exception:  # noqa: BLE001 - a display problem must never fail the node
            self.handleError(record)


def shows_warnings(function: Callable) -> Callable:
    """Decorate a node's FUNCTION: its run starts with a clean slate on the node, and the
    warnings the core logs meanwhile are shown on it."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        prompt_id, node = executing()
        if node is not None and _shown.get(node, (prompt_id,))[0] != prompt_id:
            del _shown[node]  # shown by an earlier prompt: this run decides afresh
            send(BLANK, node)
        handler = _ShowOnNode()
        CORE_LOG.addHandler(handler)
        try:
            return function(*args, **kwargs)
        finally:
            CORE_LOG.removeHandler(handler)

    return run
