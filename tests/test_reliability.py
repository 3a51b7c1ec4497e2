"""Faults, bad input, the output lock, credentials and ``cdam verify``, on a real local Ray cluster.

Every fault test compares its final output with an uninterrupted run of the same job (``reference``):
the same objects with the same bytes (Zarr chunks, Parquet files, markers, manifest). Outputs are
byte-deterministic because the run id derives from the settings fingerprint.

Waits poll a condition with a deadline (``wait_for``); S3 faults come from ``S3Proxy`` in front of moto.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cdam_worker.output_lock import LOCK_LEASE_SECONDS, OutputInUseError, OutputLock, OutputLockLost
from cdam_worker.pipeline.faults import EXIT_AFTER_BATCHES_ENV, FAIL_START_ENV, HOLD_ENV
from cdam_worker.storage import Storage
from conftest import TEST_ACCESS_KEY, TEST_SECRET
from helpers import (
    S3Proxy,
    finish,
    output_files,
    image_bytes,
    jpeg_bytes,
    make_shard,
    make_tar,
    png_bytes,
    save_tiny_vit,
    two_actor_explain_argv,
    start_driver,
    wait_for,
)
from jobs.cli import main
from jobs.verify import verify_output
from schemas.paths import LOCK_PATH, marker_path

MODEL_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=6)
CLASS_NAMES = ["cat", "dog", "zebra", "analog clock", "car", "tree"]
SHARD_SIZES = (18, 7, 13)  # shard 0 spans two 16-row Zarr chunks: an actor dying at its end has written one
ROWS_PER_SHARD = 32
REPO = Path(__file__).resolve().parent.parent


# --- shared set-up -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("reliability-data")
    rng = np.random.default_rng(1)
    for s, size in enumerate(SHARD_SIZES):
        samples = []
        for i in range(size):
            pixels = rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3), dtype=np.uint8)
            samples.append(
                (
                    f"s{s}/img{i:03d}",
                    {"jpg": image_bytes(Image.fromarray(pixels), "JPEG", quality=90), "cls": str(i % 6).encode()},
                )
            )
        make_shard(root / f"train-{s:04d}.tar", samples)
    return {
        "root": str(root),
        "spec": str(root / "train-{0000..0002}.tar"),
        "checkpoint": save_tiny_vit(root / "model.pt", MODEL_KWARGS, CLASS_NAMES),
    }


def explain_args(dataset: dict[str, str], output: str, *extra: str) -> list[str]:
    """``helpers.two_actor_explain_argv`` with the top-2 targets every test here explains."""
    return two_actor_explain_argv(dataset, output, "--targets", "topk:2", *extra)


@pytest.fixture(scope="module")
def reference(ray_local: str, dataset: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The uninterrupted run every fault test must reproduce byte for byte."""
    output = str(tmp_path_factory.mktemp("reference") / "out")
    assert main(explain_args(dataset, output)) == 0
    assert verify_output(output) == []
    files = output_files(output)
    assert sum(path.startswith("markers/") for path in files) == len(SHARD_SIZES)
    return {"url": output, "files": files}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("cdam explain: error:")]


def s3_writes(proxy: S3Proxy) -> list[str]:
    return [path.split("?")[0] for method, path in proxy.forwarded if method in ("PUT", "POST", "DELETE")]


