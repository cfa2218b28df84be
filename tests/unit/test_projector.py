"""Pixel unshuffle, the `mlp1` projector, visual tokens, stitched feature maps and shared micro-batches.

References for the expectations (never internvit itself):
    - spec/internvit.md §5.2: the index formula of InternVL's `pixel_shuffle` (v2 and v1), written out below;
      `mlp1` = LayerNorm (eps 1e-5) -> Linear -> exact GELU -> Linear.
    - transformers `InternVLModel.get_image_features` / `pixel_shuffle` (spec/peers.md §2) with the same random
      weights, moved from transformers' keys to the official ones by the mapping written in this file.
    - the stitched map of the embedding layer is compared with one convolution over the whole resized image.

Run with `-s` to see the measured parity figures.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import internvit
from helpers import randomize_, random_official_state_dict, reference_forward, save_safetensors
from internvit.features import TiledFeatures, encode_images, encode_tiles, visual_tokens
from internvit.model.projector import Projector, ProjectorConfig, load_projector, pixel_unshuffle, unshuffle_tokens
from internvit.preprocess.tiling import TiledImage, TileLayout, tile_image
from internvit.preprocess.transforms import IMAGENET_MEAN, IMAGENET_STD
from internvit.weights import CheckpointError

pytestmark = pytest.mark.unit

LLM_HIDDEN = 32
PARITY_ATOL = 1e-4


def report(label: str, value: float) -> None:
    print(f"\n[projector] {label}: {value:.3e}", end="")


# ---- pixel unshuffle against the index formula of spec §5.2 -------------------------------------------


def unshuffle_reference(x_ThwC: torch.Tensor, version: str = "v2") -> torch.Tensor:
    """Output token (a, b) = [x(2a,2b) | x(2a,2b+1) | x(2a+1,2b) | x(2a+1,2b+1)]; v1: the token grid transposed."""
    T, h, w, C = x_ThwC.shape
    out = torch.empty(T, h // 2, w // 2, 4 * C, dtype=x_ThwC.dtype)
    for a in range(h // 2):
        for b in range(w // 2):
            for dy in range(2):
                for dx in range(2):
                    ch = (dy * 2 + dx) * C  # channel = (dy*2 + dx)*C + c
                    out[:, a, b, ch:ch + C] = x_ThwC[:, 2 * a + dy, 2 * b + dx]
    if version == "v1":
        out = out.transpose(1, 2)  # column-major token order: v1[t, b, a] = v2[t, a, b]
    return out


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_pixel_unshuffle_index_formula_32x32(version):
    x = torch.randn(3, 32, 32, 8)
    out = pixel_unshuffle(x, 0.5, version=version)
    assert out.shape == (3, 16, 16, 32)
    assert torch.equal(out, unshuffle_reference(x, version))


def test_pixel_unshuffle_v1_is_v2_transposed_and_spot_values():
    x = torch.randn(2, 32, 32, 5)
    v2, v1 = pixel_unshuffle(x, version="v2"), pixel_unshuffle(x, version="v1")
    assert torch.equal(v1, v2.transpose(1, 2))
    assert not torch.equal(v1, v2)
    # token (3, 7) of v2, flattened row-major at index 3*16 + 7, as the LLM sees it
    flat = v2.reshape(2, 256, 20)
    expected = torch.cat([x[:, 6, 14], x[:, 6, 15], x[:, 7, 14], x[:, 7, 15]], dim=-1)
    assert torch.equal(flat[:, 3 * 16 + 7], expected)
    assert torch.equal(v1.reshape(2, 256, 20)[:, 7 * 16 + 3], expected)


def test_pixel_unshuffle_rectangular_grid():
    x = torch.randn(2, 8, 12, 3)  # 8 rows, 12 columns
    out = pixel_unshuffle(x, version="v2")
    assert out.shape == (2, 4, 6, 12)
    assert torch.equal(out, unshuffle_reference(x, "v2"))


def test_pixel_unshuffle_rejects_odd_grids_and_versions():
    with pytest.raises(ValueError):
        pixel_unshuffle(torch.randn(1, 5, 5, 4))
    with pytest.raises(ValueError, match="ps_version"):
        pixel_unshuffle(torch.randn(1, 4, 4, 4), version="v3")
    with pytest.raises(ValueError, match="square"):
        unshuffle_tokens(torch.randn(1, 1 + 12, 4))


def test_unshuffle_tokens_drops_cls_and_flattens_row_major():
    hidden = torch.randn(4, 1 + 64, 6)
    out = unshuffle_tokens(hidden)
    assert out.shape == (4, 16, 24)
    grid = hidden[:, 1:].reshape(4, 8, 8, 6)  # tokens 1.. are the patch grid, row-major
    assert torch.equal(out, unshuffle_reference(grid).reshape(4, 16, 24))


def test_pixel_unshuffle_equals_transformers_pixel_shuffle(hf):
    x = torch.randn(3, 32, 32, 16)
    assert torch.equal(pixel_unshuffle(x, 0.5), hf.pixel_shuffle(x, scale_factor=0.5))


# ---- transformers InternVLModel with random weights, and ours with the same ones ------------------------


def hf_vision_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `InternVLModel` keys `vision_tower.*` -> official InternViT keys (spec/peers.md §2 table)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        if not key.startswith("vision_tower."):
            continue
        k = key.removeprefix("vision_tower.")
        if k == "embeddings.cls_token":
            out["embeddings.class_embedding"] = v
        elif k == "embeddings.position_embeddings":
            out["embeddings.position_embedding"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["embeddings.patch_embedding." + k.removeprefix("embeddings.patch_embeddings.projection.")] = v
        else:
            m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", k)
            assert m, f"unexpected transformers key {key}"
            i, rest = m.groups()
            p = f"encoder.layers.{i}."
            m = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", rest)
            if m:
                qkv.setdefault(p + "attn.qkv." + m.group(2), {})[m.group(1)] = v
                continue
            renames = {
                "lambda_1": "ls1", "lambda_2": "ls2",
                "layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
                "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
                "attention.projection_layer.weight": "attn.proj.weight",
                "attention.projection_layer.bias": "attn.proj.bias",
                "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
                "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
            }
            assert rest in renames, f"unexpected transformers key {key}"
            out[p + renames[rest]] = v
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # fused rows [q | k | v] (spec §2.1)
    return out


def hf_projector_to_mlp1(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`multi_modal_projector.{layer_norm,linear_1,linear_2}` -> `mlp1.{0,1,3}` (spec/peers.md §2 table)."""
    index = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
    out = {}
    for key, v in sd.items():
        m = re.fullmatch(r"multi_modal_projector\.(layer_norm|linear_1|linear_2)\.(weight|bias)", key)
        if m:
            out[f"{index[m.group(1)]}.{m.group(2)}"] = v
    assert len(out) == 6
    return out


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    config = transformers.InternVLConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=112, patch_size=14, attention_bias=True, use_mean_pooling=True,
                           layer_scale_init_value=0.1),
        text_config=dict(model_type="qwen2", hidden_size=LLM_HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, vocab_size=100),
        downsample_ratio=0.5, vision_feature_layer=-1,
    )
    model = transformers.InternVLModel(config).eval()
    randomize_(model, seed=7)  # layer scales in [0.5, 1.5], norms ~1, nonzero biases (tests/helpers.py)
    return model


