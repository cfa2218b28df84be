"""InternVisionModel on tiny configs: shapes, outputs, numerics, dtypes, input checks, drop path, checkpointing.

The reference here is the forward pass of spec/internvit.md §2.2-2.4 written out in the test with functional ops
(fused qkv reshaped to [B, N, 3, H, D] as the official naive path does, explicit softmax, erf GELU, layer scales),
fed the same weights under the official names of spec §2.1.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import random_official_state_dict, reference_embeddings, reference_forward
from internvit import PRESETS, InternVisionConfig, InternVisionModel

pytestmark = pytest.mark.unit

TINY_6B = PRESETS["tiny"].replace(qkv_bias=False, qk_normalization=True, norm_type="rms_norm")


def build(cfg: InternVisionConfig, seed: int = 1, **kwargs) -> tuple[InternVisionModel, dict]:
    sd = random_official_state_dict(cfg, seed=seed)
    model = InternVisionModel(cfg, **kwargs)
    model.load_state_dict(sd, strict=True)
    return model.eval(), sd


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample, over all tokens and channels."""
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)


@pytest.fixture
def tiny(tiny_config):
    return build(tiny_config)


# ---- shapes and outputs -----------------------------------------------------------------------------


@torch.no_grad()
def test_output_shapes(tiny, tiny_config):
    model, _ = tiny
    out = model(torch.randn(3, 3, 56, 56))
    assert out.last_hidden_state.shape == (3, 1 + 4 * 4, 64)
    assert out.pooler_output.shape == (3, 64)
    assert out.hidden_states is None


