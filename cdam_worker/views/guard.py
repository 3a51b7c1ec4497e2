"""The dashboard's gate: which requests ``cdam serve`` answers at all (a pure ASGI middleware).

In order, before any request reaches the run:

1. A request target (path and query string) over ``MAX_TARGET_BYTES``: a one-line 414.
2. A ``Host`` header that is not one of the allowed names (the bound address, ``localhost``, ``127.0.0.1``,
   ``[::1]``, and the names given with ``--allow-host``; at the server's port, or at the port an allowed
   name spells out): a one-line 403. This is what stops DNS rebinding: a web page whose own host name
   resolves to 127.0.0.1 sends its own name as ``Host``.
3. An ``Origin`` header (a browser sends it with a cross-site request) that is not ``http://`` + an allowed
   Host: a one-line 403.
4. With a token: a request carrying ``?token=`` with the right token gets a cookie (HttpOnly,
   SameSite=Strict) and a redirect to the same address without the token (it stays out of the browser's
   history and of referrers); any other request needs that cookie, else a one-line 403. Tokens are compared
   in constant time and never logged or echoed.

WebSocket connections are closed (the dashboard has none); lifespan events pass through.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import unquote_plus

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
MAX_TARGET_BYTES = 8192
"""The longest path plus query string answered (a key of a few hundred characters, URL-encoded, fits many times)."""
TOKEN_PARAMETER = "token"
TOKEN_CHARACTERS = re.compile(r"^[A-Za-z0-9._~-]{16,256}$")
"""What a token may be made of: characters that need no escaping in a URL or a cookie, 16 at least."""


def host_name(address: str) -> str:
    """``address`` (a name, an IP address, either with ``:PORT``) as it appears in a Host header: IPv6
    literals in brackets, names lower-case."""
    address = address.strip().lower()
    try:
        return f"[{ipaddress.IPv6Address(address)}]"
    except ValueError:
        return address


def check_token(token: str, source: str) -> str:
    """``token`` if it is usable as one (ValueError naming ``source`` otherwise)."""
    if not TOKEN_CHARACTERS.match(token):
        raise ValueError(
            f"{source}: a token must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ - (got {len(token)} characters)"
        )
    return token


class Guard:
    """ASGI middleware in front of ``app``: answers only requests to an allowed Host (and Origin), with a
    valid token where one is set (see the module's docstring)."""

    def __init__(
        self, app: ASGIApp, bound_host: str = "127.0.0.1", allow_hosts: Sequence[str] = (), token: str | None = None
    ) -> None:
        self.app = app
        names = [*LOOPBACK_NAMES, *map(host_name, allow_hosts)]
        if bound_host not in WILDCARD_ADDRESSES:
            names.append(host_name(bound_host))
        self.names = tuple(dict.fromkeys(names))
        self.token = None if token is None else check_token(token, "token")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        port = (scope.get("server") or (None, None))[1]
        headers = _headers(scope)
        target = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b""))
        if target > MAX_TARGET_BYTES:
            await _plain(
                send, 414, f"request target of {target} bytes: the most this server reads is {MAX_TARGET_BYTES}"
            )
            return
        host = headers.get("host", "")
        if not self.allows_host(host, port):
            await _plain(
                send,
                403,
                f"this server does not answer to Host {_shown(host)} (cdam serve --allow-host NAME adds a name)",
            )
            return
        origin = headers.get("origin")
        if origin is not None and not (
            origin.startswith("http://") and self.allows_host(origin[len("http://") :], port)
        ):
            await _plain(
                send, 403, f"requests from origin {_shown(origin)} are refused (only this server's own pages may ask)"
            )
            return
        if self.token is not None and not await self._authorised(scope, headers, port, send):
            return
        await self.app(scope, receive, send)

    def allows_host(self, host: str, port: int | None) -> bool:
        """Whether a Host header value names this server: an allowed name at ``port`` (a bare name when
        ``port`` is 80), or an allowed ``NAME:PORT`` exactly."""
        host = host.strip().lower()
        if host in self.names and (":" in host.rpartition("]")[2] or port == 80):
            return True  # an allowed name that spells its own port, or a bare name on port 80
        name, colon, given_port = host.rpartition(":")
        if not colon or "]" in given_port:
            return False
        return name in self.names and given_port == str(port)

    async def _authorised(self, scope: Scope, headers: dict[str, str], port: int | None, send: Send) -> bool:
        """True if the request carries the token in its cookie; otherwise answers it (the cookie and a
        redirect for a right ``?token=``, a 403 for anything else) and returns False."""
        cookie = f"cdam-token-{port}"
        parts = [part for part in scope.get("query_string", b"").decode("latin-1").split("&") if part]
        given = [
            unquote_plus(value)
            for name, _, value in (part.partition("=") for part in parts)
            if unquote_plus(name) == TOKEN_PARAMETER
        ]
        if given:
            if not all(self._matches(value) for value in given):
                await _plain(send, 403, "wrong token: open the address cdam serve printed")
                return False
            rest = "&".join(part for part in parts if unquote_plus(part.partition("=")[0]) != TOKEN_PARAMETER)
            raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
            path = "/" + raw_path.lstrip("/")  # never '//host': no open redirect
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [
                        (b"location", (path + ("?" + rest if rest else "")).encode("latin-1")),
                        (b"set-cookie", f"{cookie}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode()),
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", b"0"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return False
        if any(self._matches(value) for value in _cookies(headers.get("cookie", ""), cookie)):
            return True
        await _plain(send, 403, "no valid token: open the address with ?token= that cdam serve printed")
        return False

    def _matches(self, value: str) -> bool:
        return hmac.compare_digest(value.encode("utf-8", "surrogateescape"), self.token.encode())


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (latin-1 text; the first of repeated ones, but a repeated
    Host or Origin counts as unknown: an empty value)."""
    found: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if name in found and name in ("host", "origin"):
            found[name] = ""
        elif name == "cookie" and name in found:
            found[name] += "; " + value
        else:
            found.setdefault(name, value)
    return found


def _cookies(header: str, name: str) -> list[str]:
    """The values of cookie ``name`` in a Cookie header."""
    pairs = (part.strip().partition("=") for part in header.split(";"))
    return [value.strip() for key, _, value in pairs if key.strip() == name]


def _shown(text: str) -> str:
    return repr(text if len(text) <= 100 else text[:100] + "…")


async def _plain(send: Send, status: int, message: str) -> None:
    body = f"{status}: {message}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
