"""Similarity search over extracted features: an exact index, an approximate one, and near-duplicate pairs.

References:
    - clip-retrieval / autofaiss (rom1504): "embed, index, query" as three commands, and the index kind chosen
      from the number of vectors (brute force while it is cheap, a graph or inverted file beyond).
    - faiss (Douze et al., "The Faiss library", 2024) `IndexHNSWFlat` (Malkov & Yashunin, HNSW, 2018) with inner
      product on L2-normalised vectors, i.e. cosine.
    - DINOv2 `eval/knn.py`: cosine similarity as a matrix product of L2-normalised features, top-k per block.

Differs from autofaiss:
    - exact search is our own blocked matrix product in torch (one [queries x rows] block of scores at a time,
      merged into a running top-k), so no [Q x N] score matrix is ever built, whatever N. "auto" keeps it up to
      1M vectors: there it answers 27 queries/s on 2 shared cores (37 ms a query) with no build time, while an
      HNSW graph of the same 1M took 591 s to build and reached recall@10 0.86 / 0.91 at efSearch 128 / 256
      (benchmarks/results/analysis_*, synthetic clustered 1024-d vectors);
    - the only approximate kind is HNSW32-Flat from faiss (efSearch 256): no product quantisation (a few million
      1024-d vectors fit in memory as float32). Library picked by measurement (same benchmark, 100k vectors,
      recall@10 1.000 for all): faiss HNSW32 built in 69 s and answered 1101 queries/s; usearch's HNSW32 took
      156 s (f32; 71 s in f16) and answered 585 (f16: 972) queries/s. faiss IVF-Flat (4 sqrt(N) lists, nprobe 32)
      matched HNSW there (34 s, 1126 queries/s) but was not measured at 1M (4,000 lists, k-means on 256k
      points);
    - the index folder records the metadata of the features it was built from, and `search` refuses queries whose
      model or feature-determining settings differ.

Index folder: `index.json` (kind, feature, count, width, the features' metadata, sources), `paths.parquet` (one
row per vector), and `vectors.npy` (L2-normalised float32, exact kind) or `hnsw.faiss` (ann kind).
Scores are cosine similarities.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from internvit._fileio import atomic_write
from internvit.extract import extract_features
from internvit.extract.store import upgrade_metadata
from internvit.feature_table import FeatureTable, feature_columns, read_features, settings_mismatch

INDEX_KINDS = ("auto", "exact", "ann")
INDEX_EXACT_MAX_ROWS = 1_000_000  # `build_index(kind="auto")`: exact up to this many vectors (module docstring)
DEDUP_EXACT_MAX_ROWS = 200_000  # `dedup`: every pair up to this many items (N^2 / 2 products: ~12 min at 200k on 2 cores)
INDEX_FORMAT = 1
DEDUP_BLOCK = (2048, 32768)  # rows x columns of one block of all-pairs scores (256 MB)


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row, [N] float32, without a temporary the size of `x` (np.linalg.norm makes one)."""
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def normalize(x: np.ndarray, block: int = 65536) -> np.ndarray:
    """Rows scaled to unit L2 norm, in place for float32 input (a zero row stays zero)."""
    x = np.asarray(x, np.float32)
    for i in range(0, len(x), block):
        b = x[i:i + block]
        b /= np.maximum(row_norms(b), 1e-12)[:, None]
    return x


