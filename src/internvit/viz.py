"""Pictures of what the encoder sees: PCA of the stitched patch-token map, and the CLS attention per head.

References:
    - DINOv2's PCA maps (facebookresearch/dinov2 PR #187, issues #23 and #412): the patch tokens of an image
      projected on their first 3 principal components, each min-max scaled to [0, 1] and shown as RGB; the first
      component thresholded as a foreground mask.
    - DINO (Caron et al., 2021) `visualize_attention.py`: the last layer's CLS-to-patch attention, one map per head.
    - InternVL 2.5's dynamic tiles (spec/internvit.md §4) and `features.stitch_tiles`: the grid tiles' patch grids
      stitched into one map [rows*h, cols*w], tile (r, c) at rows r*h.. and columns c*w...

Differs from those:
    - the map is the stitched map of every grid tile (`tiles="dynamic"`), not one 224/448 crop, so a wide or tall
      image keeps its shape; with `tiles="none"` it is the single centre-cropped tile the CLIP processor makes.
    - the CLS attention of a tiled image is each tile's own CLS over its own patches, stitched like the tokens
      (every tile is a separate forward pass); the thumbnail is left out, as in `extract --patch-tokens`.
    - attention probabilities are recomputed from the chosen layer's qkv output, captured by a forward hook, so the
      encoder keeps its fast attention path and `model/vision.py` is unchanged.

Shapes: T tiles, h x w patch grid per tile, Hm x Wm = rows*h x cols*w stitched map, C width, H heads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from internvit.features import stitch_tiles
from internvit.preprocess import ImageProcessor, open_image
from internvit.preprocess.tiling import tile_image
from internvit.sources import expand_sources
from internvit.weights import from_checkpoint

MAX_SIDE = 2048  # pictures of larger images are scaled down so that their long side is this


@dataclass
class EncodedImage:
    """One image through the encoder: what it saw (`shown`, the pixels the map covers) and the stitched maps."""

    path: str
    shown: Image.Image
    tokens: np.ndarray | None = None  # [Hm, Wm, C] patch tokens of the requested layer
    attention: np.ndarray | None = None  # [H, Hm, Wm] CLS attention per head


def _load(model: str | torch.nn.Module, *, dtype: str | None, device: str | None):
    vit = model if isinstance(model, torch.nn.Module) else from_checkpoint(model, dtype=dtype, device=device)
    vit.eval()
    ckpt = getattr(vit, "checkpoint", None)
    processor = (ImageProcessor.from_json(ckpt.preprocessor_path) if ckpt is not None and ckpt.preprocessor_path
                 else ImageProcessor(size=vit.config.image_size, crop_size=vit.config.image_size))
    return vit, processor


def _tiles(path: str, vit, processor, tiles: str, max_tiles: int) -> tuple[torch.Tensor, tuple[int, int], Image.Image]:
    """The encoder's input for one image: tiles [T, 3, S, S], the grid (cols, rows), and the pixels they cover."""
    image = open_image(path)
    if tiles == "dynamic":
        tiled = tile_image(image, max_tiles=max_tiles, tile_size=vit.config.image_size)
        return tiled.pixel_values, tiled.layout.grid, image
    if tiles != "none":
        raise ValueError(f"tiles must be 'none' or 'dynamic', got {tiles!r}")
    return processor(image)[None], (1, 1), processor.resize_and_crop(image)


