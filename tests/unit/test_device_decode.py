"""Device decoding (preprocess/device_decode.py, `--decode device`, and `--decode fast` on CUDA), run here on the CPU.

On a CPU torchvision's `decode_jpeg` is libjpeg-turbo, as Pillow's, so these tests check everything but nvJPEG
itself: which JPEGs go to the device, the geometry (tiles, thumbnail, the CLIP crop and its zero padding) against
the exact path's Pillow tiles, the fallback to the CPU path, and an extraction end to end (errors, rows, metadata,
resume). tests/integration/test_ray.py runs it on the Ray engine, tests/integration/test_gpu.py with nvJPEG.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import PHOTOS
from PIL import Image

from internvit.extract import core, extract_features
from internvit.extract.store import OutputMismatchError, read_metadata
from internvit.preprocess import ImageProcessor, open_image
from internvit.preprocess.device_decode import DevicePlan, clip_plan, decode_tiles, device_jpeg_size
from internvit.preprocess.tiling import dynamic_tile_pixels

pytestmark = pytest.mark.unit
pytest.importorskip("torchvision")

CPU = torch.device("cpu")


def _jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92, **save)
    return buf.getvalue()


def _close(ours: torch.Tensor, pillow: torch.Tensor) -> None:
    """The same tiles up to the resize's rounding: Pillow rounds after each of its two passes, torch once."""
    assert ours.shape == pillow.shape and ours.dtype == torch.uint8
    diff = (ours.int() - pillow.int()).abs().float()
    assert diff.mean() <= 0.5, diff.mean()
    assert (diff > 2).float().mean() <= 0.01, (diff > 2).float().mean()


@pytest.mark.parametrize("name", PHOTOS)
def test_tiles_match_the_exact_paths_tiles(photo_dir, name):
    data = (photo_dir / f"{name}.jpg").read_bytes()
    image = open_image(data)
    assert device_jpeg_size(data, exif_transpose=True, max_pixels=None) == image.size
    for max_tiles in (1, 6, 12):  # one tile (no thumbnail), and grids up- and down-scaled
        pillow, layout = dynamic_tile_pixels(image, max_tiles=max_tiles)
        _close(decode_tiles([data], [DevicePlan.for_layout(layout)], CPU)[0], pillow)
    for processor in (ImageProcessor(), ImageProcessor(size=224, crop_size=224)):
        plan = clip_plan(processor, *image.size)
        _close(decode_tiles([data], [plan], CPU)[0], processor.pixels(image)[None])


def test_a_crop_larger_than_the_image_is_zero_padded_where_pillow_pads(photo_dir):
    data = (photo_dir / "coffee.jpg").read_bytes()
    processor = ImageProcessor(size=64, crop_size=112)  # 96x64 after the resize, in a 112 square
    image = open_image(data)
    ours = decode_tiles([data], [clip_plan(processor, *image.size)], CPU)[0][0]
    pillow = processor.pixels(image)
    inside = torch.zeros(112, 112, dtype=torch.bool)
    inside[24:88, 8:104] = True  # where transformers' center_crop puts the image: offsets ceil((112 - side) / 2)
    for tile in (ours, pillow):
        assert not tile[:, ~inside].any() and tile[:, inside].float().mean() > 50
    _close(ours[None], pillow[None])


