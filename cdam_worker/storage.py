"""One API for a local folder and an S3 prefix, with obstore underneath.

``Storage.from_url("/data/out")`` and ``Storage.from_url("s3://bucket/out")`` behave the same: paths are
relative to the root, errors are one-line :class:`StorageError` messages that name the object and never
contain credentials, and transient S3 failures (throttling, 5xx, dropped connections) are retried with
exponential backoff by obstore's retry layer.

S3 is configured from the standard AWS settings: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, and, when no keys are in the environment, boto3's credential chain (profiles,
SSO, instance and container roles). With no credentials at all, requests are unsigned (public buckets).
"""

from __future__ import annotations

import io
import os
import re
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlparse

from obstore.exceptions import AlreadyExistsError, BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import LocalStore, S3Store

if TYPE_CHECKING:
    import zarr.abc.store
    from obstore.auth.boto3 import Boto3CredentialProvider
    from obstore.store import RetryConfig

RETRY_CONFIG: RetryConfig = {
    "max_retries": 6,
    "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=10), "base": 2},
    "retry_timeout": timedelta(minutes=3),
}
"""Retries for transient failures (5xx, throttling, dropped connections): about 13 s of backoff in all."""

LOCAL_READ_BUFFER = 1 << 20
S3_READ_BUFFER = 8 << 20
SCAN_WINDOWS = (4 << 10, 1 << 20)
"""A header scan's read sizes: reads far apart fetch the small one, reads close together the large one..."""
SCAN_CLOSE = 64 << 10
"""...which they are when the last reads lie at most this far apart on average (16 or more per large read)."""
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
_ACCESS_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


class StorageError(RuntimeError):
    """A storage operation failed; the one-line message names the URL and never contains credentials."""


def redact(text: str) -> str:
    """Replace every AWS key, secret or session token found in the environment by ``***``."""
    for name in _SECRET_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


