"""Who ``cdam serve`` answers (issue 21): its guard alone (pure ASGI, every rule), then the real dashboard on
loopback over a run whose keys, class names and sample json are HTML and script payloads: foreign Host
and Origin, DNS rebinding in Chromium, the token's cookie, methods other than GET, oversized and traversal
addresses; the ``cdam serve`` command's flags and logs; and a small bounded load (no failure, the tile
cache within its bound)."""

from __future__ import annotations

import asyncio
import http.client
import re
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest
from views_fixtures import HOSTILE_CLASS_NAMES, serving, serving_app, write_hostile_run

from cdam_worker.views.guard import MAX_TARGET_BYTES, Guard

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
TOKEN = "a-test-token-0123456789_abcdefXYZ"
PORT = 8050


# -- the guard alone ----------------------------------------------------------------------------------


def through_guard(
    path: str = "/",
    query: str = "",
    headers: list[tuple[str, str]] | None = None,
    *,
    token: str | None = None,
    bound: str = "127.0.0.1",
    allow: tuple[str, ...] = ("dash.example.org", "localhost:9000"),
    port: int = PORT,
    scope_type: str = "http",
) -> tuple[int, dict[str, str], bytes, bool]:
    """One GET through a Guard (these settings) in front of an app that answers 200 'run'; returns the
    status (a WebSocket's close code), the response headers, the body and whether the app was reached."""
    reached, sent = [], []

    async def app(scope: dict, receive, send) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"run"})

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    headers = [("host", f"localhost:{port}")] if headers is None else headers
    scope = {
        "type": scope_type,
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(name.encode(), value.encode()) for name, value in headers],
        "server": ("127.0.0.1", port),
    }
    asyncio.run(Guard(app, bound, allow, token)(scope, receive, send))
    if scope_type == "websocket":
        return sent[0]["code"], {}, b"", bool(reached)
    start = sent[0]
    body = b"".join(message.get("body", b"") for message in sent[1:])
    return start["status"], {name.decode(): value.decode() for name, value in start["headers"]}, body, bool(reached)


@pytest.mark.parametrize(
    "host",
    [
        "localhost:8050",
        "LOCALHOST:8050",
        "127.0.0.1:8050",
        "[::1]:8050",
        "dash.example.org:8050",
        "Dash.Example.Org:8050",
        "localhost:9000",
    ],
)
def test_guard_answers_loopback_and_allowed_names_at_the_port(host: str) -> None:
    assert through_guard(headers=[("host", host)])[::3] == (200, True)


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example:8050",
        "localhost:8051",
        "localhost",
        "dash.example.org:9000",
        "localhost:8050.attacker.example",
        "127.0.0.1.attacker.example:8050",
        "localhost:8050@attacker.example",
        "[::1]",
        "10.0.0.5:8050",
        "0.0.0.0:8050",
        "",
    ],
)
def test_guard_refuses_any_other_host_with_one_line(host: str) -> None:
    status, headers, body, reached = through_guard(headers=[("host", host)] if host else [])
    assert (status, reached) == (403, False)
    assert (
        body.decode().startswith("403: this server does not answer to Host")
        and body.count(b"\n") == 1
        and b"run" not in body.split(b"(")[0]
    )
    assert headers["content-type"].startswith("text/plain")


def test_guard_refuses_two_host_headers_and_answers_a_bare_name_on_port_80() -> None:
    assert through_guard(headers=[("host", "localhost:8050"), ("host", "attacker.example:8050")])[0] == 403
    assert through_guard(headers=[("host", "localhost")], port=80)[0] == 200


