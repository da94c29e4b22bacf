"""Checks made when a prompt is queued (the host's VALIDATE_INPUTS), before anything loads.

The host calls a node's `VALIDATE_INPUTS` with the inputs it names: widget values as queued, and
None for an input fed by a link (its value exists only at run time, where the node checks it
again). Returning True accepts; returning a string refuses the prompt (HTTP 400 at
`POST /prompt`) with that message. Naming an input there turns off the host's own min/max and
list checks for it, so `in_range` and `in_list` redo them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from ..locref_core.fgdm.palettes import Palette, get_palette

PALETTE_NAMES = ("coco183", "ade150")


def refusal(check: Callable[[], object]) -> bool | str:
    """True when `check()` passes; the message of the ValueError it raises otherwise."""
    try:
        check()
    except ValueError as err:
        return str(err)
    return True


def in_some_palette(check: Callable[[Palette], object]) -> bool | str:
    """True when `check(palette)` passes for some palette (the map's palette is only known at
    run time); else the first palette's message (coco183: what FG-DM generates)."""
    results = [refusal(functools.partial(check, get_palette(name))) for name in PALETTE_NAMES]
    return True if True in results else results[0]


def in_range(value: float | None, low: float, high: float, name: str) -> str | None:
    if value is not None and not low <= value <= high:
        return f"{name} is {value}; it must be in {low}..{high}"
    return None


def in_list(value: str | None, options: Sequence[str], name: str) -> str | None:
    if value is not None and value not in options:
        return f"{name} {value!r} is not one of {list(options)}"
    return None


def first(*results: bool | str | None) -> bool | str:
    """The first refusal among `results` (a str); True when there is none."""
    return next((r for r in results if isinstance(r, str)), True)