@pytest.fixture(scope="module")
def ours(hf):
    sd = hf.state_dict()
    model = internvit.InternVisionModel(internvit.PRESETS["tiny"].replace(image_size=112)).eval()
    model.load_state_dict(hf_vision_to_official(sd), strict=True)
    projector = Projector(ProjectorConfig(vit_hidden_size=64, llm_hidden_size=LLM_HIDDEN)).eval()
    projector.mlp1.load_state_dict(hf_projector_to_mlp1(sd), strict=True)
    return model, projector


@pytest.fixture(scope="module")
def tiled_photos() -> list[TiledImage]:
    data = pytest.importorskip("skimage.data")
    coffee = Image.fromarray(data.coffee())  # 600x400 -> 3x2 + thumbnail with 6 tiles
    astronaut = Image.fromarray(data.astronaut()).crop((0, 0, 512, 200))  # wide strip -> 3x1 + thumbnail
    return [tile_image(coffee, max_tiles=6, tile_size=112), tile_image(astronaut, max_tiles=6, tile_size=112)]


def _hf_features(hf, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        out = hf.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                    vision_feature_select_strategy="default")
    features = out.pooler_output if hasattr(out, "pooler_output") else out[1]  # [T, 16, llm_hidden]
    assert features.shape == (pixel_values.shape[0], 16, LLM_HIDDEN)
    return features.reshape(-1, LLM_HIDDEN)


