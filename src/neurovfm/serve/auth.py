"""Who may talk to the server: the token (when one is set), the Host header (loopback only) and a
custom header on state-changing requests.

A server bound beyond loopback needs a token on every API request (``Authorization: Bearer``, or
the cookie a one-time login sets), so the token never has to sit in a URL. On loopback, a page on
another site could still reach 127.0.0.1 through the user's browser: the Host check defeats DNS
rebinding, and requiring ``X-NeuroVFM`` on POST/DELETE defeats cross-site form posts (a browser
cannot add that header cross-site without a CORS preflight, which this server never grants).
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse

from neurovfm.serve.settings import ServeSettings

COOKIE = "neurovfm_token"
CSRF_HEADER = "x-neurovfm"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
OPEN_PATHS = {"/api/auth", "/api/login"}  # the page asks whether it must log in, and logs in


def token_ok(settings: ServeSettings, given: str | None) -> bool:
    return bool(settings.token) and given is not None and hmac.compare_digest(given.encode(), settings.token.encode())


def request_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.cookies.get(COOKIE)


def is_authenticated(settings: ServeSettings, request: Request) -> bool:
    return not settings.token_required or token_ok(settings, request_token(request))


def _host_name(host_header: str) -> str:
    h = host_header.strip().lower()
    if h.startswith("["):  # [::1]:8000
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def guard(settings: ServeSettings):
    """An HTTP middleware enforcing the rules in the module doc."""

    async def middleware(request: Request, call_next):
        path = request.url.path
        if settings.loopback and _host_name(request.headers.get("host", "")) not in LOOPBACK_HOSTS:
            return JSONResponse({"error": "this server answers on localhost only (Host header refused)"}, 400)
        api = path.startswith("/api/")
        if api and request.method not in ("GET", "HEAD", "OPTIONS") and CSRF_HEADER not in request.headers:
            return JSONResponse({"error": "state-changing requests need the header X-NeuroVFM: 1"}, 403)
        if api and path not in OPEN_PATHS and not is_authenticated(settings, request):
            return JSONResponse({"error": "a valid token is required (Authorization: Bearer TOKEN, or log in)"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    return middleware
