"""Storage on a local folder and on S3 (moto), through the same API."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import zarr

from cdam_worker import storage as storage_module
from cdam_worker.storage import RETRY_CONFIG, Storage, StorageError, redact, split_url
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET
from tests.helpers import S3Proxy

FAST_RETRIES = {
    "max_retries": 2,
    "backoff": {"init_backoff": timedelta(milliseconds=1), "max_backoff": timedelta(milliseconds=5), "base": 2},
}


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """The same tests on a local folder that does not exist yet and on an S3 prefix."""
    if request.param == "local":
        return Storage.from_url(str(tmp_path / "out" / "run"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage.from_url(f"s3://{bucket}/out/run")


# --- URLs ------------------------------------------------------------------------------------------


def test_local_urls_are_normalised_to_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Storage.from_url("rel/dir/").url == str(tmp_path / "rel" / "dir")
    assert Storage.from_url(f"file://{tmp_path}/a").url == str(tmp_path / "a")
    assert Storage.from_url("run:1").url == str(tmp_path / "run:1")  # a colon alone is not a scheme


def test_s3_urls_are_normalised(s3_server: str) -> None:
    assert Storage.from_url("s3://bucket/a//b/").url == "s3://bucket/a/b"
    assert Storage.from_url("s3://bucket").url == "s3://bucket"
    assert Storage.from_url("s3://bucket/a").child("b/c/").url == "s3://bucket/a/b/c"


def test_bad_urls_and_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="unsupported storage URL 'gs://b/x'"):
        Storage.from_url("gs://b/x")
    with pytest.raises(StorageError, match="without credentials") as error:
        Storage.from_url("s3://AKIDEXAMPLE:secret@bucket/x")
    assert "secret" not in str(error.value)
    with pytest.raises(StorageError, match=r"'\.\.' is not allowed"):
        Storage.from_url(str(tmp_path)).put("../escape", b"x")
    assert not (tmp_path.parent / "escape").exists()


def test_split_url(s3_server: str, tmp_path: Path) -> None:
    assert split_url("s3://b/p/x.tar") == (Storage.from_url("s3://b/p"), "x.tar")
    assert split_url("s3://b/x.tar") == (Storage.from_url("s3://b"), "x.tar")
    assert split_url(str(tmp_path / "d" / "x.tar")) == (Storage.from_url(str(tmp_path / "d")), "x.tar")
    assert split_url(f"file://{tmp_path}/x.tar") == (Storage.from_url(str(tmp_path)), "x.tar")


# --- objects, on both backends ---------------------------------------------------------------------


def test_put_get_list_exists_delete(storage: Storage) -> None:
    assert storage.list() == []
    assert not storage.exists("a.txt")
    storage.put("a.txt", b"alpha")
    storage.put("sub/b.bin", b"\x00\x01")
    storage.put("sub/deeper/c", b"")
    assert storage.get("a.txt") == b"alpha"
    assert storage.size("sub/b.bin") == 2
    assert storage.exists("a.txt") and storage.exists("sub/deeper/c")
    assert storage.list() == ["a.txt", "sub/b.bin", "sub/deeper/c"]
    assert storage.list("sub") == ["sub/b.bin", "sub/deeper/c"]
    assert storage.child("sub").list() == ["b.bin", "deeper/c"]
    assert storage.total_size() == 7 and storage.total_size("sub") == 2
    storage.put("a.txt", b"replaced")
    assert storage.get("a.txt") == b"replaced"
    storage.delete("a.txt")
    storage.delete("a.txt")  # deleting a missing object is fine
    assert not storage.exists("a.txt")
    assert storage.list() == ["sub/b.bin", "sub/deeper/c"]


def test_get_missing_object_raises_file_not_found_naming_it(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError, match=f"{storage.url}/nope.txt"):
        storage.get("nope.txt")
    with pytest.raises(FileNotFoundError, match=f"{storage.url}/nope.txt"):
        storage.size("nope.txt")
    with pytest.raises(FileNotFoundError, match=f"{storage.url}/nope.txt"):
        storage.open_reader("nope.txt")


def test_put_if_absent_creates_only_once(storage: Storage) -> None:
    assert storage.put_if_absent("lock", b"first") is True
    assert storage.put_if_absent("lock", b"second") is False
    assert storage.get("lock") == b"first"


def test_open_reader_streams_and_seeks(storage: Storage) -> None:
    data = np.random.default_rng(0).bytes(300_000)
    storage.put("blob", data)
    with storage.open_reader("blob", buffer_size=4096) as reader:
        assert reader.read(10) == data[:10]
        chunks = iter(lambda: reader.read(65_536), b"")
        assert data[10:] == b"".join(chunks)
        reader.seek(-5, os.SEEK_END)
        assert reader.read() == data[-5:]
        reader.seek(1000)
        assert reader.read(3) == data[1000:1003]


def test_zarr_store_round_trip(storage: Storage) -> None:
    array = zarr.create_array(storage.zarr_store("maps.zarr"), name="cdam", shape=(4, 6), chunks=(2, 3), dtype="f4")
    array[:] = np.arange(24, dtype="f4").reshape(4, 6)
    reopened = zarr.open_array(storage.zarr_store("maps.zarr", read_only=True), path="cdam")
    np.testing.assert_array_equal(reopened[:], np.arange(24, dtype="f4").reshape(4, 6))
    assert "maps.zarr/cdam/zarr.json" in storage.list()


def test_check_writable_passes_and_leaves_nothing(storage: Storage) -> None:
    storage.check_writable()
    assert storage.list() == []


def test_storage_pickles_as_its_url(storage: Storage) -> None:
    storage.put("x", b"1")
    copy = pickle.loads(pickle.dumps(storage))
    assert copy == storage and copy.get("x") == b"1"


# --- local specifics --------------------------------------------------------------------------------


def test_local_folder_is_created_on_first_write_only(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path / "new" / "folder"))
    assert storage.list() == [] and not storage.exists("x")
    storage.delete("x")
    with pytest.raises(FileNotFoundError):
        storage.zarr_store(read_only=True)
    assert not (tmp_path / "new").exists()
    storage.put("x", b"1")
    assert (tmp_path / "new" / "folder" / "x").read_bytes() == b"1"


def test_check_writable_local_folder_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError) as error:
        Storage.from_url(str(tmp_path / "file" / "out")).check_writable()
    message = str(error.value)
    assert message.startswith(f"local folder {tmp_path}/file/out is not writable: ")
    assert "\n" not in message


# --- S3 specifics ------------------------------------------------------------------------------------


def _assert_safe_one_liner(message: str) -> None:
    assert "\n" not in message
    assert TEST_SECRET not in message and TEST_ACCESS_KEY not in message


def test_check_writable_missing_bucket(s3_server: str) -> None:
    with pytest.raises(StorageError) as error:
        Storage.from_url("s3://cdam-no-such-bucket/out").check_writable()
    message = str(error.value)
    assert message == "S3 bucket 'cdam-no-such-bucket' does not exist (cannot write to s3://cdam-no-such-bucket/out)"
    _assert_safe_one_liner(message)


def test_missing_bucket_is_a_storage_error_on_reads_too(s3_server: str) -> None:
    with pytest.raises(StorageError, match=r"cdam-no-such-bucket.*bucket does not exist"):
        Storage.from_url("s3://cdam-no-such-bucket").get("x")


def test_check_writable_bad_credentials(s3_strict_auth: str) -> None:
    with pytest.raises(StorageError) as error:
        Storage.from_url(f"s3://{s3_strict_auth}/out").check_writable()
    message = str(error.value)
    assert f"S3 bucket {s3_strict_auth!r}" in message
    assert "access denied" in message and "InvalidAccessKeyId" in message
    _assert_safe_one_liner(message)


def test_read_errors_with_bad_credentials_are_one_line_without_secrets(s3_strict_auth: str) -> None:
    with pytest.raises(StorageError) as error:
        Storage.from_url(f"s3://{s3_strict_auth}").get("x")
    assert str(error.value).startswith(f"cannot read s3://{s3_strict_auth}/x: InvalidAccessKeyId")
    _assert_safe_one_liner(str(error.value))


@pytest.fixture
def no_env_keys(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No AWS keys in the environment, and boto3's cached credential lookup forgotten before and after."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage_module._boto3_credentials.cache_clear()
    yield
    storage_module._boto3_credentials.cache_clear()


def test_credentials_from_an_aws_profile(
    no_env_keys: None, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[cdam-test]\naws_access_key_id = {TEST_ACCESS_KEY}\naws_secret_access_key = {TEST_SECRET}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "cdam-test")
    storage = Storage.from_url(f"s3://{s3_bucket}/profile")
    storage.put("x", b"1")
    assert storage.get("x") == b"1"


def test_without_credentials_requests_are_unsigned(
    no_env_keys: None, s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage.from_url(f"s3://{s3_bucket}/public")
    storage.put("x", b"1")  # moto accepts anonymous requests
    with S3Proxy(s3_server, failures=1, fault="403") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(StorageError) as error:
            Storage.from_url(f"s3://{s3_bucket}/public").check_writable()
    assert proxy.signed == [False]
    assert str(error.value) == (
        f"access denied writing to s3://{s3_bucket}/public in S3 bucket {s3_bucket!r} (AccessDenied): check the "
        "AWS credentials and the bucket policy; no AWS credentials were found, so requests were unsigned"
    )


def test_redact_removes_credentials_from_the_environment() -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
        patch.setenv("AWS_SESSION_TOKEN", "session-token-value")
        text = "oops very-secret-value and session-token-value leaked"
        assert redact(text) == "oops *** and *** leaked"


def test_retry_config_retries_transient_failures() -> None:
    assert 5 <= RETRY_CONFIG["max_retries"] <= 8


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_transient_failures_are_retried(
    s3_bucket: str, s3_server: str, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with S3Proxy(s3_server, failures=2, fault=fault) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage = Storage.from_url(f"s3://{s3_bucket}/retry")
        storage.put("a", b"payload")
        assert proxy.failed == 2
        proxy.failures_left = 2
        assert storage.get("a") == b"payload"
        assert proxy.failed == 4


def test_persistent_failure_names_the_object(s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with S3Proxy(s3_server, failures=1_000) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage = Storage.from_url(f"s3://{s3_bucket}/retry", FAST_RETRIES)
        with pytest.raises(StorageError) as error:
            storage.get("a")
        assert proxy.requests == 3  # the first try and 2 retries
    message = str(error.value)
    assert message.startswith(f"cannot read s3://{s3_bucket}/retry/a: SlowDown")
    assert "gave up after 2 retries" in message
    _assert_safe_one_liner(message)


def test_open_reader_fetches_only_what_is_read(s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    Storage.from_url(f"s3://{s3_bucket}").put("big", bytes(4_000_000))
    with S3Proxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with Storage.from_url(f"s3://{s3_bucket}").open_reader("big", buffer_size=65_536) as reader:
            assert reader.read(100) == bytes(100)
            reader.seek(3_000_000)
            assert reader.read(100) == bytes(100)
        assert proxy.bytes_served == 2 * 65_536