def _hf_unshuffled(hf, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        out = hf.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
    hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    T = hidden.shape[0]
    return hf.pixel_shuffle(hidden[:, 1:].reshape(T, 8, 8, 64), scale_factor=0.5).reshape(-1, 256)


def test_tiles_are_what_the_test_expects(tiled_photos):
    assert [t.layout.grid for t in tiled_photos] == [(3, 2), (3, 1)]
    assert [t.pixel_values.shape[0] for t in tiled_photos] == [7, 4]


@pytest.mark.parametrize("layer", [-1, -2])
def test_visual_tokens_equal_transformers_get_image_features(hf, ours, tiled_photos, layer):
    model, projector = ours
    pixels = torch.cat([t.pixel_values for t in tiled_photos])
    expected = _hf_features(hf, pixels, layer)
    tokens, num_patches = visual_tokens(model, tiled_photos, projector=projector, select_layer=layer)
    assert num_patches == [7, 4]
    assert tokens.shape == expected.shape == (11 * 16, LLM_HIDDEN)
    err = (tokens - expected).abs().max().item()
    report(f"visual tokens vs transformers get_image_features, layer {layer}, fp32, max abs", err)
    assert err <= PARITY_ATOL
    assert expected.std() > 0.1  # not a degenerate output


def test_visual_tokens_select_layer_from_projector_config(hf, ours, tiled_photos):
    model, projector = ours
    at_minus_2 = Projector(ProjectorConfig(vit_hidden_size=64, llm_hidden_size=LLM_HIDDEN, select_layer=-2)).eval()
    at_minus_2.load_state_dict(projector.state_dict())
    pixels = torch.cat([t.pixel_values for t in tiled_photos])
    tokens, _ = visual_tokens(model, tiled_photos, projector=at_minus_2)
    assert (tokens - _hf_features(hf, pixels, -2)).abs().max().item() <= PARITY_ATOL
    assert (tokens - _hf_features(hf, pixels, -1)).abs().max().item() > 1e-2  # the layers do differ


@pytest.mark.parametrize("layer", [-1, -2])
def test_unshuffled_tokens_equal_transformers_pixel_shuffle(hf, ours, tiled_photos, layer):
    model, _ = ours
    pixels = torch.cat([t.pixel_values for t in tiled_photos])
    tokens, num_patches = visual_tokens(model, tiled_photos, projector=None, select_layer=layer)
    expected = _hf_unshuffled(hf, pixels, layer)
    assert num_patches == [7, 4] and tokens.shape == expected.shape == (11 * 16, 256)
    err = (tokens - expected).abs().max().item()
    report(f"unshuffled ViT tokens vs transformers pixel_shuffle, layer {layer}, fp32, max abs", err)
    assert err <= PARITY_ATOL


def test_visual_tokens_from_pil_images_and_small_micro_batches(hf, ours):
    """Raw images are tiled at the model's image size; micro-batches of 3 tiles change nothing."""
    model, projector = ours
    g = torch.Generator().manual_seed(3)
    pixels = (torch.rand(300, 200, 3, generator=g) * 255).to(torch.uint8).numpy()  # 200x300 portrait -> 2x3
    image = Image.fromarray(pixels)
    tokens, num_patches = visual_tokens(model, [image, image.transpose(Image.Transpose.ROTATE_90)],
                                        projector=projector, max_tiles=6, micro_batch=3)
    assert num_patches == [7, 7]
    hf_pixels = torch.cat([tile_image(im, max_tiles=6, tile_size=112).pixel_values
                           for im in (image, image.transpose(Image.Transpose.ROTATE_90))])
    assert (tokens - _hf_features(hf, hf_pixels, -1)).abs().max().item() <= PARITY_ATOL


def test_random_tiles_parity(hf, ours):
    model, projector = ours
    pixels = torch.randn(5, 3, 112, 112)
    tokens, num_patches = visual_tokens(model, [TiledImage(pixels, _layout(1, 1, thumbnail=False))],
                                        projector=projector)
    assert num_patches == [5]
    assert (tokens - _hf_features(hf, pixels, -1)).abs().max().item() <= PARITY_ATOL


# ---- load_projector from a test-written InternVL chat checkpoint -----------------------------------------


def _mlp1_tensors(g: torch.Generator, llm_hidden: int = LLM_HIDDEN, merged: int = 256) -> dict[str, torch.Tensor]:
    return {
        "mlp1.0.weight": 1 + 0.1 * torch.randn(merged, generator=g),
        "mlp1.0.bias": 0.05 * torch.randn(merged, generator=g),
        "mlp1.1.weight": torch.randn(llm_hidden, merged, generator=g) / 16,
        "mlp1.1.bias": 0.05 * torch.randn(llm_hidden, generator=g),
        "mlp1.3.weight": torch.randn(llm_hidden, llm_hidden, generator=g) / math.sqrt(llm_hidden),
        "mlp1.3.bias": 0.05 * torch.randn(llm_hidden, generator=g),
    }


def _chat_config(**overrides) -> dict:
    tiny = internvit.PRESETS["tiny"]
    config = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": {"model_type": "intern_vit_6b", "hidden_size": tiny.hidden_size,
                          "num_hidden_layers": tiny.num_hidden_layers,
                          "num_attention_heads": tiny.num_attention_heads,
                          "intermediate_size": tiny.intermediate_size, "image_size": tiny.image_size,
                          "patch_size": 14, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm"},
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": LLM_HIDDEN},
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
    }
    config.update(overrides)
    return config