def shard_objects(shard_index: int) -> re.Pattern[str]:
    """Paths of the objects a shard writes: its marker, Parquet files and Zarr chunks (its row block)."""
    chunks = "|".join(
        str(c) for c in range(shard_index * ROWS_PER_SHARD // 16, (shard_index + 1) * ROWS_PER_SHARD // 16)
    )
    return re.compile(
        rf"/(markers/{shard_index:06d}\.json|(metadata|errors)/{shard_index:06d}-[^/]*|cdam\.zarr/[^/]+/c/({chunks})/.*)$"
    )


# --- faults --------------------------------------------------------------------------------------------


def test_actor_dying_mid_shard_is_replaced_and_output_is_identical(
    ray_local, dataset, reference, tmp_path, monkeypatch, capsys
):
    """Both first actors exit after 5 batches: in shard 0 that is after its first Zarr chunk was written."""
    monkeypatch.setenv(EXIT_AFTER_BATCHES_ENV, "5")
    output = str(tmp_path / "out")
    assert main(explain_args(dataset, output)) == 0
    captured = capsys.readouterr()
    assert "actor died" in captured.err and "retrying (attempt 2 of 3)" in captured.err
    assert "3/3 shards complete (0 already done before this run)" in captured.out
    assert verify_output(output) == []
    assert output_files(output) == reference["files"]


def test_actors_that_fail_to_start_are_replaced(ray_local, dataset, reference, tmp_path, monkeypatch, capsys):
    """Both first actors fail in __init__ (as on a node lost while loading the model): their replacements do the job."""
    monkeypatch.setenv(FAIL_START_ENV, "1")
    output = str(tmp_path / "out")
    assert main(explain_args(dataset, output)) == 0
    captured = capsys.readouterr()
    assert captured.err.count("an actor could not start: ") == 2, captured.err
    assert "fault injection: an actor of generation 0 fails to start; starting a replacement" in captured.err
    assert verify_output(output) == []
    assert output_files(output) == reference["files"]


def test_job_stops_when_no_actor_can_start(ray_local, dataset, tmp_path, monkeypatch, capsys):
    """Every start fails: after the replacement budget (2 per actor) the job stops with one line saying why."""
    monkeypatch.setenv(FAIL_START_ENV, "1000")
    output = tmp_path / "out"
    assert main(explain_args(dataset, str(output))) != 0
    captured = capsys.readouterr()
    assert captured.err.count("starting a replacement") == 4, captured.err
    assert "no actor could start (6 attempts); the last error: " in captured.err
    assert "fault injection: an actor of generation" in captured.err.splitlines()[-1]
    assert not list((output / "markers").glob("*.json"))


def test_killed_driver_resumes_without_redoing_finished_shards(
    ray_local, dataset, reference, s3_bucket, s3_server, tmp_path, monkeypatch, capsys
):
    """SIGKILL the driver while shard 1's marker write hangs: shard 0 is done, 1 written but unmarked, 2 untouched."""
    output = f"s3://{s3_bucket}/killed"
    marker_1 = f"/{s3_bucket}/killed/{marker_path(1)}"
    with S3Proxy(s3_server, hold_when=lambda method, path: method == "PUT" and path.startswith(marker_1)) as stuck:
        driver = start_driver(
            explain_args(dataset, output, "--actors", "1", "--address", ray_local),
            tmp_path / "driver",
            AWS_ENDPOINT_URL=stuck.url,
        )
        wait_for(lambda: stuck.held, "held write of shard 1's marker", driver)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        storage = Storage.from_url(output)
        assert [storage.exists(marker_path(i)) for i in range(3)] == [True, False, False]
        assert len(storage.list("metadata")) == 2  # shard 1 wrote its tables; without a marker it is not done
        finished = {path: data for path, data in output_files(output).items() if shard_objects(0).search("/" + path)}
        assert len(finished) >= 3 + 5  # marker, metadata, Zarr chunks

        with S3Proxy(s3_server) as watched:  # the rerun goes through a proxy that records what it writes
            monkeypatch.setenv("AWS_ENDPOINT_URL", watched.url)
            assert main(explain_args(dataset, output)) == 0
    monkeypatch.undo()
    assert "3/3 shards complete (1 already done before this run)" in capsys.readouterr().out
    writes = s3_writes(watched)
    assert not [path for path in writes if shard_objects(0).search(path)], "a finished shard was written again"
    assert [path for path in writes if shard_objects(1).search(path)] and [
        path for path in writes if shard_objects(2).search(path)
    ]
    files = output_files(output)
    assert {path: files[path] for path in finished} == finished
    assert verify_output(output) == []
    assert files == reference["files"]


@pytest.mark.parametrize(("signum", "name"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_stopped_driver_releases_the_lock_and_a_rerun_completes(ray_local, dataset, reference, tmp_path, signum, name):
    """SIGTERM (ray job stop, a scheduler) or Ctrl-C while an actor is inside a shard: a clean stop, then resume."""
    output, hold = tmp_path / "out", tmp_path / "hold"
    hold.touch()
    driver = start_driver(
        explain_args(dataset, str(output), "--address", ray_local), tmp_path / "driver", **{HOLD_ENV: str(hold)}
    )
    wait_for(lambda: list(tmp_path.glob("hold.*")), "an actor waiting inside a shard", driver)
    assert (output / LOCK_PATH).exists()
    os.kill(driver.pid, signum)
    status, _, stderr = finish(driver, tmp_path / "driver", timeout=60)
    assert status == 128 + signum, stderr
    assert (
        f"cdam explain: stopped by {name}; shards finished so far are kept: rerun the same command to resume" in stderr
    )
    assert "Traceback" not in stderr
    assert not (output / LOCK_PATH).exists()
    hold.unlink()
    assert main(explain_args(dataset, str(output))) == 0
    assert verify_output(str(output)) == []
    assert output_files(str(output)) == reference["files"]


def test_transient_s3_faults_are_retried(ray_local, dataset, reference, s3_bucket, s3_server, monkeypatch):
    """Every 4th request (driver and actors alike) fails with 503 SlowDown or a dropped connection, and so
    does the first try of every marker and every chunk of the 'cdam' array."""
    output = f"s3://{s3_bucket}/flaky"

    def first_try(method: str, path: str) -> bool:
        return (
            method == "PUT"
            and re.search(r"/(markers/|cdam\.zarr/cdam/c/)", path) is not None
            and path not in {p for _, p, _ in flaky.faulted}
        )

    with S3Proxy(s3_server, fail_every=4, fault=("503", "drop"), fail_when=first_try) as flaky:
        monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.url)
        assert main(explain_args(dataset, output)) == 0
    monkeypatch.undo()
    faults = {fault for _, _, fault in flaky.faulted}
    faulted_writes = {path for method, path, _ in flaky.faulted if method == "PUT"}
    assert faults == {"503", "drop"} and len(flaky.faulted) >= 20
    assert sum("/markers/" in path for path in faulted_writes) == len(SHARD_SIZES)
    assert sum("/cdam.zarr/cdam/c/" in path for path in faulted_writes) == 4  # chunks 0, 1 (shard 0), 2 and 4
    assert verify_output(output) == []
    assert output_files(output) == reference["files"]


def test_persistent_s3_failure_stops_the_job_and_leaves_only_whole_shards(
    ray_local, dataset, s3_bucket, s3_server, tmp_path
):
    """Once the first marker is written, S3 refuses every request (403): the job ends with one error line."""
    output = f"s3://{s3_bucket}/broken"

    def broken(method: str, path: str) -> bool:
        return any(m == "PUT" and "/markers/" in p for m, p in proxy.forwarded)

    with S3Proxy(s3_server, fail_when=broken, fault="403") as proxy:
        driver = start_driver(
            explain_args(dataset, output, "--address", ray_local), tmp_path / "driver", AWS_ENDPOINT_URL=proxy.url
        )
        status, stdout, stderr = finish(driver, tmp_path / "driver")
    assert status != 0
    errors = error_lines(stderr)
    assert len(errors) == 1 and "AccessDenied" in errors[0] and f"s3://{s3_bucket}/broken/" in errors[0], stderr
    assert TEST_SECRET not in stdout + stderr

    storage = Storage.from_url(output)
    marked = [i for i in range(len(SHARD_SIZES)) if storage.exists(marker_path(i))]
    assert 1 <= len(marked) < len(SHARD_SIZES)
    expected = ["manifest status is 'running', not 'complete' (rerun the job to finish it)"] + [
        f"shard {i}: no completion marker" for i in range(len(SHARD_SIZES)) if i not in marked
    ]
    assert verify_output(output) == expected  # every marked shard verifies: no marker for a partly written shard


def test_lost_answer_to_the_lock_write_does_not_refuse_the_job_itself(s3_bucket, s3_server, monkeypatch):
    """The lock's conditional put went through but its answer was lost: the retry sees our own lock."""

    def first_lock_write(method: str, path: str) -> bool:
        return method == "PUT" and path.endswith("/" + LOCK_PATH) and proxy.answers_lost == 0

    with S3Proxy(s3_server, lose_answer_when=first_lock_write) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage = Storage.from_url(f"s3://{s3_bucket}/lock-retry")
        lock = OutputLock(storage, "run")
        lock.acquire()
        assert (
            proxy.answers_lost == 1 and [m for m, p in proxy.forwarded].count("PUT") == 2
        )  # the retry found the lock there
        lock.release()
        assert not storage.exists(LOCK_PATH)


# --- the output lock -------------------------------------------------------------------------------------


def refused_second_job(argv: list[str]) -> tuple[int, list[str]]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    return status, stderr.getvalue().splitlines()


def test_second_job_on_a_local_output_is_refused(ray_local, dataset, reference, tmp_path):
    output = tmp_path / "out"
    first = start_driver(explain_args(dataset, str(output), "--address", ray_local), tmp_path / "first")
    wait_for(
        lambda: (output / "manifest.json").exists() and (output / LOCK_PATH).exists(),
        "lock and manifest of the first job",
        first,
    )
    status, lines = refused_second_job(explain_args(dataset, str(output)))
    assert first.poll() is None, "the first job ended before the second started: the refusal proves nothing"
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"cdam explain: error: output {output} is in use by another cdam job (run ")
    assert f"pid {first.pid} on " in lines[0]
    status, stdout, stderr = finish(first, tmp_path / "first")
    assert status == 0, stderr
    assert not (output / LOCK_PATH).exists()
    assert verify_output(str(output)) == []
    assert output_files(str(output)) == reference["files"]


@pytest.fixture(scope="module")
def s3_job(
    ray_local: str, dataset: dict[str, str], s3_server: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    """An S3 job in a driver subprocess (output captured) and, while it runs, a second job on its output.

    The first job's first marker write is held until the second job has been refused, so the first is
    certainly running then; the held request is dropped and retried.
    """
    bucket = f"cdam-test-{uuid.uuid4().hex[:16]}"
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=TEST_SECRET,
    ).create_bucket(Bucket=bucket)
    output = f"s3://{bucket}/run"
    logs = tmp_path_factory.mktemp("s3-job")
    with S3Proxy(s3_server, hold_when=lambda method, path: method == "PUT" and "/markers/" in path) as proxy:
        first = start_driver(explain_args(dataset, output, "--address", ray_local), logs, AWS_ENDPOINT_URL=proxy.url)
        wait_for(lambda: proxy.held, "held marker write of the first job", first)
        second = refused_second_job(explain_args(dataset, output))
        proxy.release_held()
        status, stdout, stderr = finish(first, logs)
    return {
        "url": output,
        "bucket": bucket,
        "status": status,
        "stdout": stdout,
        "stderr": stderr,
        "second": second,
        "held": proxy.held,
    }


def test_second_job_on_an_s3_output_is_refused(s3_job, reference):
    status, lines = s3_job["second"]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"cdam explain: error: output {s3_job['url']} is in use by another cdam job (run ")
    assert s3_job["status"] == 0, s3_job["stderr"]
    assert not Storage.from_url(s3_job["url"]).exists(LOCK_PATH)
    assert verify_output(s3_job["url"]) == []
    assert output_files(s3_job["url"]) == reference["files"]


