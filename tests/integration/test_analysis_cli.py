"""`internvit probe`, `index`, `search`, `dedup` and `viz` as a user runs them, on features of real photos
extracted with a tiny random checkpoint, and with broken inputs (exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "internvit.cli"]
CLASSES = {"animals": ("chelsea", "coffee", "immunohistochemistry"), "scenes": ("astronaut", "rocket", "camera")}


def run_cli(*args: str, rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=300)
    if rc is not None:
        assert proc.returncode == rc, proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"internvit {command}: error: "), proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, an ImageFolder of photos with two planted near-duplicates, and its features."""
    skdata = pytest.importorskip("skimage.data")
    from internvit.weights import init_checkpoint

    root = tmp_path_factory.mktemp("analysis")
    ckpt = init_checkpoint(root / "tiny", preset="tiny", seed=3, dtype="fp32")
    photos = root / "photos"
    for label, names in CLASSES.items():
        (photos / label).mkdir(parents=True)
        for name in names:
            a = getattr(skdata, name)()
            Image.fromarray(a).convert("RGB").save(photos / label / f"{name}.jpg", quality=95)
    planted = []
    for label, name in (("scenes", "astronaut"), ("animals", "chelsea")):
        original = photos / label / f"{name}.jpg"
        im = Image.open(original)
        copy = photos / label / f"{name}_copy.jpg"
        im.resize((im.width * 3 // 5, im.height * 3 // 5), Image.Resampling.LANCZOS).save(copy, quality=70)
        planted.append({str(original), str(copy)})
    (photos / "scenes" / "broken.jpg").write_bytes(b"not a jpeg")
    features = root / "features.parquet"
    proc = run_cli("extract", photos, "--out", features, "--model", ckpt, "--dtype", "fp32", "--workers", "0",
                   "--quiet", rc=1)  # rc 1: the broken file is a row with its error
    assert "1 failed" in proc.stderr
    return {"root": root, "ckpt": ckpt, "photos": photos, "features": features, "planted": planted}


def test_probe_knn_and_linear(world, tmp_path):
    f = world["features"]
    proc = run_cli("probe", "knn", "--train", f, "--eval", f, "--out", tmp_path / "knn")
    assert "top-1" in proc.stdout and "1 error rows skipped" in proc.stderr
    report = json.loads((tmp_path / "knn" / "report.json").read_text())
    assert report["classes"] == ["animals", "scenes"] and report["train"]["skipped"] == 1
    assert set(report["results"]) == {"k=8"}  # k capped at the 8 training rows (8 of 9 rows have features)
    assert (tmp_path / "knn" / "confusion.png").stat().st_size > 1000
    run_cli("probe", "linear", "--train", f, "--eval", f, "--feature", "cls+mean", "--out", tmp_path / "lin")
    report = json.loads((tmp_path / "lin" / "report.json").read_text())
    assert report["method"] == "linear" and report["feature"] == "cls+mean" and "C" in report["details"]
    assert sum(c["count"] for c in report["per_class"].values()) == 8


def test_index_search_with_images_and_rows(world, tmp_path):
    f, photos = world["features"], world["photos"]
    run_cli("index", f, "--out", tmp_path / "idx", "--kind", "exact")
    # an image query is encoded with the index's own model and settings: it finds itself with similarity 1
    query = photos / "animals" / "coffee.jpg"
    run_cli("search", tmp_path / "idx", query, "-k", "3", "--out", tmp_path / "res.parquet")
    res = pq.read_table(tmp_path / "res.parquet")
    assert res.column_names == ["query", "rank", "path", "score"] and res.num_rows == 3
    top = res.to_pylist()[0]
    assert top["query"] == top["path"] == str(query) and top["score"] == pytest.approx(1.0, abs=1e-5)
    # rows of a feature file as queries, printed as a table
    proc = run_cli("search", tmp_path / "idx", f, "-k", "2")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 8 * 2 and all(len(line.split("\t")) == 4 for line in lines)


def test_search_encodes_queries_as_the_indexed_features_were(world, tmp_path):
    """Features of an int8 OpenVINO export (`extract --model EXPORT`: no --dtype needed, the export's own precision)
    and of a checkpoint run with `--backend openvino`: an image query is encoded the same way (backend and
    precision from the index's metadata) and finds itself with similarity 1."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    photos, query = world["photos"] / "animals", world["photos"] / "animals" / "coffee.jpg"
    run_cli("export", world["ckpt"], tmp_path / "int8", "--format", "openvino", "--precision", "int8",
            "--calibration", photos, "--force")
    for name, model in (("int8", ["--model", tmp_path / "int8"]),
                        ("openvino", ["--model", world["ckpt"], "--backend", "openvino", "--dtype", "fp32"])):
        features = tmp_path / f"{name}.parquet"
        run_cli("extract", photos, "--out", features, *model, "--workers", "0", "--quiet")
        meta = json.loads(pq.read_schema(features).metadata[b"internvit"])
        assert (meta["backend"], meta["compute_precision"]) == ("openvino", "int8" if name == "int8" else "fp32")
        run_cli("index", features, "--out", tmp_path / f"idx-{name}", "--kind", "exact")
        run_cli("search", tmp_path / f"idx-{name}", query, "-k", "1", "--out", tmp_path / f"res-{name}.parquet")
        top = pq.read_table(tmp_path / f"res-{name}.parquet").to_pylist()[0]
        assert top["path"] == str(query) and top["score"] == pytest.approx(1.0, abs=1e-5), name


def test_dedup_ranks_planted_copies_first(world, tmp_path):
    run_cli("dedup", world["features"], "--threshold", "-1", "--out", tmp_path / "pairs.parquet")
    pairs = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    assert len(pairs) == 8 * 7 // 2  # every pair at threshold -1
    top = [{p["path_a"], p["path_b"]} for p in pairs[:2]]
    assert sorted(map(sorted, top)) == sorted(map(sorted, world["planted"]))
    assert pairs[1]["score"] > pairs[2]["score"]


def test_viz_pca_and_attention(world, tmp_path):
    img = world["photos"] / "scenes" / "astronaut.jpg"
    run_cli("viz", "pca", img, "--out", tmp_path, "--model", world["ckpt"], "--tiles", "dynamic", "--layer", "1",
            "--dtype", "fp32")
    w, h = Image.open(img).size
    assert Image.open(tmp_path / "astronaut_pca.png").size == (2 * w, h)
    run_cli("viz", "attention", img, "--out", tmp_path, "--model", world["ckpt"], "--dtype", "fp32")
    assert (tmp_path / "astronaut_attention.png").is_file()


def test_broken_inputs_exit_2_with_one_line(world, tmp_path):
    f = world["features"]
    assert_one_line_error(run_cli("probe", "knn", "--train", tmp_path / "missing.parquet", "--eval", f, rc=None),
                          "probe", "missing.parquet")
    assert_one_line_error(run_cli("probe", "knn", "--train", f, "--eval", f, "--labels", "species", rc=None),
                          "probe", "no column 'species'")
    assert_one_line_error(run_cli("index", f, "--out", tmp_path / "i", "--feature", "cls_l7", rc=None),
                          "index", "no column 'cls_l7'")
    assert_one_line_error(run_cli("search", tmp_path / "nope", f, rc=None), "search", "not an index folder")
    (tmp_path / "notes.parquet").write_text("hello")
    assert_one_line_error(run_cli("dedup", tmp_path / "notes.parquet", "--out", tmp_path / "p.parquet", rc=None),
                          "dedup", "not a readable Parquet file")
    assert_one_line_error(run_cli("viz", "pca", tmp_path / "missing.jpg", "--out", tmp_path, "--model",
                                  world["ckpt"], rc=None), "viz", "missing.jpg")
    # features of another model: refused by the index
    other = tmp_path / "other.parquet"
    table = pq.read_table(f)
    meta = json.loads(table.schema.metadata[b"internvit"])
    assert meta["weights_fingerprint"].startswith("sha256:")  # extract records what the weights are
    meta["model"] = "/some/other/checkpoint"
    meta["weights_fingerprint"] = "sha256:" + "0" * 32  # other weights
    pq.write_table(table.replace_schema_metadata({b"internvit": json.dumps(meta).encode()}), other)
    run_cli("index", f, "--out", tmp_path / "idx")
    assert_one_line_error(run_cli("search", tmp_path / "idx", other, rc=None), "search", "sha256:" + "0" * 32)
