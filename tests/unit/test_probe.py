"""The k-NN and linear probes against computations written here (numpy) and scikit-learn's LogisticRegression.

Feature files are written by the test with pyarrow in the layout `internvit extract` writes (path, error, cls,
mean; the `internvit` metadata), including error rows that the probes must skip.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from internvit.probe import fit_logistic, knn_scores, linear_probe_fit, probe

pytestmark = pytest.mark.unit

META = {"model": "test-model", "dtype": "float32", "tiles": "none", "max_tiles": None, "frames": 8,
        "preprocess": {"size": 448}, "hidden_size": 16, "layers": []}


def write_features(path, paths, cls, *, errors=(), meta=META, mean=None):
    """A feature file as `extract` writes it; `errors` adds rows with an error and null features."""
    C = cls.shape[1]
    n_err = len(errors)
    valid = np.r_[np.ones(len(paths), bool), np.zeros(n_err, bool)]
    flat_cls = np.concatenate([cls, np.zeros((n_err, C), np.float32)]).astype(np.float32).reshape(-1)
    mean = cls * 0.5 + 1 if mean is None else mean
    flat_mean = np.concatenate([mean, np.zeros((n_err, C), np.float32)]).astype(np.float32).reshape(-1)
    table = pa.table({
        "path": pa.array(list(paths) + list(errors), pa.string()),
        "error": pa.array([None] * len(paths) + [f"{e}: broken" for e in errors], pa.string()),
        "cls": pa.FixedSizeListArray.from_arrays(pa.array(flat_cls), C, mask=pa.array(~valid)),
        "mean": pa.FixedSizeListArray.from_arrays(pa.array(flat_mean), C, mask=pa.array(~valid)),
        "label": pa.array([p.split("/")[-2] for p in paths] + [None] * n_err, pa.string()),
    })
    table = table.replace_schema_metadata({b"internvit": json.dumps(meta).encode()})
    pq.write_table(table, path)
    return path


def labelled_set(n, classes, dim, seed, spread=1.6):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).standard_normal((classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = centers[y] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32), y


def reference_knn(train, y_train, queries, k, T, K):
    """DINOv2's weighted vote, written out: cosine, the max-k neighbours, softmax(s/T), sum of the first k."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.T.astype(np.float64)
    out = {}
    max_k = max(k)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :max_k]
    top = np.take_along_axis(sims, order, 1)
    w = np.exp((top - top[:, :1]) / T)
    w /= w.sum(1, keepdims=True)
    for kk in k:
        votes = np.zeros((len(queries), K))
        for q in range(len(queries)):
            for j in range(kk):
                votes[q, y_train[order[q, j]]] += w[q, j]
        out[kk] = votes
    return out


def test_knn_scores_equal_reference():
    train, y = labelled_set(400, 6, 16, seed=1)
    queries, _ = labelled_set(60, 6, 16, seed=2)
    ks = (10, 20, 100, 200)
    ours = knn_scores(train, y, queries, 6, ks=ks, temperature=0.07, query_block=16)
    ref = reference_knn(train, y, queries, ks, 0.07, 6)
    for k in ks:
        np.testing.assert_allclose(ours[k], ref[k], atol=2e-4)
        assert (ours[k].argmax(1) == ref[k].argmax(1)).all()


def test_knn_probe_from_files(tmp_path):
    train, y_train = labelled_set(300, 4, 16, seed=3)
    ev, y_eval = labelled_set(80, 4, 16, seed=4)
    names = [f"/data/c{c}/img{i}.jpg" for i, c in enumerate(y_train)]
    enames = [f"/val/c{c}/img{i}.jpg" for i, c in enumerate(y_eval)]
    ftrain = write_features(tmp_path / "train.parquet", names, train, errors=["/data/c0/bad.jpg"])
    feval = write_features(tmp_path / "eval.parquet", enames, ev, errors=["/val/c1/x.jpg", "/val/c2/y.jpg"])
    report = probe("knn", ftrain, feval, out=tmp_path / "rep")
    ref = reference_knn(train, y_train, ev, (10, 20, 100, 200), 0.07, 4)
    for k in (10, 20, 100, 200):
        top = np.argsort(-ref[k], axis=1, kind="stable")
        assert report.results[f"k={k}"]["top1"] == pytest.approx(np.mean(top[:, 0] == y_eval))
        assert report.results[f"k={k}"]["top5"] == pytest.approx(1.0)  # 4 classes: always in the top 5
    assert (report.train["skipped"], report.eval["skipped"]) == (1, 2)
    pred20 = ref[20].argmax(1)
    for c in range(4):
        assert report.per_class[f"c{c}"]["accuracy"] == pytest.approx(np.mean(pred20[y_eval == c] == c))
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["results"] == report.results and saved["headline"] == "k=20"
    assert (tmp_path / "rep" / "confusion.png").stat().st_size > 1000


