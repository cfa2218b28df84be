"""Turn the SOURCES of `internvit extract` into one ordered list of inputs: files, folders, globs and list files
(`expand_sources`); WebDataset tar shards, whose image members are inputs (`find_inputs`, both engines); and, for
engines that read through pyarrow's filesystems (Ray), remote URIs, remote shards and Parquet tables of paths or
image bytes (`list_inputs`).

Tar shards (img2dataset's output: `KEY.jpg`, `KEY.json`, `KEY.txt` per sample): a `.tar` file, a glob of them or
a brace range (`shard-{00000..00999}.tar`). Each image or video member is one input named `SHARD.tar/MEMBER`; the
shard's headers are read with `tarfile` (seeking over the data) and a member's bytes are read at its offset when
it is prepared: nothing is unpacked to disk. A shard that ends early or has a corrupt header gives a row for the
shard with the error (its members before that point are inputs as usual); a member cut short gives its own.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field

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
    tables: dict[str, list[str]] = field(default_factory=dict)  # Parquet tables that carry the bytes: uri -> paths
    members: dict[str, Member] = field(default_factory=dict)  # inputs inside tar shards: path -> where
    errors: dict[str, str] = field(default_factory=dict)  # inputs known to fail (a broken shard): path -> why

    def add_shard(self, shard: str) -> None:
        members, error = list_shard(shard)
        for m in members:
            self.members[f"{shard}/{m.name}"] = m
        self.paths += [f"{shard}/{m.name}" for m in members]
        if error is not None:
            self.paths.append(shard)
            self.errors[shard] = error


def find_inputs(sources: Iterable[str | os.PathLike]) -> Inputs:
    """`expand_sources`, plus tar shards (`.tar` files, globs and brace ranges of them): their members are inputs.

    Raises:
        NoInputsError: the sources name no input at all.
    """
    sources = [os.fspath(s) for s in sources]
    inputs = Inputs([])
    plain = []
    for source in sources:
        shards = shard_paths(source)
        for shard in shards:
            inputs.add_shard(shard)
        if not shards:
            plain.append(source)
    try:
        inputs.paths = expand_sources(plain) + inputs.paths if plain else inputs.paths
    except NoInputsError:
        if not inputs.paths:
            raise
    if not inputs.paths:
        raise NoInputsError("no inputs in " + ", ".join(repr(s) for s in sources) + " (tar shards without images)")
    inputs.paths = list(dict.fromkeys(inputs.paths))
    return inputs


# ---- WebDataset tar shards ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """An input inside a tar shard: `size` bytes at `offset` of `shard` (a local path or a URI)."""

    shard: str
    name: str
    offset: int
    size: int


def is_shard_name(path: str) -> bool:
    return path.lower().endswith(".tar")


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b` -> a00b, a01b, a02b (zero-padded as written); `a{x,y}` -> ax, ay; nested and repeated."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    if m.group(3) is not None:
        choices = m.group(3).split(",")
    else:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
    return [out for c in choices for out in expand_braces(head + c + tail)]


def shard_paths(source: str) -> list[str]:
    """The tar shards a source names (none if it names no `.tar`, or is a glob without a match): local ones
    absolute, URIs as given."""
    names = expand_braces(source)
    if not all(is_shard_name(n) for n in names):
        return []
    found: list[str] = []
    for name in names:
        if is_uri(name) or os.path.exists(name) or not glob.has_magic(name):
            found.append(name if is_uri(name) else os.path.abspath(name))
        else:
            found += sorted(os.path.abspath(p) for p in glob.glob(name, recursive=True) if os.path.isfile(p))
    return found


def list_shard(shard: str) -> tuple[list[Member], str | None]:
    """The image and video members of a tar shard, and the error that stopped the listing (None: read whole)."""
    members: list[Member] = []
    try:
        with _open_binary(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if info.isfile() and (is_image_name(info.name) or is_video_name(info.name)):
                    members.append(Member(shard, info.name, info.offset_data, info.size))
    except FileNotFoundError:
        return [], f"{shard}: no such file"
    except (tarfile.TarError, OSError, EOFError) as e:
        where = f"after {len(members)} members" if members else "at its start"
        return members, f"{shard}: truncated or corrupt tar shard, unreadable {where} ({e})"
    return members, None


def read_member(member: Member) -> bytes:
    """A member's bytes, read at its offset in the shard (a member cut short by a truncated shard fails)."""
    with _open_binary(member.shard) as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) < member.size:
        raise ValueError(f"truncated member: {len(data)} of {member.size} bytes in the shard")
    return data


def _open_binary(path: str):
    """A seekable binary file: local, or any URI pyarrow's filesystems open."""
    if not is_uri(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    return fs.open_input_file(inner)


def list_inputs(sources, *, path_column: str, bytes_column: str) -> Inputs:
    """Sources as `find_inputs`, plus remote URIs (folders, list files, tar shards) and `.parquet` tables (a path
    column, maybe a bytes column)."""
    import pyarrow.parquet as pq

    paths: dict[str, None] = {}
    tables: dict[str, list[str]] = {}
    members: dict[str, Member] = {}
    errors: dict[str, str] = {}
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
        elif shard_paths(source):
            shards = Inputs([])
            for shard in shard_paths(source):
                shards.add_shard(shard)
            paths.update((p, None) for p in shards.paths)
            members.update(shards.members)
            errors.update(shards.errors)
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
    return Inputs(list(paths), tables, members, errors)
