"""OpenAI-style server-sent events: `data: {json}\n\n` per chunk and a final `data: [DONE]\n\n`.

We frame the events ourselves on a StreamingResponse instead of using sse-starlette: its default
separator is CRLF and it interleaves `: ping` comments, while the OpenAI stream is plain
`data: ...\n\n` lines and nothing else, which is also what `curl -N` users grep for.

`SSEResponse` closes its body iterator when the response ends for any reason (client
disconnect included). Starlette cancels the streaming task on disconnect, which leaves an
iterator that was paused at a `yield` un-finalised until garbage collection; closing it
explicitly runs the route's `finally`, which aborts the engine requests at once.
"""
from __future__ import annotations

import json
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any]) -> bytes:
    """One `data:` event. JSON never contains a raw newline, so one line per event is safe."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    else:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + body.encode("utf-8") + b"\n\n"


class SSEResponse(StreamingResponse):
    """text/event-stream response whose iterator is always closed when the response ends."""

    def __init__(self, content, headers: dict[str, str] | None = None) -> None:
        hdrs = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        super().__init__(content, media_type="text/event-stream", headers=hdrs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
