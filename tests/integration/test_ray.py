"""The Ray engine (`internvit extract --engine ray`) against the local engine, on a local Ray instance on loopback.

One Ray instance serves the module (2 CPUs, whatever the machine, so the actor pool is sized as on the smallest
machines, where actors that took whole CPUs would starve the read tasks). The first CLI run and the interrupted
run are separate drivers that join it with `--address`; the resumed run is the CLI's default, its own instance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Ray turns 127.0.0.1 into the machine's address unless this is "0"; it is read when `ray` is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from helpers import PHOTOS  # noqa: E402
from PIL import Image  # noqa: E402

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

CLI = [sys.executable, "-m", "internvit.cli"]


@pytest.fixture(scope="module")
def ray_address():
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # loopback only
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def photo_dir(messy_dir) -> Path:
    """The photographs with every kind of bad file among them (conftest.messy_dir)."""
    return messy_dir[0]


def rows_by_path(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    assert len({r["path"] for r in rows}) == len(rows), "a path has two rows"
    return {r["path"]: r for r in rows}


def assert_same_rows(ray_rows: dict[str, dict], local_rows: dict[str, dict]) -> None:
    assert set(ray_rows) == set(local_rows)
    for path, want in local_rows.items():
        got = ray_rows[path]
        for key, value in want.items():
            if key.startswith(("cls", "mean")) and value is not None:
                np.testing.assert_allclose(got[key], value, atol=1e-5, rtol=0, err_msg=f"{path} {key}")
            else:
                assert got[key] == value, (path, key)


def test_ray_engine_equals_local_engine(ray_address, tiny_ckpt, photo_dir, tmp_path):
    from internvit.extract import extract_features
    from internvit.extract.ray import extract_features_ray

    listing = tmp_path / "more.txt"
    listing.write_text(f"# a list file\n{photo_dir / 'missing.jpg'}\n{photo_dir / 'coffee.jpg'}\n")  # a duplicate
    common = ["--model", str(tiny_ckpt), "--dtype", "fp32", "--batch-size", "3", "--max-pixels", "1000000",
              "--layers", "1", "--quiet"]
    local_out = tmp_path / "local.parquet"
    local = extract_features([photo_dir, listing], local_out, model=str(tiny_ckpt), dtype="fp32", batch_size=3,
                             num_workers=0, max_pixels=1_000_000, layers=(1,), progress=False)
    assert local.failed == 5  # empty, notes, truncated, huge, missing

    # The CLI, as a second driver on the test's Ray instance.
    ray_out = tmp_path / "ray_out"
    proc = subprocess.run(CLI + ["extract", str(photo_dir), str(listing), "--out", str(ray_out), "--engine", "ray",
                                 "--address", ray_address] + common,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # some inputs failed, as with the local engine
    assert "10 inputs, 10 processed, 0 already done, 5 failed" in proc.stderr, proc.stderr
    shards = sorted(ray_out.glob("part-*.parquet"))
    assert shards and all(pq.read_schema(s) == pq.read_schema(local_out) for s in shards)  # metadata included
    ray_table = pq.read_table(ray_out)
    assert ray_table.schema.equals(pq.read_schema(local_out), check_metadata=True)
    assert_same_rows(rows_by_path(ray_table), rows_by_path(pq.read_table(local_out)))

    # Parquet tables: image bytes under a path name (a bad one included), or paths only; `--out` resumes.
    names = {f"mem/{n}.jpg": (photo_dir / f"{n}.jpg").read_bytes() for n in PHOTOS[:2]}
    names["mem/broken.jpg"] = b"not an image"
    table_file = tmp_path / "inputs.parquet"
    pq.write_table(pa.table({"path": list(names) + [str(photo_dir / "rocket.jpg")],
                             "bytes": list(names.values()) + [None]}), table_file)
    s = extract_features_ray([table_file], ray_out, model=str(tiny_ckpt), dtype="fp32", batch_size=3,
                             max_pixels=1_000_000, layers=(1,), progress=False)
    assert (s.inputs, s.skipped, s.processed, s.failed) == (4, 1, 3, 6)
    rows = rows_by_path(pq.read_table(ray_out))
    local_rows = rows_by_path(pq.read_table(local_out))
    for n in PHOTOS[:2]:
        want = dict(local_rows[str(photo_dir / f"{n}.jpg")], path=f"mem/{n}.jpg")
        assert_same_rows({want["path"]: rows[want["path"]]}, {want["path"]: want})
    assert rows["mem/broken.jpg"]["error"].startswith("mem/broken.jpg: ")
    assert "not an image" in rows["mem/broken.jpg"]["error"]

    # A WebDataset shard named by a file:// URI and a brace range (read through pyarrow, as s3:// would be).
    import io
    import tarfile

    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for name, data in [(f"{n}.jpg", names[f"mem/{n}.jpg"]) for n in PHOTOS[:2]] + [("bad.jpg", b"garbage")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    s = extract_features_ray([f"file://{tmp_path}/shard-{{0..0}}.tar"], ray_out, model=str(tiny_ckpt), dtype="fp32",
                             batch_size=3, max_pixels=1_000_000, layers=(1,), progress=False)
    assert (s.inputs, s.processed) == (3, 3)
    rows = rows_by_path(pq.read_table(ray_out))
    for n in PHOTOS[:2]:
        path = f"file://{tmp_path}/shard-0.tar/{n}.jpg"
        assert_same_rows({path: rows[path]}, {path: dict(local_rows[str(photo_dir / f"{n}.jpg")], path=path)})
    assert "not an image" in rows[f"file://{tmp_path}/shard-0.tar/bad.jpg"]["error"]


def test_interrupted_run_resumes_each_input_once(ray_address, tiny_ckpt, photo_dir, tmp_path):
    from internvit.extract.ray import extract_features_ray

    src = Image.open(photo_dir / "astronaut.jpg").resize((1200, 900))
    imgs = tmp_path / "many"
    imgs.mkdir()
    n = 60
    for i in range(n):
        src.save(imgs / f"img{i:03d}.jpg", quality=85)
    out = tmp_path / "out"
    code = (
        "from internvit.extract.ray import extract_features_ray\n"
        f"extract_features_ray([{str(imgs)!r}], {str(out)!r}, model={str(tiny_ckpt)!r}, dtype='fp32', "
        f"batch_size=2, rows_per_shard=4, progress=False, address={ray_address!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(out.glob("part-*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{stderr.decode()[-3000:]}"

    saved = [p for s in out.glob("part-*.parquet") for p in pq.read_table(s, columns=["path"])["path"].to_pylist()]
    assert 0 < len(saved) < n, len(saved)

    # The rerun as a user types it: the CLI with no --address starts (and stops) its own instance, on loopback.
    proc = subprocess.run(CLI + ["extract", str(imgs), "--out", str(out), "--engine", "ray", "--model",
                                 str(tiny_ckpt), "--dtype", "fp32", "--batch-size", "2", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    skipped = int(proc.stderr.split(" already done")[0].rsplit(" ", 1)[1])
    assert skipped >= len(saved) and f"{n} inputs, {n - skipped} processed" in proc.stderr, proc.stderr
    paths = pq.read_table(out, columns=["path"])["path"].to_pylist()
    assert sorted(paths) == sorted(str(p) for p in imgs.iterdir())  # each input exactly once

    again = extract_features_ray([imgs], out, model=str(tiny_ckpt), dtype="fp32", batch_size=2, progress=False)
    assert (again.skipped, again.processed) == (n, 0)
    assert pq.read_table(out).num_rows == n


def test_ray_engine_decodes_on_the_actors_device(ray_address, tiny_ckpt, photo_dir, tmp_path):
    """`--decode device`: the tasks hand over undecoded JPEGs, the actors decode them; rows as the local engine's."""
    pytest.importorskip("torchvision")
    from internvit.extract import extract_features
    from internvit.extract.ray import extract_features_ray

    opts = dict(model=str(tiny_ckpt), dtype="fp32", batch_size=3, max_pixels=1_000_000, tiles="dynamic", max_tiles=4,
                decode="device", progress=False)
    local = extract_features([photo_dir], tmp_path / "local.parquet", num_workers=0, **opts)
    extract_features_ray([photo_dir], tmp_path / "ray", **opts)
    table = pq.read_table(tmp_path / "ray")
    assert json.loads(table.schema.metadata[b"internvit"])["jpeg_decoder"] == "device"
    assert_same_rows(rows_by_path(table), rows_by_path(pq.read_table(local.out)))