def _stitch(maps_ThwX: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return stitch_tiles(maps_ThwX, grid)


class _QKVCapture:
    """A forward hook on one layer's `attn.qkv` that keeps the CLS row of the attention probabilities."""

    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn
        self.probs: list[torch.Tensor] = []  # per forward [B, H, N]
        self.handle = attn.qkv.register_forward_hook(self)

    def __call__(self, module, inputs, qkv_BN3C: torch.Tensor) -> None:
        attn = self.attn
        B, N, C3 = qkv_BN3C.shape
        C = C3 // 3
        H, D = attn.num_heads, attn.head_dim
        qkv = qkv_BN3C.float().view(B, N, 3, C)
        q_BNC, k_BNC = qkv[:, :, 0], qkv[:, :, 1]
        if attn.qk_normalization:  # the 6B normalises q and k over the full width before the heads split
            q_BNC, k_BNC = attn.q_norm(q_BNC.to(qkv_BN3C.dtype)).float(), attn.k_norm(k_BNC.to(qkv_BN3C.dtype)).float()
        q_BH1D = q_BNC[:, :1].view(B, 1, H, D).transpose(1, 2)
        k_BHND = k_BNC.view(B, N, H, D).transpose(1, 2)
        scores_BHN = (q_BH1D @ k_BHND.transpose(-2, -1)).squeeze(2) * attn.scale
        self.probs.append(scores_BHN.softmax(-1))

    def remove(self) -> None:
        self.handle.remove()


def _layer_index(layer: int, num_layers: int, *, attention: bool) -> int:
    """`hidden_states` index (0 = embeddings .. L = last; negative from the end); for attention 1..L."""
    j = layer + num_layers + 1 if layer < 0 else layer
    lo = 1 if attention else 0
    if not lo <= j <= num_layers:
        what = "attention layers are 1..{L} (or -1 = last)" if attention else "layers are 0..{L} (0 = embeddings)"
        raise ValueError(f"layer {layer} is out of range: {what.format(L=num_layers)}")
    return j


@torch.inference_mode()
def encode_for_viz(images, *, model: str | torch.nn.Module, layer: int = -1, tiles: str = "none",
                   max_tiles: int = 12, attention: bool = False, dtype: str | None = "fp32",
                   device: str | None = None, micro_batch: int = 8) -> list[EncodedImage]:
    """Encode images and return per image its stitched patch-token map of `layer` (or, with `attention`, the CLS
    attention of layer `layer` per head on the stitched grid).

    Args:
        images: image paths.
        model: a checkpoint name/path for `internvit.from_pretrained`, or a loaded model.
        layer: `hidden_states` index for tokens (0 = embeddings, -1 = last); for attention the layer 1..L.
        tiles: "none" (the CLIP processor's single centre-cropped tile) or "dynamic" (InternVL tiles).
        max_tiles: the tile budget with "dynamic".
        attention: compute the CLS attention instead of the tokens.
        dtype, device: for loading `model`.
        micro_batch: tiles per forward.
    """
    vit, processor = _load(model, dtype=dtype, device=device)
    L = vit.config.num_hidden_layers
    j = _layer_index(layer, L, attention=attention)
    out = []
    for path in images:
        pixels, grid, shown = _tiles(str(path), vit, processor, tiles, max_tiles)
        cols, rows = grid
        T = pixels.shape[0]
        capture = _QKVCapture(vit.encoder.layers[j - 1].attn) if attention else None
        chunks = []
        try:
            for i in range(0, T, micro_batch):
                o = vit(pixels[i:i + micro_batch].to(vit.device, vit.dtype), output_hidden_states=not attention)
                if not attention:
                    chunks.append(o.hidden_states[j].float().cpu())
        finally:
            if capture is not None:
                capture.remove()
        side = vit.config.image_size // vit.config.patch_size
        if attention:
            probs_THN = torch.cat(capture.probs).cpu()
            maps = probs_THN[:cols * rows, :, 1:].reshape(-1, probs_THN.shape[1], side, side).permute(0, 2, 3, 1)
            out.append(EncodedImage(str(path), shown, attention=_stitch(maps, grid).permute(2, 0, 1).numpy()))
        else:
            tokens_TNC = torch.cat(chunks)
            maps = tokens_TNC[:cols * rows, 1:].reshape(-1, side, side, tokens_TNC.shape[-1])
            out.append(EncodedImage(str(path), shown, tokens=_stitch(maps, grid).numpy()))
    return out


def pca_components(tokens_HWC: np.ndarray, n: int = 3) -> np.ndarray:
    """The map projected on its first `n` principal components, [Hm, Wm, n] (float64, not scaled).

    Each component's sign is fixed so that its largest loading is positive (SVD signs are arbitrary).
    """
    Hm, Wm, C = tokens_HWC.shape
    x = tokens_HWC.reshape(-1, C).astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    vt = vt[:n]
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])
    proj = x @ (vt * signs[:, None]).T
    if proj.shape[1] < n:  # fewer tokens than components
        proj = np.pad(proj, ((0, 0), (0, n - proj.shape[1])))
    return proj.reshape(Hm, Wm, n)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=(0, 1), keepdims=True), x.max(axis=(0, 1), keepdims=True)
    return (x - lo) / np.where(hi > lo, hi - lo, 1.0)


