"""`--decode fast` on a GPU: JPEGs decoded by nvJPEG and resized and cut into tiles on the device.

A loader worker only reads a JPEG's header (`device_plan`): if the device can decode it as Pillow would see it, the
worker hands over the encoded bytes and the geometry (`DevicePlan`) instead of pixels; the extraction pipeline then
decodes a few inputs' JPEGs at a time on the device (`decode_tiles`, torchvision's batched `decode_jpeg`, nvJPEG on
CUDA) and resizes them there with torch's antialiased bicubic filter, which is Pillow's (a = -0.5, support scaled
with the downscale factor). The tiles come out as uint8 tensors on the device, like those the workers make.

What goes to the device: baseline or progressive 8-bit YCbCr JPEGs (Pillow mode RGB) that end with their EOI
marker, need no EXIF rotation and are within the pixel limit. Anything else (grayscale and CMYK JPEGs, a rotated
phone photo, a truncated file, other formats) takes the CPU path, which also gives the error rows; so does a JPEG
the device decoder refuses.

Not pixel-exact: nvJPEG's IDCT and chroma upsampling are not libjpeg's, and torch rounds the resize once where
Pillow rounds after each of its two passes. docs/performance.md gives the fidelity against `--decode exact`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .tiling import TileLayout
from .transforms import MAX_RESIZE_PIXELS

_ORIENTATION = 0x0112
_EOI = b"\xff\xd9"


@dataclass(frozen=True)
class DevicePlan:
    """What the device makes of one decoded image.

    Attributes:
        resize: (width, height) the whole image is resized to.
        tile_size: side of each tile.
        grid: dynamic tiles: (columns, rows) cut from the resized image; None for the CLIP resize + center crop.
        thumbnail: dynamic tiles: append the whole image resized to one tile.
        crop: CLIP: (left, top) of the `tile_size` center crop in the resized image (negative: zero padded).
    """

    resize: tuple[int, int]
    tile_size: int
    grid: tuple[int, int] | None = None
    thumbnail: bool = False
    crop: tuple[int, int] = (0, 0)

    @property
    def num_tiles(self) -> int:
        return 1 if self.grid is None else self.grid[0] * self.grid[1] + int(self.thumbnail)

    @classmethod
    def for_layout(cls, layout: TileLayout) -> DevicePlan:
        (cols, rows), S = layout.grid, layout.tile_size
        return cls((cols * S, rows * S), S, (cols, rows), layout.thumbnail)


def jpeg_decoder_available() -> bool:
    """Whether torchvision's `decode_jpeg` (nvJPEG on CUDA) can be imported here."""
    try:
        _decode_jpeg()
    except ImportError:
        return False
    return True


def device_jpeg_size(data: bytes, *, exif_transpose: bool, max_pixels: int | None) -> tuple[int, int] | None:
    """(width, height) of a JPEG the device decoder may take (module docstring), else None: the CPU path decides.

    Reads the header only."""
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\x00").endswith(_EOI):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode != "RGB":
                return None
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                return None
            if exif_transpose and im.getexif().get(_ORIENTATION, 1) not in (0, 1):
                return None
    except Exception:  # noqa: BLE001 - a header Pillow cannot parse: the CPU path reports it
        return None
    return width, height


def decode_tiles(jpegs: list[bytes], plans: list[DevicePlan], device: torch.device) -> list[torch.Tensor]:
    """Decode `jpegs` on `device` in one batch and make each one's uint8 tiles [T, 3, S, S] there (`plans`).

    Raises:
        RuntimeError: the decoder refused one of them (it gives no partial results: decode one at a time to find it).
    """
    decode = _decode_jpeg()
    from torchvision.io import ImageReadMode

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders (for TorchCodec's)
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode(data, mode=ImageReadMode.RGB, device=device)
    return [plan_tiles(image, plan) for image, plan in zip(images, plans)]


def plan_tiles(image_CHW: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
    """A decoded uint8 image [3, H, W] -> its tiles [T, 3, S, S] as `plan` says, on the image's device."""
    S = plan.tile_size
    resized = resize_uint8(image_CHW, plan.resize)
    if plan.grid is not None:
        cols, rows = plan.grid
        tiles = resized.reshape(3, rows, S, cols, S).permute(1, 3, 0, 2, 4).reshape(-1, 3, S, S)
        if plan.thumbnail:
            tiles = torch.cat([tiles, resize_uint8(image_CHW, (S, S))[None]])
        return tiles
    left, top = plan.crop  # as PIL's crop: outside the image is zero
    W, H = plan.resize
    out = torch.zeros((1, 3, S, S), dtype=torch.uint8, device=resized.device)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + S, W), min(top + S, H)
    out[0, :, y0 - top:y1 - top, x0 - left:x1 - left] = resized[:, y0:y1, x0:x1]
    return out


def resize_uint8(image_CHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a uint8 image to (width, height), antialiased as Pillow's; the same size is a no-op."""
    width, height = size
    if image_CHW.shape[1:] == (height, width):
        return image_CHW
    x = F.interpolate(image_CHW[None].float(), size=(height, width), mode="bicubic", antialias=True,
                      align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def _decode_jpeg():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg
    return decode_jpeg


def clip_plan(processor, width: int, height: int) -> DevicePlan | None:
    """The CLIP processor's resize + center crop (`ImageProcessor.resize_and_crop`) as a plan; None where the device
    does not reproduce it (no resize or no crop, another filter, an intermediate over `MAX_RESIZE_PIXELS`)."""
    if not (processor.do_resize and processor.do_center_crop and processor.resample == Image.Resampling.BICUBIC):
        return None
    out_w, out_h = processor.resized_size(width, height)
    if out_w * out_h > MAX_RESIZE_PIXELS:
        return None  # the CPU path refuses it with its reason
    S = processor.crop_size
    return DevicePlan((out_w, out_h), S, crop=((out_w - S) // 2, (out_h - S) // 2))
