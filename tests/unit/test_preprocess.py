"""Unit tests for internvit.preprocess: robust loading, RGB conversion, the processor config, the tile transform.

The numbers of `ImageProcessor` against transformers, and of `tile_transform` against torchvision, are in
tests/parity/test_preprocess_parity.py; here every expectation is computed by hand or with Pillow/numpy.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from internvit import PRESETS, InternVisionModel
from internvit.checkpoint import save_pretrained
from internvit.preprocess import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLoadError,
    ImageProcessor,
    open_image,
    tile_transform,
    to_rgb,
    to_tensor_normalized,
)

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).parents[1] / "fixtures" / "preprocessor_config.json"


def _pixel(image: Image.Image) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return tuple(np.asarray(image)[0, 0].tolist())


def _noise(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- RGB conversion -----------------------------------------------------------------------------------------


def _palette_image(transparency: int | bytes) -> Image.Image:
    im = Image.new("P", (4, 3), 0)
    im.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    im.info["transparency"] = transparency
    return im


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (4, 3), 100), (100, 100, 100)),
        (Image.new("LA", (4, 3), (100, 0)), (100, 100, 100)),  # alpha dropped, not composited
        (Image.new("RGBA", (4, 3), (10, 20, 30, 0)), (10, 20, 30)),
        (Image.new("CMYK", (4, 3), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (4, 3), (255, 0, 0, 0)), (0, 255, 255)),
        (Image.new("1", (4, 3), 1), (255, 255, 255)),
        (_palette_image(0), (255, 0, 0)),  # palette index 0 is red and "transparent": keep the red
        (_palette_image(bytes([0] * 256)), (255, 0, 0)),
        (Image.new("YCbCr", (4, 3), (255, 128, 128)), (255, 255, 255)),
    ],
    ids=["L", "LA", "RGBA", "CMYK-white", "CMYK-cyan", "1", "P-transparency", "P-transparency-bytes", "YCbCr"],
)
def test_to_rgb_usual_modes(image: Image.Image, expected: tuple[int, int, int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns on palette transparency given as bytes; we must not
        rgb = to_rgb(image)
    assert rgb.size == image.size
    assert _pixel(rgb) == expected
    assert "transparency" not in rgb.info
    # InternVL's `Image.open(f).convert('RGB')`, pixel for pixel (its palette warning is not ours to test).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        internvl = image.convert("RGB")
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(internvl))


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16", [0, 256, 32768, 65535], [0, 1, 128, 255]),
        ("I;16B", [0, 256, 32768, 65535], [0, 1, 128, 255]),
        ("I", [0, 256, 32768, 65535], [0, 1, 128, 255]),  # above 255: 16-bit data, same as I;16
        ("I", [0, 7, 200, 255], [0, 7, 200, 255]),  # already 8-bit range: kept
        ("I", [-5, 7, 200, 70000], [0, 0, 0, 255]),  # clipped to 0..65535 first
        ("F", [0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),  # [0, 1] floats
        ("F", [-3.0, 7.4, 200.6, 300.0], [0, 7, 201, 255]),  # 0..255 floats, rounded and clipped
    ],
)
def test_to_rgb_high_bit_depth(mode: str, values: list[float], expected: list[int]) -> None:
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}[mode]
    im = Image.frombytes(mode, (4, 1), np.array(values, dtype=dtype).tobytes())
    assert im.mode == mode
    rgb = to_rgb(im)
    assert rgb.mode == "RGB"
    got = np.asarray(rgb)
    np.testing.assert_array_equal(got[0, :, 0], expected)
    np.testing.assert_array_equal(got[..., 0], got[..., 2])  # grey stays grey
    # Pillow's own convert would clip: 32768 -> 255, 0.5 -> 0.
    assert im.mode == mode  # the input is untouched


def test_sixteen_bit_png_file(tmp_path: Path) -> None:
    path = tmp_path / "depth16.png"
    Image.frombytes("I;16", (2, 1), np.array([1000, 60000], dtype="<u2").tobytes()).save(path)
    rgb = open_image(path)
    np.testing.assert_array_equal(np.asarray(rgb)[0, :, 1], [1000 >> 8, 60000 >> 8])


def test_rgb_pil_input_is_returned_as_is() -> None:
    im = _noise(5, 7)
    assert open_image(im, exif_transpose=False) is im
    assert to_rgb(im) is im


# --- files: EXIF, animation, errors -----------------------------------------------------------------------


def _two_colour_jpeg(path: Path, orientation: int | None) -> None:
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half red
    pixels[:, 32:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif)


def test_exif_orientation_applied_and_switchable(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    _two_colour_jpeg(path, orientation=6)  # 6: display rotated 90 degrees clockwise

    upright = open_image(path)
    assert upright.size == (32, 64)
    top, bottom = np.asarray(upright)[4, 16], np.asarray(upright)[-4, 16]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60

    raw = open_image(path, exif_transpose=False)  # InternVL's pixels: no rotation
    assert raw.size == (64, 32)
    assert np.asarray(raw)[16, 4][0] > 200


def test_no_orientation_tag_is_identity(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    _two_colour_jpeg(path, orientation=None)
    np.testing.assert_array_equal(np.asarray(open_image(path)), np.asarray(open_image(path, exif_transpose=False)))


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    rgb = open_image(path)
    assert rgb.mode == "RGB" and rgb.size == (8, 6)
    assert _pixel(rgb) == (255, 0, 0)


def test_multipage_tiff_gives_first_page(tmp_path: Path) -> None:
    path = tmp_path / "pages.tiff"
    pages = [Image.new("L", (5, 5), 10), Image.new("L", (5, 5), 200)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert _pixel(open_image(path)) == (10, 10, 10)


def test_bytes_input() -> None:
    buffer = io.BytesIO()
    _noise(9, 11).save(buffer, "PNG")
    rgb = open_image(buffer.getvalue())
    assert rgb.size == (11, 9)
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(_noise(9, 11)))


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    _noise(128, 128).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (_truncated_jpeg, "truncated"),
        (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        (lambda p: p.write_text("just some notes\n"), "not an image"),
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
    ],
    ids=["truncated", "empty", "text", "missing", "directory"],
)
def test_bad_files_raise_image_load_error(tmp_path: Path, make, cause: str) -> None:
    path = tmp_path / "photo_x.jpg"
    make(path)
    with pytest.raises(ImageLoadError) as info:
        open_image(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": ")
    assert cause in message
    assert isinstance(info.value, ValueError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_empty_bytes_raise() -> None:
    with pytest.raises(ImageLoadError, match=r"^<bytes>: empty"):
        open_image(b"")


def test_too_many_pixels_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ImageLoadError) as info:
        open_image(path, max_pixels=50_000)
    assert str(info.value) == f"{path}: 300x200 = 60000 pixels exceeds max_pixels=50000"
    assert open_image(path, max_pixels=60_000).size == (300, 200)
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_pil_bomb_limit_is_ours_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow's own limit (errors above 2 * MAX_IMAGE_PIXELS) must not decide, and must be left as it was.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)
    assert open_image(path, max_pixels=None).size == (100, 100)
    with pytest.raises(ImageLoadError, match=r"100x100 = 10000 pixels exceeds max_pixels=5000"):
        open_image(path, max_pixels=5_000)
    assert Image.MAX_IMAGE_PIXELS == 1_000


def test_wrong_type_is_type_error() -> None:
    with pytest.raises(TypeError):
        open_image(42)  # type: ignore[arg-type]


# --- ImageProcessor config ----------------------------------------------------------------------------------


def test_processor_json_round_trip() -> None:
    official = json.loads(FIXTURE.read_text())
    processor = ImageProcessor.from_json(FIXTURE)
    assert processor == ImageProcessor()  # the defaults are the model card's file (spec §3.1)
    assert processor.to_dict() == official
    assert list(processor.to_dict()) == list(official)  # same key order
    assert ImageProcessor.from_dict(processor.to_dict()) == processor


def test_processor_to_json_is_the_official_file(tmp_path: Path) -> None:
    out = tmp_path / "preprocessor_config.json"
    ImageProcessor().to_json(out)
    assert out.read_bytes() == FIXTURE.read_bytes()  # 287 bytes, 19 lines


def test_checkpoints_get_the_official_preprocessor_file(tmp_path: Path) -> None:
    # save_pretrained (below preprocess/) writes registry.PREPROCESSOR_CONFIG beside weights that come without one
    sd = {k: torch.zeros(v.shape) for k, v in InternVisionModel(PRESETS["tiny"]).state_dict().items()}
    out = save_pretrained(sd, PRESETS["tiny"], tmp_path / "ckpt")
    assert json.loads((out / "preprocessor_config.json").read_text()) == json.loads(FIXTURE.read_text())


def test_processor_from_dict_size_layouts() -> None:
    config = json.loads(FIXTURE.read_text())
    config.update(
        size={"shortest_edge": 336},
        crop_size={"height": 320, "width": 320},
        image_processor_type="CLIPImageProcessor",  # unknown keys are ignored
        do_convert_rgb=True,
    )
    processor = ImageProcessor.from_dict(config)
    assert (processor.size, processor.crop_size) == (336, 320)
    with pytest.raises(ValueError, match="size"):
        ImageProcessor.from_dict({"size": {"height": 448, "width": 448}})  # a squash resize: not this processor
    with pytest.raises(ValueError, match="crop_size"):
        ImageProcessor.from_dict({"crop_size": {"height": 448, "width": 224}})


def test_processor_non_default_rescale_round_trips() -> None:
    processor = ImageProcessor(do_rescale=False, rescale_factor=0.5)
    assert ImageProcessor.from_dict(processor.to_dict()) == processor


def test_processor_from_pretrained(tmp_path: Path) -> None:
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor()  # no file: defaults
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 224, "crop_size": 224}))
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor(size=224, crop_size=224)


def test_processor_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        ImageProcessor(size=0)
    with pytest.raises(ValueError):
        ImageProcessor(image_mean=(0.5, 0.5))
    with pytest.raises(ValueError):
        ImageProcessor(resample=9)


# --- ImageProcessor pixels ----------------------------------------------------------------------------------


def _normalize(pixels_HWC: np.ndarray) -> np.ndarray:
    x = pixels_HWC.astype(np.float32) / np.float32(255)
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return x.transpose(2, 0, 1)


def test_processor_resizes_shortest_edge_then_crops_centre() -> None:
    image = _noise(60, 100)  # h=60, w=100
    processor = ImageProcessor(size=30, crop_size=24)
    out = processor(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    resized = image.resize((50, 30), Image.Resampling.BICUBIC)  # int(30 * 100 / 60) = 50
    expected = _normalize(np.asarray(resized)[3:27, 13:37])  # offsets (30 - 24) // 2, (50 - 24) // 2
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_processor_pads_when_crop_is_larger() -> None:
    image = Image.new("RGB", (3, 2), (255, 255, 255))
    out = ImageProcessor(do_resize=False, crop_size=6)(image)
    assert out.shape == (3, 6, 6)
    white = _normalize(np.full((1, 1, 3), 255, np.uint8))[:, 0, 0]
    zero = _normalize(np.zeros((1, 1, 3), np.uint8))[:, 0, 0]
    # transformers puts the image at ceil((6 - side) / 2): rows 2..3, columns 2..4; the rest is 0 before normalize.
    inside = np.zeros((6, 6), dtype=bool)
    inside[2:4, 2:5] = True
    np.testing.assert_allclose(out.numpy()[:, inside], np.repeat(white[:, None], inside.sum(), 1), atol=1e-6)
    np.testing.assert_allclose(out.numpy()[:, ~inside], np.repeat(zero[:, None], (~inside).sum(), 1), atol=1e-6)


def test_processor_batches_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    _noise(50, 70, seed=1).save(path)
    processor = ImageProcessor(size=32, crop_size=32)
    batch = processor([path, _noise(50, 70, seed=1), str(path)])
    assert batch.shape == (3, 3, 32, 32)
    assert torch.equal(batch[0], batch[1]) and torch.equal(batch[0], batch[2])
    with pytest.raises(ValueError):
        processor([])


def test_processor_switches() -> None:
    image = _noise(10, 10)
    raw = ImageProcessor(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)(image)
    np.testing.assert_array_equal(raw.numpy(), np.asarray(image).transpose(2, 0, 1).astype(np.float32))


# --- to_tensor_normalized and tile_transform -----------------------------------------------------------------


def test_to_tensor_normalized_matches_formula() -> None:
    image = _noise(7, 5)
    out = to_tensor_normalized(image, IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (3, 7, 5) and out.dtype == torch.float32 and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), _normalize(np.asarray(image)), atol=1e-6)
    unnormalized = to_tensor_normalized(np.asarray(image), None, None)
    np.testing.assert_allclose(unnormalized.numpy(), np.asarray(image).transpose(2, 0, 1) / 255, atol=1e-7)
    with pytest.raises(ValueError):
        to_tensor_normalized(np.zeros((4, 4), np.uint8), None, None)


def test_tile_transform_squashes_without_cropping() -> None:
    pixels = np.zeros((100, 300, 3), dtype=np.uint8)
    pixels[:, :100] = (255, 0, 0)  # left third red: a centre crop of the 448-high resize would drop it
    pixels[:, 200:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    out = tile_transform(image)
    assert out.shape == (3, 448, 448) and out.dtype == torch.float32
    expected = _normalize(np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC)))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    red = _normalize(np.array([[[255, 0, 0]]], np.uint8))[:, 0, 0]
    np.testing.assert_allclose(out.numpy()[:, 224, 0], red, atol=1e-6)  # the left edge survives
    assert tile_transform(Image.fromarray(pixels).convert("L"), size=56).shape == (3, 56, 56)
