"""Turn the SOURCES of `internvit extract` into one ordered list of inputs: files, folders, globs and list files
(`expand_sources`), plus, for engines that read through pyarrow's filesystems (Ray), remote URIs and Parquet
tables of paths or image bytes (`list_inputs`)."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass

from internvit._fileio import filesystem, is_uri

from internvit.preprocess.image import is_image_name
from internvit.preprocess.video import is_video_name

LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


class NoInputsError(ValueError):
    """The sources name no input at all (empty folders, globs without a match, empty list files)."""


def expand_sources(sources: Iterable[str | os.PathLike]) -> list[str]:
    """Expand sources into absolute paths, in order, each real file once.

    - a folder: every file with an image or video extension below it, recursively, sorted; symbolic links to
      folders are followed, but each real folder is walked once (a link loop ends there);
    - a glob (`photos/**/*.jpg`): its matches, sorted;
    - a `.txt` / `.lst` / `.list` file: one path per line (blank lines and `#` comments skipped, a UTF-8 BOM
      ignored; relative paths are relative to the current folder);
    - anything else, existing or not, is an input: a missing or broken file becomes a row with its error.

    A file reached by two paths (links, `a/../a`) is an input once, under the first path. Special files (FIFOs,
    sockets, devices) stay inputs and become error rows when opened: they are never read.

    Raises:
        NoInputsError: the sources name no input; the message says what each source gave.
    """
    out: dict[str, None] = {}
    seen_files: set[tuple[int, int]] = set()
    empty: list[str] = []
    for source in sources:
        source = os.fspath(source)
        if os.path.isdir(source):
            paths = _walk(source)
            kind = "a folder with no image or video files"
        elif os.path.isfile(source) and os.path.splitext(source)[1].lower() in LIST_EXTENSIONS:
            with open(source, encoding="utf-8-sig") as f:
                lines = (line.strip() for line in f)
                paths = [line for line in lines if line and not line.startswith("#")]
            kind = "a list file with no paths"
        elif not os.path.exists(source) and glob.has_magic(source):
            paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
            kind = "a pattern that matches no file"
        else:
            paths = [source]
        if not paths:
            empty.append(f"{source!r} ({kind})")
        for p in paths:
            p = os.path.abspath(p)
            key = _file_key(p)
            if key is not None:
                if key in seen_files:
                    continue
                seen_files.add(key)
            out[p] = None
    if not out:
        raise NoInputsError("no inputs in " + ", ".join(empty or ["the sources"]))
    return list(out)


def _file_key(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file a path reaches, or None for a path that does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(root: str) -> list[str]:
    """Files with media extensions below `root`, sorted; each real folder visited once (links followed)."""
    found: list[str] = []
    visited: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited:
            dirs[:] = []  # reached again through a link: already walked (or a loop)
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs.sort()
        found.extend(os.path.join(folder, f) for f in files if is_image_name(f) or is_video_name(f))
    return sorted(found)


# ---- URIs and input tables (the Ray engine) -------------------------------------------------------------


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        return f.readall()


def _list_remote(uri: str) -> list[str]:
    """A remote folder (recursive, image and video extensions), list file, or single input, as URIs."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.Directory:
        base = uri.rstrip("/")
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        names = sorted(f.path for f in found if f.type == pafs.FileType.File
                       and (is_image_name(f.base_name) or is_video_name(f.base_name)))
        return [base + name[len(root.rstrip("/")):] for name in names]
    if info.type == pafs.FileType.File and os.path.splitext(root)[1].lower() in LIST_EXTENSIONS:
        lines = (line.strip() for line in read_bytes(uri).decode("utf-8").splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    return [uri]  # a missing remote file becomes a row with its error, as a missing local one


@dataclass
class Inputs:
    paths: list[str]  # every distinct input, in order: local absolute paths, URIs, or a table's `path` values
    tables: dict[str, list[str]]  # Parquet tables that carry the bytes: uri -> its paths (read by Ray Data)


def list_inputs(sources, *, path_column: str, bytes_column: str) -> Inputs:
    """Sources as `expand_sources`, plus remote URIs and `.parquet` tables (a path column, maybe a bytes column)."""
    import pyarrow.parquet as pq

    paths: dict[str, None] = {}
    tables: dict[str, list[str]] = {}
    for source in sources:
        source = os.fspath(source)
        if source.lower().endswith(".parquet"):
            fs, path = filesystem(source)
            schema = pq.read_schema(path, filesystem=fs)
            if path_column not in schema.names:
                raise ValueError(f"{source}: an input table needs a {path_column!r} column (it has "
                                 f"{', '.join(schema.names)})")
            rows = pq.read_table(path, columns=[path_column], filesystem=fs).column(path_column).to_pylist()
            if any(p is None for p in rows):
                raise ValueError(f"{source}: the {path_column!r} column has nulls; every row needs a name")
            if bytes_column in schema.names:
                tables[source] = rows
            else:
                paths.update((p if is_uri(p) else os.path.abspath(p), None) for p in rows)
        elif is_uri(source):
            paths.update((p, None) for p in _list_remote(source))
        elif os.path.isfile(source) and os.path.splitext(source)[1].lower() in LIST_EXTENSIONS:
            with open(source, encoding="utf-8-sig") as f:  # as `expand_sources`, but a line may be a URI
                lines = [line.strip() for line in f]
            paths.update((p if is_uri(p) else os.path.abspath(p), None)
                         for p in lines if p and not p.startswith("#"))
        else:
            paths.update((p, None) for p in expand_sources([source]))
    for rows in tables.values():
        paths.update((p, None) for p in rows)
    return Inputs(list(paths), tables)