def test_moto_honours_conditional_puts(s3_bucket):
    """The S3 lock relies on If-None-Match: * (obstore's put mode 'create'); moto implements it."""
    storage = Storage.from_url(f"s3://{s3_bucket}/conditional")
    assert storage.put_if_absent("lock.json", b"first") is True
    assert storage.put_if_absent("lock.json", b"second") is False
    assert storage.get("lock.json") == b"first"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lock_lease_and_stale_holders(where, tmp_path, request):
    url = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/lease"
    storage = Storage.from_url(url)
    assert LOCK_LEASE_SECONDS == 120.0

    def holder(**fields: object) -> None:
        storage.put(
            LOCK_PATH,
            json.dumps(
                {
                    "run_id": "other",
                    "token": "theirs",
                    "host": "elsewhere",
                    "pid": 1,
                    "renewed_at": time.time(),
                    "lease_seconds": LOCK_LEASE_SECONDS,
                    **fields,
                }
            ).encode(),
        )

    holder()  # a live job on another host
    with pytest.raises(OutputInUseError, match="in use by another cdam job \\(run other, pid 1 on elsewhere\\)"):
        OutputLock(storage, "mine").acquire()
    holder(renewed_at=time.time() - LOCK_LEASE_SECONDS - 1)  # its lease ran out
    OutputLock(storage, "mine").acquire()
    assert json.loads(storage.get(LOCK_PATH))["run_id"] == "mine"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder(host=socket.gethostname(), pid=dead.pid)  # a driver on this host that is gone
    lock = OutputLock(storage, "mine")
    lock.acquire()
    holder(host=socket.gethostname(), pid=os.getppid())  # a live process on this host
    with pytest.raises(OutputInUseError):
        OutputLock(storage, "mine").acquire()
    lock.release()  # not ours any more: left alone
    assert json.loads(storage.get(LOCK_PATH))["token"] == "theirs"


