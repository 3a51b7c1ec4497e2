"""Shared fixtures: an in-process S3 (moto) server and fresh buckets on it."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# A runner that starts the tests in the background (`cmd &` in a script, nohup) ignores SIGINT, and an ignored
# signal stays ignored in every process started from here: the commands the tests stop with Ctrl-C would not stop.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TEST_ACCESS_KEY = "cdam-test-access-key"
TEST_SECRET = "cdam-test-secret-DO-NOT-LEAK"

# Variables that would point the S3 clients elsewhere or at other credentials.
_CLEARED_AWS_VARIABLES = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SKIP_SIGNATURE",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AWS_ALLOW_HTTP",
    "AWS_CONDITIONAL_PUT",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_BUCKET",
    "AWS_BUCKET_NAME",
)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session; the AWS_* environment points at it.

    Sets AWS_ENDPOINT_URL, fake keys (the secret is ``TEST_SECRET``) and AWS_REGION=us-east-1, and restores
    the environment at the end. Yields the endpoint URL.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name in _CLEARED_AWS_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        patch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
        patch.setenv("AWS_REGION", "us-east-1")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", "/dev/null")
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_client(s3_server: str):  # boto3 client types are generated at run time
    """A boto3 S3 client for the moto server (with the test keys, whatever the environment says)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=TEST_SECRET,
    )


@pytest.fixture
def s3_bucket(s3_client) -> Iterator[str]:
    """A fresh, empty bucket on the moto server; its objects and itself are removed afterwards."""
    name = f"cdam-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=name):
        if keys := [{"Key": item["Key"]} for item in page.get("Contents", [])]:
            s3_client.delete_objects(Bucket=name, Delete={"Objects": keys})
    s3_client.delete_bucket(Bucket=name)


@pytest.fixture
def s3_strict_auth(s3_bucket: str) -> Iterator[str]:
    """Make the moto server check credentials (it accepts any by default): unknown keys get 403.

    Yields a bucket created before the check was switched on (the same one as ``s3_bucket``).
    """
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    previous = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0
    try:
        yield s3_bucket
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = previous


@pytest.fixture(scope="module")
def ray_local(s3_server: str) -> Iterator[str]:
    """A real local Ray cluster on 127.0.0.1 (2 CPUs), started after the S3 environment so actors inherit it.

    Yields the cluster's address, for drivers started in a subprocess.
    """
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def demo_cache() -> Path:
    """The demo's cache folder (the one ``cdam demo`` uses): its shards and trained model are built once
    per machine, under a key that hashes the demo's settings and source, so a changed demo rebuilds."""
    from cdam_worker.demo_assets import ensure_demo_assets
    from jobs.demo import default_cache_dir

    cache = default_cache_dir()
    ensure_demo_assets(cache)
    return cache


@pytest.fixture(scope="session")
def demo_assets(demo_cache: Path):  # noqa: ANN201
    """The demo's shards, trained checkpoint and watermark location (see cdam_worker.demo_assets.DemoAssets)."""
    from cdam_worker.demo_assets import ensure_demo_assets

    return ensure_demo_assets(demo_cache)


@pytest.fixture(scope="session")
def demo_run(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished ``cdam demo`` output (all classes, basis stored), made once per session in a subprocess
    (its own local Ray). Read-only for the tests: copy it before changing anything."""
    import subprocess
    import sys

    output = tmp_path_factory.mktemp("demo-run") / "out"
    done = subprocess.run(
        [sys.executable, "-m", "jobs", "demo", "--output", str(output), "--cache-dir", str(demo_cache)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, f"cdam demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return str(output)