def test_which_jpegs_go_to_the_device(photo_dir):
    rgb = Image.open(photo_dir / "astronaut.jpg").convert("RGB")
    base = _jpeg(rgb)
    size = dict(exif_transpose=True, max_pixels=None)
    assert device_jpeg_size(base, **size) == rgb.size
    assert device_jpeg_size(_jpeg(rgb, progressive=True), **size) == rgb.size
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    rotated = _jpeg(rgb, exif=exif)
    assert device_jpeg_size(rotated, **size) is None  # Pillow's path applies the rotation
    assert device_jpeg_size(rotated, exif_transpose=False, max_pixels=None) == rgb.size
    assert device_jpeg_size(_jpeg(rgb.convert("L")), **size) is None
    assert device_jpeg_size(_jpeg(rgb.convert("CMYK")), **size) is None
    assert device_jpeg_size(base[: len(base) // 2], **size) is None  # truncated: the CPU path names it
    assert device_jpeg_size(base + b"trailing", **size) is None
    assert device_jpeg_size(base, exif_transpose=True, max_pixels=100) is None
    png = io.BytesIO()
    rgb.save(png, "PNG")
    assert device_jpeg_size(png.getvalue(), **size) is None
    assert device_jpeg_size(b"", **size) is None


def test_a_jpeg_the_device_refuses_goes_the_cpu_path(photo_dir, monkeypatch):
    """nvJPEG refuses some JPEGs libjpeg reads; a batch then fails whole, and each JPEG is retried alone."""
    calls = []

    def refusing(jpegs, plans, device):
        calls.append(len(jpegs))
        if any(j.endswith(b"\xff\xd9") and b"REFUSE" in j for j in jpegs):
            raise RuntimeError("nvjpeg: unsupported")
        return decode_tiles(jpegs, plans, device)

    monkeypatch.setattr(core, "decode_tiles", refusing)
    prepare = core.Prepare(ImageProcessor(), "dynamic", 6, 8, 448, True, 10**8, "device", device_decode=True)
    good = (photo_dir / "astronaut.jpg").read_bytes()
    refused = good[:-2] + b"REFUSE\xff\xd9"  # Pillow reads it (bytes after the scan are skipped)
    items = [prepare(f"{i}.jpg", data) for i, data in enumerate((good, refused, good))]
    assert all(it.jpeg is not None and it.pixels is None for it in items)
    prepare.decode_on_device(items, CPU)
    assert calls == [3, 1, 1, 1]  # the batch, then one at a time
    assert all(it.error is None and it.jpeg is None and it.num_tiles == it.layout.num_tiles for it in items)
    pillow, _ = dynamic_tile_pixels(open_image(refused), max_tiles=6)
    assert torch.equal(items[1].pixels, pillow)  # the CPU path's exact pixels


def test_extract_with_device_decoding(tiny_ckpt, messy_dir, tmp_path, monkeypatch):
    """Rows and error rows as exact decoding gives them, through loader processes; recorded; not mixed on resume."""
    root, bad = messy_dir
    decoded = []  # the packer decodes in this process

    def counting(jpegs, plans, device):
        decoded.extend(jpegs)
        return decode_tiles(jpegs, plans, device)

    monkeypatch.setattr(core, "decode_tiles", counting)
    options = dict(model=str(tiny_ckpt), dtype="fp32", tiles="dynamic", max_tiles=6, batch_size=4, max_pixels=10**6,
                   progress=False)
    rows = {}
    for decode in ("exact", "device"):
        out = tmp_path / f"{decode}.parquet"
        extract_features([root, root / "missing.jpg"], out, num_workers=1, decode=decode, **options)
        rows[decode] = {Path(r["path"]).name: r for r in pq.read_table(out).to_pylist()}
        meta = read_metadata(pq.read_schema(out))
        assert (meta["decode"], meta["jpeg_decoder"]) == (decode, "device" if decode == "device" else "pillow")
    assert sorted(decoded) == sorted((root / f"{n}.jpg").read_bytes() for n in PHOTOS)  # only the good JPEGs
    assert rows["exact"].keys() == rows["device"].keys() == {*bad, *(f"{n}.jpg" for n in PHOTOS), "camera.png"}
    for name, exact in rows["exact"].items():
        device = rows["device"][name]
        assert device["error"] == exact["error"]
        assert (name in bad) == (exact["error"] is not None)
        if exact["error"] is None:
            assert (device["num_tiles"], device["grid_cols"], device["width"]) == \
                (exact["num_tiles"], exact["grid_cols"], exact["width"])
            a, b = np.asarray(exact["cls"]), np.asarray(device["cls"])
            assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.999
    with pytest.raises(OutputMismatchError, match="decode"):
        extract_features([root], tmp_path / "device.parquet", num_workers=0, decode="exact", **options)


def test_options_name_the_modes():
    with pytest.raises(ValueError, match="exact, fast, device"):
        dataclasses.replace(core.ExtractOptions(), decode="gpu")


def test_the_packer_decodes_many_inputs_per_call(tiny_ckpt, photo_dir, tmp_path, monkeypatch):
    """The batched decoder is called with up to DECODE_BATCH inputs, not one loader task's few."""
    from internvit.extract import pipeline

    root = tmp_path / "many"
    root.mkdir()
    photo = Image.open(photo_dir / "coffee.jpg")
    for i in range(40):
        photo.rotate(i * 9).save(root / f"{i:02d}.jpg")
    calls = []

    def counting(jpegs, plans, device):
        calls.append(len(jpegs))
        return decode_tiles(jpegs, plans, device)

    monkeypatch.setattr(core, "decode_tiles", counting)
    extract_features([root], tmp_path / "f.parquet", model=str(tiny_ckpt), dtype="fp32", decode="device",
                     num_workers=0, progress=False)
    assert calls == [pipeline.DECODE_BATCH, 40 - pipeline.DECODE_BATCH]