def test_guard_names_the_bound_address_but_not_a_wildcard() -> None:
    assert through_guard(headers=[("host", "10.0.0.5:8050")], bound="10.0.0.5")[0] == 200
    assert through_guard(headers=[("host", "[fd00::5]:8050")], bound="fd00::5")[0] == 200
    for wildcard in ("0.0.0.0", "::"):
        assert through_guard(headers=[("host", "10.0.0.5:8050")], bound=wildcard, allow=())[0] == 403
        assert through_guard(headers=[("host", "localhost:8050")], bound=wildcard, allow=())[0] == 200
        assert through_guard(headers=[("host", "10.0.0.5:8050")], bound=wildcard, allow=("10.0.0.5",))[0] == 200


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("http://localhost:8050", 200),
        ("http://127.0.0.1:8050", 200),
        ("http://dash.example.org:8050", 200),
        ("http://attacker.example", 403),
        ("http://attacker.example:8050", 403),
        ("null", 403),
        ("https://localhost:8050", 403),
        ("http://localhost:8051", 403),
        ("http://localhost:8050.attacker.example", 403),
    ],
)
def test_guard_checks_the_origin_of_a_request_that_has_one(origin: str, status: int) -> None:
    got, _, body, reached = through_guard(headers=[("host", "localhost:8050"), ("origin", origin)])
    assert (got, reached) == (status, status == 200)
    if status == 403:
        assert body.decode().startswith("403: requests from origin") and body.count(b"\n") == 1


def test_guard_with_a_token_sets_a_strict_cookie_once_and_then_wants_it() -> None:
    status, headers, body, reached = through_guard("/class/3", f"token={TOKEN}&page=2", token=TOKEN)
    assert (status, reached, body) == (303, False, b"")
    assert headers["location"] == "/class/3?page=2"  # the token leaves the address
    assert headers["set-cookie"] == f"cdam-token-{PORT}={TOKEN}; HttpOnly; SameSite=Strict; Path=/"
    assert through_guard("/", f"token={TOKEN}", token=TOKEN)[1]["location"] == "/"
    assert (
        through_guard("//attacker.example/", f"token={TOKEN}", token=TOKEN)[1]["location"] == "/attacker.example/"
    )  # no open redirect
    cookie = ("cookie", f"other=1; cdam-token-{PORT}={TOKEN}")
    assert through_guard("/tile", "key=a", [("host", "localhost:8050"), cookie], token=TOKEN)[::3] == (200, True)
    for headers in (
        [("host", "localhost:8050")],
        [("host", "localhost:8050"), ("cookie", f"cdam-token-{PORT}=wrong-token-0123456789")],
        [("host", "localhost:8050"), ("cookie", f"cdam-token-9999={TOKEN}")],
        [("host", "localhost:8050"), ("cookie", f"cdam-token-{PORT}={TOKEN}x")],
    ):
        status, _, body, reached = through_guard("/", "", headers, token=TOKEN)
        assert (status, reached) == (
            403,
            False,
        ) and body == b"403: no valid token: open the address with ?token= that cdam serve printed\n"
    for query in ("token=wrong", f"token={TOKEN[:-1]}", f"token={TOKEN}&token=wrong", "token=", f"token={TOKEN}%00"):
        status, headers, body, reached = through_guard("/", query, token=TOKEN)
        assert (status, reached) == (403, False) and "set-cookie" not in headers and TOKEN.encode() not in body
    assert (
        through_guard("/", f"token={TOKEN}", [("host", "attacker.example:8050")], token=TOKEN)[0] == 403
    )  # the Host check comes first


def test_guard_refuses_long_targets_and_websockets() -> None:
    status, _, body, reached = through_guard("/image", "key=" + "a" * MAX_TARGET_BYTES)
    assert (status, reached) == (414, False) and body.startswith(b"414: request target of") and body.count(b"\n") == 1
    assert through_guard("/image", "key=" + "a" * (MAX_TARGET_BYTES - 20))[0] == 200
    assert through_guard(scope_type="websocket")[::3] == (1008, False)


@pytest.mark.parametrize("token", ["short", "has space in it 0123456789", "x" * 300, "caf\u00e9-0123456789abcdef"])
def test_guard_refuses_an_unusable_token(token: str) -> None:
    with pytest.raises(ValueError, match="a token must be 16 to 256 characters"):
        Guard(None, token=token)