@torch.inference_mode()
def top_k(queries: np.ndarray, database: np.ndarray, k: int, *, cosine: bool = False, query_block: int = 1024,
          row_block: int = 65536, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The `k` largest inner products of each query with the database rows, computed block by block.

    Memory beyond the inputs is one [query_block, row_block + k] score block, so 1M x 1M never exists.

    Args:
        queries: [Q, C] float32.
        database: [N, C] float32 (a memory-mapped array works: each block is read once per query block).
        k: neighbours per query (capped at N, or N - 1 with `exclude_self`).
        cosine: divide by the norms (computed per block), so unnormalised inputs need no normalised copy.
        exclude_self: `queries` is `database` (same rows, same order); a row is not its own neighbour.

    Returns:
        scores [Q, k] float32, descending, and indices [Q, k] int64 into `database`.
    """
    Q, N = len(queries), len(database)
    k = min(k, N - 1 if exclude_self else N)
    scores = np.empty((Q, max(k, 0)), np.float32)
    indices = np.empty((Q, max(k, 0)), np.int64)
    if k <= 0 or Q == 0:
        return scores, indices
    for q0 in range(0, Q, query_block):
        q = np.array(queries[q0:q0 + query_block], np.float32)  # a copy: normalised below without touching the input
        q_qC = torch.from_numpy(normalize(q) if cosine else q)
        best_s = torch.full((len(q_qC), k), -math.inf)
        best_i = torch.zeros((len(q_qC), k), dtype=torch.int64)
        for n0 in range(0, N, row_block):
            rows = np.ascontiguousarray(database[n0:n0 + row_block], np.float32)
            rows_nC = torch.from_numpy(rows if rows.flags.writeable else rows.copy())  # a read-only memory map
            s_qn = q_qC @ rows_nC.T
            if cosine:
                s_qn /= torch.from_numpy(np.maximum(row_norms(rows), 1e-12))
            if exclude_self:
                qi = torch.arange(q0, q0 + len(q_qC))
                own = (qi >= n0) & (qi < n0 + len(rows_nC))
                s_qn[own.nonzero()[:, 0], (qi[own] - n0)] = -math.inf
            kk = min(k, s_qn.shape[1])
            s, i = s_qn.topk(kk, dim=1)
            cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + n0], 1)
            best_s, pick = cand_s.topk(k, dim=1)
            best_i = cand_i.gather(1, pick)
        scores[q0:q0 + len(q_qC)] = best_s.numpy()
        indices[q0:q0 + len(q_qC)] = best_i.numpy()
    return scores, indices


# ---- the approximate index ----------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("the ann index needs faiss: pip install 'internvit[analysis]'") from None
    return faiss


@dataclass(frozen=True)
class HNSWParams:
    """A faiss HNSW-Flat graph: `m` links per node, `ef_construction` candidates while inserting,
    `ef_search` candidates while searching (recall against speed; raise it for more recall)."""

    m: int = 32
    ef_construction: int = 64
    ef_search: int = 256


def build_ann(vectors: np.ndarray, params: HNSWParams = HNSWParams()):
    """A faiss HNSW-Flat inner-product index over L2-normalised `vectors`, added in blocks (a memory-mapped
    source is never copied whole)."""
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(vectors.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    for n0 in range(0, len(vectors), 65536):
        index.add(np.ascontiguousarray(vectors[n0:n0 + 65536], np.float32))
    index.hnsw.efSearch = params.ef_search
    return index


# ---- index folders --------------------------------------------------------------------------------------


@dataclass
class IndexInfo:
    """What `build_index` wrote."""

    out: Path
    kind: str
    count: int
    dim: int
    skipped: int
    seconds: float


class Index:
    """A loaded index folder: `search(vectors, k)` and the metadata of the features it holds."""

    def __init__(self, folder: str | os.PathLike) -> None:
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        manifest = self.folder / "index.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{folder}: not an index folder (no index.json); build one with `internvit index`")
        info = json.loads(manifest.read_text())
        if info.get("format") != INDEX_FORMAT:
            raise ValueError(f"{folder}: index format {info.get('format')!r}, this version reads {INDEX_FORMAT}")
        self.info = info
        self.kind: str = info["kind"]
        self.feature: str = info["feature"]
        self.metadata: dict = upgrade_metadata(info["metadata"])  # an index of an earlier version too
        self.dim: int = info["dim"]
        self.paths: list[str] = pq.read_table(self.folder / "paths.parquet").column("path").to_pylist()
        if self.kind == "exact":
            self._vectors = np.load(self.folder / "vectors.npy", mmap_mode="r")
        else:
            self._ann = _faiss().read_index(str(self.folder / "hnsw.faiss"))
            self._ann.hnsw.efSearch = info["ann"]["ef_search"]

    def __len__(self) -> int:
        return len(self.paths)

    def check_compatible(self, metadata: dict, *, source: str) -> None:
        """Refuse features from another model or other feature-determining settings (a ValueError naming both)."""
        diff = settings_mismatch(self.metadata, metadata)
        if diff:
            raise ValueError(f"{source} was extracted with other settings than index {self.folder} "
                             f"({'; '.join(f'index vs query: {d}' for d in diff)}); its features are not comparable")

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores [Q, k] (descending) and row indices [Q, k] of each query's nearest vectors.

        An ANN index may return fewer than k hits for a query; the missing ones have index -1.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape} do not match the index width {self.dim}")
        q = normalize(np.array(queries, np.float32))
        if self.kind == "exact":
            return top_k(q, self._vectors, k)
        scores, ids = self._ann.search(q, min(k, len(self)))
        return scores, ids


def build_index(files, out: str | os.PathLike, *, feature: str = "cls", kind: str = "auto") -> IndexInfo:
    """Build an index folder over the `feature` vectors of one or more feature files.

    Args:
        files: Parquet files from `internvit extract`, all from the same model and settings.
        out: the index folder (created; an existing index there is replaced).
        feature: "cls", "mean", "cls+mean", "cls_l12", ...
        kind: "exact" (blocked brute force), "ann" (faiss HNSW) or "auto": exact up to
            `INDEX_EXACT_MAX_ROWS` vectors, ann beyond.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind not in INDEX_KINDS:
        raise ValueError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
    start = time.perf_counter()
    table = read_features(files, feature=feature)
    if not len(table):
        raise ValueError(f"{', '.join(map(str, table.sources))}: no rows with features ({table.skipped} error rows)")
    if kind == "auto":
        kind = "exact" if len(table) <= INDEX_EXACT_MAX_ROWS else "ann"
    vectors = normalize(table.vectors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"format": INDEX_FORMAT, "kind": kind, "feature": feature, "count": len(table), "dim": vectors.shape[1],
            "skipped": table.skipped, "sources": [os.path.abspath(s) for s in table.sources],
            "metadata": table.metadata}
    for stale in ("vectors.npy", "hnsw.faiss"):
        (out / stale).unlink(missing_ok=True)
    if kind == "exact":
        atomic_write(out / "vectors.npy", lambda tmp: np.save(open(tmp, "wb"), vectors))
    else:
        params = HNSWParams()
        ann = build_ann(vectors, params)
        atomic_write(out / "hnsw.faiss", lambda tmp: _faiss().write_index(ann, tmp))
        info["ann"] = {"library": "faiss", "faiss_version": _faiss().__version__, "index": f"HNSW{params.m},Flat",
                       "metric": "inner_product", "ef_construction": params.ef_construction,
                       "ef_search": params.ef_search}
    paths = pa.table({"path": pa.array(table.paths, pa.string())})
    atomic_write(out / "paths.parquet", lambda tmp: pq.write_table(paths, tmp))
    atomic_write(out / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return IndexInfo(out, kind, len(table), vectors.shape[1], table.skipped, time.perf_counter() - start)


def query_features(index: Index, queries, **extract_options) -> FeatureTable:
    """The features of `queries` as comparable with `index`: rows of feature files (checked against the index's
    metadata), and images encoded with the index's own model and settings by `internvit.extract_features`.

    Args:
        index: a loaded index.
        queries: `.parquet` feature files and/or image sources (files, folders, globs, list files).
        extract_options: passed to `extract_features` for images (device, batch_size, num_workers, progress).
    """
    import tempfile

    files = [str(q) for q in queries if str(q).endswith(".parquet")]
    images = [str(q) for q in queries if not str(q).endswith(".parquet")]
    tables = []
    for f in files:
        t = read_features(f, feature=index.feature)
        index.check_compatible(t.metadata, source=f)
        tables.append(t)
    if images:
        with tempfile.TemporaryDirectory(prefix="internvit-search-") as tmp:
            out = Path(tmp) / "queries.parquet"
            _encode_like(index, images, out, **extract_options)
            t = read_features(out, feature=index.feature)
            if t.skipped:
                import pyarrow.parquet as pq

                errors = [e for e in pq.read_table(out, columns=["error"]).column("error").to_pylist() if e]
                raise ValueError(f"{len(errors)} query image(s) could not be encoded, e.g. {errors[0]}")
            index.check_compatible(t.metadata, source=f"the query images encoded with {index.metadata.get('model')}")
            tables.append(t)
    if not tables:
        raise ValueError("no queries given")
    paths = [p for t in tables for p in t.paths]
    vectors = np.concatenate([t.vectors for t in tables]) if len(tables) > 1 else tables[0].vectors
    return FeatureTable(paths, vectors, index.feature, index.metadata, sum(t.skipped for t in tables),
                        [s for t in tables for s in t.sources])


def _encode_like(index: Index, images: list[str], out: Path, **options) -> None:
    """Run `internvit.extract_features` on `images` with the model and settings the index's features came from."""
    meta = index.metadata
    model = meta.get("model")
    if not model or model == "in-memory model":
        raise ValueError(f"index {index.folder}: its features do not name a model that can be loaded "
                         f"({model!r}); query with rows of a feature file instead")
    # Only the pooled columns are searched: patch and visual tokens are not extracted for queries.
    layers = sorted({int(c.split("_l", 1)[1]) for c in feature_columns(index.feature) if "_l" in c})
    options.setdefault("progress", False)
    # The backend and precision the features were computed with: an export folder runs in its own (int8 included).
    precision = meta.get("compute_precision", "bf16")
    options.setdefault("backend", meta.get("backend"))
    options.setdefault("decode", meta.get("decode", "exact"))
    extract_features(images, out, model=model, dtype=precision if precision in ("fp32", "bf16", "fp16") else None,
                     tiles=meta.get("tiles", "none"), max_tiles=meta.get("max_tiles") or 12,
                     frames=meta.get("frames", 8), layers=layers, exif_transpose=meta.get("exif_transpose", True),
                     **options)


def search(index_dir: str | os.PathLike, queries, *, k: int = 10, **extract_options):
    """Search an index folder: the `k` nearest indexed items of every query, as a pyarrow Table with columns
    `query` (the query's path), `rank` (0 = nearest), `path` and `score` (cosine similarity).

    Args:
        index_dir: a folder written by `build_index`.
        queries: images (encoded with the index's own model and settings) and/or `.parquet` feature files whose
            rows are the queries.
        k: neighbours per query.
        extract_options: for `extract_features` when images are encoded (device, batch_size, num_workers).
    """
    import pyarrow as pa

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    index = Index(index_dir)
    q = query_features(index, queries, **extract_options)
    scores, ids = index.search(q.vectors, k)
    rows_q, rows_rank, rows_path, rows_score = [], [], [], []
    for qi, path in enumerate(q.paths):
        for rank, (s, i) in enumerate(zip(scores[qi], ids[qi])):
            if i < 0:
                break
            rows_q.append(path)
            rows_rank.append(rank)
            rows_path.append(index.paths[i])
            rows_score.append(float(s))
    return pa.table({"query": pa.array(rows_q, pa.string()), "rank": pa.array(rows_rank, pa.int32()),
                     "path": pa.array(rows_path, pa.string()), "score": pa.array(rows_score, pa.float32())})


def dedup(files, *, threshold: float = 0.95, feature: str = "cls", neighbors: int = 32,
          exact_max_rows: int = DEDUP_EXACT_MAX_ROWS):
    """Pairs of near-duplicate items: cosine similarity >= `threshold`, highest first.

    Up to `exact_max_rows` vectors every pair is compared (blocked products: the threshold decides, nothing is
    missed); beyond, each vector's `neighbors` nearest from an HNSW index are the candidates, so a group of
    more than `neighbors` copies reports only part of its pairs.

    Returns:
        A pyarrow Table with columns `path_a`, `path_b`, `score`, each pair once (path_a's row comes first in the
        input), sorted by score descending.
    """
    import pyarrow as pa

    table = read_features(files, feature=feature)
    x = normalize(table.vectors)
    n = len(x)
    a_idx: list[np.ndarray] = []
    b_idx: list[np.ndarray] = []
    sc: list[np.ndarray] = []
    if n <= exact_max_rows:
        rb, cb = DEDUP_BLOCK  # one [rb, cb] block of scores at a time, upper triangle only
        with torch.inference_mode():
            xt = torch.from_numpy(x)
            for i0 in range(0, n, rb):
                for j0 in range(i0, n, cb):
                    s = (xt[i0:i0 + rb] @ xt[j0:j0 + cb].T).numpy()
                    ii, jj = np.nonzero(s >= threshold)
                    keep = jj + j0 > ii + i0  # each pair once, never an item with itself
                    a_idx.append(ii[keep] + i0)
                    b_idx.append(jj[keep] + j0)
                    sc.append(s[ii[keep], jj[keep]])
    else:
        ann = build_ann(x, HNSWParams(ef_search=max(HNSWParams.ef_search, 2 * neighbors)))
        for q0 in range(0, n, 16384):
            s, ids = ann.search(x[q0:q0 + 16384], neighbors + 1)
            qi = np.repeat(np.arange(q0, q0 + len(s)), s.shape[1]).reshape(s.shape)
            keep = (s >= threshold) & (ids >= 0) & (ids != qi)
            lo, hi = np.minimum(qi[keep], ids[keep]), np.maximum(qi[keep], ids[keep])
            a_idx.append(lo)
            b_idx.append(hi)
            sc.append(s[keep])
    a = np.concatenate(a_idx) if a_idx else np.zeros(0, np.int64)
    b = np.concatenate(b_idx) if b_idx else np.zeros(0, np.int64)
    s = np.concatenate(sc) if sc else np.zeros(0, np.float32)
    if n > exact_max_rows and len(a):  # a pair found from both ends appears twice
        _, first = np.unique(a * n + b, return_index=True)
        a, b, s = a[first], b[first], s[first]
    order = np.lexsort((b, a, -s))
    paths = np.array(table.paths, dtype=object)
    return pa.table({"path_a": pa.array(paths[a[order]].tolist(), pa.string()),
                     "path_b": pa.array(paths[b[order]].tolist(), pa.string()),
                     "score": pa.array(s[order], pa.float32())})
