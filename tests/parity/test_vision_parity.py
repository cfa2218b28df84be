"""InternViT parity with timm and transformers: the full 300M where its size is the point (official config and
parameter count, fp32 and bf16 numerics at 448), a small model with the same 32x32 position grid elsewhere
(resampled position embeddings at 448x672, gradients), each on one set of random weights.

The weights are timm's `vit_intern300m_patch14_448` with every parameter randomised (tests/helpers.py). Each model
gets them through its own, test-written route:
    - timm: the model itself (its state dict is also saved as a file in timm's layout);
    - ours: the official layout, written by the test with the renames of spec/peers.md §1, plus the official
      config.json (tests/fixtures/config_300m.json); the timm-layout file must load to the same tensors;
    - transformers: `InternVLVisionModel` loaded with `strict=True` from the renames of spec/peers.md §2
      (q/k/v = rows [:C], [C:2C], [2C:] of the fused qkv), written in conftest, never through internvit.

Run with `-s` to see the measured figures.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import internvit
from helpers import (
    assign_weights,
    official_config_300m,
    randomize_,
    timm_to_official,
    timm_to_transformers,
    write_official_checkpoint,
)

pytestmark = pytest.mark.parity

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

FP32_ATOL = 1e-4
BF16_MIN_COSINE = 0.999


def report(label: str, value: float) -> None:
    print(f"\n[parity] {label}: {value:.3e}" if value < 0.9 else f"\n[parity] {label}: {value:.6f}", end="")


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One cosine similarity per sample, over all its tokens and channels."""
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)


# ---- the three models: ours kept for the module, each peer built in turn ------------------------------------


HF_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=448,
               patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6,
               use_mean_pooling=True, layer_scale_init_value=0.1, attn_implementation="sdpa")


def hf_model(random_300m, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' `InternVLVisionModel`, built on the meta device and given the renamed tensors (strict)."""
    with torch.device("meta"):
        model = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(**HF_300M))
    assert model.config._attn_implementation == "sdpa"
    return assign_weights(model, timm_to_transformers(random_300m.timm_state_dict(dtype)))


@pytest.fixture(scope="module")
def ours(random_300m):
    model = internvit.from_pretrained(random_300m.official_dir, dtype="fp32")
    assert model.dtype == torch.float32
    return model


@pytest.fixture(scope="module")
def pixels_448():
    return torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(448))


@pytest.fixture(scope="module")
def pixels_448x672():
    return torch.randn(1, 3, 448, 672, generator=torch.Generator().manual_seed(672))


@pytest.fixture(scope="module")
def out_448(random_300m, ours, pixels_448):
    with torch.no_grad():
        out = {"ours": ours(pixels_448)}
        timm_model = random_300m.timm_model()
        out["timm"] = timm_model.forward_features(pixels_448)
        out["timm_cls"] = timm_model.forward_head(out["timm"], pre_logits=True)  # global_pool='token': raw CLS
        del timm_model
        out["hf"] = hf_model(random_300m)(pixels_448).last_hidden_state
    # A check of the references, not of our code: the two test-written mappings describe one function.
    assert max_abs(out["hf"], out["timm"]) <= FP32_ATOL
    return out


@dataclass
class Small:
    """A small InternViT (2 layers, width 64) with the 300M's 448-px, 32x32 position grid, in all three libraries."""

    timm: torch.nn.Module
    hf: torch.nn.Module
    ours: torch.nn.Module


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Small:
    model = timm.create_model("vit_intern300m_patch14_448", pretrained=False, depth=2, embed_dim=64, num_heads=4,
                              mlp_ratio=4, img_size=448)
    randomize_(model, seed=64)
    model.eval()
    config = {**official_config_300m(), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 256}
    folder = write_official_checkpoint(tmp_path_factory.mktemp("small"), timm_to_official(model.state_dict()), config)
    hf = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=448,
        patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6,
        use_mean_pooling=True, layer_scale_init_value=0.1, attn_implementation="sdpa"))
    hf.load_state_dict(timm_to_transformers(model.state_dict()), strict=True)
    return Small(model, hf.eval(), internvit.from_pretrained(folder, dtype="fp32"))


