"""Turn the SOURCES of `internvit extract` (files, folders, globs, list files) into one ordered list of inputs."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

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
