"""Key contract: our module names and shapes are the official checkpoint's (spec/internvit.md §2.1), pinned by a
fixture written from the spec's table (tests/fixtures/make_keys_300m.py), not from our model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from internvit import PRESETS, InternVisionModel

pytestmark = pytest.mark.unit

KEYS_300M = Path(__file__).parents[1] / "fixtures" / "keys_300m.json"


def meta_model(preset: str) -> InternVisionModel:
    with torch.device("meta"):
        return InternVisionModel(PRESETS[preset])


def shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_fixture_totals():
    expected = json.loads(KEYS_300M.read_text())
    assert len(expected) == 340
    assert sum(math.prod(s) for s in expected.values()) == 304_012_288


def test_300m_keys_and_shapes_equal_the_official_table():
    model = meta_model("300m")
    expected = json.loads(KEYS_300M.read_text())
    got = shapes(model)
    assert sorted(set(expected) - set(got)) == []  # missing from our model
    assert sorted(set(got) - set(expected)) == []  # not in the official checkpoint
    assert got == expected
    assert len(got) == 340
    assert sum(p.numel() for p in model.parameters()) == 304_012_288
    # The spec's split: embeddings 1,653,760 + 24 x 12,598,272.
    emb = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embeddings."))
    layer0 = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.layers.0."))
    assert (emb, layer0) == (1_653_760, 12_598_272)
    # bf16 bytes = the 608 MB safetensors file of [H1].
    assert 2 * sum(p.numel() for p in model.parameters()) == 608_024_576


def test_300m_has_no_final_norm_or_pooler():
    names = shapes(meta_model("300m"))
    assert not [k for k in names if not k.startswith(("embeddings.", "encoder.layers."))]


def test_300m_model_on_meta_has_no_buffers():
    # every state_dict entry is a parameter: nothing else would have to be written to or read from a checkpoint
    model = meta_model("300m")
    assert len(list(model.buffers())) == 0
    assert all(p.device.type == "meta" for p in model.parameters())


def test_6b_preset_keys():
    model = meta_model("6b")
    got = shapes(model)
    layers = {int(k.split(".")[2]) for k in got if k.startswith("encoder.layers.")}
    assert layers == set(range(45))
    for i in (0, 44):
        p = f"encoder.layers.{i}."
        assert got[p + "attn.q_norm.weight"] == [3200]
        assert got[p + "attn.k_norm.weight"] == [3200]
        assert p + "attn.q_norm.bias" not in got and p + "attn.k_norm.bias" not in got
        assert got[p + "attn.qkv.weight"] == [9600, 3200]
        assert p + "attn.qkv.bias" not in got  # no qkv bias in the 6B
        assert got[p + "norm1.weight"] == [3200] and got[p + "norm2.weight"] == [3200]
        assert p + "norm1.bias" not in got and p + "norm2.bias" not in got  # RMSNorm: weight only
        assert got[p + "mlp.fc1.weight"] == [12800, 3200]
    assert got["embeddings.position_embedding"] == [1, 1025, 3200]
    # The 6B per layer: the 300M's tensors minus qkv bias and 2 norm biases, plus q_norm and k_norm.
    assert len(got) == 4 + 45 * (14 - 3 + 2)
    # Its norms are not LayerNorms.
    assert not isinstance(model.encoder.layers[0].norm1, torch.nn.LayerNorm)
