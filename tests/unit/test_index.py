"""Exact search against a brute-force argsort, the ANN index's recall, model checks, dedup on planted pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from internvit.index import Index, build_index, dedup, search, top_k

sys.path.insert(0, str(Path(__file__).parent))
from test_probe import META, write_features  # noqa: E402

pytestmark = pytest.mark.unit


def brute_force(queries, database, k):
    """Cosine similarities of every pair, sorted with numpy."""
    a = database / np.linalg.norm(database, axis=1, keepdims=True)
    b = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def clustered(n, dim, seed, clusters=50):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).standard_normal((clusters, dim)).astype(np.float32)
    return (centers[rng.integers(0, clusters, n)] + 0.8 * rng.standard_normal((n, dim))).astype(np.float32)


def test_top_k_blocks_equal_argsort():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((1000, 24)).astype(np.float32)
    q = rng.standard_normal((37, 24)).astype(np.float32)
    dbn, qn = db / np.linalg.norm(db, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    scores, ids = top_k(qn, dbn, 15, query_block=8, row_block=100)  # many blocks of both
    ref_s, ref_i = brute_force(q, db, 15)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    # the database as its own queries, without self-matches
    s2, i2 = top_k(dbn[:50], dbn[:50], 5, query_block=7, row_block=9, exclude_self=True)
    sims = dbn[:50].astype(np.float64) @ dbn[:50].T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_array_equal(i2, np.argsort(-sims, axis=1, kind="stable")[:, :5])


def test_exact_index_search_equals_brute_force(tmp_path):
    db = clustered(3000, 16, seed=1)
    q = clustered(20, 16, seed=2)
    paths = [f"/img/{i:05d}.jpg" for i in range(len(db))]
    f = write_features(tmp_path / "db.parquet", paths, db, errors=["/img/broken.jpg"])
    fq = write_features(tmp_path / "q.parquet", [f"/q/{i}.jpg" for i in range(20)], q)
    info = build_index([f], tmp_path / "idx", kind="auto")
    assert (info.kind, info.count, info.skipped) == ("exact", 3000, 1)
    table = search(tmp_path / "idx", [fq], k=10)
    assert table.column_names == ["query", "rank", "path", "score"] and table.num_rows == 200
    ref_s, ref_i = brute_force(q, db, 10)
    got = table.to_pydict()
    assert got["path"] == [paths[i] for i in ref_i.reshape(-1)]
    assert got["rank"] == list(range(10)) * 20
    np.testing.assert_allclose(got["score"], ref_s.reshape(-1), atol=1e-5)


def test_ann_recall_at_10(tmp_path):
    pytest.importorskip("faiss")
    db = clustered(20000, 32, seed=3, clusters=200)
    q = clustered(200, 32, seed=4, clusters=200)
    f = write_features(tmp_path / "db.parquet", [f"/i/{i}" for i in range(len(db))], db)
    info = build_index([f], tmp_path / "ann", kind="ann")
    assert info.kind == "ann"
    index = Index(tmp_path / "ann")
    _, ids = index.search(q, 10)
    _, ref = brute_force(q, db, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
    assert recall >= 0.95, recall
    manifest = json.loads((tmp_path / "ann" / "index.json").read_text())
    assert manifest["ann"]["library"] == "faiss" and manifest["metadata"]["model"] == META["model"]


def test_search_refuses_features_of_another_model(tmp_path):
    db = clustered(100, 16, seed=5)
    f = write_features(tmp_path / "db.parquet", [f"/i/{i}" for i in range(100)], db,
                       meta={**META, "weights_fingerprint": "sha256:aaa"})
    build_index([f], tmp_path / "idx")
    other = write_features(tmp_path / "o.parquet", ["/q/0"], db[:1],
                           meta={**META, "weights_fingerprint": "sha256:bbb"})
    with pytest.raises(ValueError, match="weights_fingerprint 'sha256:aaa' vs 'sha256:bbb'"):
        search(tmp_path / "idx", [other])
    bf16 = write_features(tmp_path / "b.parquet", ["/q/0"], db[:1],
                          meta={**META, "dtype": "bfloat16", "weights_fingerprint": "sha256:aaa"})
    with pytest.raises(ValueError, match="compute_precision 'fp32' vs 'bf16'"):  # from files' old `dtype`
        search(tmp_path / "idx", [bf16])
    # the same weights under another path are the same model
    moved = write_features(tmp_path / "m.parquet", ["/q/0"], db[:1],
                           meta={**META, "model": "/elsewhere/ckpt", "weights_fingerprint": "sha256:aaa"})
    assert search(tmp_path / "idx", [moved], k=1).column("path").to_pylist() == ["/i/0"]
    # no fingerprint on one side: the model strings decide
    plain = write_features(tmp_path / "p.parquet", ["/q/0"], db[:1], meta={**META, "model": "another"})
    with pytest.raises(ValueError, match="model 'test-model' vs 'another'"):
        search(tmp_path / "idx", [plain])
    with pytest.raises(FileNotFoundError, match="not an index folder"):
        search(tmp_path / "nothing", [moved])


@pytest.mark.parametrize("exact_max_rows", [10**9, 0], ids=["all-pairs", "ann-neighbours"])
def test_dedup_finds_planted_pairs_first(tmp_path, exact_max_rows, monkeypatch):
    if exact_max_rows == 0:
        pytest.importorskip("faiss")
    monkeypatch.setattr("internvit.index.DEDUP_BLOCK", (300, 700))  # many row and column blocks
    x = clustered(2000, 32, seed=6, clusters=40)
    rng = np.random.default_rng(7)
    planted = [(5, 1500), (77, 900), (1234, 1999)]
    for a, b in planted:
        x[b] = x[a] + 0.01 * rng.standard_normal(32).astype(np.float32)
    paths = [f"/p/{i:04d}.jpg" for i in range(len(x))]
    f = write_features(tmp_path / "f.parquet", paths, x)
    pairs = dedup(f, threshold=0.99, exact_max_rows=exact_max_rows)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn.astype(np.float64) @ xn.T
    iu = np.triu_indices(len(x), 1)
    expected = {(paths[a], paths[b]) for a, b in zip(*iu) if sims[a, b] >= 0.99}
    assert {(paths[a], paths[b]) for a, b in planted} <= expected
    got = list(zip(pairs.column("path_a").to_pylist(), pairs.column("path_b").to_pylist()))
    assert set(got) == expected and len(got) == len(expected)
    scores = pairs.column("score").to_numpy()
    assert (np.diff(scores) <= 0).all()
    pq.write_table(pairs, tmp_path / "pairs.parquet")
