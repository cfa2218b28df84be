"""Parity: our preprocessing against the independent implementations it reproduces (spec/internvit.md §3).

- `ImageProcessor` vs transformers' `CLIPImageProcessorPil` (transformers 5; `CLIPImageProcessor` before),
  both built from tests/fixtures/preprocessor_config.json (the model card's file, spec §3.1).
- `tile_transform` vs InternVL's `build_transform`, written out with torchvision as in InternVL
  (`T.Resize((448, 448), BICUBIC)`, `T.ToTensor()`, `T.Normalize(IMAGENET_MEAN, IMAGENET_STD)`).

Inputs: the photographs bundled with scikit-image (no download) and random-noise images of odd sizes,
including extreme aspect ratios whose shortest-edge resize is hundreds of millions of pixels (the slow cases:
transformers really builds that intermediate). Run with `pytest -s` to see each max |difference|.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from internvit.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor, tile_transform

pytestmark = pytest.mark.parity

FIXTURE = Path(__file__).parents[1] / "fixtures" / "preprocessor_config.json"
ATOL = 1e-5

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "rocket_transposed", "camera"]
# (width, height): degenerate, extreme aspect ratios both ways, and off-by-one around the 448 crop.
# Tall strips stop short of MAX_RESIZE_PIXELS (1x3000 and 7x5000, beyond it, are refused: tests/unit). The widest
# strip is 1000x1: transformers resizes it whole (448,000 x 448 px, 2.4 GB as float32); 3000x1 cost 6.6 GB.
ODD_SIZES = [(1, 1), (1, 300), (1000, 1), (5000, 7), (7, 2000), (449, 448), (447, 1000)]


def _photo(name: str) -> Image.Image:
    data = pytest.importorskip("skimage.data")
    if name == "rocket_transposed":  # a portrait photo: the bundled ones are all landscape or square
        return Image.fromarray(np.ascontiguousarray(data.rocket().transpose(1, 0, 2)))
    return Image.fromarray(getattr(data, name)())  # camera() is greyscale: mode "L"


def _noise(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 10_007 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference_clip(config: dict):
    """transformers' PIL-backend CLIP processor from a preprocessor_config.json dict."""
    pytest.importorskip("transformers")
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4.x: the slow processor is the PIL/numpy one
        from transformers import CLIPImageProcessor as cls
    return cls(**config)


def _compare_clip(case: str, image: Image.Image, config: dict) -> None:
    expected = _reference_clip(config)(image, return_tensors="pt")["pixel_values"][0]
    got = ImageProcessor.from_dict(config)(image)
    assert got.shape == expected.shape, case
    diff = (got - expected).abs().max().item()
    print(f"[CLIPImageProcessorPil parity] {case}: shape {tuple(got.shape)}, max|diff| = {diff:.3g}")
    assert diff <= ATOL, case


@pytest.fixture(scope="module")
def official_config() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", PHOTOS)
def test_clip_processor_photos(name: str, official_config: dict) -> None:
    _compare_clip(name, _photo(name), official_config)


@pytest.mark.parametrize("size", ODD_SIZES, ids=[f"w{w}xh{h}" for w, h in ODD_SIZES])
def test_clip_processor_odd_sizes(size: tuple[int, int], official_config: dict) -> None:
    _compare_clip(f"noise w{size[0]}xh{size[1]}", _noise(*size), official_config)


@pytest.mark.parametrize(
    ("overrides", "size"),
    [
        ({"size": 224}, (300, 200)),  # resized below the 448 crop: transformers zero-pads before normalizing
        ({"size": 224}, (2000, 9)),
        ({"do_resize": False}, (5, 3)),
        ({"do_resize": False}, (600, 451)),  # odd margins on both axes
        ({"resample": 2, "size": 300, "crop_size": 256}, (640, 427)),
    ],
    ids=["pad-224", "pad-wide", "no-resize-pad", "no-resize-crop", "bilinear-300-256"],
)
def test_clip_processor_other_configs(overrides: dict, size: tuple[int, int], official_config: dict) -> None:
    config = {**official_config, **overrides}
    _compare_clip(f"{overrides} w{size[0]}xh{size[1]}", _noise(*size), config)


def _internvl_build_transform(input_size: int = 448):
    T = pytest.importorskip("torchvision.transforms")
    from torchvision.transforms.functional import InterpolationMode

    # InternVL chat `build_transform` (spec §3.2), verbatim apart from the names.
    return T.Compose(
        [
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


@pytest.mark.parametrize("name", PHOTOS + ["noise w1xh1", "noise w1xh3000", "noise w5000xh7", "noise w449xh448"])
def test_tile_transform_matches_internvl(name: str) -> None:
    if name.startswith("noise"):
        width, height = (int(v) for v in name.split()[1][1:].split("xh"))
        image = _noise(width, height)
    else:
        image = _photo(name)
    expected = _internvl_build_transform()(image)
    got = tile_transform(image)
    assert got.shape == expected.shape == (3, 448, 448)
    diff = (got - expected).abs().max().item()
    print(f"[InternVL build_transform parity] {name}: max|diff| = {diff:.3g}")
    assert diff <= ATOL, name
