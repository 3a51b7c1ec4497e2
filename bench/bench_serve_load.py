"""Bench: ``cdam serve`` under a bounded load on loopback (issue 21).

Several clients (threads, each with its own kept-alive connection, as a browser tab has) walk the dashboard
of a 50,000-image synthetic run (``bench/bench_views.py``'s: real image shards, audit tables) as users do:
the overview now and then, a class page (random class and gallery page) and the 48 tiles it preloads, the
audit's 2-D plot, the next gallery page through the API and its tiles, and an image page with its tiles. The server runs
behind a token (the clients open the tokened address once and go on with the cookie), in a process of its
own; the load stops after ``--seconds`` or ``--max-requests``, whichever comes first.

Reported: requests, throughput, p50/p99 latency (all and by kind), failed requests (any status but 200,
or no answer), the server's peak RSS, and each of its tile renderer's caches (decoded images, maps,
encoded tiles) against its byte bound. It exits 1 if a request failed or a cache went past its bound.

    python -m bench.bench_serve_load --run /tmp/cdam-serve-load-run --seconds 60 --clients 8
    python -m bench.bench_serve_load --run /tmp/cdam-serve-load-run --cache-mb 64   # a tight cache: evictions

The server side is ``cdam serve``'s own (``create_app`` behind its guard, ``jobs.serve.listen``, uvicorn
with no access log), started as ``python -m bench.bench_serve_load --serve RUN``, which on Ctrl-C writes
its peak RSS and caches' state to ``--stats``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"^serving (http://\S+)")
PICTURE = re.compile(r'<(?:link rel="preload" as="image" href|img[^>]* src)="(/[^"]+)"')
"""A picture a page names: a preloaded gallery tile, or an image's source."""
TOKEN_VARIABLE = "CDAM_BENCH_SERVE_TOKEN"
"""How the server process gets its token (a command line is visible to every user of the machine)."""


def tile_caches(app: Any) -> dict[str, Any]:
    """The ``ByteLRU`` caches of an app made by ``create_app`` (security headers > guard > Starlette app)."""
    return app.app.app.state.dashboard.tiles.caches


def cache_state(app: Any) -> dict[str, dict[str, int]]:
    """Each cache's bytes now, its peak and its bound."""
    return {
        name: {"bytes": cache.nbytes, "peak_bytes": cache.peak_bytes, "max_bytes": cache.max_bytes, "items": len(cache)}
        for name, cache in tile_caches(app).items()
    }


# -- the server ----------------------------------------------------------------------------------------


def serve(run: str, token: str, cache_bytes: int, stats: Path) -> None:
    """``cdam serve RUN --token`` on 127.0.0.1 and a free port, as the command sets it up; prints its address,
    and when stopped writes its peak RSS and caches' state to ``stats``."""
    import uvicorn

    from cdam_worker.reading import open_run
    from cdam_worker.views.app import create_app
    from jobs.serve import listen

    app = create_app(open_run(run), "127.0.0.1", (), token, cache_bytes)
    listener = listen("127.0.0.1", 0)
    print(f"serving http://127.0.0.1:{listener.getsockname()[1]}", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[listener])
    finally:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        stats.write_text(json.dumps({"peak_rss_bytes": peak_rss, "caches": cache_state(app)}))


# -- the clients ----------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw: latency by kind of request, and the failures."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float, failure: str | None) -> None:
        with self.lock:
            self.seconds.setdefault(kind, []).append(seconds)
            self.count += 1
            if failure:
                self.failures.append(failure)


class Spent(Exception):
    """The load's time or request budget is spent."""


class Client:
    """One browser-tab-like client: a kept-alive connection with the dashboard's cookie."""

    def __init__(self, base: str, cookie: str, tally: Tally, budget: threading.Semaphore, deadline: float) -> None:
        address = urlparse(base)
        self.connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
        self.headers = {"Cookie": cookie}
        self.tally, self.budget, self.deadline = tally, budget, deadline

    def get(self, kind: str, path: str) -> bytes | None:
        """GET ``path``: its body, None on a failure (Spent once the time or the request budget is spent)."""
        if time.monotonic() > self.deadline or not self.budget.acquire(blocking=False):
            raise Spent
        started = time.perf_counter()
        failure, body = None, None
        try:
            self.connection.request("GET", path, headers=self.headers)
            response = self.connection.getresponse()
            body = response.read()
            if response.status != 200:
                failure = f"{path}: {response.status} {body[:200]!r}"
        except (OSError, http.client.HTTPException) as error:
            failure = f"{path}: {type(error).__name__}: {error}"
            self.connection.close()
        self.tally.add(kind, time.perf_counter() - started, failure)
        return None if failure else body

    def get_pictures(self, html: bytes | None) -> None:
        """GET the pictures a page names (preloaded tiles, image sources), as a browser does."""
        for source in PICTURE.findall(html.decode() if html else ""):
            address = urlparse(unescape(source))
            kind = f"tile {parse_qs(address.query)['size'][0]}" if address.path == "/tile" else address.path.lstrip("/")
            self.get(kind, unescape(source))

    def walk(self, rng: random.Random, n_classes: int) -> None:
        """Walk the dashboard as a browser tab does, following the pictures each page names, until the
        budget or the time is spent."""
        try:
            while True:
                if rng.random() < 0.1:
                    self.get("overview", "/")
                c, page = rng.randrange(n_classes), rng.randrange(1, 4)  # pages are numbered from 1 in the address
                self.get_pictures(
                    self.get("class page", f"/class/{c}?page={page}")
                )  # its first gallery, prototypes, medoids
                self.get("scatter api", f"/api/scatter?class={c}")
                gallery = self.get(
                    "gallery api", f"/api/gallery?class={c}&offset={48 * page}&limit=48"
                )  # the next page
                items = json.loads(gallery)["items"] if gallery else []
                for item in items:
                    self.get("tile 160", item["tile"])
                if items:
                    self.get_pictures(self.get("image page", rng.choice(items)["href"]))
        except Spent:
            pass
        finally:
            self.connection.close()


