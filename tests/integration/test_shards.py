"""WebDataset tar shards as sources (img2dataset's layout: KEY.jpg, KEY.json, KEY.txt per sample): the same rows as
the same images in a folder, a brace range, resume per member, and error rows for a corrupt member and a truncated
shard while the run goes on."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import PHOTOS

from internvit.extract import extract_features
from internvit.sources import NoInputsError, expand_braces, find_inputs

pytestmark = pytest.mark.integration


def _write_shard(path: Path, samples: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data in samples.items():
            for name, payload in ((f"{key}.jpg", data), (f"{key}.json", json.dumps({"key": key}).encode()),
                                  (f"{key}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def shards(photo_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "shards"
    root.mkdir()
    photos = {name: (photo_dir / f"{name}.jpg").read_bytes() for name in PHOTOS}
    _write_shard(root / "shard-00000.tar", {k: photos[k] for k in PHOTOS[:2]})
    _write_shard(root / "shard-00001.tar", {k: photos[k] for k in PHOTOS[2:]})
    return root


def test_two_shards_give_the_rows_of_the_same_images_in_a_folder(tiny_ckpt, photo_dir, shards, tmp_path):
    common = dict(model=str(tiny_ckpt), dtype="fp32", batch_size=3, num_workers=1, progress=False)
    folder = tmp_path / "folder.parquet"
    extract_features([str(photo_dir / f"{name}.jpg") for name in PHOTOS], folder, **common)
    out = tmp_path / "shards.parquet"
    s = extract_features([str(shards / "shard-{00000..00001}.tar")], out, **common)
    assert (s.inputs, s.failed) == (len(PHOTOS), 0)  # the .json and .txt members are not inputs
    want = {Path(r["path"]).stem: r for r in pq.read_table(folder).to_pylist()}
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(
        f"{shards}/shard-0000{i // 2}.tar/{name}.jpg" for i, name in enumerate(PHOTOS))
    for r in rows:
        ref = want[Path(r["path"]).stem]
        assert (r["width"], r["height"]) == (ref["width"], ref["height"])
        np.testing.assert_allclose(r["cls"], ref["cls"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(r["mean"], ref["mean"], atol=1e-6, rtol=0)
    again = extract_features([str(shards / "shard-*.tar")], out, **common)  # a glob names the same members
    assert (again.skipped, again.processed) == (len(PHOTOS), 0)


def test_corrupt_member_and_truncated_shard_give_error_rows(tiny_ckpt, photo_dir, shards, tmp_path):
    good = (photo_dir / "coffee.jpg").read_bytes()
    _write_shard(shards / "bad.tar", {"garbage": b"not a jpeg at all", "fine": good})
    whole = (shards / "shard-00001.tar").read_bytes()
    (shards / "cut.tar").write_bytes(whole[:len(whole) // 3])  # ends inside the first sample's image
    out = tmp_path / "f.parquet"
    s = extract_features([str(shards / "bad.tar"), str(shards / "cut.tar")], out, model=str(tiny_ckpt),
                         dtype="fp32", num_workers=0, progress=False)
    rows = {r["path"].removeprefix(f"{shards}/"): r for r in pq.read_table(out).to_pylist()}
    assert rows["bad.tar/fine.jpg"]["error"] is None
    assert "bad.tar/garbage.jpg: not an image" in rows["bad.tar/garbage.jpg"]["error"]
    assert "truncated member" in rows[f"cut.tar/{PHOTOS[2]}.jpg"]["error"]
    assert "cut.tar: truncated or corrupt tar shard" in rows["cut.tar"]["error"]
    assert s.failed == 3 and len(rows) == 4


def test_brace_ranges_and_missing_shards():
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
    inputs = find_inputs(["/nonexistent/shard-{0..1}.tar"])  # named shards that are not there: error rows
    assert inputs.paths == ["/nonexistent/shard-0.tar", "/nonexistent/shard-1.tar"]
    assert "no such file" in inputs.errors["/nonexistent/shard-0.tar"]
    with pytest.raises(NoInputsError, match="matches no file"):
        find_inputs(["/nonexistent/*.tar"])