def another_jobs_lock() -> dict[str, object]:
    """The lock of another job (run "other", token "theirs", on host "elsewhere"), renewed just now."""
    return {
        "run_id": "other",
        "token": "theirs",
        "host": "elsewhere",
        "pid": 7,
        "renewed_at": time.time(),
        "lease_seconds": LOCK_LEASE_SECONDS,
    }


@pytest.mark.parametrize("where", ["local", "s3"])
def test_renewal_notices_a_takeover_and_restores_a_deleted_lock(where, tmp_path, request):
    url = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/renew"
    storage = Storage.from_url(url)
    lock = OutputLock(storage, "mine")
    lock.acquire()
    lock.renew()
    assert json.loads(storage.get(LOCK_PATH))["token"] == lock.payload["token"]
    storage.delete(LOCK_PATH)  # removed by hand while the job runs: renewing makes it ours again
    lock.renew()
    assert json.loads(storage.get(LOCK_PATH))["token"] == lock.payload["token"]
    taken = another_jobs_lock()
    storage.put(LOCK_PATH, json.dumps(taken).encode())  # another job took over after our lease ran out
    with pytest.raises(
        OutputLockLost, match=r"another cdam job took over the output lock of .* \(run other, pid 7 on elsewhere\)"
    ):
        lock.renew()
    assert json.loads(storage.get(LOCK_PATH))["token"] == "theirs"  # not overwritten
    lock.release()
    assert json.loads(storage.get(LOCK_PATH))["token"] == "theirs"


