"""PCA pictures and CLS attention maps with a tiny random checkpoint (56 px tiles, 4x4 patches, 4 heads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from internvit.viz import encode_for_viz, pca_components, viz
from internvit import from_pretrained

pytestmark = pytest.mark.unit


def two_colours(path, size=(112, 56), split=42):
    """Red left of x = split, blue from there on (split on a patch boundary of the 2 x 1 tile grid)."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, :split] = (220, 30, 30)
    a[:, split:] = (30, 40, 200)
    Image.fromarray(a).save(path)
    return path


def test_pca_first_component_separates_two_colours(tiny_ckpt, tmp_path):
    img = two_colours(tmp_path / "flag.png")
    (e,) = encode_for_viz([img], model=tiny_ckpt, layer=1, tiles="dynamic", dtype="fp32")
    assert e.tokens.shape == (4, 8, 64)  # grid 2 x 1 tiles of 4 x 4 patches, stitched
    pc1 = pca_components(e.tokens, 3)[..., 0]
    # map columns 0..2 cover x < 42 (14 px patches of the 112 px wide resized image): red; 3..7 blue
    red, blue = pc1[:, :3], pc1[:, 3:]
    assert red.max() < blue.min() or blue.max() < red.min(), pc1


def test_pca_png_is_the_grid_scaled_to_the_image(tiny_ckpt, tmp_path):
    img = two_colours(tmp_path / "flag.png")
    (png,) = viz("pca", [img], tmp_path / "out", model=tiny_ckpt, layer=1, tiles="dynamic", dtype="fp32")
    picture = np.asarray(Image.open(png))
    assert png.name == "flag_pca.png" and picture.shape == (56, 2 * 112, 3)  # image | PCA at the image's size
    pca = picture[:, 112:]
    # each of the 4 x 8 map cells is a 14 x 14 block of one colour
    for r in range(4):
        for c in range(8):
            block = pca[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].reshape(-1, 3)
            assert (block == block[0]).all()
    (masked,) = viz("pca", [img], tmp_path / "out2", model=tiny_ckpt, layer=1, tiles="dynamic", dtype="fp32",
                    mask_threshold=0.5)
    mask = np.asarray(Image.open(masked))[:, 224:, 0]
    assert Image.open(masked).size == (3 * 112, 56)
    assert len(np.unique(mask[:, :42])) == 1 and len(np.unique(mask[:, 42:])) == 1  # the mask is the colour split
    assert mask[0, 0] != mask[0, -1]


def test_cls_attention_equals_manual_computation(tiny_ckpt, tmp_path):
    """The hook's maps against attention recomputed here from hidden_states and the layer's weights."""
    rng = np.random.default_rng(0)
    img = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 255, (56, 112, 3), dtype=np.uint8)).save(img)
    (e,) = encode_for_viz([img], model=tiny_ckpt, layer=2, tiles="dynamic", attention=True, dtype="fp32")
    assert e.attention.shape == (4, 4, 8)  # heads, stitched 4 x 8 grid

    from internvit.preprocess.tiling import tile_image

    model = from_pretrained(tiny_ckpt, dtype="fp32")
    pixels = tile_image(Image.open(img).convert("RGB"), max_tiles=12, tile_size=56).pixel_values
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states[1]  # input of layer 2
        layer = model.encoder.layers[1]
        qkv = F.linear(F.layer_norm(hidden, (64,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps),
                       layer.attn.qkv.weight, layer.attn.qkv.bias)
    T, N = hidden.shape[:2]
    q, k = qkv[..., :64].reshape(T, N, 4, 16), qkv[..., 64:128].reshape(T, N, 4, 16)
    probs = torch.einsum("thd,tnhd->thn", q[:, 0], k).mul(16**-0.5).softmax(-1)  # CLS row, [T, H, N]
    for tile in range(2):  # grid (2, 1): tile 0 on the left, tile 1 on the right; the thumbnail is left out
        expected = probs[tile, :, 1:].reshape(4, 4, 4).numpy()
        np.testing.assert_allclose(e.attention[:, :, tile * 4:(tile + 1) * 4], expected, atol=1e-6)
    np.testing.assert_allclose(e.attention.sum((1, 2)) + 0, probs[:2, :, 1:].sum((0, 2)).numpy(), atol=1e-5)


def test_attention_png_and_layer_errors(tiny_ckpt, tmp_path):
    img = two_colours(tmp_path / "flag.png")
    (png,) = viz("attention", [img], tmp_path / "att", model=tiny_ckpt, dtype="fp32")
    w, h = Image.open(png).size
    # tiles "none": the 56 x 56 centre crop; image + 4 heads + mean as 256 px panels, 5 per row
    assert png.name == "flag_attention.png" and (w, h) == (5 * 256, 2 * 256)
    with pytest.raises(ValueError, match="attention layers are 1..2"):
        viz("attention", [img], tmp_path / "x", model=tiny_ckpt, layer=0)
    with pytest.raises(ValueError, match="layers are 0..2"):
        viz("pca", [img], tmp_path / "x", model=tiny_ckpt, layer=5)
