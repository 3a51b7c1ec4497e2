"""Builders for test inputs (tar shards, encoded images) and an HTTP proxy that injects S3 faults."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from cdam_worker.storage import Storage
from schemas.paths import LOCK_PATH


def make_tar(path: str | Path, members: Sequence[tuple[str | tarfile.TarInfo, bytes]]) -> Path:
    """Write a tar with the members in the given order; '.tar.gz' / '.tgz' paths are gzip-compressed.

    A member is (name, data) for a regular file, or (TarInfo, data) for anything else (links, folders,
    devices; data is then usually b"").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def make_shard(path: str | Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> Path:
    """Write a WebDataset shard: one '<key>.<ext>' member per (ext, bytes) of each (key, members) sample."""
    return make_tar(path, [(f"{key}.{ext}", data) for key, members in samples for ext, data in members.items()])


def image_bytes(image: Image.Image, format: str = "PNG", **save_options: object) -> bytes:
    """``image`` encoded in ``format`` (any format Pillow can write)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_options)
    return buffer.getvalue()


def gradient_image(width: int = 16, height: int = 12, mode: str = "RGB") -> Image.Image:
    """A deterministic colour gradient converted to ``mode``."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    rgb = np.stack([x, y, 255 - x], axis=-1).round().astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def jpeg_bytes(width: int = 16, height: int = 12, mode: str = "RGB") -> bytes:
    """A small JPEG (``mode`` may be RGB, L or CMYK)."""
    return image_bytes(gradient_image(width, height, mode), "JPEG", quality=90)


def png_bytes(width: int = 16, height: int = 12, mode: str = "RGB") -> bytes:
    """A small PNG in any mode PNG supports (RGB, RGBA, L, LA, P, 1, I;16)."""
    return image_bytes(gradient_image(width, height, mode), "PNG")


_FAULTS = {"503": ("SlowDown", "Please reduce your request rate."), "403": ("AccessDenied", "Access Denied")}


class S3Proxy:
    """An HTTP proxy in front of an S3 endpoint that injects faults and records traffic.

    The first ``failures`` requests are answered with ``fault``: "503" (S3 SlowDown), "403" (AccessDenied)
    or "drop" (the connection is closed without an answer); the rest are forwarded. ``fault`` may also be a
    sequence of those, used in turn. Further faults:

    - ``fail_every=k``: every k-th request (counting all requests) gets ``fault``: transient faults spread
      over a whole job;
    - ``fail_when(method, path)``: every request for which it returns True gets ``fault`` (``path`` is the
      request path with its query, ``/bucket/key?...``); it may look at ``forwarded`` to fail everything
      after some request went through. It can be replaced while the proxy runs;
    - ``hold_when(method, path)``: matching requests wait until :meth:`release_held`, then their
      connection is dropped (they never reach the server): a client stuck in the middle of a request;
    - ``lose_answer_when(method, path)``: matching requests are forwarded, but the connection is closed
      before the server's answer is passed on (the request took effect, the client cannot know).

    ``forwarded`` lists (method, path) of the requests that reached the server, ``faulted`` (method, path,
    fault) of those that got a fault, ``signed`` says for each
    request whether it carried an Authorization header. Use as a context manager; ``url`` is its endpoint.
    """

    def __init__(
        self,
        target: str,
        *,
        failures: int = 0,
        fault: str | Sequence[str] = "503",
        fail_every: int = 0,
        fail_when: Callable[[str, str], bool] | None = None,
        hold_when: Callable[[str, str], bool] | None = None,
        lose_answer_when: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.target = urlparse(target)
        self.failures_left = failures
        self.fault = fault
        self.fail_every = fail_every
        self.fail_when = fail_when
        self.hold_when = hold_when
        self.lose_answer_when = lose_answer_when
        self.answers_lost = 0
        self.requests = 0
        self.failed = 0
        self.held = 0
        self.bytes_served = 0
        self.signed: list[bool] = []
        self.forwarded: list[tuple[str, str]] = []
        self.faulted: list[tuple[str, str, str]] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> S3Proxy:
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release_held()
        self._server.shutdown()
        self._server.server_close()

    def release_held(self) -> None:
        """Let held requests go: their connections are closed without an answer."""
        self._released.set()

    def _take_failure(self, signed: bool, method: str, path: str) -> str | None:
        """The fault to answer this request with, or None to forward it."""
        with self._lock:
            self.requests += 1
            self.signed.append(signed)
            fail = self.failures_left > 0 or (self.fail_every > 0 and self.requests % self.fail_every == 0)
            fail = fail or (self.fail_when is not None and self.fail_when(method, path))
            self.failures_left = max(0, self.failures_left - 1)
            if not fail:
                return None
            faults = [self.fault] if isinstance(self.fault, str) else list(self.fault)
            fault = faults[self.failed % len(faults)]
            self.failed += 1
            self.faulted.append((method, path, fault))
            return fault

    def _hold(self, method: str, path: str) -> bool:
        if self.hold_when is None or self._released.is_set() or not self.hold_when(method, path):
            return False
        with self._lock:
            self.held += 1
        self._released.wait()
        return True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._hold(self.command, self.path):
                    self.close_connection = True
                    return
                fault = proxy._take_failure("Authorization" in self.headers, self.command, self.path)
                if fault is not None:
                    if fault == "drop":
                        self.close_connection = True
                        return
                    code, message = _FAULTS[fault]
                    error = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":  # a body after a HEAD answer would corrupt the kept-alive connection
                        self.wfile.write(error)
                    return
                connection = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=30)
                connection.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                response = connection.getresponse()
                payload = response.read()
                connection.close()
                with proxy._lock:
                    proxy.forwarded.append((self.command, self.path))
                    lose = proxy.lose_answer_when is not None and proxy.lose_answer_when(self.command, self.path)
                    proxy.answers_lost += lose
                if lose:
                    self.close_connection = True
                    return
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", response.getheader("Content-Length") or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    with proxy._lock:  # counted before the client can see the answer
                        proxy.bytes_served += len(payload)
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler


# --- drivers in a subprocess ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def wait_for(
    condition: Callable[[], object], what: str, process: subprocess.Popen | None = None, timeout: float = 240.0
) -> None:
    """Poll ``condition`` until it holds; fail if ``process`` exits first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the driver exited with {process.returncode} before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.05)


def start_driver(argv: list[str], logs: Path, **env: str) -> subprocess.Popen:
    """``python -m jobs ARGV`` in its own process group, stdout and stderr to files under ``logs``."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "wb") as stdout, open(logs / "stderr", "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs", *argv],
            stdout=stdout,
            stderr=stderr,
            cwd=REPO,
            env={**os.environ, **env},
            start_new_session=True,
        )


