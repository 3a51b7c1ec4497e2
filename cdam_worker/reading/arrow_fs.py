"""A read-only pyarrow filesystem over :class:`Storage`, so Arrow datasets (and DuckDB through them)
read a run's Parquet files with the job's own S3 settings, credentials and retries."""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.fs as pafs

from cdam_worker.storage import Storage


class StorageFileSystemHandler(pafs.FileSystemHandler):
    """The objects below a Storage root as a pyarrow filesystem: reads only, paths relative to the root."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorageFileSystemHandler) and other.storage == self.storage

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "cdam-storage"

    def normalize_path(self, path: str) -> str:
        return path.strip("/")

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        infos = []
        for path in paths:
            try:
                infos.append(pafs.FileInfo(path, pafs.FileType.File, size=self.storage.size(path)))
            except FileNotFoundError:
                kind = pafs.FileType.Directory if self.storage.list(path) else pafs.FileType.NotFound
                infos.append(pafs.FileInfo(path, kind))
        return infos

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        base = selector.base_dir.strip("/")
        sizes = self.storage.sizes(base)
        if not selector.recursive:
            sizes = {path: size for path, size in sizes.items() if posixpath.dirname(path) == base}
        return [pafs.FileInfo(path, pafs.FileType.File, size=size) for path, size in sorted(sizes.items())]

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(self.storage.open_reader(path), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(self.storage.open_reader(path), mode="r")

    def _read_only(self, *_args: object, **_kwargs: object) -> None:
        raise PermissionError(f"{self.storage.url} is opened read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


def storage_filesystem(storage: Storage) -> pafs.FileSystem:
    """``storage`` as a read-only pyarrow filesystem (paths relative to its root)."""
    return pafs.PyFileSystem(StorageFileSystemHandler(storage))