def open_with_token(base: str, token: str) -> str:
    """Open the tokened address once, as a user does; returns the cookie it sets (``name=value``)."""
    address = urlparse(base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    connection.request("GET", f"/?token={token}")
    response = connection.getresponse()
    response.read()
    connection.close()
    if response.status != 303 or not response.getheader("set-cookie"):
        raise SystemExit(f"the tokened address answered {response.status}, not a redirect with a cookie")
    return response.getheader("set-cookie").split(";")[0]


def load(
    base: str, token: str, n_classes: int, clients: int, seconds: float, max_requests: int, seed: int = 0
) -> tuple[Tally, float]:
    """Run ``clients`` walking clients against ``base`` until ``seconds`` pass or ``max_requests`` are made;
    returns the tally and the seconds it took."""
    cookie = open_with_token(base, token)
    tally, budget = Tally(), threading.Semaphore(max_requests)
    started = time.monotonic()
    threads = [
        threading.Thread(
            target=Client(base, cookie, tally, budget, started + seconds).walk,
            args=(random.Random(seed + i), n_classes),
        )
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally, time.monotonic() - started


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run", type=Path, default=Path("/tmp/cdam-serve-load-run"), help="the synthetic run (written if not there)"
    )
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long (default 60)")
    parser.add_argument("--max-requests", type=int, default=20_000, help="or after this many requests (default 20,000)")
    parser.add_argument(
        "--cache-mb", type=int, default=512, help="the tile renderer's cache bound (cdam serve's default: 512)"
    )
    parser.add_argument("--serve", metavar="RUN", help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        try:
            serve(args.serve, os.environ[TOKEN_VARIABLE], args.cache_mb << 20, args.stats)
        except KeyboardInterrupt:  # how the bench stops it
            pass
        return
    if not (args.run / "manifest.json").exists():
        from bench.bench_views import write_run

        started = time.perf_counter()
        write_run(args.run, args.images, args.classes, None)
        print(
            f"wrote the synthetic run ({args.images} images, {args.classes} classes) "
            f"in {time.perf_counter() - started:.0f} s"
        )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    token = secrets.token_urlsafe(32)
    stats = Path(tempfile.mkdtemp(prefix="cdam-serve-load-")) / "stats.json"
    command = [
        sys.executable,
        "-m",
        "bench.bench_serve_load",
        "--serve",
        str(args.run),
        "--stats",
        str(stats),
        "--cache-mb",
        str(args.cache_mb),
    ]
    server = subprocess.Popen(
        command, cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, TOKEN_VARIABLE: token}
    )
    try:
        for line in server.stderr:
            if match := LISTENING.match(line):
                base = match.group(1)
                break
        else:
            raise SystemExit("the server exited before it listened")
        threading.Thread(target=server.stderr.read, daemon=True).start()  # its notes, not kept
        time.sleep(2)  # the background index of the shards (0.5 s on this run) is not what is measured
        tally, took = load(base, token, args.classes, args.clients, args.seconds, args.max_requests)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    state = json.loads(stats.read_text())
    every = [s for values in tally.seconds.values() for s in values]
    p50, p99 = percentiles(every)
    print(
        f"{tally.count} requests by {args.clients} clients in {took:.1f} s: {tally.count / took:.0f} requests/s; "
        f"p50 {1000 * p50:.1f} ms, "
        f"p99 {1000 * p99:.1f} ms; {len(tally.failures)} failed"
    )
    for kind, values in sorted(tally.seconds.items()):
        p50, p99 = percentiles(values)
        print(f"  {kind:12s} {len(values):6d} requests  p50 {1000 * p50:7.1f} ms  p99 {1000 * p99:7.1f} ms")
    print(f"server peak RSS: {state['peak_rss_bytes'] / 2**20:.0f} MiB")
    over = []
    for name, cache in state["caches"].items():
        print(
            f"  cache {name:7s} peak {cache['peak_bytes'] / 2**20:6.1f} MiB "
            f"of {cache['max_bytes'] / 2**20:6.1f} MiB bound, "
            f"at the end {cache['bytes'] / 2**20:6.1f} MiB in {cache['items']} items"
        )
        if cache["peak_bytes"] > cache["max_bytes"]:
            over.append(name)
    for failure in tally.failures[:10]:
        print(f"  failed: {failure}")
    if tally.failures or over:
        raise SystemExit(f"{len(tally.failures)} request(s) failed; caches over their bound: {over or 'none'}")


if __name__ == "__main__":
    main()