def _panel(values_HW3: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """[Hm, Wm, 3] in [0, 1] -> an RGB image of `size`, each map cell a block (nearest neighbour)."""
    rgb = Image.fromarray((np.clip(values_HW3, 0, 1) * 255).round().astype(np.uint8))
    return rgb.resize(size, Image.Resampling.NEAREST)


def _fit(image: Image.Image) -> Image.Image:
    w, h = image.size
    s = min(1.0, MAX_SIDE / max(w, h))
    return image if s == 1.0 else image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)


def pca_picture(encoded: EncodedImage, *, mask_threshold: float | None = None) -> Image.Image:
    """The image, then its PCA map as RGB at the image's size, then (with `mask_threshold`) the foreground mask:
    the first component, min-max scaled, above the threshold. Panels side by side."""
    shown = _fit(encoded.shown.convert("RGB"))
    comps = _minmax(pca_components(encoded.tokens, 3))
    panels = [shown, _panel(comps, shown.size)]
    if mask_threshold is not None:
        mask = (comps[..., :1] > mask_threshold).astype(np.float64)
        panels.append(_panel(np.repeat(mask, 3, axis=2), shown.size))
    return _side_by_side(panels)


def _heat(values_HW: np.ndarray) -> np.ndarray:
    """[Hm, Wm] -> [Hm, Wm, 3], min-max scaled, black -> red -> yellow -> white (an "inferno"-like ramp)."""
    v = _minmax(values_HW[..., None])[..., 0]
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)


def attention_picture(encoded: EncodedImage, *, columns: int = 5, panel_side: int = 256) -> Image.Image:
    """The image and one heat map per head (plus the mean over heads), each scaled to a panel of the image's
    aspect ratio with long side `panel_side`, in rows of `columns`."""
    shown = encoded.shown.convert("RGB")
    w, h = shown.size
    s = panel_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    att = encoded.attention
    panels = [shown.resize(size, Image.Resampling.BICUBIC)] + [_panel(_heat(a), size) for a in att]
    panels.append(_panel(_heat(att.mean(0)), size))
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * size[0], rows * size[1]), (255, 255, 255))
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % columns) * size[0], (i // columns) * size[1]))
    return sheet


def _side_by_side(panels: list[Image.Image]) -> Image.Image:
    w, h = panels[0].size
    sheet = Image.new("RGB", (w * len(panels), h))
    for i, p in enumerate(panels):
        sheet.paste(p, (i * w, 0))
    return sheet


def _out_name(out: Path, path: str, suffix: str, used: set[str]) -> Path:
    stem = Path(path).stem
    name, n = f"{stem}_{suffix}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}_{suffix}.png"
    used.add(name)
    return out / name


def viz(kind: str, images, out: str | os.PathLike, *, model: str | torch.nn.Module, layer: int | None = None,
        tiles: str = "none", max_tiles: int = 12, mask_threshold: float | None = None, dtype: str | None = "fp32",
        device: str | None = None) -> list[Path]:
    """Write one PNG per image to the folder `out`: `NAME_pca.png` or `NAME_attention.png`.

    Args:
        kind: "pca" or "attention".
        images: image paths (folders, globs and list files are expanded as for `extract`).
        out: the output folder.
        model: checkpoint for `internvit.from_pretrained`, or a loaded model.
        layer: `hidden_states` index for pca (default -1, the last layer); attention layer 1..L (default last).
        tiles, max_tiles: "none" (one centre-cropped tile) or "dynamic" (InternVL tiles, stitched).
        mask_threshold: pca only: also draw the foreground mask, first component (scaled to [0, 1]) > threshold.
        dtype, device: for loading `model`.

    Returns:
        The PNG files written, in input order.
    """
    if kind not in ("pca", "attention"):
        raise ValueError(f"kind must be 'pca' or 'attention', got {kind!r}")
    paths = expand_sources(images)
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, images))}")
    encoded = encode_for_viz(paths, model=model, layer=-1 if layer is None else layer, tiles=tiles,
                             max_tiles=max_tiles, attention=kind == "attention", dtype=dtype, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for e in encoded:
        picture = pca_picture(e, mask_threshold=mask_threshold) if kind == "pca" else attention_picture(e)
        target = _out_name(out, e.path, kind, used)
        picture.save(target)
        written.append(target)
    return written
