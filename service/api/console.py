"""GET /console: the operator's console, a static page that uses only the public HTTP API.

The files ship inside the package (``service/console/``); nothing is built. Every response carries a
Content-Security-Policy that allows scripts, styles and fetches from this origin only (no inline
script, no eval, no framing), so even a rendering mistake cannot run text that users posted.
No auth here: the page holds no data; it asks for an API key and sends it with each API call.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse, Response

router = APIRouter(include_in_schema=False)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def _files() -> dict[str, bytes]:
    """The console's files by name (read once; only names with a known type are served)."""
    root = resources.files("service.console")
    return {f.name: f.read_bytes() for f in root.iterdir()
            if f.is_file() and any(f.name.endswith(ext) for ext in TYPES)}


_FILES = _files()


def _serve(name: str) -> Response:
    body = _FILES.get(name)
    if body is None:
        raise HTTPException(status_code=404, detail=f"no console file {name!r}")
    media_type = next(t for ext, t in TYPES.items() if name.endswith(ext))
    return Response(body, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/console/")
def console_slash() -> RedirectResponse:
    """``/console/`` -> ``/console`` (the page's relative links are resolved against ``/console``)."""
    return RedirectResponse("../console", status_code=308)  # relative: works under a path prefix


@router.get("/console")
def console() -> Response:
    """The console page."""
    return _serve("index.html")


@router.get("/console/static/{name}")
def console_file(name: str) -> Response:
    """One of the console's scripts, styles or icons."""
    return _serve(name)
