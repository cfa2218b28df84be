"""Pixels for InternViT: the model card's CLIP processor (`ImageProcessor`) and InternVL's tile transform.

References:
    - `ImageProcessor`: the `CLIPImageProcessor` that the standalone ViT model card loads from
      `preprocessor_config.json` (spec/internvit.md §3.1): RGB -> shortest edge to 448 (PIL bicubic) -> center
      crop 448 -> x/255 -> ImageNet normalize. The numbers equal transformers 5's `CLIPImageProcessorPil`
      (`image_transforms.get_resize_output_image_size` with `default_to_square=False`, `resize`,
      `center_crop`, `rescale`, `normalize`); `tests/parity/test_preprocess_parity.py` checks this.
    - `tile_transform`: InternVL's `build_transform(input_size=448)` (spec §3.2): RGB -> squash to 448x448
      with PIL bicubic (no crop) -> `ToTensor` -> ImageNet normalize.

Differs from transformers' `CLIPImageProcessorPil`:
    - No transformers or torchvision import; returns a torch tensor, not a `BatchFeature`.
    - Transparency is dropped by `convert("RGB")` (as InternVL did), not composited onto white, and high-bit-depth
      modes are scaled to 8 bit first (`internvit.preprocess.image.to_rgb`). Paths are opened with `open_image`,
      which also applies the EXIF orientation.
    - The center crop is `PIL.Image.crop`, which pads out-of-image rows/columns with zeros exactly where
      transformers' numpy `center_crop` pads (offsets `(size - crop) // 2` in both).
    - `size` is a shortest edge and `crop_size` a square side; a `{"height", "width"}` resize (a squash) or a
      non-square crop is rejected by `from_dict` rather than half-supported.
    - Columns that the crop removes are dropped between Pillow's horizontal and vertical resize passes (same
      pixels, far less work for wide images). Rows cannot be: cropping first with `Image.resize(box=...)`
      changes pixels (by up to 27 levels in our tests; Pillow passes box coordinates as float32 and the
      filter weights move), so a tall image still makes a tall intermediate, as in transformers; one over
      `MAX_RESIZE_PIXELS` (taller than about 1:330) is refused instead of allocated.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .image import ImageSource, open_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

_PIL_FILTERS = (0, 1, 2, 3, 4, 5)  # nearest, lanczos, bilinear, bicubic, box, hamming
# The largest image one resize pass may make (200 MB of RGB). Only extreme aspect ratios reach it (> 1:330 for
# tall images, > 1:150,000 for wide ones); without it one 320-byte PNG of 1x60000 asks for 36 G pixels.
MAX_RESIZE_PIXELS = 1 << 26


@dataclass(frozen=True)
class Normalization:
    """The arithmetic that turns 8-bit pixels into the encoder's input: `(pixels * scale - mean) / std` in float32.

    Loader workers hand over uint8 tiles with their `Normalization`; the extraction core applies it on the device
    (`__call__`); `ImageProcessor`, `tile_transform` and `to_tensor_normalized` run it too, so the features do
    not change.
    """

    scale: float = 1 / 255
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] (any device) -> float32 of the same shape.

        Bit-identical to both references: transformers rescales in float64 and casts to float32, torchvision's
        `ToTensor` divides by 255 in float32, and for integers 0..255 the two round to the same float32; the
        subtraction and division then run in float32 with float32 mean/std, as in both.
        """
        if self.scale == 1 / 255:  # the same float32 for each of the 256 values, at a third of the memory traffic
            x = pixels.to(torch.float32).div_(255)
        else:
            x = pixels.to(torch.float64).mul_(self.scale).to(torch.float32)
        if self.mean is None:
            return x
        if self.std is None:
            raise ValueError("std is required when mean is given")
        return x.sub_(_channel_values(tuple(self.mean), x.device)).div_(_channel_values(tuple(self.std), x.device))