def finish(driver: subprocess.Popen, logs: Path, timeout: float = 300.0) -> tuple[int, str, str]:
    try:
        status = driver.wait(timeout)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    return status, (logs / "stdout").read_text(), (logs / "stderr").read_text()


def upload_folder(
    client, folder: str | Path, bucket: str, prefix: str
) -> str:  # boto3 client types are generated at run time
    """Copy every file below ``folder`` to ``s3://bucket/prefix/...`` (same relative paths); returns that URL."""
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


def explain_argv(shards: Sequence[str | Path], output: str | Path, model: str, *flags: str) -> list[str]:
    """``cdam explain`` of ``shards`` into ``output`` with ``model``, one actor, and the other ``flags``."""
    return [
        "explain",
        "--shards",
        *map(str, shards),
        "--output",
        str(output),
        "--model",
        model,
        *flags,
        "--actors",
        "1",
    ]


def save_tiny_vit(path: str | Path, model_kwargs: dict[str, int], class_names: Sequence[str]) -> str:
    """A randomly initialised (seed 0) ``vit_small_patch16_224`` built with ``model_kwargs``, saved as a cdam
    checkpoint at ``path``; returns the path."""
    import timm  # here, not at the top: most tests that use helpers need no model
    import torch

    from cdam_worker import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(
        path,
        timm.create_model("vit_small_patch16_224", **model_kwargs),
        "vit_small_patch16_224",
        model_kwargs,
        list(class_names),
    )
    return str(path)


def write_photo_shards(
    root: Path, n_shards: int, shard_size: int, height: int, width: int, label: bytes, seed: int, corrupt: bool = False
) -> str:
    """``n_shards`` shards ``part-NNNN.tar`` of ``shard_size`` random ``height`` x ``width`` JPEGs labelled
    ``label``; with ``corrupt``, sample ``s + 1`` of shard ``s`` is a truncated JPEG. Returns the brace spec."""
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        samples = [
            (
                f"s{s}/img{i}",
                {
                    "jpg": image_bytes(
                        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)), "JPEG"
                    ),
                    "cls": label,
                },
            )
            for i in range(shard_size)
        ]
        if corrupt:
            samples[s + 1] = (f"s{s}/broken", {"jpg": b"\xff\xd8\xff" + bytes(40)})
        make_shard(root / f"part-{s:04d}.tar", samples)
    return str(root / f"part-{{0000..{n_shards - 1:04d}}}.tar")


def two_actor_explain_argv(dataset: dict, output: str, *extra: str) -> list[str]:
    """``cdam explain`` of a dataset fixture's ``spec`` with its ``checkpoint`` into ``output``: two actors,
    batches of 4, then ``extra``."""
    return [
        "explain",
        "--shards",
        dataset["spec"],
        "--output",
        output,
        "--checkpoint",
        dataset["checkpoint"],
        "--actors",
        "2",
        "--batch-size",
        "4",
        *extra,
    ]


def output_files(url: str | Path) -> dict[str, bytes]:
    """Every object of a run's output (local or S3) but the lock, by path; the manifest without its ``timings``
    (seconds per phase of the command that completed the run: the one field that differs between runs)."""
    storage = Storage.from_url(str(url))
    files = {path: storage.get(path) for path in storage.list() if path != LOCK_PATH}
    if "manifest.json" in files:
        manifest = json.loads(files["manifest.json"])
        manifest.pop("timings", None)
        files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files
