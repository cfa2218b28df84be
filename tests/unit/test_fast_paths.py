"""The fast paths compute the same function: blocked attention and chunked CPU inference.

The references are written in the tests from the spec: attention as softmax(q k^T / sqrt(D)) v over [B, H, N, D]
(spec §2.3), the whole forward pass in tests/helpers.py (spec §2.2-2.4); the 300M parity tests (tests/parity) run
the default ("auto") path against timm and transformers too.
"""

import dataclasses

import pytest
import torch

from helpers import random_official_state_dict, reference_forward

import internvit
from internvit import InternVisionModel
from internvit.weights import init_checkpoint
from internvit.model.vision import blocked_attention

pytestmark = pytest.mark.unit


def reference_attention(q, k, v):
    scores = (q.double() @ k.double().transpose(-2, -1)) / q.shape[-1] ** 0.5
    return (scores.softmax(-1) @ v.double()).transpose(1, 2)  # [B, N, H, D]


@pytest.mark.parametrize("N, block", [(1025, 128), (17, 128), (300, 7), (129, 128)])
def test_blocked_attention_equals_the_formula(N, block):
    torch.manual_seed(0)
    qkv = torch.randn(2, N, 3, 4, 16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as the model passes them
    out = blocked_attention(q, k, v, 16**-0.5, block=block)
    assert out.shape == (2, N, 4, 16)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_blocked_attention_bf16_is_close():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, 1025, 64) for _ in range(3))
    ref = reference_attention(q, k, v).float()
    out = blocked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.125).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.9999, cos


@pytest.mark.parametrize("impl", ["sdpa", "blocked", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_attention_implementation_equals_the_spec(impl, dtype, tiny_config):
    """Each path against the spec's forward pass written in tests/helpers.py (not against another of our paths)."""
    sd = random_official_state_dict(tiny_config, seed=1)
    model = InternVisionModel(tiny_config, attn_implementation=impl)
    model.load_state_dict(sd)
    x = torch.randn(3, 3, 56, 84)
    with torch.no_grad():
        got = model.to(dtype)(x.to(dtype)).last_hidden_state.float()
    want = reference_forward(sd, tiny_config, x)[-1]
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        cos = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1), dim=1)
        assert (cos > 0.999).all(), cos


def test_auto_picks_blocked_for_bf16_on_cpu_and_sdpa_for_fp32(tiny_config, tmp_path):
    # chosen at construction, and again whenever the weights change dtype or device, or the mode changes
    model = InternVisionModel(tiny_config)
    attns = [layer.attn for layer in model.encoder.layers]
    assert {a.implementation for a in attns} == {"sdpa"}
    model.to(torch.bfloat16)
    assert {a.implementation for a in attns} == {"blocked"}
    model.float()
    assert {a.implementation for a in attns} == {"sdpa"}
    # loaded from a bf16 checkpoint on the meta device with assign=True, as from_pretrained does
    init_checkpoint(tmp_path / "bf16", preset="tiny", dtype="bf16")
    loaded = internvit.from_pretrained(tmp_path / "bf16")
    assert {layer.attn.implementation for layer in loaded.encoder.layers} == {"blocked"}
    # attention dropout in training needs SDPA's dropout; eval goes back to the blocked path
    dropout = InternVisionModel(dataclasses.replace(tiny_config, attention_dropout=0.1)).to(torch.bfloat16)
    assert dropout.train().encoder.layers[0].attn.implementation == "sdpa"
    assert dropout.eval().encoder.layers[0].attn.implementation == "blocked"
    # an explicit choice stays
    eager = InternVisionModel(tiny_config, attn_implementation="eager").bfloat16()
    assert eager.encoder.layers[0].attn.implementation == "eager"


def test_cpu_inference_chunks_give_the_spec_outputs(tiny_config):
    """No-grad CPU inference runs a few images at a time; with grad on, one pass. Both equal the spec's forward."""
    sd = random_official_state_dict(tiny_config, seed=2)
    model = InternVisionModel(tiny_config).eval()
    model.load_state_dict(sd)
    x = torch.randn(5, 3, 56, 56)
    want = reference_forward(sd, tiny_config, x)
    with torch.no_grad():
        chunked = model(x, output_hidden_states=True)
    whole = model(x, output_hidden_states=True)  # grad enabled: no chunking
    for out in (chunked, whole):
        assert len(out.hidden_states) == len(want) == tiny_config.num_hidden_layers + 1
        for a, b in zip(out.hidden_states, want):
            torch.testing.assert_close(a.detach(), b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooler_output.detach(), want[-1][:, 0], atol=1e-5, rtol=1e-5)
    embeds = model.embeddings(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_embeds=embeds).last_hidden_state, want[-1], atol=1e-5, rtol=1e-5)
