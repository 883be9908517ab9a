"""GET / and /playground: the playground page, and its script and style sheet.

The page is plain HTML, JS and CSS shipped inside the package (no build step, nothing fetched from
a CDN) and talks to the server only through the public API (`/v1/models`, streaming
`/v1/chat/completions`, `/v1/adapters` for admin keys), so it works through auth exactly as any
client would. The files are read once per process; `--no-playground` leaves this router out.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from loragate.gateway.errors import APIError

router = APIRouter()

ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "logo.svg": "image/svg+xml",
}
# The page's own files only; the API is same-origin. Blocks injected scripts should a model's
# answer ever reach the DOM as markup (the page only ever sets textContent).
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return resources.files("loragate.gateway").joinpath("static", name).read_bytes()


def _asset(name: str) -> Response:
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if name == "index.html":
        headers["Content-Security-Policy"] = _CSP
    return Response(_read(name), media_type=ASSETS[name], headers=headers)


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
async def page() -> Response:
    return _asset("index.html")


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    """Browsers ask for it on their own; the logo beats a 404 in every console."""
    return _asset("logo.svg")


@router.get("/playground/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS or name == "index.html":
        raise APIError(404, f"no playground file named {name!r}", "invalid_request_error", None, "not_found")
    return _asset(name)