@torch.no_grad()
@pytest.mark.parametrize("hw", [(42, 70), (84, 56), (60, 75)])
def test_non_square_and_non_multiple_sizes(tiny, hw):
    model, _ = tiny
    H, W = hw
    out = model(torch.randn(2, 3, H, W))
    assert out.last_hidden_state.shape == (2, 1 + (H // 14) * (W // 14), 64)  # floor, like a stride-14 conv


@torch.no_grad()
@torch.no_grad()
@pytest.mark.parametrize("hw", [(56, 56), (59, 70)])
def test_patch_embedding_as_a_matmul_equals_the_convolution(tiny, hw):
    """fp32 on CUDA embeds patches with a matmul (cuDNN's convolution would run in TF32 by default); checked here
    against the convolution, also where the size is not a multiple of the patch (the rest is dropped)."""
    emb = tiny[0].embeddings
    x = torch.randn(2, 3, *hw)
    conv = emb.patch_embedding(x).flatten(2).transpose(1, 2)
    ours, h, w = emb.patches_as_matmul(x)
    assert (h, w) == (hw[0] // 14, hw[1] // 14)
    torch.testing.assert_close(ours, conv, atol=1e-5, rtol=1e-5)


def test_matches_spec_forward(tiny, tiny_config):
    model, sd = tiny
    x = torch.randn(2, 3, 56, 56)
    out = model(x, output_hidden_states=True)
    ref = reference_forward(sd, tiny_config, x)
    torch.testing.assert_close(out.last_hidden_state, ref[-1], atol=1e-5, rtol=0)
    assert len(out.hidden_states) == tiny_config.num_hidden_layers + 1
    for got, want in zip(out.hidden_states, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_pooler_is_raw_cls_and_no_final_norm(tiny):
    model, _ = tiny
    out = model(torch.randn(2, 3, 56, 56), output_hidden_states=True)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)  # the last layer's output, untouched
    # No final LayerNorm: tokens are not standardised (a LayerNorm with our random affine would give mean ~ bias).
    ln = F.layer_norm(out.last_hidden_state, (64,))
    assert (out.last_hidden_state - ln).abs().max() > 0.1
    assert (out.last_hidden_state.std(-1) - 1).abs().max() > 0.05


@torch.no_grad()
def test_hidden_states_entries(tiny, tiny_config):
    model, sd = tiny
    x = torch.randn(2, 3, 56, 56)
    out = model(x, output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    assert all(h.shape == (2, 17, 64) for h in out.hidden_states)
    # at the native size the position-embedding interpolation is the identity (spec §2.2)
    torch.testing.assert_close(out.hidden_states[0], reference_embeddings(sd, tiny_config, x), atol=1e-6, rtol=0)


@torch.no_grad()
def test_pixel_embeds_skip_the_embeddings(tiny):
    model, _ = tiny
    x = torch.randn(2, 3, 56, 56)
    full = model(x, output_hidden_states=True)
    from_embeds = model(pixel_embeds=full.hidden_states[0])
    torch.testing.assert_close(from_embeds.last_hidden_state, full.last_hidden_state, atol=0, rtol=0)


# ---- attention backends and position embeddings -----------------------------------------------------


@torch.no_grad()
def test_sdpa_and_eager_agree(tiny_config):
    sdpa, sd = build(tiny_config, attn_implementation="sdpa")
    eager = InternVisionModel(tiny_config, attn_implementation="eager").eval()
    eager.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 84)
    torch.testing.assert_close(eager(x).last_hidden_state, sdpa(x).last_hidden_state, atol=1e-5, rtol=0)


def test_unknown_attn_implementation(tiny_config):
    with pytest.raises(ValueError, match="attn_implementation"):
        InternVisionModel(tiny_config, attn_implementation="flash_attention_3")


@torch.no_grad()
@pytest.mark.parametrize("hw", [(42, 70), (84, 98), (28, 28)])
def test_pos_embed_interpolation_at_other_sizes(tiny, tiny_config, hw):
    model, sd = tiny
    H, W = hw
    h, w = H // 14, W // 14
    x = torch.randn(2, 3, H, W)
    emb = model(x, output_hidden_states=True).hidden_states[0]
    # The official resampling, computed here: fp32 bicubic, align_corners=False, no antialias (spec §2.2).
    pos = sd["embeddings.position_embedding"]
    grid = pos[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    patches = F.conv2d(x, sd["embeddings.patch_embedding.weight"], sd["embeddings.patch_embedding.bias"], stride=14)
    expected_patch_tokens = patches.flatten(2).transpose(1, 2) + resized
    expected_cls = sd["embeddings.class_embedding"][:, 0] + pos[:, 0]  # the CLS position is never interpolated
    torch.testing.assert_close(emb[:, 1:], expected_patch_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb[:, 0], expected_cls.expand(2, -1), atol=1e-6, rtol=0)
    # and the antialiased kernel timm uses at runtime is a different function (spec/peers.md §1)
    aa = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    assert (aa.flatten(2).transpose(1, 2) - resized).abs().max() > 1e-3


@torch.no_grad()
def test_resize_pos_embeddings(tiny, tiny_config):
    model, sd = tiny
    original = copy.deepcopy(model)
    model.resize_pos_embeddings(84)
    pos = model.embeddings.position_embedding
    assert pos.shape == (1, 1 + 6 * 6, 64)
    assert isinstance(pos, torch.nn.Parameter)
    assert model.config.image_size == 84 and model.config.grid_size == 6
    old = sd["embeddings.position_embedding"]
    torch.testing.assert_close(pos[:, :1], old[:, :1], atol=0, rtol=0)
    grid = old[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pos[:, 1:], expected, atol=1e-6, rtol=0)
    # the resized model at its new native size computes what the original computes there by runtime interpolation
    x = torch.randn(1, 3, 84, 84)
    torch.testing.assert_close(model(x).last_hidden_state, original(x).last_hidden_state, atol=1e-5, rtol=0)
    # and its state dict keeps the official key names
    assert set(model.state_dict()) == set(sd)


def test_resize_pos_embeddings_rejects_bad_size_without_side_effects(tiny):
    model, sd = tiny
    x = torch.randn(1, 3, 56, 56)
    before = model(x).last_hidden_state
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.resize_pos_embeddings(90)  # 90 is not a multiple of 14
    assert model.config.image_size == 56
    assert model.embeddings.position_embedding.shape == (1, 17, 64)
    torch.testing.assert_close(model(x).last_hidden_state, before, atol=0, rtol=0)


# ---- dtypes -----------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tiny, dtype):
    model, _ = tiny
    x = torch.randn(2, 3, 56, 56)
    ref = model(x).last_hidden_state
    half = copy.deepcopy(model).to(dtype)
    out = half(x.to(dtype)).last_hidden_state
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert cosine(out, ref).min() >= 0.99


@torch.no_grad()
def test_fp32_pixels_into_bf16_model(tiny):
    model, _ = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.randn(2, 3, 56, 56)
    out = bf16(x)  # the official code fails here (InternVL #602); ours casts (documented in vision.py)
    assert out.last_hidden_state.dtype == torch.bfloat16
    torch.testing.assert_close(out.last_hidden_state, bf16(x.bfloat16()).last_hidden_state, atol=0, rtol=0)


# ---- input validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixels", "error", "match"),
    [
        (torch.randn(3, 56, 56), ValueError, r"\[B, 3, H, W\].*\(3, 56, 56\)"),
        (torch.randn(1, 1, 56, 56), ValueError, r"\[B, 3, H, W\].*\(1, 1, 56, 56\)"),
        (torch.randn(1, 3, 10, 56), ValueError, r"smaller than one 14x14 patch"),
        (torch.randn(1, 3, 56, 13), ValueError, r"smaller than one 14x14 patch"),
        (torch.zeros(1, 3, 56, 56, dtype=torch.uint8), TypeError, r"floating.*uint8"),
        (torch.zeros(1, 3, 56, 56, dtype=torch.int64), TypeError, r"floating.*int64"),
    ],
)
def test_bad_inputs(tiny, pixels, error, match):
    model, _ = tiny
    with pytest.raises(error, match=match):
        model(pixels)


def test_no_input(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="pixel_values"):
        model()


# ---- drop path, meta device, gradient checkpointing --------------------------------------------------


def test_drop_path_rates_are_linspace_floats():
    with torch.device("meta"):
        model = InternVisionModel(PRESETS["300m"])  # drop_path_rate 0.1: the official .item() fails on meta
    assert PRESETS["300m"].drop_path_rate == 0.1
    assert all(p.device.type == "meta" for p in model.parameters())
    rates = [layer.drop_path for layer in model.encoder.layers]
    assert all(type(r) is float for r in rates)
    assert rates == pytest.approx(torch.linspace(0, 0.1, 24).tolist(), rel=1e-6, abs=1e-9)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)


def test_init_draws_as_the_official_code(tiny_config):
    # modeling_intern_vit.py: class_embedding = randn, then the patch Conv2d, then position_embedding = randn;
    # ls1/ls2 = initializer_factor * ones. Ours skips the draws on the meta device only (`randn_unless_meta`).
    C = tiny_config.hidden_size
    torch.manual_seed(5)
    cls = torch.randn(1, 1, C)
    conv = torch.nn.Conv2d(3, C, kernel_size=tiny_config.patch_size, stride=tiny_config.patch_size)
    pos = torch.randn(1, tiny_config.num_positions, C)
    torch.manual_seed(5)
    emb = InternVisionModel(tiny_config).embeddings
    assert torch.equal(emb.class_embedding, cls) and torch.equal(emb.position_embedding, pos)
    assert torch.equal(emb.patch_embedding.weight, conv.weight)
    layer = InternVisionModel(tiny_config).encoder.layers[0]
    assert torch.equal(layer.ls1, tiny_config.initializer_factor * torch.ones(C)) and torch.equal(layer.ls2, layer.ls1)


@torch.no_grad()
def test_drop_path_only_in_train_mode(tiny_config):
    cfg = tiny_config.replace(drop_path_rate=0.5)  # rates [0.0, 0.5]
    model, sd = build(cfg)
    plain, _ = build(tiny_config)  # the same weights, no drop path
    x = torch.randn(16, 3, 56, 56)
    eval_out = model(x, output_hidden_states=True)
    torch.testing.assert_close(eval_out.last_hidden_state, plain(x).last_hidden_state, atol=0, rtol=0)
    model.train()
    torch.manual_seed(1)
    train_a = model(x, output_hidden_states=True)
    torch.manual_seed(2)
    train_b = model(x, output_hidden_states=True)
    # layer 0 has rate 0: identical in train mode; layer 1 (rate 0.5) drops or rescales every sample's branch
    torch.testing.assert_close(train_a.hidden_states[1], eval_out.hidden_states[1], atol=0, rtol=0)
    per_sample = (train_a.last_hidden_state - eval_out.last_hidden_state).flatten(1).abs().amax(1)
    assert (per_sample > 1e-4).all()
    assert not torch.equal(train_a.last_hidden_state, train_b.last_hidden_state)
    # rate 0 in train mode (dropout 0.0) is deterministic and equals eval
    plain.train()
    torch.testing.assert_close(plain(x).last_hidden_state, eval_out.last_hidden_state, atol=0, rtol=0)


def test_gradient_checkpointing_same_gradients(tiny_config):
    model, _ = build(tiny_config)
    model.train()
    x = torch.randn(2, 3, 56, 56)
    target = torch.randn(2, 17, 64)
    calls = []
    for layer in model.encoder.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss = (model(x).last_hidden_state * target).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads()
    model.set_grad_checkpointing(True)
    ckpt, ckpt_calls = grads()
    assert plain_calls == 2 and ckpt_calls == 4  # each layer recomputed once in the backward pass
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        assert plain[name].abs().sum() > 0, name  # every parameter gets a gradient
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


# ---- the 6B flavour (RMSNorm, q/k norm, no qkv bias) ---------------------------------------------------


@torch.no_grad()
def test_tiny_6b_flavour_matches_spec_forward():
    model, sd = build(TINY_6B)
    keys = set(model.state_dict())
    assert "encoder.layers.0.attn.q_norm.weight" in keys and "encoder.layers.0.attn.k_norm.weight" in keys
    assert "encoder.layers.0.attn.qkv.bias" not in keys and "encoder.layers.0.norm1.bias" not in keys
    x = torch.randn(2, 3, 56, 70)
    out = model(x, output_hidden_states=True)
    ref = reference_forward(sd, TINY_6B, x)
    for got, want in zip(out.hidden_states, ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_formula(dtype):
    model, sd = build(TINY_6B)
    model = model.to(dtype)
    x = 3 * torch.randn(2, 5, 64, dtype=dtype) + 0.5
    for name in ("norm1", "norm2", "attn.q_norm", "attn.k_norm"):
        module = model.encoder.layers[1].get_submodule(name)
        weight = sd[f"encoder.layers.1.{name}.weight"].to(dtype)
        x32 = x.float()
        expected = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        got = module(x)
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