@functools.lru_cache(maxsize=32)
def _channel_values(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Per-channel constants [C, 1, 1] in float32 on `device`, made once (a copy to a GPU would wait for it)."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def uint8_pixels(image: Image.Image | np.ndarray) -> torch.Tensor:
    """8-bit RGB pixels as a uint8 tensor [3, H, W] (a channels-last view: no copy beyond the array's own)."""
    pixels_HWC = np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    if pixels_HWC.ndim != 3 or pixels_HWC.shape[2] != 3:
        raise ValueError(f"expected RGB pixels [H, W, 3], got shape {pixels_HWC.shape}")
    return torch.from_numpy(pixels_HWC).permute(2, 0, 1)


def to_tensor_normalized(
    image: Image.Image | np.ndarray,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    *,
    scale: float = 1 / 255,
) -> torch.Tensor:
    """Turn 8-bit RGB pixels into a normalized float32 tensor: `(pixels * scale - mean) / std` (`Normalization`).

    Kept for callers that hold PIL images (training data); the extraction path applies `Normalization` to uint8
    tiles on the device.

    Args:
        image: An RGB `PIL.Image` or a uint8 array [H, W, 3].
        mean: Per-channel mean subtracted after scaling; `None` skips normalization (then `std` is ignored).
        std: Per-channel standard deviation.
        scale: Factor applied to the raw 0..255 values (1.0 for no rescale).

    Returns:
        A float32 tensor [3, H, W].
    """
    return Normalization(scale, mean, std if mean is not None else None)(uint8_pixels(image)).contiguous()


def tile_pixels(image: ImageSource, *, size: int = 448) -> torch.Tensor:
    """`tile_transform` before its normalization: the squash to `size` x `size`, as uint8 [3, size, size]."""
    # torchvision's Resize((s, s), BICUBIC) on a PIL image is exactly this call (antialias does not apply to PIL).
    return uint8_pixels(_load_rgb(image).resize((size, size), Image.Resampling.BICUBIC))


def tile_transform(
    image: ImageSource,
    *,
    size: int = 448,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """InternVL's `build_transform`: squash to `size` x `size` with PIL bicubic, /255, normalize.

    The aspect ratio is not kept and nothing is cropped; dynamic tiles are already square, so for them the
    resize is a copy.

    Args:
        image: A PIL image (converted to RGB as is) or a path / bytes (opened with `open_image`).
        size: Output side in pixels.
        mean: Per-channel normalization mean.
        std: Per-channel normalization standard deviation.

    Returns:
        A float32 tensor [3, size, size].
    """
    return Normalization(1 / 255, mean, std)(tile_pixels(image, size=size)).contiguous()


@dataclass(frozen=True, kw_only=True)
class ImageProcessor:
    """The model card's `CLIPImageProcessor`, with the defaults of the official `preprocessor_config.json`.

    Attributes:
        size: Target length of the shortest edge after resizing (aspect ratio kept).
        crop_size: Side of the square center crop; zero-padded where the image is smaller.
        do_resize: Resize the shortest edge to `size`.
        do_center_crop: Center-crop to `crop_size`.
        do_rescale: Multiply the 0..255 values by `rescale_factor`.
        rescale_factor: Rescale factor.
        do_normalize: Subtract `image_mean` and divide by `image_std`.
        image_mean: Per-channel mean.
        image_std: Per-channel standard deviation.
        resample: PIL resampling filter code (3 = bicubic).
    """

    size: int = 448
    crop_size: int = 448
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    resample: int = 3

    def __post_init__(self) -> None:
        for name in ("size", "crop_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {self.image_mean} and {self.image_std}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must be non-zero, got {self.image_std}")
        if self.resample not in _PIL_FILTERS:
            raise ValueError(f"resample must be a PIL filter code {_PIL_FILTERS}, got {self.resample!r}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ImageProcessor:
        """Build from the contents of a `preprocessor_config.json`; unknown keys are ignored.

        Args:
            config: The parsed JSON. `size` may be an int or `{"shortest_edge": n}`; `crop_size` an int or
                `{"height": n, "width": n}`.

        Raises:
            ValueError: A size layout this processor does not reproduce (a squash resize, a non-square crop).
        """
        kwargs: dict[str, Any] = {}
        if "size" in config:
            kwargs["size"] = _parse_edge("size", config["size"])
        if "crop_size" in config:
            kwargs["crop_size"] = _parse_edge("crop_size", config["crop_size"])
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if key in config:
                kwargs[key] = bool(config[key])
        if "rescale_factor" in config:
            kwargs["rescale_factor"] = float(config["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if key in config:
                kwargs[key] = tuple(float(v) for v in config[key])
        if "resample" in config:
            kwargs["resample"] = int(config["resample"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> ImageProcessor:
        """Read a `preprocessor_config.json` file."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ImageProcessor:
        """Read `<path>/preprocessor_config.json` from a local model directory, or use the defaults if absent."""
        config_path = os.path.join(path, PREPROCESSOR_CONFIG_NAME)
        return cls.from_json(config_path) if os.path.isfile(config_path) else cls()

    def to_dict(self) -> dict[str, Any]:
        """The official layout (the 9 keys of spec §3.1, sorted); rescale keys only when not the default."""
        config: dict[str, Any] = {
            "crop_size": self.crop_size,
            "do_center_crop": self.do_center_crop,
            "do_normalize": self.do_normalize,
            "do_resize": self.do_resize,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resample": self.resample,
            "size": self.size,
        }
        # The official file omits these (CLIP's defaults); write them only if they change, so
        # from_dict(to_dict()) is lossless and the default output is the official file, byte for byte.
        if not self.do_rescale:
            config["do_rescale"] = False
        if self.rescale_factor != 1 / 255:
            config["rescale_factor"] = self.rescale_factor
        return dict(sorted(config.items()))

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write `to_dict()` as the Hub writes it (2-space indent, trailing newline)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")

    def resize_and_crop(self, image: Image.Image, *, source_size: tuple[int, int] | None = None) -> Image.Image:
        """The geometric part: shortest edge to `size`, then the `crop_size` center crop (uint8 RGB in and out).

        Raises:
            ValueError: the resize would need an intermediate image over `MAX_RESIZE_PIXELS` (an extreme aspect
                ratio: a 1x20000 strip becomes 448 x 8,960,000); checked before anything is allocated.
        """
        if self.do_resize:
            width, height = image.size
            out_w, out_h = self.resized_size(*(source_size or image.size))
            wide = self.do_center_crop and out_w > self.crop_size and self.resample != Image.Resampling.NEAREST
            # Pillow resizes horizontally, then vertically: the intermediates below are what each pass makes.
            largest = out_w * height if wide else out_w * max(height, out_h)
            if largest > MAX_RESIZE_PIXELS:
                raise ValueError(
                    f"{width}x{height} is too elongated for the CLIP resize (shortest side to {self.size}): it "
                    f"would make a {out_w}x{out_h} image ({largest / 1e6:,.0f} M pixels in one pass, limit "
                    f"{MAX_RESIZE_PIXELS / 1e6:,.0f} M); dynamic tiles (--tiles dynamic) handle such images"
                )
            if wide:
                # Pillow's convolution resize is two passes, horizontal then vertical, each rounded to uint8
                # (libImaging/Resample.c, ImagingResampleInner). Running them as two calls and dropping the
                # columns the crop removes in between gives the same pixels, and spares the vertical pass over
                # them: a 3000x1 image otherwise makes a 1344000x448 intermediate (600 M pixels).
                image = image.resize((out_w, height), resample=self.resample)
                left = (out_w - self.crop_size) // 2
                image = image.crop((left, 0, left + self.crop_size, height))
                image = image.resize((self.crop_size, out_h), resample=self.resample)
            else:
                image = image.resize((out_w, out_h), resample=self.resample)
        if self.do_center_crop:
            width, height = image.size
            # transformers' `center_crop`: floor offsets, and where the crop is larger than the image the
            # image sits at ceil((crop - side) / 2) in a zero canvas; PIL's crop with a negative floor offset
            # puts it at the same place and fills the rest with 0 (before rescale/normalize, as there).
            top = (height - self.crop_size) // 2
            left = (width - self.crop_size) // 2
            image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        return image

    def __call__(self, images: ImageSource | list[ImageSource] | tuple[ImageSource, ...]) -> torch.Tensor:
        """Preprocess one image to [3, H, W], or a list of images to [B, 3, H, W] (float32).

        Args:
            images: A PIL image (converted to RGB as is), a path or bytes (opened with `open_image`, which also
                applies the EXIF orientation), or a list/tuple of them.

        Returns:
            The normalized pixels; H = W = `crop_size` when `do_center_crop`.
        """
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("got an empty list of images")
            tensors = [self._one(image) for image in images]
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) > 1:
                raise ValueError(
                    f"images have different sizes after preprocessing ({sorted(shapes)}); "
                    "enable do_center_crop to batch them"
                )
            return torch.stack(tensors)
        return self._one(images)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image of this size after the resize step, before the crop."""
        if not self.do_resize:
            return width, height
        out_h, out_w = _shortest_edge_size(height, width, self.size)
        return out_w, out_h

    @property
    def normalization(self) -> Normalization:
        """The rescale and normalize steps (applied to `pixels`' output, on any device)."""
        mean, std = (self.image_mean, self.image_std) if self.do_normalize else (None, None)
        return Normalization(self.rescale_factor if self.do_rescale else 1.0, mean, std)

    def pixels(self, image: ImageSource, *, source_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The geometric steps only: uint8 [3, H, W] (`normalization` makes them the processor's output).

        `source_size`: the size to compute the resize from when `image` was decoded at a reduced scale (JPEG
        draft); the output then has the same size as for the full image.
        """
        return uint8_pixels(self.resize_and_crop(_load_rgb(image), source_size=source_size))

    def _one(self, image: ImageSource) -> torch.Tensor:
        return self.normalization(self.pixels(image)).contiguous()


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side `size`; transformers' `get_resize_output_image_size`.

    The long side is `int(size * long / short)`, truncated, evaluated in this order (a different order can round
    differently), and a square input maps to (size, size).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _parse_edge(key: str, value: Any) -> int:
    """The side from a transformers size layout: `448`, `{"shortest_edge": 448}`, a square `{"height", "width"}`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if key == "size" and set(value) == {"shortest_edge"}:
            return int(value["shortest_edge"])
        if key == "crop_size" and set(value) == {"height", "width"} and value["height"] == value["width"]:
            return int(value["height"])
    raise ValueError(
        f"{key}={value!r} is not supported: size must be an int or {{'shortest_edge': n}}, "
        "crop_size an int or a square {'height': n, 'width': n}"
    )


def _load_rgb(image: ImageSource) -> Image.Image:
    """PIL images: RGB conversion only (current frame, no EXIF rotation, no pixel limit); paths/bytes: `open_image`.

    The caller already holds a PIL image (often from `open_image` with its own `max_pixels`), so limiting it
    again here could only reject an image that the caller accepted.
    """
    if isinstance(image, Image.Image):
        return open_image(image, exif_transpose=False, max_pixels=None)
    return open_image(image)
