"""Read the feature Parquet files `internvit extract` writes as float32 matrices, for probes, indexes and dedup.

References:
    - `extract/store.py`: the columns (`path`, `error`, `cls`, `mean`, `cls_lI`, `mean_lI`, ...) and the
      `internvit` schema metadata (the run's settings as JSON).
    - torchvision's `ImageFolder`: a row's label is the name of its file's parent folder.

Differs from reading the file with `pyarrow.parquet.read_table(...).to_numpy()`:
    - rows whose `error` is set (or whose feature is null) are skipped and counted, never turned into zeros;
    - the matrix is filled one record batch at a time into one preallocated array, so 1M x 1024 features take
      their 4 GB once instead of twice.

A feature spec names one column of fixed-size float lists (`cls`, `mean`, `cls_l12`) or several joined by `+`
(`cls+mean`), concatenated in that order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from internvit.extract.store import METADATA_KEY, upgrade_metadata

# Run settings that change the numbers in a feature column; two files whose settings differ here hold
# features from different encoders (or the same encoder seeing different pixels) and cannot be compared.
# `exif_transpose` is recorded by newer extracts only; absent on both sides it compares equal.
FEATURE_KEYS = ("compute_precision", "tiles", "max_tiles", "frames", "preprocess", "exif_transpose", "hidden_size")


@dataclass
class FeatureTable:
    """The usable rows of one or more feature files.

    Attributes:
        paths: the `path` of each kept row.
        vectors: [N, C] float32, row i belongs to `paths[i]`.
        feature: the feature spec the columns were read with.
        metadata: the files' `internvit` metadata (the run's settings).
        skipped: rows left out because their `error` is set or their feature is null.
        sources: the files read.
        extra: other columns read on request (e.g. a label column), one list per column, aligned with `paths`.
    """

    paths: list[str]
    vectors: np.ndarray
    feature: str
    metadata: dict
    skipped: int = 0
    sources: list[str] = field(default_factory=list)
    extra: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


def read_metadata(path: str | os.PathLike) -> dict:
    """The `internvit` metadata of a feature file under today's names (`upgrade_metadata`; an empty dict for a
    file without it)."""
    raw = (_schema(path).metadata or {}).get(METADATA_KEY)
    try:
        return upgrade_metadata(json.loads(raw)) if raw else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its 'internvit' metadata is not valid JSON ({e})") from None


def model_identity(metadata: dict) -> str | None:
    """What identifies the weights: the fingerprint of the exact weights when recorded, else the model name."""
    return metadata.get("weights_fingerprint") or metadata.get("model")


def settings_mismatch(a: dict, b: dict) -> list[str]:
    """The feature-determining settings in which two metadata dicts differ, as readable strings (empty if none).

    The model is compared by weights fingerprint when both record one (the same weights under another path are
    the same model), else by the model string.
    """
    a, b = upgrade_metadata(a), upgrade_metadata(b)
    out = []
    if a.get("weights_fingerprint") and b.get("weights_fingerprint"):
        if a["weights_fingerprint"] != b["weights_fingerprint"]:
            out.append(f"weights_fingerprint {a['weights_fingerprint']!r} vs {b['weights_fingerprint']!r}")
    elif a.get("model") != b.get("model"):
        out.append(f"model {a.get('model')!r} vs {b.get('model')!r}")
    for key in FEATURE_KEYS:
        if a.get(key) != b.get(key):
            out.append(f"{key} {a.get(key)!r} vs {b.get(key)!r}")
    return out


def feature_columns(feature: str) -> list[str]:
    cols = [c.strip() for c in feature.split("+")]
    if not feature or not all(cols):
        raise ValueError(f"feature {feature!r}: expected a column name such as cls, mean, cls_l12 or cls+mean")
    return cols


def read_features(files, *, feature: str = "cls", columns: tuple[str, ...] = (),
                  batch_rows: int = 8192) -> FeatureTable:
    """Read the feature column(s) `feature` of one or more feature files into a float32 matrix.

    Args:
        files: a path or a list of paths to Parquet files written by `internvit extract`.
        feature: one column or several joined by "+" (concatenated), e.g. "cls", "mean", "cls+mean".
        columns: other columns to read for each kept row (returned in `FeatureTable.extra`).
        batch_rows: rows converted at a time.

    Raises:
        ValueError: a file lacks a column, a column is not a fixed-size float list, or the files were written
            with different models or settings.
        OSError: a file is missing or is not Parquet.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not files:
        raise ValueError("no feature files given")
    cols = feature_columns(feature)
    metadata: dict | None = None
    widths: list[int] | None = None
    total = 0
    for f in files:
        schema = _schema(f)
        meta = read_metadata(f)
        if metadata is None:
            metadata, first = meta, f
        elif diff := settings_mismatch(metadata, meta):
            raise ValueError(f"{f} and {first} were extracted with different settings ({'; '.join(diff)}); "
                             "read them separately")
        names = schema.names
        for c in ("path", *cols, *columns):
            if c not in names:
                available = ", ".join(n for n in names if _is_vector(schema.field(n).type)) or "none"
                raise ValueError(f"{f}: no column {c!r} (feature columns: {available})")
        w = []
        for c in cols:
            t = schema.field(c).type
            if not _is_vector(t):
                raise ValueError(f"{f}: column {c!r} is {t}, not a fixed-size list of floats")
            w.append(t.list_size)
        if widths is None:
            widths = w
        elif w != widths:
            raise ValueError(f"{f}: feature widths {w} differ from {widths} in {first}")
        total += pq.ParquetFile(f).metadata.num_rows

    width = sum(widths)
    vectors = np.empty((total, width), np.float32)
    paths: list[str] = []
    extra: dict[str, list] = {c: [] for c in columns}
    skipped = 0
    n = 0
    for f in files:
        pf = pq.ParquetFile(f)
        has_error = "error" in pf.schema_arrow.names
        read = ["path", *(["error"] if has_error else []), *dict.fromkeys(cols), *columns]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=read):
            keep = np.ones(batch.num_rows, bool)
            if has_error:
                keep &= np.asarray(batch.column("error").is_null())
            for c in cols:
                keep &= np.asarray(batch.column(c).is_valid())
            skipped += int((~keep).sum())
            if not keep.any():
                continue
            batch = batch.filter(pa.array(keep))
            m = batch.num_rows
            offset = 0
            for c, wc in zip(cols, widths):
                arr = batch.column(c)
                values = arr.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slicing and nulls
                vectors[n:n + m, offset:offset + wc] = values.reshape(m, wc)
                offset += wc
            paths.extend(batch.column("path").to_pylist())
            for c in columns:
                extra[c].extend(batch.column(c).to_pylist())
            n += m
    return FeatureTable(paths, vectors[:n], feature, metadata or {}, skipped, [str(f) for f in files], extra)


def folder_labels(paths: list[str]) -> list[str]:
    """ImageFolder labels: the name of each path's parent folder."""
    return [Path(p).parent.name for p in paths]


def _schema(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such feature file")
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None


def _is_vector(t) -> bool:
    import pyarrow as pa

    return pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)