# -- the dashboard on loopback ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    dest = tmp_path_factory.mktemp("hostile") / "run"
    return str(dest), write_hostile_run(dest)["keys"]


def request(
    base: str, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """``method path`` exactly as written, with these headers (Host: the server's own unless given)."""
    address = urlparse(base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    headers = {"Host": address.netloc, **(headers or {})}
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, {name.lower(): value for name, value in response.getheaders()}, body


def routes(keys: list[str]) -> list[str]:
    key = quote(keys[0])
    return [
        "/",
        "/class/0",
        "/class/1",
        f"/image?key={key}",
        "/api/gallery?class=0",
        "/api/scatter?class=0",
        f"/tile?key={key}&view=overlay&map=c0&size=160",
        "/prototype?class=0&cluster=0",
        "/contact-sheet?class=0&cluster=1",
        "/colorbar.png",
        "/static/app.js",
    ]


def test_dashboard_answers_only_its_host_origin_and_token(hostile_run: tuple[str, list[str]]) -> None:
    dest, keys = hostile_run
    with serving(dest, token=TOKEN) as url:
        port = urlparse(url).port
        status, headers, body = request(url, f"/class/0?token={TOKEN}&page=0")
        assert (status, headers["location"], body) == (303, "/class/0?page=0", b"")
        cookie = headers["set-cookie"].split(";")[0]
        assert (
            cookie == f"cdam-token-{port}={TOKEN}"
            and "HttpOnly" in headers["set-cookie"]
            and "SameSite=Strict" in headers["set-cookie"]
        )
        run_text = [HOSTILE_CLASS_NAMES[0].encode(), keys[0].encode(), b"synthetic-"]
        for path in routes(keys):
            status, headers, body = request(url, path, {"Cookie": cookie})
            assert status == 200, (path, status, body[:200])
            assert "content-security-policy" in headers and headers["x-content-type-options"] == "nosniff"
            refusals = [
                request(url, path, {"Host": f"attacker.example:{port}", "Cookie": cookie}),  # DNS rebinding
                request(url, path, {"Host": f"127.0.0.1.nip.io:{port}", "Cookie": cookie}),
                request(url, path, {"Origin": "http://attacker.example", "Cookie": cookie}),  # a foreign page's request
                request(url, path),  # no token
                request(url, path, {"Cookie": f"cdam-token-{port}=not-the-token-0123456789"}),
                request(url, path + ("&" if "?" in path else "?") + "token=not-the-token-0123456789"),
            ]
            for status, headers, body in refusals:
                assert status == 403 and body.count(b"\n") == 1 and headers["content-type"].startswith("text/plain"), (
                    path,
                    status,
                    body,
                )
                assert not any(text in body for text in run_text) and TOKEN.encode() not in body, (path, body)
                assert "set-cookie" not in headers


def test_dashboard_escapes_hostile_names_and_refuses_what_is_not_a_read(hostile_run: tuple[str, list[str]]) -> None:
    from html import escape

    dest, keys = hostile_run
    with serving(dest) as url:
        for path in routes(keys)[:4]:
            status, _, body = request(url, path)
            page = body.decode()
            assert status == 200
            for payload in (*HOSTILE_CLASS_NAMES[:3], keys[0], "</script><script>", "<img src=x", "<svg", "<b>"):
                assert payload not in page, (path, payload)  # no payload reaches the HTML as markup
        assert escape(HOSTILE_CLASS_NAMES[0]) in request(url, "/")[2].decode()
        assert escape(keys[0]) in request(url, f"/image?key={quote(keys[0])}")[2].decode()
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            status, _, body = request(url, "/", {"Content-Length": "0"}, method)
            assert status == 405 and body == b"405: Method Not Allowed\n", (method, status, body)
        status, _, body = request(url, "/", method="HEAD")
        assert status == 200 and body == b""
        status, _, body = request(url, "/image?key=" + "a" * 9000)
        assert status == 414 and body.count(b"\n") == 1 and body.startswith(b"414: request target of 9010 bytes")
        try:  # past what the HTTP parser itself reads: it answers 400, or closes the connection before the answer
            status, _, body = request(url, "/image?key=" + "a" * 100_000)
        except ConnectionResetError:
            status, body = 400, b""  # refused: the connection was closed, nothing of the run was sent
        assert status in (400, 414) and len(body) < 200, (status, body)
        for path in (
            "/static/../../../etc/passwd",
            "/static/..%2F..%2Fapp.py",
            "/static/%2e%2e/guard.py",
            "/../../etc/passwd",
            "/tile?key=..%2F..%2Fmanifest.json&view=input&map=att&size=160",
            "/image?key=..%2Fmanifest.json",
            "/contact-sheet?class=..%2F..%2Fetc",
            "/class/99",
            "/api/gallery?class=..%2F..%2Fetc",
        ):
            status, _, body = request(url, path)
            assert status == 404 and b"root:" not in body and body.count(b"\n") == 1, (path, status, body)


# -- the command -----------------------------------------------------------------------------------------


class Served:
    """``cdam serve`` in a process of its own; ``url`` is the address it printed, ``stop()`` its whole stderr."""

    def __init__(self, *argv: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jobs", "serve", *argv], stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        self.lines: list[str] = []
        while not (self.lines and self.lines[-1].startswith("cdam serve: http://")):
            line = self.process.stderr.readline()
            if not line:
                self.process.wait(60)
                raise AssertionError(f"cdam serve exited: {''.join(self.lines)}")
            self.lines.append(line)
        self.url = self.lines[-1].split()[2]

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(60) == 130
        return "".join(self.lines) + self.process.stderr.read()


def test_serve_with_a_token_prints_it_once_and_never_logs_it(hostile_run: tuple[str, list[str]]) -> None:
    dest, keys = hostile_run
    server = Served(dest, "--port", "0", "--token")
    try:
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]{43})", server.url)
        assert match, server.url
        port, token = match.groups()
        base = f"http://127.0.0.1:{port}"
        assert request(base, "/")[0] == 403
        status, headers, _ = request(base, f"/image?key={quote(keys[1])}&token={token}")
        assert status == 303 and headers["location"] == f"/image?key={quote(keys[1])}"
        cookie = headers["set-cookie"].split(";")[0]
        assert request(base, headers["location"], {"Cookie": cookie})[0] == 200
        assert request(base, f"/?token={token}x")[0] == 403
    finally:
        log = server.stop()
    assert log.count(token) == 1 and log.count("?token=") == 1, log  # the printed address only: no access log


def test_serve_off_loopback_wants_a_token_and_only_loopback_or_allowed_names(
    hostile_run: tuple[str, list[str]],
) -> None:
    dest, _ = hostile_run
    server = Served(dest, "--host", "0.0.0.0", "--port", "0")
    try:
        assert "bound to 0.0.0.0 without --allow-host: only requests addressed to localhost" in "".join(server.lines)
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", server.url)
        assert match, server.url
        port, token = match.groups()
        base = f"http://127.0.0.1:{port}"
        assert request(base, "/")[0] == 403
        status, headers, _ = request(base, f"/?token={token}")
        cookie = headers["set-cookie"].split(";")[0]
        assert status == 303 and request(base, "/", {"Cookie": cookie})[0] == 200
        assert (
            request(base, "/", {"Cookie": cookie, "Host": f"192.0.2.7:{port}"})[0] == 403
        )  # a machine address is not a known name
    finally:
        log = server.stop()
    assert "--no-auth" not in log and "anyone who can reach" not in log


def serve_refusal(dest: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """``cdam serve DEST FLAGS`` as a user runs it, for flags it must refuse before it serves anything."""
    return subprocess.run(
        [sys.executable, "-m", "jobs", "serve", dest, *flags], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_serve_token_file_no_auth_and_refusals(hostile_run: tuple[str, list[str]], tmp_path: Path) -> None:
    dest, _ = hostile_run
    (tmp_path / "bad").write_text("short\n")
    done = serve_refusal(dest, "--port", "0", "--token-file", str(tmp_path / "bad"))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        f"cdam serve: error: --token-file {tmp_path / 'bad'}: a token must be"
    )
    done = serve_refusal(dest, "--token", "--no-auth")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
    done = serve_refusal(dest, "--allow-host", "http://dash.example.org")
    assert done.returncode == 2
    assert "argument --allow-host: 'http://dash.example.org': a host name or address" in done.stderr
    (tmp_path / "token").write_text(TOKEN + "\n")
    server = Served(dest, "--port", "0", "--token-file", str(tmp_path / "token"), "--allow-host", "dash.example.org")
    try:
        assert TOKEN not in server.url and "the token is in" in server.lines[-1]
        base = server.url
        port = urlparse(base).port
        status, headers, _ = request(base, f"/?token={TOKEN}", {"Host": f"dash.example.org:{port}"})
        assert (
            status == 303
            and request(base, "/", {"Cookie": headers["set-cookie"].split(";")[0], "Host": f"dash.example.org:{port}"})[
                0
            ]
            == 200
        )
    finally:
        log = server.stop()
    assert TOKEN not in log
    server = Served(dest, "--host", "0.0.0.0", "--port", "0", "--no-auth")
    try:
        assert "?token=" not in server.url and request(server.url.replace("0.0.0.0", "127.0.0.1"), "/")[0] == 200
    finally:
        log = server.stop()
    assert "warning: serving on 0.0.0.0 with --no-auth: anyone who can reach this address can see the run" in log


# -- a bounded load -------------------------------------------------------------------------------------


def test_a_bounded_load_fails_no_request_and_keeps_the_caches_in_their_bound(tmp_path: Path) -> None:
    """bench/bench_serve_load.py's clients, small: 4 clients, 600 requests over a 600-image run of 4 classes (overview,
    class pages, galleries, tiles, image pages), with caches of 4 MiB in all, which they fill many times. A client's
    first walk reaches its image page after about 110 requests, and of 600 one client makes at least 150 however the
    threads interleave (every gallery page of 150 images per class has items), so each kind is requested."""
    from bench.bench_serve_load import cache_state, load
    from bench.bench_views import write_run
    from cdam_worker.reading import open_run
    from cdam_worker.views.app import create_app

    write_run(tmp_path / "run", 600, 4, None)
    app = create_app(open_run(str(tmp_path / "run")), "127.0.0.1", (), TOKEN, cache_bytes=4 << 20)
    with serving_app(app) as url:
        tally, _ = load(url, TOKEN, n_classes=4, clients=4, seconds=300, max_requests=600)
        caches = cache_state(app)
    assert tally.failures == [] and tally.count == 600
    assert {"class page", "gallery api", "tile 160", "image page", "tile 256"} <= set(tally.seconds)
    for name, cache in caches.items():
        assert 0 < cache["peak_bytes"] <= cache["max_bytes"], (name, cache)
    assert caches["images"]["peak_bytes"] > caches["images"]["max_bytes"] * 0.9  # filled: images were evicted


@pytest.mark.parametrize(
    ("host", "allow", "shown"),
    [
        ("127.0.0.1", [], "127.0.0.1:8050"),
        ("::1", [], "[::1]:8050"),
        ("0.0.0.0", [], "127.0.0.1:8050"),
        ("0.0.0.0", ["GPU.example.org", "other"], "gpu.example.org:8050"),
        ("0.0.0.0", ["localhost:9000"], "localhost:9000"),
        ("::", ["fd00::1"], "[fd00::1]:8050"),
        ("10.0.0.5", ["dash.example.org"], "10.0.0.5:8050"),
    ],
)
def test_serve_prints_an_address_it_answers(host: str, allow: list[str], shown: str) -> None:
    import argparse

    from jobs.serve import _shown_host

    assert _shown_host(argparse.Namespace(host=host, allow_host=allow), 8050) == shown
    assert through_guard(headers=[("host", shown)], bound=host, allow=tuple(allow), port=8050)[0] == 200  # and answered
