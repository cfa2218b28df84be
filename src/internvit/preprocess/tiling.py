"""InternVL 2.5 dynamic high-resolution tiling: 1..max_tiles tiles of 448 px chosen by aspect ratio, plus a thumbnail.

References:
    - InternVL `dynamic_preprocess` / `find_closest_aspect_ratio` (spec/internvit.md §4, [S4], [S9]): the grid,
      its tie-break rules, the bicubic resize of the whole image to the grid, raster-order crops, thumbnail last.
    - Multi-image samples share the budget: `max(1, max_tiles // n)` tiles per image ([S5]).

Differs from transformers' `GotOcr2ImageProcessor(crop_to_patches=True)`, which re-implements the same rule: there
the candidates with the same tile count are visited in (columns, rows) order; InternVL visits them in the
iteration order of a Python set. The two pick different grids only when two grids with the same tile count are
exactly as close to the image's aspect ratio, which needs min_tiles > 1 (e.g. a 10x4 image with min = max = 4:
InternVL takes 4x1, transformers 2x2); we follow InternVL, because that is what the model saw in training
(tests/unit/test_tiling.py checks every disagreement is of this kind).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from internvit.registry import DEFAULT_MAX_TILES

from .image import ImageSource, open_image
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Normalization

TILE_SIZE = 448
# InternVL uses up to 12 tiles (40 at most in its evaluations). The grid search is cubic in the budget and an
# image resized to its grid costs max_tiles * 448^2 pixels, so larger budgets are refused rather than run.
MAX_TILES = 128


@dataclass(frozen=True)
class TileLayout:
    """Where each tile of an image came from, so that features map back to pixels.

    Attributes:
        image_size: (width, height) of the source image.
        grid: (columns, rows) of the tile grid.
        boxes: per grid tile, in raster order, its (left, top, right, bottom) in source pixels (floats: the
            source is resized to the grid, so a tile covers a fractional region of it).
        thumbnail: whether a thumbnail of the whole image follows the grid tiles.
        tile_size: side of each tile in pixels.
    """

    image_size: tuple[int, int]
    grid: tuple[int, int]
    boxes: tuple[tuple[float, float, float, float], ...]
    thumbnail: bool
    tile_size: int = TILE_SIZE

    @property
    def num_tiles(self) -> int:
        """Tiles the encoder sees for this image, the thumbnail included."""
        return len(self.boxes) + int(self.thumbnail)


@lru_cache(maxsize=256)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """The grids (columns, rows) InternVL considers, in the order it visits them.

    Built exactly as InternVL builds it, a set sorted by tile count: within one tile count the order is CPython's
    set iteration order, which is deterministic for tuples of small ints and decides exact ties.
    """
    if min_tiles < 1 or max_tiles < 1:
        raise ValueError(f"need min_tiles >= 1 and max_tiles >= 1, got {min_tiles} and {max_tiles}")
    if max_tiles > MAX_TILES:
        raise ValueError(f"max_tiles={max_tiles} is above the supported {MAX_TILES} (InternVL 2.5 uses 12)")
    # min_tiles > max_tiles (a shared multi-image budget below min_tiles) leaves no candidate, and the image
    # becomes a single tile, as in InternVL.
    ratios = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(ratios, key=lambda x: x[0] * x[1]))


def choose_grid(width: int, height: int, *, min_tiles: int = 1, max_tiles: int = DEFAULT_MAX_TILES,
                tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """InternVL's `find_closest_aspect_ratio`: the grid (columns, rows) closest to width/height.

    On an exact tie a later candidate wins only if the image has more than half the pixels of its tiles; a small
    image is still up-scaled to an exactly matching grid (spec §4).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_budget(num_images: int, max_tiles: int) -> int:
    """Tiles per image when `num_images` images share one sample's budget (InternVL multi-image training)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    return max(1, max_tiles // num_images)


def dynamic_tiles(image: Image.Image, *, min_tiles: int = 1, max_tiles: int = DEFAULT_MAX_TILES, tile_size: int = TILE_SIZE,
                  use_thumbnail: bool = True) -> tuple[list[Image.Image], TileLayout]:
    """Cut an RGB image into tiles exactly as InternVL's `dynamic_preprocess`.

    The whole image is resized (PIL bicubic) to columns*tile_size x rows*tile_size, cut in raster order, and
    a thumbnail (the whole image squashed to tile_size) is appended when there is more than one tile.

    Returns:
        The tiles (tile_size x tile_size PIL images, thumbnail last) and their layout.
    """
    pixels, layout = dynamic_tile_pixels(image, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size,
                                         use_thumbnail=use_thumbnail)
    return [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in pixels], layout


def dynamic_tile_pixels(image: Image.Image, *, min_tiles: int = 1, max_tiles: int = DEFAULT_MAX_TILES,
                        tile_size: int = TILE_SIZE, use_thumbnail: bool = True,
                        source_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, TileLayout]:
    """`dynamic_tiles` as one uint8 tensor [T, 3, S, S] (the same pixels; the crops are array slices).

    `source_size`: the image's full size when it was decoded at a reduced scale (JPEG draft): the grid and the
    layout are chosen from it, as for the full image.
    """
    layout = tile_layout(source_size or image.size, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size,
                         use_thumbnail=use_thumbnail)
    (cols, rows), S = layout.grid, tile_size
    resized_HWC = np.asarray(image.resize((cols * S, rows * S), Image.Resampling.BICUBIC))
    tiles_TCSS = np.empty((layout.num_tiles, 3, S, S), np.uint8)
    tiles_TCSS[: cols * rows] = resized_HWC.reshape(rows, S, cols, S, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, S, S)
    if layout.thumbnail:
        tiles_TCSS[-1] = np.asarray(image.resize((S, S), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    return torch.from_numpy(tiles_TCSS), layout


def tile_layout(size: tuple[int, int], *, min_tiles: int = 1, max_tiles: int = DEFAULT_MAX_TILES,
                tile_size: int = TILE_SIZE, use_thumbnail: bool = True) -> TileLayout:
    """The grid, boxes and thumbnail of an image of `size` (width, height), as `dynamic_tiles` cuts it."""
    width, height = size
    cols, rows = choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    boxes = tuple((c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows)
                  for r in range(rows) for c in range(cols))
    return TileLayout((width, height), (cols, rows), boxes, use_thumbnail and len(boxes) != 1, tile_size)


@dataclass
class TiledImage:
    """An image cut into normalized tiles, ready for the encoder: `pixel_values` [T, 3, S, S] and its layout."""

    pixel_values: torch.Tensor
    layout: TileLayout


def tile_image(image: ImageSource, *, min_tiles: int = 1, max_tiles: int = DEFAULT_MAX_TILES, use_thumbnail: bool = True,
               tile_size: int = 448, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> TiledImage:
    """InternVL's `load_image`: dynamic tiles (+ thumbnail), each normalized as `build_transform` does.

    The tiles are already tile_size square, so `build_transform`'s resize is the identity (Pillow returns a copy
    for a same-size resize) and only the normalization remains.
    """
    rgb = image if isinstance(image, Image.Image) and image.mode == "RGB" else open_image(image)
    pixels, layout = dynamic_tile_pixels(rgb, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size,
                                         use_thumbnail=use_thumbnail)
    return TiledImage(Normalization(1 / 255, mean, std)(pixels), layout)


def tile_images(images: Sequence[ImageSource], *, min_tiles: int = 1, max_tiles: int = DEFAULT_MAX_TILES,
                use_thumbnail: bool = True, share_budget: bool = False, tile_size: int = 448) -> list[TiledImage]:
    """Tile several images. With `share_budget` (InternVL's multi-image training) each image gets
    `max(1, max_tiles // len(images))` tiles; the model card's chat inference tiles each image on its own."""
    per_image = tile_budget(len(images), max_tiles) if share_budget else max_tiles
    return [tile_image(im, min_tiles=min_tiles, max_tiles=per_image, use_thumbnail=use_thumbnail,
                       tile_size=tile_size) for im in images]
