"""Open any image file as a fully loaded 8-bit RGB `PIL.Image`, or fail with a message that names the file.

References:
    - InternVL `load_image`: `Image.open(image_file).convert('RGB')` (spec/internvit.md §3.2, [S9]); for the
      usual modes (L, LA, P, PA, RGBA, CMYK, YCbCr, LAB, HSV, 1) we do exactly that `convert`, so alpha is
      dropped, not composited.
    - Pillow `Image.open` / `ImageFile.load` / `ImageOps.exif_transpose` and its decompression-bomb check.

Differs from InternVL:
    - EXIF orientation is applied (`exif_transpose=True`); InternVL ignores it, so a phone photo reaches its
      model sideways. Pass `exif_transpose=False` to get InternVL's pixels.
    - High-bit-depth modes (I;16*, I, F) are scaled to 8 bit before the RGB conversion; Pillow's `convert`
      clips them to [0, 255], which turns most 16-bit images white.
    - The pixel limit is ours (`max_pixels`) and is checked from the header before anything is decoded;
      every failure is an `ImageLoadError` naming the input and the cause.
    - transformers 5 (`image_transforms.convert_to_rgb`) composites transparency onto white instead; that is
      not what InternVL trained with, so we do not follow it.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000

# What `open_image` accepts: a path, encoded bytes, or an already open image.
ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# Pillow's own bomb check reads the module global `Image.MAX_IMAGE_PIXELS` (89.5 M pixels; an error above twice
# that). We switch it off only around `Image.open` (a header parse) so that `max_pixels` alone decides, and
# restore it at once; the lock keeps two of our threads from restoring each other's value.
_PIL_LIMIT_LOCK = threading.Lock()


IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .webp .bmp .dib .tif .tiff .ppm .pgm .pbm .pnm .tga .ico .jp2 .avif .heic"
    .split()
)


def is_image_name(path: str | os.PathLike) -> bool:
    """Whether a file name has an image extension (how folders are walked; content is checked when opened)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


class ImageLoadError(ValueError):
    """An input could not be opened as an image; the message starts with the input's name."""


def open_image(
    source: ImageSource,
    *,
    exif_transpose: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """Open a path, encoded bytes or a PIL image as a fully loaded RGB image.

    An animated file (GIF, APNG, WebP, multi-page TIFF) gives its first frame; an already open PIL image gives
    its current frame. A truncated file fails: `ImageFile.LOAD_TRUNCATED_IMAGES` is never set.

    Args:
        source: A file path, the bytes of an encoded image, or a `PIL.Image.Image`.
        exif_transpose: Rotate/flip by the EXIF orientation tag (`ImageOps.exif_transpose`).
        max_pixels: Largest width * height accepted, checked from the header before decoding;
            `None` for no limit.
        draft: `--decode fast`: called with the image's full (oriented) size, returns the size it will be resized
            to; a JPEG at least twice that size in both directions is decoded at 1/2, 1/4 or 1/8 scale (Pillow's
            `draft`, libjpeg's DCT scaling), never below it. Other formats decode in full.

    Returns:
        A loaded image in mode "RGB": a new image, except that an RGB `PIL.Image` source comes back itself
        when `exif_transpose` is False.

    Raises:
        ImageLoadError: The input is missing, empty, a directory, not an image, truncated or corrupt, too
            large, or in a mode that cannot be converted to RGB.
        TypeError: `source` is none of the accepted types.
    """
    if isinstance(source, Image.Image):
        name = str(getattr(source, "filename", "") or "<PIL image>")
        return _finish(source, name, owned=False, exif_transpose=exif_transpose, max_pixels=max_pixels, draft=None)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError("<bytes>: empty input (0 bytes)")
        with _open_pil(io.BytesIO(source), "<bytes>") as im:
            return _finish(im, "<bytes>", owned=True, exif_transpose=exif_transpose, max_pixels=max_pixels,
                           draft=draft)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        with _open_file(name) as fp, _open_pil(fp, name) as im:
            return _finish(im, name, owned=True, exif_transpose=exif_transpose, max_pixels=max_pixels, draft=draft)
    raise TypeError(f"expected a path, bytes or a PIL image, got {type(source).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB, scaling high-bit-depth modes first.

    Args:
        image: Any PIL image; it is not modified.

    Returns:
        An "RGB" image; `image` itself when it is already RGB.

    Raises:
        ValueError: Pillow has no conversion from this mode to RGB.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(image)).convert("RGB")
    if "transparency" in image.info:
        # convert("RGB") ignores transparency for the pixels but warns for palette transparency given as bytes
        # and copies the key into the result; drop it from a copy so the output is plain RGB and quiet.
        image = image.copy()
        del image.info["transparency"]
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert mode {image.mode!r} to RGB ({e})") from e


def _to_uint8(image: Image.Image) -> np.ndarray:
    """Map a 16-bit, 32-bit integer or float single-channel image to a uint8 [H, W] array."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Top byte, as 8-bit viewers do; astype first so big-endian "I;16B" arrays shift correctly.
        return (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    if image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        # Older Pillow opened 16-bit PNGs as "I": treat values above 255 as 16-bit data, like "I;16" above,
        # so the same file gives the same pixels whichever mode Pillow picks.
        if values.size and values.max() > 255:
            return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.clip(values, 0, 255).astype(np.uint8)
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.max() <= 1.0:
        values = values * 255.0  # a [0, 1] float image
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"))


def special_file_kind(mode: int) -> str | None:
    """"a FIFO", "a socket", ... for an `st_mode` that is neither a regular file nor a folder, else None."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")


