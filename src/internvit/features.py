"""From images to what users need: tiled features with their layout, stitched feature maps, visual tokens.

References:
    - InternVL's `load_image` (dynamic tiles + thumbnail, `build_transform`), `extract_feature` (ViT, drop CLS,
      pixel unshuffle, `mlp1`) and the order in which `chat()` splices the tokens into the prompt
      (spec/internvit.md §4, §5.2-5.3): tiles of image 1 in raster order, its thumbnail, then image 2, ...
    - vLLM's InternVL path (spec/peers.md §4): all tiles of all images go through the encoder together and are
      split back per image afterwards. Here they go in bounded micro-batches, so a 12-tile image does not need
      12 tiles of activations at once and small images fill the batch of others.

Shapes: T tiles of one image, N = 1 + h*w tokens per tile (h = w = 32 at 448 px), C width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from internvit.model.projector import Projector, unshuffle_tokens
from internvit.model.vision import InternVisionModel
from internvit.preprocess.image import ImageSource
from internvit.preprocess.tiling import TiledImage, TileLayout, tile_images
from internvit.registry import DEFAULT_MAX_TILES


@torch.inference_mode()
def encode_tiles(model: InternVisionModel, pixel_values: Sequence[torch.Tensor], *, micro_batch: int = 8,
                 layers: Sequence[int] = (-1,)) -> list[list[torch.Tensor]]:
    """Run the tiles of many images through the encoder in shared, bounded micro-batches.

    Args:
        model: the encoder.
        pixel_values: per image, its tiles [T_i, 3, S, S].
        micro_batch: tiles per forward; memory is bounded by it, whatever the images' tile counts.
        layers: which `hidden_states` to return (0 = embeddings, -1 = last; `model.vision.layer_indices`); the
            encoder stops after the deepest one.

    Returns:
        Per image, per requested layer, the tokens [T_i, N, C] (in the model's dtype, on its device).
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    counts = [int(p.shape[0]) for p in pixel_values]
    flat = torch.cat(list(pixel_values)) if pixel_values else torch.empty(0)
    chunks: list[list[torch.Tensor]] = [[] for _ in layers]
    for start in range(0, flat.shape[0], micro_batch):
        states = model.forward_intermediates(flat[start:start + micro_batch].to(model.device, model.dtype), layers)
        for k, state in enumerate(states):
            chunks[k].append(state)
    per_layer = [torch.cat(c).split(counts) if c else [] for c in chunks]
    return [[per_layer[k][n] for k in range(len(layers))] for n in range(len(counts))]


@dataclass
class TiledFeatures:
    """Encoder features of one tiled image.

    Attributes:
        layout: grid, tile boxes in source pixels, thumbnail or not.
        cls: CLS token per tile [T, C], grid tiles in raster order, thumbnail last.
        patch_tokens: per tile its patch grid [T, h, w, C].
    """

    layout: TileLayout
    cls: torch.Tensor
    patch_tokens: torch.Tensor

    @classmethod
    def from_tokens(cls, layout: TileLayout, tokens_TNC: torch.Tensor) -> TiledFeatures:
        """From the encoder's tokens of the image's tiles [T, 1 + h*w, C] (square patch grids)."""
        T, N, C = tokens_TNC.shape
        side = int(round((N - 1) ** 0.5))
        return cls(layout, tokens_TNC[:, 0], tokens_TNC[:, 1:].reshape(T, side, side, C))

    @property
    def image_cls(self) -> torch.Tensor:
        """The CLS of the view that saw the whole image: the thumbnail's of a tiled image, else the single tile's."""
        return self.cls[-1] if self.layout.thumbnail else self.cls[0]

    @property
    def grid_patch_tokens(self) -> torch.Tensor:
        """The grid tiles only (no thumbnail), [cols*rows, h, w, C]."""
        cols, rows = self.layout.grid
        return self.patch_tokens[: cols * rows]

    @property
    def thumbnail_cls(self) -> torch.Tensor | None:
        return self.cls[-1] if self.layout.thumbnail else None

    @property
    def thumbnail_patch_tokens(self) -> torch.Tensor | None:
        return self.patch_tokens[-1] if self.layout.thumbnail else None

    def feature_map(self) -> torch.Tensor:
        """One high-resolution map stitched from the grid tiles: [rows*h, cols*w, C].

        Tile (r, c)'s patch grid lands at rows r*h..(r+1)*h-1 and columns c*w..(c+1)*w-1, so map cell (y, x)
        covers the source pixels of its tile's box subdivided h x w.
        """
        return stitch_tiles(self.patch_tokens, self.layout.grid)


def stitch_tiles(patch_tokens_ThwC: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-tile patch grids [T, h, w, C] (grid tiles in raster order first) -> one map [rows*h, cols*w, C]."""
    cols, rows = grid
    _, h, w, C = patch_tokens_ThwC.shape
    tiles = patch_tokens_ThwC[: cols * rows]
    return tiles.reshape(rows, cols, h, w, C).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, C)


def encode_images(model: InternVisionModel, images: Sequence[ImageSource | TiledImage], *, min_tiles: int = 1,
                  max_tiles: int = DEFAULT_MAX_TILES, use_thumbnail: bool = True, share_budget: bool = False, micro_batch: int = 8,
                  layer: int = -1) -> list[TiledFeatures]:
    """Tile images (or take pre-tiled ones) and encode all their tiles together.

    Returns:
        Per image, its `TiledFeatures` (float tensors in the model's dtype).
    """
    tiled = _as_tiled(images, min_tiles=min_tiles, max_tiles=max_tiles, use_thumbnail=use_thumbnail,
                      share_budget=share_budget, tile_size=model.config.image_size)
    encoded = encode_tiles(model, [t.pixel_values for t in tiled], micro_batch=micro_batch, layers=(layer,))
    return [TiledFeatures.from_tokens(t.layout, tokens_TNC) for t, (tokens_TNC,) in zip(tiled, encoded)]


def visual_tokens(model: InternVisionModel, images: Sequence[ImageSource | TiledImage], *,
                  projector: Projector | None = None, min_tiles: int = 1, max_tiles: int = DEFAULT_MAX_TILES,
                  use_thumbnail: bool = True, share_budget: bool = False, micro_batch: int = 8,
                  select_layer: int | None = None, downsample_ratio: float = 0.5,
                  ps_version: str = "v2") -> tuple[torch.Tensor, list[int]]:
    """The visual tokens InternVL feeds to its LLM, in prompt order.

    Without a projector: the pixel-unshuffled ViT tokens, [sum(T_i)*256, 4*C]; with one: `mlp1` applied,
    [sum(T_i)*256, llm_hidden]. Image i's tokens are its `num_patches_list[i]` tiles x 256 tokens, tiles in
    raster order then the thumbnail, each tile's tokens row-major over its 16x16 merged grid.

    Returns:
        The tokens and `num_patches_list` (tiles per image), as InternVL's `chat()` takes them.
    """
    if projector is not None and select_layer is None:
        select_layer = projector.config.select_layer
    layer = -1 if select_layer is None else select_layer
    tiled = _as_tiled(images, min_tiles=min_tiles, max_tiles=max_tiles, use_thumbnail=use_thumbnail,
                      share_budget=share_budget, tile_size=model.config.image_size)
    encoded = encode_tiles(model, [t.pixel_values for t in tiled], micro_batch=micro_batch, layers=(layer,))
    with torch.inference_mode():
        hidden_TNC = torch.cat([e[0] for e in encoded])
        if projector is not None:
            tokens = projector(hidden_TNC)
        else:
            tokens = unshuffle_tokens(hidden_TNC, downsample_ratio, version=ps_version)
    return tokens.reshape(-1, tokens.shape[-1]), [t.pixel_values.shape[0] for t in tiled]


def _as_tiled(images, **kwargs) -> list[TiledImage]:
    if all(isinstance(im, TiledImage) for im in images):
        return list(images)
    if any(isinstance(im, TiledImage) for im in images):
        raise TypeError("pass either images or TiledImage objects, not a mix")
    return tile_images(images, **kwargs)