def write_chat_checkpoint(folder: Path, *, config: dict | None = None, mlp1: dict | None = None,
                          sharded: str | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """config.json + model.safetensors (or shards + index) with vision_model.*, mlp1.*, language_model.* keys.

    sharded: None (one file), "mlp1_with_vision" or "mlp1_with_llm" (which shard holds mlp1.*).
    """
    g = torch.Generator().manual_seed(11)
    vision = {"vision_model." + k: v for k, v in random_official_state_dict(internvit.PRESETS["tiny"], 5).items()}
    mlp = _mlp1_tensors(g) if mlp1 is None else mlp1
    llm = {"language_model.model.embed_tokens.weight": torch.randn(100, LLM_HIDDEN, generator=g),
           "language_model.lm_head.weight": torch.randn(100, LLM_HIDDEN, generator=g)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or _chat_config(), indent=2))
    cast = lambda d: {k: v.to(dtype) for k, v in d.items()}  # noqa: E731
    if sharded is None:
        save_safetensors(cast({**vision, **mlp, **llm}), folder / "model.safetensors")
    else:
        first, second = ({**vision, **mlp}, llm) if sharded == "mlp1_with_vision" else (vision, {**mlp, **llm})
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        save_safetensors(cast(first), folder / names[0])
        save_safetensors(cast(second), folder / names[1])
        weight_map = {k: names[0] for k in first} | {k: names[1] for k in second}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return mlp


