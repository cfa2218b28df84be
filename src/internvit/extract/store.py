"""A Parquet output that survives `kill -9` and resumes without duplicates.

Layout while a run is going on: `OUT` (the consolidated file of earlier runs, if any) and `OUT.parts/`, where
finished rows land as small Parquet files, each written to a temporary name and renamed, so every file there is
complete. At the end of a run (and on Ctrl-C) everything is streamed into a new `OUT` (renamed into place) and
the parts are removed. After a kill, `OUT` and every part are readable; the next run with the same `--out`
skips what they hold and consolidates. When a path appears more than once (a retried error, a kill between the
rename and the clean-up), the newest row wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from internvit._fileio import atomic_write, filesystem

METADATA_KEY = b"internvit"
# Settings that must agree between a file and a run that appends to it.
# Everything that determines a row's features: the weights (by content, see `weights.files_fingerprint`), the model
# path, the preprocessing (EXIF orientation included) and what is stored.
COMPATIBLE_KEYS = ("model", "weights_fingerprint", "backend", "compute_precision", "stored_dtype", "layers",
                   "patch_tokens", "visual_tokens", "projector", "tiles", "max_tiles", "frames", "preprocess",
                   "decode", "jpeg_decoder", "exif_transpose", "hidden_size")
STORED_DTYPE = "float32"  # what every feature column of `feature_schema` holds, whatever the encoder computed in


class OutputMismatchError(ValueError):
    """The existing output was written with other settings; resuming would mix incompatible rows."""


class OutputLockedError(ValueError):
    """Another run is writing the same output."""


def check_compatible(have: dict, wanted: dict, *, path: object) -> None:
    """Refuse to add rows made with `wanted` settings to a file written with `have`, naming each differing field."""
    have = upgrade_metadata(have)
    diff = {k: (have.get(k), wanted.get(k)) for k in COMPATIBLE_KEYS if have.get(k) != wanted.get(k)}
    if diff:
        shown = ", ".join(f"{k}: file has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
        raise OutputMismatchError(f"{path} was written with other settings ({shown}); resuming would mix their "
                                  "features: use the same model and options, or choose another --out")


def upgrade_metadata(meta: dict) -> dict:
    """Metadata of any version under today's names: `compute_precision` (what the encoder computed in: fp32, bf16,
    fp16, int8) and `stored_dtype` (what the feature columns hold). Earlier outputs recorded `dtype` (the torch
    model's dtype, an exported encoder's float32 inputs) and, once backends existed, `backend` and `precision` (the
    compute precision); before backends, torch computed in `dtype`. Every version stored float32; before `--decode`,
    every output was decoded exactly, and before device decoding every JPEG by Pillow."""
    if not meta:
        return meta
    if "compute_precision" in meta:
        return {"decode": "exact", "jpeg_decoder": "pillow", **meta}
    old = dict(meta)
    dtype, precision = old.pop("dtype", None), old.pop("precision", None)
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return {"backend": "torch", "decode": "exact", "jpeg_decoder": "pillow", **old,
            "compute_precision": precision or short.get(dtype, dtype),
            "stored_dtype": STORED_DTYPE}


def unreadable_output(path: object, error: Exception) -> OutputMismatchError:
    return OutputMismatchError(
        f"{path}: exists but is not a readable Parquet file ({error}). internvit writes every file whole, so it "
        "was damaged or written by something else: move it away (its inputs are then extracted again), or "
        "choose another --out"
    )


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold `OUT.lock` (an exclusive `flock`) while a run writes `out`; another run refuses at once.

    The kernel releases the lock when the process ends, however it ends (`kill -9` included), so a stale file
    never blocks a later run. Raises `OutputLockedError` naming the holder (pid, host, start, command).
    """
    import fcntl

    out = Path(out)
    lock = out.with_name(out.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLockedError(f"{out} is being written by another run ({holder}); wait for it to end or "
                                    "choose another --out") from None
        # The holder before us may have removed the file between our open and our lock: lock the current one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}: {command}\n".encode())
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def read_errors(out: str | os.PathLike) -> tuple[int, list[tuple[str, str]]]:
    """The number of rows of an output (a Parquet file or a folder of shards) and (path, error) of each error
    row, in file order. Raises `FileNotFoundError` or `ValueError` naming `out` when it is not such an output."""
    try:
        table = pq.read_table(out, columns=["path", "error"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{out}: no such file or folder") from None
    except (pa.ArrowException, OSError) as e:  # not Parquet, or Parquet without our columns
        raise ValueError(f"{out}: not an output of internvit extract ({' '.join(str(e).split())})") from None
    errors = table.filter(table.column("error").is_valid())
    return table.num_rows, list(zip(errors.column("path").to_pylist(), errors.column("error").to_pylist()))


def feature_schema(hidden_size: int, *, layers: tuple[int, ...] = (), patch_tokens: bool = False,
                   visual_tokens: int = 0, metadata: dict | None = None) -> pa.Schema:
    """The output columns (see `extract/local.py` and the README for their meaning)."""
    vec = pa.list_(pa.float32(), hidden_size)  # STORED_DTYPE
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("num_tiles", pa.int32()),
        pa.field("grid_cols", pa.int32()),
        pa.field("grid_rows", pa.int32()),
        pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("cls", vec),
        pa.field("mean", vec),
    ]
    for i in layers:
        fields += [pa.field(f"cls_l{i}", vec), pa.field(f"mean_l{i}", vec)]
    if patch_tokens:
        fields += [pa.field("map_height", pa.int32()), pa.field("map_width", pa.int32()),
                   pa.field("patch_tokens", pa.list_(vec))]
    if visual_tokens:
        fields.append(pa.field("visual_tokens", pa.list_(pa.list_(pa.float32(), visual_tokens))))
    meta = {METADATA_KEY: json.dumps({**(metadata or {}), "stored_dtype": STORED_DTYPE}, sort_keys=True).encode()}
    return pa.schema(fields, metadata=meta)


def read_metadata(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


class FeatureStore:
    """Rows go in with `add`; `flush` makes them durable; `consolidate` produces the single `OUT` file.

    Buffered rows are flushed to a part every `flush_seconds` (and at `rows_per_part` rows or `bytes_per_part`
    bytes), so a kill loses at most that much finished work besides the batch in flight.
    """

    def __init__(self, out: str | os.PathLike, schema: pa.Schema, *, flush_seconds: float = 10.0,
                 rows_per_part: int = 4096, bytes_per_part: int = 256 << 20) -> None:
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.schema = schema
        self.rows_per_part = rows_per_part
        self.bytes_per_part = bytes_per_part
        self.flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_rows = 0
        self._buffered_bytes = 0
        self._check_compatible()
        self._next_part = 1 + max((self._part_number(p) for p in self._part_files()), default=0)

    # ---- what is already there ----

    def _part_files(self) -> list[Path]:
        if not self.parts.is_dir():
            return []
        return sorted(p for p in self.parts.iterdir() if re.fullmatch(r"part-\d+\.parquet", p.name))

    @staticmethod
    def _part_number(path: Path) -> int:
        return int(path.stem.split("-")[1])

    def _existing_files(self) -> list[Path]:
        """Oldest first: the consolidated file, then the parts in the order they were written."""
        return ([self.out] if self.out.is_file() else []) + self._part_files()

    def _check_compatible(self) -> None:
        if self.out.is_dir():
            raise OutputMismatchError(f"{self.out} is a folder; --out names the Parquet file to write")
        wanted = read_metadata(self.schema)
        for path in self._existing_files():
            try:
                have = read_metadata(pq.read_schema(path))  # the footer: a cut file fails here
            except (pa.ArrowInvalid, OSError) as e:
                raise unreadable_output(path, e) from None
            check_compatible(have, wanted, path=path)

    def finished(self, *, include_errors: bool = True) -> set[str]:
        """Paths that already have a row (by default also those whose row is an error)."""
        done: dict[str, bool] = {}
        for path in self._existing_files():
            table = pq.read_table(path, columns=["path", "error"])
            for p, e in zip(table.column("path").to_pylist(), table.column("error").to_pylist()):
                done[p] = e is None
        return {p for p, ok in done.items() if ok or include_errors}

    def failed(self) -> int:
        """Error rows in the consolidated output."""
        if not self.out.is_file():
            return 0
        errors = pq.read_table(self.out, columns=["error"]).column("error")
        return len(errors) - errors.null_count

    # ---- writing ----

    def add(self, rows: dict[str, list]) -> None:
        batch = pa.RecordBatch.from_pydict(rows, schema=self.schema)
        self._buffer.append(batch)
        self._buffered_rows += batch.num_rows
        self._buffered_bytes += batch.nbytes
        if (self._buffered_rows >= self.rows_per_part or self._buffered_bytes >= self.bytes_per_part
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        atomic_write(self.parts / f"part-{self._next_part:08d}.parquet", lambda tmp: pq.write_table(table, tmp))
        self._next_part += 1
        self._buffer.clear()
        self._buffered_rows = self._buffered_bytes = 0

    def consolidate(self) -> pa.Schema | None:
        """Stream `OUT` and the parts into a new `OUT`, newest row per path, then remove the parts."""
        self.flush()
        files = self._existing_files()
        if not files or files == [self.out]:
            return None
        # Pass 1: where is the newest row of each path?
        newest: dict[str, tuple[int, int]] = {}
        for fi, path in enumerate(files):
            for ri, p in enumerate(pq.read_table(path, columns=["path"]).column("path").to_pylist()):
                newest[p] = (fi, ri)
        keep: list[set[int]] = [set() for _ in files]
        for fi, ri in newest.values():
            keep[fi].add(ri)

        # Pass 2: copy those rows, one row group at a time (bounded memory).
        def write(tmp: str) -> None:
            with pq.ParquetWriter(tmp, self.schema) as writer:
                for fi, path in enumerate(files):
                    offset = 0
                    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                        mask = pa.array([offset + i in keep[fi] for i in range(batch.num_rows)])
                        offset += batch.num_rows
                        kept = batch.filter(mask)
                        if kept.num_rows:
                            writer.write_table(pa.Table.from_batches([kept]).cast(self.schema))

        atomic_write(self.out, write)
        for path in files[1:] if files[0] == self.out else files:
            path.unlink()
        for tmp in self.parts.glob(".part-*.tmp"):  # a part a killed run was writing (we hold the lock)
            tmp.unlink()
        try:
            self.parts.rmdir()
        except OSError:
            pass
        return self.schema


# ---- a folder of shards (the Ray engine) -------------------------------------------------------------

SHARD_PREFIX = "part-"


def shard_name(paths: list[str]) -> str:
    """Named by its inputs: a write task that Ray retries rewrites the same shard instead of adding one."""
    digest = hashlib.sha1("\n".join(sorted(paths)).encode()).hexdigest()[:24]
    return f"{SHARD_PREFIX}{digest}.parquet"


def write_whole(fs, path: str, table) -> None:
    """Whole files only: tmp + rename on a local disk; object stores publish an object when it is closed."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    else:
        with fs.open_output_stream(path) as f:
            pq.write_table(table, f)


class ShardStore:
    """A folder (local, shared or a URI) of `part-*.parquet` shards with the local engine's schema and metadata:
    the Ray engine's output. The same interface as `FeatureStore` for what is already there (settings checked on
    opening, `finished`, `failed`); rows are written by the engine's tasks, each shard whole (`write_whole`)."""

    def __init__(self, out: str, schema: pa.Schema) -> None:
        import pyarrow.fs as pafs

        self.fs, self.root = filesystem(out)
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise ValueError(f"{out} is a file; the ray engine writes a folder of Parquet shards, choose another --out")
        self.fs.create_dir(self.root, recursive=True)
        self.schema = schema
        self._check_compatible()

    def files(self) -> list[str]:
        """Oldest first (by modification time, then name): later shards win when a path is in two."""
        import pyarrow.fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        found = [f for f in found if f.type == pafs.FileType.File and f.base_name.startswith(SHARD_PREFIX)
                 and f.base_name.endswith(".parquet")]
        return [f.path for f in sorted(found, key=lambda f: (f.mtime_ns or 0, f.base_name))]

    def _check_compatible(self) -> None:
        """As `FeatureStore`: resuming with other settings (model, dtype, layers, ...) is refused."""
        wanted = read_metadata(self.schema)
        for path in self.files():
            try:
                have = read_metadata(pq.read_schema(path, filesystem=self.fs))
            except (pa.ArrowInvalid, OSError) as e:
                raise unreadable_output(path, e) from None
            check_compatible(have, wanted, path=path)

    def _rows(self) -> list[tuple[str, list[str], list[str | None]]]:
        out = []
        for path in self.files():
            table = pq.read_table(path, columns=["path", "error"], filesystem=self.fs)
            out.append((path, table.column("path").to_pylist(), table.column("error").to_pylist()))
        return out

    def finished(self, *, include_errors: bool = True) -> set[str]:
        """Paths that already have a row (by default also those whose row is an error)."""
        done: dict[str, bool] = {}
        for _, paths, errors in self._rows():
            done.update((p, e is None) for p, e in zip(paths, errors))
        return {p for p, ok in done.items() if ok or include_errors}

    def failed(self) -> int:
        return sum(e is not None for _, _, errors in self._rows() for e in errors)

    def dedupe(self) -> int:
        """Keep each path's newest row: rewrite (or remove) the shards that hold older ones. Returns rows dropped."""
        rows = self._rows()
        newest: dict[str, tuple[int, int]] = {}
        for fi, (_, paths, _) in enumerate(rows):
            for ri, p in enumerate(paths):
                newest[p] = (fi, ri)
        dropped = 0
        for fi, (path, paths, _) in enumerate(rows):
            keep = [newest[p] == (fi, ri) for ri, p in enumerate(paths)]
            if all(keep):
                continue
            dropped += len(keep) - sum(keep)
            if any(keep):
                table = pq.read_table(path, filesystem=self.fs)
                write_whole(self.fs, path, table.filter(pa.array(keep)))
            else:
                self.fs.delete_file(path)
        return dropped
