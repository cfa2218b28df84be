"""The overlapped extraction pipeline (extract/pipeline.py) on a CPU, checked by its structure, never by timing.

An encoder that waits for a later stage proves the stages run at the same time: in a serial pipeline it would wait
for ever (here: until its timeout, which the test then reports). Also: tiles of many inputs fill each forward,
the tiles in flight stay bounded while the encoder is stuck, and `--decode` is recorded and not mixed on resume.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import internvit
from internvit.extract import extract_features
from internvit.extract import core, pipeline
from internvit.extract.local import LOADER_INPUTS
from internvit.extract.store import FeatureStore, OutputMismatchError, read_metadata

pytestmark = pytest.mark.unit

WAIT = 60.0  # seconds a stage waits for another before the test calls the pipeline serial


@pytest.fixture
def many_images(tmp_path: Path, photo_dir: Path) -> Path:
    root = tmp_path / "many"
    root.mkdir()
    photo = Image.open(photo_dir / "astronaut.jpg").resize((96, 72))
    for i in range(16):
        photo.rotate(i * 20).save(root / f"img{i:02d}.jpg")
    return root


def _encoder(tiny_ckpt, hook):
    """The tiny model whose forward first calls `hook(batch number, tiles)`."""
    vit = internvit.from_pretrained(str(tiny_ckpt), dtype="fp32")
    forward, calls = vit.forward_intermediates, []

    def wrapped(pixels, indices):
        calls.append(pixels.shape[0])
        hook(len(calls) - 1, pixels.shape[0])
        return forward(pixels, indices)

    vit.forward_intermediates = wrapped
    return vit, calls


def _count_prepared(monkeypatch) -> list[str]:
    prepared: list[str] = []
    call = core.Prepare.__call__

    def counting(self, path, data=None):
        prepared.append(path)
        return call(self, path, data)

    monkeypatch.setattr(core.Prepare, "__call__", counting)
    return prepared


def test_loading_encoding_and_writing_overlap(tiny_ckpt, many_images, tmp_path, monkeypatch):
    """Batch 0's forward waits until inputs of a later loader task are prepared, and the writing of batch 0 waits
    until the forward of batch 2 has started: both can only happen when the stages run at the same time."""
    prepared = _count_prepared(monkeypatch)
    serial: list[str] = []
    forward_started = [threading.Event() for _ in range(8)]
    written = threading.Event()

    def hook(batch, tiles):
        forward_started[batch].set()
        if batch == 0 and not _wait_for(lambda: len(prepared) > LOADER_INPUTS):  # past batch 0's loader task
            serial.append("the encoder waited for the loader")

    add = FeatureStore.add

    def slow_add(self, rows):
        if not written.is_set() and not forward_started[2].wait(WAIT):
            serial.append("the writer waited for the encoder")
        written.set()
        add(self, rows)

    monkeypatch.setattr(FeatureStore, "add", slow_add)
    vit, calls = _encoder(tiny_ckpt, hook)
    s = extract_features([many_images], tmp_path / "f.parquet", model=vit, batch_size=2, num_workers=0,
                         progress=False)
    assert serial == []
    assert s.processed == 16 and s.failed == 0 and calls == [2] * 8


def test_tiles_of_many_inputs_fill_each_forward(tiny_ckpt, photo_dir, tmp_path):
    vit, calls = _encoder(tiny_ckpt, lambda batch, tiles: None)
    s = extract_features([photo_dir], tmp_path / "f.parquet", model=vit, batch_size=5, tiles="dynamic",
                         max_tiles=4, num_workers=0, progress=False)
    table = pq.read_table(tmp_path / "f.parquet")
    assert sum(calls) == s.tiles == sum(table.column("num_tiles").to_pylist())
    assert calls[:-1] == [5] * (len(calls) - 1) and 0 < calls[-1] <= 5  # full forwards, whatever the inputs


def test_tiles_in_flight_stay_bounded(tiny_ckpt, many_images, tmp_path, monkeypatch):
    """With the encoder stuck in its first forward, the loader stops after a fixed number of inputs."""
    prepared = _count_prepared(monkeypatch)
    seen: list[int] = []

    def hook(batch, tiles):
        if batch == 0:
            last, since = -1, time.monotonic()
            while time.monotonic() - since < 1.0:  # until the loader has stopped for a second
                if len(prepared) != last:
                    last, since = len(prepared), time.monotonic()
                time.sleep(0.02)
            seen.append(len(prepared))

    vit, _ = _encoder(tiny_ckpt, hook)
    extract_features([many_images], tmp_path / "f.parquet", model=vit, batch_size=1, num_workers=0, progress=False)
    # one batch being encoded, QUEUE_DEPTH waiting, one being filled, and the rest of the loader task being packed
    assert seen and seen[0] <= (pipeline.QUEUE_DEPTH + 2) * 1 + LOADER_INPUTS


def test_decode_fast_is_recorded_and_not_mixed_on_resume(tiny_ckpt, photo_dir, tmp_path):
    out = tmp_path / "f.parquet"
    big = tmp_path / "big"
    big.mkdir()
    Image.open(photo_dir / "chelsea.jpg").resize((1800, 1200)).save(big / "cat.jpg", quality=90)
    extract_features([big], out, model=str(tiny_ckpt), dtype="fp32", decode="fast", num_workers=0, progress=False)
    assert read_metadata(pq.read_schema(out))["decode"] == "fast"
    row = pq.read_table(out).to_pylist()[0]
    assert (row["width"], row["height"]) == (1800, 1200)  # the full size, though decoded at 1/2 scale
    exact = tmp_path / "e.parquet"
    extract_features([big], exact, model=str(tiny_ckpt), dtype="fp32", num_workers=0, progress=False)
    cls = np.array(pq.read_table(exact).to_pylist()[0]["cls"])
    assert 0.99 < np.dot(cls, row["cls"]) / np.linalg.norm(cls) / np.linalg.norm(row["cls"]) < 1.0
    (big / "more.jpg").write_bytes((big / "cat.jpg").read_bytes())
    with pytest.raises(OutputMismatchError, match="decode: file has 'fast', this run 'exact'"):
        extract_features([big], out, model=str(tiny_ckpt), dtype="fp32", num_workers=0, progress=False)


def _wait_for(condition, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_an_encoder_error_stops_the_run_and_keeps_finished_rows(tiny_ckpt, many_images, tmp_path):
    def hook(batch, tiles):
        if batch == 3:
            raise RuntimeError("CUDA error: an illegal memory access")

    vit, _ = _encoder(tiny_ckpt, hook)
    out = tmp_path / "f.parquet"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        extract_features([many_images], out, model=vit, batch_size=2, num_workers=0, flush_seconds=0,
                         progress=False)
    assert 0 < pq.read_table(out).num_rows <= 6  # batches 0-2 at most, consolidated; a rerun resumes


def test_normalization_equals_transformers_rescale_and_normalize():
    """Every uint8 value, each channel: transformers' float64 rescale then float32 normalize, bit for bit."""
    transforms = pytest.importorskip("transformers.image_transforms")
    import torch

    from internvit.preprocess import IMAGENET_MEAN, IMAGENET_STD, Normalization

    pixels_HWC = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1)[None]  # [1, 256, 3]
    want = transforms.normalize(transforms.rescale(pixels_HWC, 1 / 255, dtype=np.float32), IMAGENET_MEAN,
                                IMAGENET_STD, input_data_format="channels_last")
    for scale in (1 / 255, 1 / 127.5):  # the fast path, and the general one
        got = Normalization(scale, IMAGENET_MEAN, IMAGENET_STD)(torch.from_numpy(pixels_HWC).permute(2, 0, 1))
        ref = want if scale == 1 / 255 else transforms.normalize(
            transforms.rescale(pixels_HWC, scale, dtype=np.float32), IMAGENET_MEAN, IMAGENET_STD,
            input_data_format="channels_last")
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), ref)
