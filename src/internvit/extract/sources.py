"""Turn the SOURCES of `internvit extract` (files, folders, globs, list files) into one ordered list of inputs."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from internvit.preprocess.image import is_image_name
from internvit.preprocess.video import is_video_name

LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


def expand_sources(sources: Iterable[str | os.PathLike]) -> list[str]:
    """Expand sources into absolute paths, in order, each once.

    - a folder: every file with an image or video extension below it, recursively, sorted;
    - a glob (`photos/**/*.jpg`): its matches, sorted;
    - a `.txt` / `.lst` / `.list` file: one path per line (blank lines and `#` comments skipped; relative paths
      are relative to the current folder);
    - anything else, existing or not, is an input: a missing or broken file becomes a row with its error.
    """
    out: dict[str, None] = {}
    for source in sources:
        source = os.fspath(source)
        if os.path.isdir(source):
            found = []
            for root, dirs, files in os.walk(source, followlinks=True):
                dirs.sort()
                found.extend(os.path.join(root, f) for f in files if is_image_name(f) or is_video_name(f))
            paths = sorted(found)
        elif os.path.isfile(source) and os.path.splitext(source)[1].lower() in LIST_EXTENSIONS:
            with open(source, encoding="utf-8") as f:
                lines = (line.strip() for line in f)
                paths = [line for line in lines if line and not line.startswith("#")]
        elif not os.path.exists(source) and glob.has_magic(source):
            paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        else:
            paths = [source]
        out.update((os.path.abspath(p), None) for p in paths)
    return list(out)