def test_logistic_equals_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = labelled_set(500, 5, 12, seed=5, spread=2.5)
    z = (x - x.mean(0)) / x.std(0)
    for C in (0.01, 1.0):
        coef, bias = fit_logistic(z.astype(np.float32), y, 5, C, max_iter=500, tol=1e-7)
        ref = sklearn.LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(z, y)
        p_ours = np.exp(z @ coef.T + bias)
        p_ours /= p_ours.sum(1, keepdims=True)
        # float32 optimisation (ours) vs float64 (sklearn): both reach the optimum to ~1e-7 in the objective,
        # i.e. ~5e-4 in the probabilities; C x 1.5 moves them by 7e-3 (C = 1) to 9e-2 (C = 0.01).
        np.testing.assert_allclose(p_ours, ref.predict_proba(z), atol=2e-3)
        assert (p_ours.argmax(1) == ref.predict(z)).all()


def test_linear_probe_picks_c_on_held_out_train_and_matches_sklearn(tmp_path):
    sklearn = pytest.importorskip("sklearn.linear_model")
    train, y_train = labelled_set(600, 5, 16, seed=6, spread=2.5)
    ev, y_eval = labelled_set(150, 5, 16, seed=7, spread=2.5)
    grid = (1e-3, 1e-2, 1e-1, 1.0)
    model, search = linear_probe_fit(train.copy(), y_train, 5, c_grid=grid, max_iter=500)
    assert search["held_out_rows"] == 60 and set(search["held_out_top1"]) == {repr(c) for c in grid}
    best = max(search["held_out_top1"].values())
    assert search["held_out_top1"][repr(model.C)] == best  # the chosen C is the best on the held-out rows
    assert min(grid, key=lambda c: (-search["held_out_top1"][repr(c)], c)) == model.C  # first best on the path
    mean, std = train.mean(0), train.std(0)  # the test's own standardisation
    ref = sklearn.LogisticRegression(C=model.C, tol=1e-10, max_iter=5000).fit((train - mean) / std, y_train)
    ref_pred = ref.predict((ev - mean) / std)
    names = [f"/d/c{c}/{i}.jpg" for i, c in enumerate(y_train)]
    enames = [f"/e/c{c}/{i}.jpg" for i, c in enumerate(y_eval)]
    ftrain = write_features(tmp_path / "t.parquet", names, train)
    feval = write_features(tmp_path / "e.parquet", enames, ev)
    report = probe("linear", ftrain, feval, labels="label", c_grid=grid, max_iter=500)
    assert report.details["C"] == model.C
    assert report.results["linear"]["top1"] == pytest.approx(np.mean(ref_pred == y_eval), abs=1 / 150)


def test_probe_refuses_mixed_models_and_missing_columns(tmp_path):
    x, y = labelled_set(40, 2, 16, seed=8)
    names = [f"/d/c{c}/{i}.jpg" for i, c in enumerate(y)]
    a = write_features(tmp_path / "a.parquet", names, x)
    b = write_features(tmp_path / "b.parquet", names, x, meta={**META, "model": "other-model"})
    with pytest.raises(ValueError, match="other-model"):
        probe("knn", a, b)
    with pytest.raises(ValueError, match="no column 'cls_l3'"):
        probe("knn", a, a, feature="cls_l3")
    with pytest.raises(ValueError, match="no column 'species'"):
        probe("knn", a, a, labels="species")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        probe("knn", tmp_path / "missing.parquet", a)


def test_cls_plus_mean_concatenates(tmp_path):
    from internvit.feature_table import read_features

    x, y = labelled_set(10, 2, 16, seed=9)
    f = write_features(tmp_path / "a.parquet", [f"/d/c{c}/{i}.jpg" for i, c in enumerate(y)], x, errors=["/d/x"])
    t = read_features(f, feature="cls+mean")
    np.testing.assert_array_equal(t.vectors, np.concatenate([x, x * 0.5 + 1], 1))
    assert t.skipped == 1 and len(t) == 10