def test_ray_engine_runs_an_openvino_export(ray_address, tiny_ckpt, photo_dir, tmp_path):
    """The actors load an export folder through the same `_load_encoder`; rows agree with the local torch run."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnxscript")
    from internvit.export import export
    from internvit.extract import extract_features
    from internvit.extract.ray import extract_features_ray

    exported = export(tiny_ckpt, tmp_path / "ov", format="openvino", layers=[1]).path
    opts = dict(dtype="fp32", batch_size=3, max_pixels=1_000_000, layers=(1,), tiles="dynamic", max_tiles=4,
                progress=False)
    local = extract_features([photo_dir], tmp_path / "torch.parquet", model=str(tiny_ckpt), num_workers=0, **opts)
    s = extract_features_ray([photo_dir], tmp_path / "ray_ov", model=str(exported), **opts)
    assert (s.processed, s.failed) == (local.processed, local.failed)
    table = pq.read_table(tmp_path / "ray_ov")
    meta = json.loads(table.schema.metadata[b"internvit"])
    assert (meta["backend"], meta["compute_precision"], meta["stored_dtype"]) == ("openvino", "fp32", "float32")
    ray_rows, local_rows = rows_by_path(table), rows_by_path(pq.read_table(local.out))
    assert set(ray_rows) == set(local_rows)
    for path, want in local_rows.items():
        for key in ("cls", "mean", "cls_l1", "mean_l1"):
            if want[key] is not None:
                np.testing.assert_allclose(ray_rows[path][key], want[key], atol=1e-4, rtol=0, err_msg=f"{path} {key}")