def _mlp1_reference(mlp: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """spec §5.2: LayerNorm(eps 1e-5) -> Linear -> exact GELU -> Linear."""
    y = F.layer_norm(x, (x.shape[-1],), mlp["mlp1.0.weight"], mlp["mlp1.0.bias"], eps=1e-5)
    y = F.linear(y, mlp["mlp1.1.weight"], mlp["mlp1.1.bias"])
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    return F.linear(y, mlp["mlp1.3.weight"], mlp["mlp1.3.bias"])


@pytest.mark.parametrize("sharded", [None, "mlp1_with_vision"])
def test_load_projector_from_chat_checkpoint(tmp_path, sharded):
    mlp = write_chat_checkpoint(tmp_path / "chat", sharded=sharded)
    projector = load_projector(tmp_path / "chat")
    assert isinstance(projector, Projector) and not projector.training
    assert projector.config == ProjectorConfig(vit_hidden_size=64, llm_hidden_size=LLM_HIDDEN, downsample_ratio=0.5,
                                               ps_version="v2", select_layer=-1)
    for k, v in projector.mlp1.state_dict().items():
        assert torch.equal(v, mlp["mlp1." + k]), k
    assert isinstance(projector.mlp1[0], torch.nn.LayerNorm) and projector.mlp1[0].eps == 1e-5
    assert isinstance(projector.mlp1[2], torch.nn.GELU) and projector.mlp1[2].approximate == "none"
    hidden = torch.randn(3, 1 + 16, 64)
    expected = _mlp1_reference(mlp, unshuffle_reference(hidden[:, 1:].reshape(3, 4, 4, 64)).reshape(3, 4, 256))
    with torch.no_grad():
        out = projector(hidden)
    assert out.shape == (3, 4, LLM_HIDDEN)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_load_projector_when_mlp1_sits_in_another_shard(tmp_path):
    mlp = write_chat_checkpoint(tmp_path / "chat", sharded="mlp1_with_llm")
    projector = load_projector(tmp_path / "chat")
    for k, v in projector.mlp1.state_dict().items():
        assert torch.equal(v, mlp["mlp1." + k]), k


def test_load_projector_config_fields_and_dtype(tmp_path):
    write_chat_checkpoint(tmp_path / "chat", config=_chat_config(ps_version="v1", select_layer=-2),
                          dtype=torch.bfloat16)
    projector = load_projector(tmp_path / "chat")
    assert projector.config.ps_version == "v1" and projector.config.select_layer == -2
    assert projector.mlp1[1].weight.dtype == torch.bfloat16
    assert load_projector(tmp_path / "chat", dtype="fp32").mlp1[1].weight.dtype == torch.float32


def test_load_projector_without_mlp1_is_a_clear_error(tmp_path):
    write_chat_checkpoint(tmp_path / "chat", mlp1={})
    with pytest.raises(CheckpointError, match=r"no mlp1\.\* weights") as e:
        load_projector(tmp_path / "chat")
    assert str(tmp_path / "chat") in str(e.value)


def test_load_projector_with_a_missing_mlp1_tensor_names_it(tmp_path):
    mlp = _mlp1_tensors(torch.Generator().manual_seed(1))
    del mlp["mlp1.3.bias"]
    write_chat_checkpoint(tmp_path / "chat", mlp1=mlp)
    with pytest.raises(CheckpointError, match=r"3\.bias"):
        load_projector(tmp_path / "chat")


def test_load_projector_with_wrong_llm_width_is_a_clear_error(tmp_path):
    write_chat_checkpoint(tmp_path / "chat", config=_chat_config(llm_config={"hidden_size": 48}))
    with pytest.raises(CheckpointError, match="do not match"):
        load_projector(tmp_path / "chat")


def test_load_projector_needs_an_llm_hidden_size(tmp_path):
    write_chat_checkpoint(tmp_path / "chat", config=_chat_config(llm_config={}))
    with pytest.raises(ValueError, match="hidden_size"):
        load_projector(tmp_path / "chat")


def test_load_projector_without_config_json(tmp_path):
    write_chat_checkpoint(tmp_path / "chat")
    (tmp_path / "chat" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_projector(tmp_path / "chat")


# ---- the stitched feature map ---------------------------------------------------------------------------


def _layout(cols: int, rows: int, *, thumbnail: bool, tile_size: int = 56) -> TileLayout:
    boxes = tuple((c * 10.0, r * 10.0, c * 10.0 + 10, r * 10.0 + 10) for r in range(rows) for c in range(cols))
    return TileLayout((cols * 10, rows * 10), (cols, rows), boxes, thumbnail, tile_size)


@pytest.mark.parametrize("cols, rows, thumbnail", [(3, 2, True), (2, 3, False), (1, 1, False), (4, 1, True)])
def test_feature_map_places_tile_r_c_at_rows_r_h_cols_c_w(cols, rows, thumbnail):
    h, w = 4, 5  # distinct on purpose: a swapped axis cannot pass
    T = cols * rows + int(thumbnail)
    tokens = torch.zeros(T, h, w, 3)
    for k in range(T):
        tokens[k, ..., 0] = k  # tile index
        tokens[k, ..., 1] = torch.arange(h).view(h, 1)  # row inside the tile
        tokens[k, ..., 2] = torch.arange(w).view(1, w)  # column inside the tile
    if thumbnail:
        tokens[-1] = -1.0
    features = TiledFeatures(_layout(cols, rows, thumbnail=thumbnail), torch.arange(T).float()[:, None], tokens)
    fmap = features.feature_map()
    assert fmap.shape == (rows * h, cols * w, 3)
    for Y in range(rows * h):
        for X in range(cols * w):
            r, c = Y // h, X // w
            assert fmap[Y, X].tolist() == [r * cols + c, Y % h, X % w], (Y, X)
    assert (fmap[..., 0] >= 0).all()  # the thumbnail is not in the map
    assert features.grid_patch_tokens.shape[0] == cols * rows
    if thumbnail:
        assert torch.equal(features.thumbnail_patch_tokens, tokens[-1]) and features.thumbnail_cls.item() == T - 1
    else:
        assert features.thumbnail_patch_tokens is None and features.thumbnail_cls is None


@pytest.fixture(scope="module")
def tiny_model():
    model = internvit.InternVisionModel(internvit.PRESETS["tiny"]).eval()  # 56 px tiles, 4x4 patches
    return randomize_(model, seed=21)


def _normalized(image: Image.Image) -> torch.Tensor:
    x = (np.asarray(image, dtype=np.float32) / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def test_feature_map_of_embeddings_is_one_convolution_over_the_resized_image(tiny_model):
    """Layer 0 (patch embedding + position embedding) is local, so the stitched map of a 3x2 grid must equal
    one stride-14 convolution over the whole 168x112 resized image plus each tile's position embedding."""
    data = pytest.importorskip("skimage.data")
    image = Image.fromarray(data.coffee())  # 600x400
    (features,) = encode_images(tiny_model, [image], max_tiles=6, layer=0)
    assert features.layout.grid == (3, 2) and features.layout.thumbnail and features.patch_tokens.shape[0] == 7

    emb = tiny_model.embeddings
    pos = emb.position_embedding.detach()[0]  # [1 + 16, C]
    with torch.no_grad():
        whole = F.conv2d(_normalized(image.resize((168, 112), Image.BICUBIC)), emb.patch_embedding.weight,
                         emb.patch_embedding.bias, stride=14)[0].permute(1, 2, 0)  # [8, 12, C]
        thumb = F.conv2d(_normalized(image.resize((56, 56), Image.BICUBIC)), emb.patch_embedding.weight,
                         emb.patch_embedding.bias, stride=14)[0].permute(1, 2, 0)  # [4, 4, C]
    expected = whole + pos[1:].reshape(4, 4, 64).repeat(2, 3, 1)
    fmap = features.feature_map()
    assert fmap.shape == (8, 12, 64)
    torch.testing.assert_close(fmap, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.thumbnail_patch_tokens, thumb + pos[1:].reshape(4, 4, 64), atol=1e-5, rtol=1e-5)
    cls = (emb.class_embedding.detach()[0, 0] + pos[0]).expand(7, 64)
    torch.testing.assert_close(features.cls, cls, atol=1e-6, rtol=1e-6)


def test_feature_map_of_last_layer_puts_each_tile_in_place(tiny_model):
    data = pytest.importorskip("skimage.data")
    image = Image.fromarray(data.chelsea())  # 451x300 -> 3x2
    (features,) = encode_images(tiny_model, [image], max_tiles=6)
    cols, rows = features.layout.grid
    assert (cols, rows) == (3, 2)
    resized = image.resize((cols * 56, rows * 56), Image.BICUBIC)
    fmap = features.feature_map()
    for r in range(rows):
        for c in range(cols):
            tile = _normalized(resized.crop((c * 56, r * 56, (c + 1) * 56, (r + 1) * 56)))
            with torch.no_grad():
                tokens = tiny_model(tile).last_hidden_state[0]
            torch.testing.assert_close(fmap[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4], tokens[1:].reshape(4, 4, 64),
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(features.cls[r * cols + c], tokens[0], atol=1e-5, rtol=1e-5)


# ---- shared micro-batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("micro_batch", [1, 4, 64])
def test_encode_tiles_shares_micro_batches_across_images(tiny_model, micro_batch):
    g = torch.Generator().manual_seed(5)
    pixels = [torch.randn(n, 3, 56, 56, generator=g) for n in (1, 7, 13)]
    batches: list[int] = []
    forward = tiny_model.forward_intermediates

    def counted(x, indices):
        batches.append(x.shape[0])
        return forward(x, indices)

    tiny_model.forward_intermediates = counted
    try:
        results = encode_tiles(tiny_model, pixels, micro_batch=micro_batch, layers=(-1, 1, 0))
    finally:
        del tiny_model.forward_intermediates
    total = 21
    assert len(batches) == math.ceil(total / micro_batch)
    assert sum(batches) == total and max(batches) <= micro_batch
    if micro_batch == 4:
        assert batches == [4, 4, 4, 4, 4, 1]  # image 0's single tile shares its batch with image 1's
    assert len(results) == 3
    sd = tiny_model.state_dict()
    for p, per_layer in zip(pixels, results):
        want = reference_forward(sd, tiny_model.config, p)  # the spec's forward, image by image
        assert len(per_layer) == 3
        last, mid, first = per_layer
        assert last.shape == (p.shape[0], 17, 64)
        torch.testing.assert_close(last, want[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(mid, want[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(first, want[0], atol=1e-5, rtol=0)


def test_forward_intermediates_stops_at_the_deepest_layer_asked(tiny_model):
    x = torch.randn(2, 3, 56, 56)
    calls: list[int] = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, layer in enumerate(tiny_model.encoder.layers)]
    try:
        with torch.no_grad():
            (embeddings,) = tiny_model.forward_intermediates(x, [0])
            assert calls == []
            first, again = tiny_model.forward_intermediates(x, [1, -2])  # -2 = hidden_states[1] of 2 layers
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0]  # layer 2 never ran
    want = reference_forward(tiny_model.state_dict(), tiny_model.config, x)
    torch.testing.assert_close(embeddings, want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(first, want[1], atol=1e-5, rtol=0)
    assert again is first or torch.equal(again, first)
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.forward_intermediates(x, [3])


def test_encode_tiles_rejects_bad_micro_batch(tiny_model):
    with pytest.raises(ValueError):
        encode_tiles(tiny_model, [torch.randn(1, 3, 56, 56)], micro_batch=0)


def test_encode_images_with_13_tile_image_counts_forwards(tiny_model):
    image = Image.new("RGB", (224, 168), (120, 30, 200))  # 4:3 -> 4x3 grid + thumbnail = 13 tiles
    calls: list[int] = []
    forward = tiny_model.forward_intermediates
    tiny_model.forward_intermediates = lambda x, indices: calls.append(x.shape[0]) or forward(x, indices)
    try:
        features = encode_images(tiny_model, [image, Image.new("RGB", (56, 56))], max_tiles=12, micro_batch=8)
    finally:
        del tiny_model.forward_intermediates
    assert [f.patch_tokens.shape[0] for f in features] == [13, 1]
    assert calls == [8, 6]
    assert features[0].feature_map().shape == (12, 16, 64)
