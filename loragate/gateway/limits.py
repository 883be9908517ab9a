"""Request-shape limits, enforced before any real work: body size (413), JSON nesting depth and
array length (400), and strings that cannot be encoded (lone UTF-16 surrogates, 400).

The body limit is an ASGI middleware so it holds for every route, including ones added later:
a declared Content-Length above the limit is refused before a byte of the body is read, and a
chunked body is counted as it arrives and refused the moment it passes the limit. The JSON checks
run inside `parse_body`, between reading the bytes and building the pydantic model.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loragate.engine.json_limits import largest_array, nesting_depth
from loragate.gateway.errors import APIError, bad_request

_SURROGATE = re.compile("[\ud800-\udfff]")


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the {limit} bytes this server accepts",
                    "invalid_request_error", None, "request_too_large")


ErrorRenderer = Callable[[Scope, APIError], Response]


def openai_error(_: Scope, err: APIError) -> Response:
    return err.response()


class BodyLimitMiddleware:
    """413 for bodies over `limit` bytes, in the OpenAI error shape unless `render` picks another
    for the request's path (LoRAX's routes answer in LoRAX's)."""

    def __init__(self, app: ASGIApp, limit: int, render: ErrorRenderer = openai_error) -> None:
        self.app = app
        self.limit = limit
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            err = too_large(self.limit) if declared.isdigit() else bad_request("invalid Content-Length header")
            await self.render(scope, err)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large(self.limit)  # rendered by the app's APIError handler
            return message

        await self.app(scope, counted, send)


def _lone_surrogate_at(value: Any) -> str | None:
    """JSON path of the first string (or key) holding a lone UTF-16 surrogate, else None.

    JSON allows `"\\ud800"`, and Python decodes it to a str that cannot be encoded as UTF-8: it
    would fail later, in the tokenizer or while rendering a response, as a 500."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                return path or "body"
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v) if isinstance(x, (str, list, dict)))
        elif isinstance(v, dict):
            for k, x in v.items():
                key_path = f"{path}.{k}" if path else str(k)
                if not k.isascii() and _SURROGATE.search(k):
                    return path or "body"
                if isinstance(x, (str, list, dict)):
                    stack.append((key_path, x))
    return None


def json_items_limit(engine) -> int:
    """The longest array a valid request can need: token ids up to the context length, a logit_bias
    entry per vocabulary token; never below 4096."""
    vocab = getattr(getattr(engine, "tokenizer", None), "vocab_size", 0) or 0
    return max(4096, int(getattr(engine, "max_model_len", 0) or 0), int(vocab))


def load_json_body(raw: bytes, max_depth: int, max_items: int) -> dict:
    """Bytes -> a JSON object, or a 400 naming what is wrong. Depth is checked on the raw text
    (the decoder would otherwise recurse once per level), the rest right after decoding."""
    if not raw:
        raise bad_request("request body is required")
    if nesting_depth(raw) > max_depth:
        raise bad_request(f"request body is nested deeper than {max_depth} levels", None, "json_too_deep")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    if largest_array(data) > max_items:
        raise bad_request(f"request body has an array or object with more than {max_items} items", None,
                          "json_too_large")
    where = _lone_surrogate_at(data)
    if where is not None:
        where = where if len(where) <= 200 else where[:200] + "..."
        raise bad_request(f"{where}: string holds an unpaired UTF-16 surrogate, which is not valid Unicode",
                          None if where == "body" else where, "invalid_unicode")
    return data