@contextlib.contextmanager
def _open_file(name: str) -> Iterator[io.BufferedReader]:
    """Open `name` for reading, turning the usual OS errors (and an empty file) into ImageLoadError.

    Only regular files are read: the file is opened non-blocking (opening a FIFO would otherwise wait for a
    writer) and anything but a regular file is refused before a byte is read.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageLoadError(f"{name}: no such file") from None
    except PermissionError:
        raise ImageLoadError(f"{name}: permission denied") from None
    except OSError as e:
        raise ImageLoadError(f"{name}: cannot open ({e.strerror or e})") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise ImageLoadError(f"{name}: is a directory, not a file")
        raise ImageLoadError(f"{name}: {special_file_kind(mode)}, not a regular file (not read)")
    os.set_blocking(fd, True)
    fp = os.fdopen(fd, "rb")
    with fp:
        if os.fstat(fp.fileno()).st_size == 0:
            raise ImageLoadError(f"{name}: empty file (0 bytes)")
        yield fp


@contextlib.contextmanager
def _open_pil(fp: io.IOBase, name: str) -> Iterator[Image.Image]:
    """`Image.open` (header only) with Pillow's bomb check off; closes the lazy image afterwards."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageLoadError(f"{name}: not an image (cannot identify image file)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageLoadError(f"{name}: cannot read image header ({e})") from e
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with im:
        yield im


def _finish(
    im: Image.Image, name: str, *, owned: bool, exif_transpose: bool, max_pixels: int | None,
    draft: Callable[[int, int], tuple[int, int]] | None,
) -> Image.Image:
    """Check the size, decode, orient and convert an opened (possibly lazy) image.

    `owned` says that `im` was opened here and is closed by the caller's `with` right after we return.
    """
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
        )
    if draft is not None and im.format == "JPEG":
        _draft(im, draft, exif_transpose)
    try:
        im.load()
    except Image.DecompressionBombError as e:
        # Raised by a plugin's own check while decoding (e.g. a TIFF tile or GIF frame larger than the header).
        raise ImageLoadError(f"{name}: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # e.g. "image file is truncated (12 bytes not processed)", "broken data stream when reading image file"
        raise ImageLoadError(f"{name}: {e}") from e
    opened = im
    if exif_transpose:
        try:
            im = ImageOps.exif_transpose(im)  # a new image, rotated or not
        except Exception:  # noqa: BLE001 - a malformed EXIF block must not lose a decodable image
            # Keep the pixels unrotated, as InternVL (which never reads EXIF) would see them.
            pass
    try:
        rgb = to_rgb(im)
    except ValueError as e:
        raise ImageLoadError(f"{name}: {e}") from e
    if owned and rgb is opened:
        # Closing an image frees its pixels: return a copy detached from the file the caller will close.
        rgb = opened.copy()
    return rgb


def _draft(im: Image.Image, target: Callable[[int, int], tuple[int, int]], exif_transpose: bool) -> None:
    """Ask libjpeg for the smallest DCT scale that keeps `im` at least the target size (in stored orientation)."""
    width, height = im.size
    try:
        rotated = exif_transpose and im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap axes
    except Exception:  # noqa: BLE001 - a malformed EXIF block: `_finish` then keeps the pixels unrotated
        rotated = False
    w, h = target(*((height, width) if rotated else (width, height)))
    im.draft(None, (h, w) if rotated else (w, h))