def test_job_that_lost_its_lock_stops(ray_local, dataset, tmp_path):
    """A driver paused past its lease finds, at its next renewal, that another job took the output: it stops."""
    output, hold = tmp_path / "out", tmp_path / "hold"
    hold.touch()
    driver = start_driver(
        explain_args(dataset, str(output), "--address", ray_local), tmp_path / "driver", **{HOLD_ENV: str(hold)}
    )
    try:
        wait_for(lambda: list(tmp_path.glob("hold.*")), "an actor waiting inside a shard", driver)
        taken = another_jobs_lock()
        (output / LOCK_PATH).write_text(json.dumps(taken))
        status, _, stderr = finish(driver, tmp_path / "driver", timeout=90)  # the next renewal comes within 20 s
    finally:
        hold.unlink()
    assert status == 2, stderr
    assert "cdam explain: error: another cdam job took over the output lock of" in stderr
    assert "stopping so the two jobs do not write the same output" in stderr
    assert json.loads((output / LOCK_PATH).read_text())["token"] == "theirs"
    assert not list((output / "markers").glob("*.json"))


# --- security ------------------------------------------------------------------------------------------------


def test_credentials_never_appear_in_outputs_or_logs(s3_job, ray_local):
    """Scan every output object (Parquet decoded), the driver's stdout/stderr and Ray's session logs."""
    import ray

    secrets = [TEST_SECRET, TEST_ACCESS_KEY]
    storage = Storage.from_url(s3_job["url"])
    objects = storage.list()
    assert any(path.endswith(".parquet") for path in objects) and "manifest.json" in objects
    for path in objects:
        data = storage.get(path)
        texts = [data.decode("latin-1")]
        if path.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            texts += [str(table.to_pylist()), str(table.schema.metadata)]
        for secret in secrets:
            assert not any(secret in text for text in texts), f"{secret!r} in {path}"
    for secret in secrets:
        assert secret not in s3_job["stdout"] + s3_job["stderr"]
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    scanned = [path for path in logs.rglob("*") if path.is_file()]
    assert any(path.name.startswith("worker-") for path in scanned)
    for path in scanned:
        text = path.read_bytes().decode("latin-1")
        for secret in secrets:
            assert secret not in text, f"{secret!r} in Ray log {path}"


