"""The fast paths compute the same function: blocked attention and chunked CPU inference.

The reference is written here from spec §2.3 (softmax(q k^T / sqrt(D)) v over [B, H, N, D]) and torch's SDPA in
fp32; the 300M parity tests (tests/parity) run the default ("auto") path against timm and transformers too.
"""

import pytest
import torch

from internvit import InternVisionModel
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
def test_every_attention_implementation_agrees(impl, tiny_config):
    torch.manual_seed(0)
    ref = InternVisionModel(tiny_config, attn_implementation="sdpa")
    ref.init_weights(torch.Generator().manual_seed(1))
    model = InternVisionModel(tiny_config, attn_implementation=impl)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 56, 84)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, ref(x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_auto_picks_blocked_for_bf16_on_cpu_and_sdpa_for_fp32(tiny_config):
    attn = InternVisionModel(tiny_config).encoder.layers[0].attn
    assert attn.implementation(torch.zeros(1, 2, 64)) == "sdpa"
    assert attn.implementation(torch.zeros(1, 2, 64, dtype=torch.bfloat16)) == "blocked"


def test_cpu_inference_chunks_give_the_same_outputs(tiny_config):
    """No-grad CPU inference runs a few images at a time; with grad on, one pass. Same numbers either way."""
    torch.manual_seed(0)
    model = InternVisionModel(tiny_config).eval()
    model.init_weights(torch.Generator().manual_seed(2))
    x = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        chunked = model(x, output_hidden_states=True)
    whole = model(x, output_hidden_states=True)  # grad enabled: no chunking
    torch.testing.assert_close(chunked.last_hidden_state, whole.last_hidden_state.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.pooler_output, whole.pooler_output.detach(), atol=1e-5, rtol=1e-5)
    assert len(chunked.hidden_states) == len(whole.hidden_states) == tiny_config.num_hidden_layers + 1
    for a, b in zip(chunked.hidden_states, whole.hidden_states):
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-5)
    embeds = model.embeddings(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_embeds=embeds).last_hidden_state, chunked.last_hidden_state)
