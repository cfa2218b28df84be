"""File helpers: atomic writes (readers, and a run killed midway, never see half a file) and pyarrow filesystems
for local paths and URIs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` on a temporary name in the same folder, then rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the result the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(uri_or_path: str):
    """(pyarrow filesystem, path inside it) for a local path or any URI pyarrow knows (s3://, gs://, hdfs://...)."""
    import pyarrow.fs as pafs

    if is_uri(uri_or_path):
        return pafs.FileSystem.from_uri(uri_or_path)
    return pafs.LocalFileSystem(), os.path.abspath(uri_or_path)