@pytest.fixture(scope="module")
def out_448x672(small, pixels_448x672):
    x = pixels_448x672
    with torch.no_grad():
        timm_default = small.timm.forward_features(x)  # timm resamples with antialias=True
        with pytest.MonkeyPatch.context() as mp:
            from timm.layers import pos_embed

            mp.setattr(
                timm.models.vision_transformer,
                "resample_abs_pos_embed",
                functools.partial(pos_embed.resample_abs_pos_embed, antialias=False),
            )
            timm_official_kernel = small.timm.forward_features(x)
        return {
            "timm": timm_official_kernel,
            "timm_default": timm_default,
            "hf": small.hf(x).last_hidden_state,
            "ours": small.ours(x).last_hidden_state,
        }


# ---- weights ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_official_config_and_size(ours):
    assert sum(p.numel() for p in ours.parameters()) == 304_012_288
    assert ours.config.extra["architectures"] == ["InternVisionModel"]
    assert (ours.config.hidden_size, ours.config.num_hidden_layers, ours.config.num_attention_heads) == (1024, 24, 16)


@pytest.mark.slow
def test_timm_layout_file_loads_the_same_tensors(random_300m, ours):
    from_timm = internvit.from_pretrained(random_300m.timm_file, dtype="fp32")  # no config.json next to it
    assert from_timm.config.num_attention_heads == 16 and from_timm.config.image_size == 448
    expected = ours.state_dict()
    got = from_timm.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


# ---- fp32 at 448 x 448, batch 2 --------------------------------------------------------------------------


@pytest.mark.slow
def test_fp32_448_shapes(out_448):
    assert out_448["ours"].last_hidden_state.shape == (2, 1025, 1024)
    assert out_448["timm"].shape == out_448["hf"].shape == (2, 1025, 1024)


@pytest.mark.slow
def test_fp32_448_vs_timm(out_448):
    diff = max_abs(out_448["ours"].last_hidden_state, out_448["timm"])
    report("fp32 448x448 ours vs timm max abs", diff)
    assert diff <= FP32_ATOL


@pytest.mark.slow
def test_fp32_448_vs_transformers(out_448):
    diff = max_abs(out_448["ours"].last_hidden_state, out_448["hf"])
    report("fp32 448x448 ours vs transformers max abs", diff)
    assert diff <= FP32_ATOL


@pytest.mark.slow
def test_pooler_output_is_timm_cls_token(out_448):
    diff = max_abs(out_448["ours"].pooler_output, out_448["timm_cls"])
    report("fp32 448x448 pooler_output vs timm CLS max abs", diff)
    assert out_448["ours"].pooler_output.shape == (2, 1024)
    assert diff <= FP32_ATOL


@pytest.mark.slow
def test_outputs_are_not_trivial(out_448):
    # random weights that reach the output: the samples differ and the activations are O(1) or larger
    y = out_448["ours"].last_hidden_state
    assert y.abs().mean() > 0.1
    assert max_abs(y[0], y[1]) > 0.1


# ---- fp32 at 448 x 672 (H x W), batch 1: position embeddings resampled at runtime -------------------------


def test_fp32_448x672_shapes(out_448x672):
    assert out_448x672["ours"].shape == (1, 1 + 32 * 48, 64)


def test_fp32_448x672_vs_timm_with_official_kernel(out_448x672):
    diff = max_abs(out_448x672["ours"], out_448x672["timm"])
    report("fp32 448x672 ours vs timm (antialias=False) max abs", diff)
    assert diff <= FP32_ATOL