class Storage:
    """A local folder or an s3://bucket/prefix, one API.

    Storage pickles as its URL, so a copy sent to another process (a Ray worker) rebuilds its client
    from that process's environment.
    """

    url: str

    def __init__(
        self,
        url: str,
        *,
        local_root: str | None = None,
        bucket: str = "",
        prefix: str = "",
        s3_options: dict[str, Any] | None = None,
        retry_config: RetryConfig = RETRY_CONFIG,
    ) -> None:
        self.url = url
        self._local_root = local_root
        self._bucket = bucket
        self._prefix = prefix
        self._s3_options = s3_options or {}
        self._retry_config = retry_config
        self._store: LocalStore | S3Store | None = None

    @classmethod
    def from_url(cls, url: str, retry_config: RetryConfig | None = None) -> Storage:
        """Storage for '/abs/or/relative/path', 'file:///path' or 's3://bucket/prefix'."""
        retry_config = retry_config or RETRY_CONFIG
        scheme = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
        if scheme and scheme[1] == "s3":
            bucket, _, prefix = url[len("s3://") :].partition("/")
            if not bucket or "@" in bucket:  # never echo a URL that may embed credentials
                raise StorageError("invalid S3 URL: expected s3://bucket/prefix without credentials")
            prefix = _relative(prefix)
            return cls(
                _s3_url(bucket, prefix),
                bucket=bucket,
                prefix=prefix,
                s3_options=_s3_options(bucket, retry_config),
                retry_config=retry_config,
            )
        if scheme and scheme[1] == "file":
            url = urlparse(url).path
        elif scheme:
            raise StorageError(f"unsupported storage URL {url!r}: use a local path, file:// or s3://")
        root = os.path.abspath(os.path.expanduser(url))
        return cls(root, local_root=root, retry_config=retry_config)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Storage.from_url, (self.url, self._retry_config))

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def is_local(self) -> bool:
        """Whether this is a local folder rather than an S3 prefix."""
        return self._local_root is not None

    def child(self, path: str) -> Storage:
        """Storage rooted at ``path`` below this one."""
        path = _relative(path)
        if not path:
            return self
        if self._local_root is not None:
            root = os.path.join(self._local_root, path)
            return Storage(root, local_root=root, retry_config=self._retry_config)
        prefix = f"{self._prefix}/{path}" if self._prefix else path
        return Storage(
            _s3_url(self._bucket, prefix),
            bucket=self._bucket,
            prefix=prefix,
            s3_options=self._s3_options,
            retry_config=self._retry_config,
        )

    def put(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path``, replacing any existing object."""
        path = _relative(path)
        with self._errors("write", path):
            self._obstore(create=True).put(path, data)

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Create ``path`` only if it does not exist yet (S3 If-None-Match); False if it already existed."""
        path = _relative(path)
        with self._errors("write", path):
            try:
                self._obstore(create=True).put(path, data, mode="create")
            except AlreadyExistsError:
                return False
        return True

    def get(self, path: str) -> bytes:
        """The whole object at ``path``; FileNotFoundError if it does not exist."""
        path = _relative(path)
        with self._errors("read", path):
            return bytes(self._existing_obstore(path).get(path).bytes())

    def read_range(self, path: str, start: int, length: int) -> memoryview:
        """``length`` bytes of the object at ``path`` from ``start``, in one ranged request;
        FileNotFoundError if it does not exist."""
        path = _relative(path)
        with self._errors("read", path):
            return memoryview(self._existing_obstore(path).get_range(path, start=start, length=length))

    def exists(self, path: str) -> bool:
        """Whether an object exists at ``path``."""
        try:
            self.size(path)
        except FileNotFoundError:
            return False
        return True

    def size(self, path: str) -> int:
        """Size in bytes of the object at ``path``; FileNotFoundError if it does not exist."""
        path = _relative(path)
        with self._errors("read", path):
            return int(self._existing_obstore(path).head(path)["size"])

    def list(self, prefix: str = "") -> list[str]:
        """Sorted paths, relative to this root, of all objects below the folder ``prefix`` (recursive)."""
        return sorted(meta["path"] for meta in self._listing(prefix))

    def total_size(self, prefix: str = "") -> int:
        """Bytes in all objects below the folder ``prefix`` (one listing, no per-object requests)."""
        return sum(self.sizes(prefix).values())

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Size in bytes of every object below the folder ``prefix``, by path (one listing)."""
        return {meta["path"]: int(meta["size"]) for meta in self._listing(prefix)}

    def _listing(self, prefix: str) -> list[dict[str, Any]]:
        """obstore's metadata of every object below the folder ``prefix``."""
        prefix = _relative(prefix)
        with self._errors("list", prefix):
            store = self._obstore()
            if store is None:
                return []
            return [meta for batch in store.list(prefix or None) for meta in batch]

    def delete(self, path: str) -> None:
        """Delete the object at ``path``; no error if it does not exist."""
        path = _relative(path)
        try:
            with self._errors("delete", path):
                self._existing_obstore(path).delete(path)
        except FileNotFoundError:
            pass

    def open_reader(self, path: str, buffer_size: int | None = None) -> BinaryIO:
        """A seekable buffered reader that fetches ``buffer_size`` bytes per request, never the whole object."""
        size = self.size(path)
        if buffer_size is None:
            buffer_size = LOCAL_READ_BUFFER if self.is_local else S3_READ_BUFFER
        raw = _RangeReader(self, _relative(path), size)
        return io.BufferedReader(raw, buffer_size=buffer_size)  # type: ignore[return-value]

    def open_scanner(self, path: str) -> BinaryIO:
        """A seekable reader for a scan that jumps from header to header (a tar's member headers): each read
        it cannot answer from its last fetch fetches 1 MiB where the reads lie close together (small members:
        many headers per request) and 4 KiB where they lie far apart (large members: headers, not data)."""
        return _ScanReader(self, _relative(path), self.size(path))  # type: ignore[return-value]

    def zarr_store(self, path: str = "", read_only: bool = False) -> zarr.abc.store.Store:
        """A zarr v3 store (zarr.storage.ObjectStore) rooted at ``path`` below this storage."""
        from zarr.storage import ObjectStore

        storage = self.child(path)
        store = storage._obstore(create=not read_only)
        if store is None:
            raise FileNotFoundError(f"no such folder: {storage.url}")
        return ObjectStore(store, read_only=read_only)

    def check_writable(self) -> None:
        """Write and delete a probe object; StorageError with a one-line reason when that fails. A local folder
        that does not exist yet is not made: its nearest existing parent must be a folder this process may write."""
        if self._local_root is not None and not os.path.isdir(self._local_root):
            parent = os.path.dirname(os.path.abspath(self._local_root))
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                raise StorageError(f"local folder {self.url} is not writable: {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise StorageError(f"local folder {self.url} is not writable: permission denied on {parent}")
            return
        probe = f".cdam-write-probe-{uuid.uuid4().hex}"
        try:
            store = self._obstore(create=True)
            store.put(probe, b"")
            store.delete(probe)
        except (BaseError, OSError) as exc:
            raise StorageError(self._not_writable_reason(exc)) from None

    def _not_writable_reason(self, exc: Exception) -> str:
        if self._local_root is not None:
            return f"local folder {self.url} is not writable: {_describe(exc)}"
        bucket = self._bucket
        code = _s3_error_code(exc)
        if code == "NoSuchBucket":
            return f"S3 bucket {bucket!r} does not exist (cannot write to {self.url})"
        if code in _ACCESS_DENIED_CODES or isinstance(exc, (PermissionDeniedError, UnauthenticatedError)):
            unsigned = self._s3_options["config"].get("skip_signature")
            note = "; no AWS credentials were found, so requests were unsigned" if unsigned else ""
            return (
                f"access denied writing to {self.url} in S3 bucket {bucket!r} ({code or 'forbidden'}): "
                f"check the AWS credentials and the bucket policy{note}"
            )
        return f"cannot write to {self.url} (S3 bucket {bucket!r}): {_describe(exc)}"

    def _obstore(self, create: bool = False) -> LocalStore | S3Store | None:
        """The obstore store; for a local folder that does not exist yet, None unless ``create``."""
        if self._store is None:
            if self._local_root is None:
                self._store = S3Store(self._bucket, prefix=self._prefix or None, **self._s3_options)
            elif os.path.isdir(self._local_root) or create:
                self._store = LocalStore(self._local_root, mkdir=True)
        return self._store

    def _existing_obstore(self, path: str) -> LocalStore | S3Store:
        store = self._obstore()
        if store is None:
            raise FileNotFoundError(path)
        return store

    @contextmanager
    def _errors(self, action: str, path: str) -> Iterator[None]:
        """Turn obstore and OS errors into FileNotFoundError / StorageError naming ``url/path``."""
        where = f"{self.url}/{path}" if path else self.url
        try:
            yield
        except FileNotFoundError as exc:
            if _s3_error_code(exc) == "NoSuchBucket":
                raise StorageError(f"cannot {action} {where}: S3 bucket does not exist") from None
            raise FileNotFoundError(f"no such object: {where}") from None
        except (BaseError, OSError) as exc:
            raise StorageError(f"cannot {action} {where}: {_describe(exc)}") from None


def split_url(url: str) -> tuple[Storage, str]:
    """'s3://b/p/x.tar' -> (Storage('s3://b/p'), 'x.tar'); likewise for local paths."""
    if url.startswith("s3://"):
        parent, _, name = url.rstrip("/").rpartition("/")
        if parent == "s3:/":  # 's3://bucket' alone has no object name
            raise StorageError(f"invalid S3 object URL {url!r}: no object name")
        return Storage.from_url(parent), name
    path = urlparse(url).path if url.startswith("file://") else url
    path = os.path.abspath(os.path.expanduser(path))
    return Storage.from_url(os.path.dirname(path)), os.path.basename(path)


class _RangeReader(io.RawIOBase):
    """Raw seekable reads of one object through ranged GETs (each one retried by obstore)."""

    def __init__(self, storage: Storage, path: str, size: int) -> None:
        super().__init__()
        self._storage = storage
        self._path = path
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        length = min(len(buffer), self._size - self._position)
        if length <= 0:
            return 0
        data = self._storage.read_range(self._path, self._position, length)
        count = len(data)
        memoryview(buffer).cast("B")[:count] = data
        self._position += count
        return count


class _ScanReader(_RangeReader):
    """A _RangeReader whose reads are answered from one window, fetched in a size set by how far apart
    the recent reads lie (Storage.open_scanner)."""

    def __init__(self, storage: Storage, path: str, size: int) -> None:
        super().__init__(storage, path, size)
        self._window, self._window_start = memoryview(b""), 0
        self._last_read = 0
        self._gaps: deque[int] = deque(maxlen=16)

    def readinto(self, buffer: Any) -> int:
        wanted = len(buffer)
        self._gaps.append(abs(self._position - self._last_read))
        self._last_read = self._position
        start = self._position - self._window_start
        if start < 0 or start + wanted > len(self._window):
            close = len(self._gaps) >= 4 and sum(self._gaps) <= SCAN_CLOSE * len(self._gaps)
            window = bytearray(max(wanted, SCAN_WINDOWS[close]))
            self._window_start, start = self._position, 0
            self._window = memoryview(window)[: super().readinto(window)]
            self._position = self._window_start
        data = self._window[start : start + wanted]
        memoryview(buffer).cast("B")[: len(data)] = data
        self._position += len(data)
        return len(data)


def _relative(path: str) -> str:
    """A clean relative object path: no leading/trailing or doubled slashes, no '.' and no '..'."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise StorageError(f"invalid path {path!r}: '..' is not allowed")
    return "/".join(parts)


def _s3_url(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def _s3_options(bucket: str, retry_config: RetryConfig) -> dict[str, Any]:
    """Keyword arguments for obstore's S3Store (besides bucket and prefix) from the standard AWS settings."""
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    config: dict[str, Any] = {}
    client_options: dict[str, Any] = {}
    credential_provider = None
    profile_region = None
    keys_in_env = env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")
    if not keys_in_env and env.get("AWS_SKIP_SIGNATURE", "").lower() not in ("1", "true"):
        credential_provider, profile_region = _boto3_credentials(env.get("AWS_PROFILE"))
        if credential_provider is None:
            config["skip_signature"] = True
    config["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or profile_region or "us-east-1"
    if endpoint:
        config["endpoint"] = endpoint
        client_options["allow_http"] = endpoint.startswith("http://")
    if "AWS_VIRTUAL_HOSTED_STYLE_REQUEST" not in env:
        # Custom endpoints (MinIO, moto, Ceph) want path-style; AWS itself wants virtual-hosted style,
        # except for bucket names with dots, which break its TLS certificates.
        config["virtual_hosted_style_request"] = not endpoint and "." not in bucket
    return {
        "config": config,
        "client_options": client_options,
        "retry_config": retry_config,
        "credential_provider": credential_provider,
    }


@cache
def _boto3_credentials(profile: str | None) -> tuple[Boto3CredentialProvider | None, str | None]:
    """boto3's credential chain (profiles, SSO, instance/container roles) and the profile's region."""
    import boto3
    import botocore.exceptions
    from obstore.auth.boto3 import Boto3CredentialProvider

    try:
        session = boto3.Session(profile_name=profile)
        if session.get_credentials() is None:
            return None, session.region_name
        return Boto3CredentialProvider(session), session.region_name
    except botocore.exceptions.BotoCoreError as exc:
        raise StorageError(f"cannot load AWS credentials (profile {profile!r}): {redact(str(exc))}") from None


def _s3_error_code(exc: Exception) -> str | None:
    match = re.search(r"<Code>([^<]+)</Code>", str(exc))
    return match[1] if match else None


def _describe(exc: Exception) -> str:
    """A short one-line reason: the S3 error code and message, or the first line of the error."""
    text = str(exc)
    code = _s3_error_code(exc)
    status = re.search(r"status code: (\d{3}[^:]*)", text)
    if code:
        message = re.search(r"<Message>([^<]+)</Message>", text)
        reason = f"{code}: {message[1]}" if message else code
    elif status:  # HEAD answers carry no error document
        reason = f"HTTP {status[1].strip()}"
    else:
        reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) and not code:
        reason = f"access denied ({reason})"
    if retries := re.search(r"after (\d+) retries", text):
        reason = f"{reason[:250]} (gave up after {retries[1]} retries)"
    return redact(reason)[:300]
