"""Listening to a real server's websocket while a prompt runs: what each node was sent.

The host sends progress text as a binary frame: event type 3 (4 bytes, big-endian), the node
id's length (4 bytes), the node id, the text (UTF-8); the front end draws the text on the node,
the latest replacing the earlier. ``aiohttp`` is the host's own dependency.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections import defaultdict
from typing import Any

PROGRESS_TEXT = 3
DONE = ("execution_success", "execution_error", "execution_interrupted")


def run_listening(server: Any, prompt: dict, timeout: float = 600.0
                  ) -> tuple[str, dict[str, list[str]]]:
    """Queue `prompt` as a websocket client and wait for its end; (prompt id, node id -> the
    progress texts it was sent, in order)."""
    return asyncio.run(asyncio.wait_for(_listen(server, prompt), timeout))


async def _listen(server: Any, prompt: dict) -> tuple[str, dict[str, list[str]]]:
    import aiohttp

    client_id = uuid.uuid4().hex
    texts: dict[str, list[str]] = defaultdict(list)
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
        async with session.post(f"{server.url}/prompt",
                                json={"prompt": prompt, "client_id": client_id}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise AssertionError(f"prompt refused ({resp.status}): {body}")
            prompt_id = body["prompt_id"]
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                (event,) = struct.unpack(">I", msg.data[:4])
                if event == PROGRESS_TEXT:
                    (n,) = struct.unpack(">I", msg.data[4:8])
                    texts[msg.data[8:8 + n].decode()].append(msg.data[8 + n:].decode())
            elif msg.type == aiohttp.WSMsgType.TEXT:
                data = msg.json()
                if data["type"] in DONE and data["data"].get("prompt_id") == prompt_id:
                    return prompt_id, dict(texts)
            else:
                break
    raise AssertionError(f"the websocket closed before prompt {prompt_id} ended")