# --- bad input -----------------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this creates the file at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Five shards covering every kind of bad input, and what the job must make of each sample."""
    root = tmp_path_factory.mktemp("bad-input")
    unpickled = root / "UNPICKLED"
    payload = pickle.dumps(_Exploit(str(unpickled)))
    good = jpeg_bytes(24, 20)
    corrupt = bytearray(jpeg_bytes(40, 40))
    corrupt[len(corrupt) // 2 :] = bytes(len(corrupt) - len(corrupt) // 2)
    mixed = [
        ("ok", {"jpg": good, "cls": b"1"}),
        ("corrupt-jpeg", {"jpg": bytes(corrupt[: len(corrupt) * 2 // 3]), "cls": b"1"}),
        ("not-an-image", {"png": b"GIF? no: just some text", "cls": b"1"}),
        ("gray", {"png": png_bytes(30, 20, "L"), "cls": b"2"}),
        ("cmyk", {"jpg": jpeg_bytes(30, 20, "CMYK"), "cls": b"2"}),
        ("rgba", {"png": png_bytes(30, 20, "RGBA"), "cls": b"2"}),
        ("palette", {"png": png_bytes(30, 20, "P"), "cls": b"2"}),
        (
            "sixteen-bit",
            {
                "png": image_bytes(Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)), "PNG"),
                "cls": b"2",
            },
        ),
        ("one-pixel", {"png": png_bytes(1, 1), "cls": b"3"}),
        ("bomb", {"png": png_header(20_000, 20_000), "cls": b"3"}),
        ("no-cls", {"jpg": good}),
        ("cls-99", {"jpg": good, "cls": b"99"}),
        ("word-cls", {"jpg": good, "cls": b"seven"}),
        ("no-image", {"cls": b"1", "json": b'{"note": "image missing"}'}),
        ("ok", {"jpg": good, "cls": b"1"}),  # the same key again, later in the shard
        ("v1.2/dotted-folder", {"jpg": good, "cls": b"4"}),
        ("dotted.name", {"jpg": good, "cls": b"4"}),  # key 'dotted', extension 'name.jpg'
        ("pickles", {"jpg": good, "cls": b"5", "pyd": payload, "pickle": payload}),
    ]
    members = [(f"{key}.{ext}", data) for key, sample in mixed for ext, data in sample.items()]
    members.insert(2, ("../outside/escape.jpg", good))
    members.insert(3, ("/absolute/escape.jpg", good))
    make_tar(root / "bad-0000.tar", members)
    make_shard(root / "bad-0001.tar", [("ok", {"jpg": good, "cls": b"1"}), ("other", {"jpg": good, "cls": b"0"})])
    full = make_shard(root / "bad-0002.tar", [(f"t{i}", {"jpg": jpeg_bytes(20, 20), "cls": b"0"}) for i in range(4)])
    with tarfile.open(full) as tar:
        cut = tar.getmember("t3.jpg").offset_data + 100
    full.write_bytes(full.read_bytes()[:cut])  # a tar cut inside t3's image
    make_tar(root / "bad-0003.tar", [])  # a valid tar without members
    (root / "bad-0004.tar").write_bytes(b"")  # not a tar at all
    # labelled: the images of bad-0000 with a label in range (--targets label explains them alone)
    labelled = {"ok", "gray", "cmyk", "rgba", "palette", "sixteen-bit", "one-pixel", "v1.2/dotted-folder", "pickles"}
    explained = labelled | {"no-cls", "cls-99", "other", "t0", "t1", "t2"}
    errors = {
        ("bad-0000", "corrupt-jpeg", "corrupt image 'corrupt-jpeg.jpg': "),
        ("bad-0000", "not-an-image", "corrupt image 'not-an-image.png': cannot identify image file"),
        ("bad-0000", "bomb", "decompression bomb: 'bomb.png': "),
        ("bad-0000", "word-cls", "non-integer cls 'word-cls.cls': 'seven'"),
        ("bad-0000", "no-image", "no image member (members: no-image.cls, no-image.json)"),
        ("bad-0000", "ok", "duplicate key 'ok' (first seen at sample 0)"),
        ("bad-0000", "dotted", "no image member (members: dotted.name.jpg, dotted.name.cls)"),
        ("bad-0000", "../outside/escape", "unsafe member path '../outside/escape.jpg'"),
        ("bad-0000", "/absolute/escape", "unsafe member path '/absolute/escape.jpg'"),
        ("bad-0001", "ok", "duplicate key 'ok': already in shard bad-0000"),
        ("bad-0002", "t3", "truncated tar: sample may be incomplete"),
        ("bad-0002", None, "truncated tar after 6 members: unexpected end of data"),
        ("bad-0004", None, "empty file, not a tar"),
    }
    return {
        "root": root,
        "spec": str(root / "bad-{0000..0004}.tar"),
        "unpickled": unpickled,
        "labelled": labelled,
        "explained": explained,
        "errors": errors,
        "checkpoint": save_tiny_vit(root / "model.pt", MODEL_KWARGS, CLASS_NAMES),
    }


def read_tables(output: str, folder: str) -> list[dict]:
    storage = Storage.from_url(output)
    return [row for path in storage.list(folder) for row in pq.read_table(io.BytesIO(storage.get(path))).to_pylist()]


def error_rows(output: str) -> set[tuple[str, str | None, str]]:
    return {(row["shard"], row["key"], row["reason"]) for row in read_tables(output, "errors")}


def matches(actual: set[tuple[str, str | None, str]], expected: set[tuple[str, str | None, str]]) -> bool:
    """Each actual error matches one expected (shard, key, reason prefix), and each expected one is there."""
    pairs = [(a, e) for a in actual for e in expected if a[:2] == e[:2] and a[2].startswith(e[2])]
    return len(actual) == len(expected) == len({a for a, _ in pairs}) == len({e for _, e in pairs})


def bad_args(bad_dataset: dict, output: str, *extra: str) -> list[str]:
    return [
        "explain",
        "--shards",
        bad_dataset["spec"],
        "--output",
        output,
        "--checkpoint",
        bad_dataset["checkpoint"],
        "--actors",
        "2",
        "--batch-size",
        "4",
        *extra,
    ]


def test_bad_input_is_recorded_and_everything_else_explained(ray_local, bad_dataset, tmp_path, capsys):
    output = str(tmp_path / "out")
    assert main(bad_args(bad_dataset, output, "--targets", "topk:1")) == 0
    n_errors = len(bad_dataset["errors"])
    assert (
        f"done: {len(bad_dataset['explained'])} images explained, {n_errors} samples in errors/, 5/5 shards complete"
        in capsys.readouterr().out
    )

    errors = error_rows(output)
    assert matches(errors, bad_dataset["errors"]), sorted(errors, key=str)
    assert all("\n" not in reason for _, _, reason in errors)
    rows = {row["key"]: row for row in read_tables(output, "metadata")}
    assert set(rows) == bad_dataset["explained"]
    assert rows["ok"]["shard"] == "bad-0000" and rows["no-cls"]["label"] is None and rows["cls-99"]["label"] == 99
    assert (rows["one-pixel"]["width"], rows["one-pixel"]["height"]) == (1, 1)
    assert all(
        (rows[key]["width"], rows[key]["height"]) == (30, 20)
        for key in ("gray", "cmyk", "rgba", "palette", "sixteen-bit")
    )
    assert verify_output(output) == []
    assert not bad_dataset["unpickled"].exists(), "a pickle member was unpickled"
    assert not (bad_dataset["root"].parent / "outside").exists()


def test_label_targets_refuse_missing_and_out_of_range_labels_and_strict_fails(
    ray_local, bad_dataset, tmp_path, capsys
):
    output = str(tmp_path / "out")
    assert (
        main(
            bad_args(
                bad_dataset,
                output,
                "--targets",
                "label",
                "--strict",
                "--shards",
                str(bad_dataset["root"] / "bad-0000.tar"),
            )
        )
        == 1
    )
    captured = capsys.readouterr()
    mixed_errors = {
        e for e in bad_dataset["errors"] if e[0] == "bad-0000" and e[1] != "dotted"
    }  # 'dotted.name.cls' is no label either
    expected = mixed_errors | {
        ("bad-0000", "no-cls", "missing cls label"),
        ("bad-0000", "dotted", "missing cls label"),
        ("bad-0000", "cls-99", "cls label 99 is out of range for a model with 6 classes"),
    }
    assert matches(error_rows(output), expected), sorted(error_rows(output), key=str)
    assert (
        captured.err.splitlines()[-1]
        == f"error: {len(expected)} sample(s) could not be explained (--strict); see {output}/errors/"
    )
    assert "1/1 shards complete" in captured.out
    assert {row["key"] for row in read_tables(output, "metadata")} == bad_dataset["labelled"]
    assert verify_output(output) == []
    assert not bad_dataset["unpickled"].exists()


# --- cdam verify --------------------------------------------------------------------------------------------


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))


DAMAGE: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "marker deleted": (lambda out: (out / "markers/000001.json").unlink(), ["shard 1: no completion marker"]),
    "Zarr chunk replaced by another": (
        lambda out: shutil.copy(out / "cdam.zarr/cdam/c/4/0/0/0", out / "cdam.zarr/cdam/c/0/0/0/0"),
        ["shard train-0000: Zarr array 'cdam' rows 0..31 do not match their checksum"],
    ),
    "Zarr chunk garbled": (
        lambda out: (out / "cdam.zarr/logits/c/2/0").write_bytes(b"garbage"),
        ["shard train-0001: Zarr array 'logits' rows 32..47 cannot be read (RuntimeError)"],
    ),
    "metadata deleted": (
        lambda out: (out / "metadata/000002-train-0002.parquet").unlink(),
        ["shard train-0002: metadata/000002-train-0002.parquet is missing"],
    ),
    "metadata replaced": (
        lambda out: shutil.copy(out / "metadata/000001-train-0001.parquet", out / "metadata/000000-train-0000.parquet"),
        [
            "shard train-0000: metadata/000000-train-0000.parquet does not match its checksum",
            "shard train-0000: metadata has 7 rows, marker says 18 images",
            "shard train-0000: metadata rows [32, 33, 34, 35, 36] lie outside the shard's block",
            "shard train-0000: members/000000-train-0000.parquet lacks 7 explained key(s), e.g. 's1/img000'",
            "shard train-0001: key 's1/img000' also in shard train-0000 (and 6 more keys)",
        ],
    ),
    "members deleted": (
        lambda out: (out / "members/000001-train-0001.parquet").unlink(),
        ["shard train-0001: members/000001-train-0001.parquet is missing"],
    ),
    "manifest image count": (
        lambda out: _edit_json(out / "manifest.json", lambda m: m["shards"][2].update(n_images=12)),
        ["shard train-0002: manifest records 12 images, the marker 13"],
    ),
    "manifest totals": (
        lambda out: _edit_json(out / "manifest.json", lambda m: m["totals"].update(images=37)),
        ["manifest totals say 37 images, the shards' markers 38"],
    ),
    "manifest planned samples": (
        lambda out: _edit_json(out / "manifest.json", lambda m: m["settings"]["shards"][1].update(n_samples=8)),
        [
            "manifest fingerprint does not match its settings (the manifest was edited)",
            "shard train-0001: marker counts 7 samples, manifest plans 8 (and errors/ does not say why)",
        ],
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_lists_each_problem(reference, tmp_path, capsys, damage):
    output = tmp_path / "out"
    shutil.copytree(reference["url"], output)
    assert main(["verify", str(output)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"OK: 0 problem(s) in {output}"

    damage_it, problems = DAMAGE[damage]
    damage_it(output)
    assert main(["verify", str(output)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed == problems + [f"FAILED: {len(problems)} problem(s) in {output}"]