def test_fp32_448x672_vs_transformers(out_448x672):
    diff = max_abs(out_448x672["ours"], out_448x672["hf"])
    report("fp32 448x672 ours vs transformers max abs", diff)
    assert diff <= FP32_ATOL


def test_timm_default_antialias_differs_from_official(out_448x672):
    # timm's runtime resampling uses antialias=True, a different bicubic kernel from the official
    # F.interpolate(bicubic, align_corners=False) even when upsampling (spec/peers.md §1).
    diff = max_abs(out_448x672["timm_default"], out_448x672["ours"])
    report("fp32 448x672 ours vs timm default (antialias=True) max abs", diff)
    assert diff > 1e-3


# ---- bf16 -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def out_bf16(random_300m, pixels_448, out_448):
    """Each implementation loaded in bf16 in turn (its weights are the fp32 ones cast, as the official files)."""
    x = pixels_448.bfloat16()
    ours_bf16 = internvit.from_pretrained(random_300m.official_dir, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in ours_bf16.parameters())
    with torch.no_grad():
        out = {"ours": ours_bf16(x).last_hidden_state}
        del ours_bf16
        out["timm"] = random_300m.timm_model(torch.bfloat16).forward_features(x)
        out["hf"] = hf_model(random_300m, torch.bfloat16)(x).last_hidden_state
    out["timm_fp32"] = out_448["timm"]
    return out


@pytest.mark.slow
def test_bf16_vs_timm(out_bf16):
    assert out_bf16["ours"].dtype == out_bf16["timm"].dtype == torch.bfloat16
    cos = cosines(out_bf16["ours"], out_bf16["timm"])
    report("bf16 448x448 ours vs timm bf16 min cosine", cos.min().item())
    assert (cos >= BF16_MIN_COSINE).all(), cos


@pytest.mark.slow
def test_bf16_vs_transformers(out_bf16):
    cos = cosines(out_bf16["ours"], out_bf16["hf"])
    report("bf16 448x448 ours vs transformers bf16 min cosine", cos.min().item())
    assert (cos >= BF16_MIN_COSINE).all(), cos


@pytest.mark.slow
def test_bf16_vs_fp32_reference(out_bf16):
    # for scale: how far bf16 itself moves each implementation from the fp32 function
    ours = cosines(out_bf16["ours"], out_bf16["timm_fp32"])
    timm_ = cosines(out_bf16["timm"], out_bf16["timm_fp32"])
    report("bf16 448x448 ours vs timm fp32 min cosine", ours.min().item())
    report("bf16 448x448 timm bf16 vs timm fp32 min cosine", timm_.min().item())
    assert (ours >= BF16_MIN_COSINE).all(), ours


# ---- training: gradients (stage 1.5 / 2 train the ViT) ----------------------------------------------------


def test_gradients_equal_timm(small):
    """fp32, train mode, drop-path 0, our gradient checkpointing on: the gradient of every parameter for a loss
    on all tokens equals timm's (timm without checkpointing). The small model: the 300M adds nothing but time."""
    timm_model = copy.deepcopy(small.timm).train()
    model = copy.deepcopy(small.ours).train()
    for layer in model.encoder.layers:
        layer.drop_path = 0.0  # the official config's 0.1 would make both sides random
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(7))
    target = torch.randn(2, 1025, 64, generator=torch.Generator().manual_seed(8))
    ((model(x).last_hidden_state - target) ** 2).mean().backward()
    ((timm_model.forward_features(x) - target) ** 2).mean().backward()
    theirs = timm_to_official({k: p.grad for k, p in timm_model.named_parameters()})
    assert set(theirs) == {k for k, _ in model.named_parameters()}
    worst = 0.0
    for k, p in model.named_parameters():
        rel = (max_abs(p.grad, theirs[k]) / theirs[k].abs().max().clamp(min=1e-30)).item()
        worst = max(worst, rel)
    report(f"fp32 448x448 gradients vs timm, worst relative max abs over {len(theirs)} tensors", worst)
    assert worst < 1e-4
