"""InternVisionConfig against the official config.json files (spec/internvit.md §1) and transformers' native config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvit import PRESETS, InternVisionConfig

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parents[1] / "fixtures"
CONFIG_300M = FIXTURES / "config_300m.json"

# 6B-448px-V1-5 / V2_5 column of spec §1 [H4]; the file has no norm_type (the class default 'rms_norm' applies).
CONFIG_6B = {
    "architectures": ["InternVisionModel"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_intern_vit.InternVisionConfig",
        "AutoModel": "modeling_intern_vit.InternVisionModel",
    },
    "drop_path_rate": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 3200,
    "image_size": 448,
    "initializer_factor": 0.1,
    "initializer_range": 1e-10,
    "intermediate_size": 12800,
    "layer_norm_eps": 1e-06,
    "model_type": "intern_vit_6b",
    "num_attention_heads": 25,
    "num_channels": 3,
    "num_hidden_layers": 45,
    "patch_size": 14,
    "qk_normalization": True,
    "qkv_bias": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2",
    "use_flash_attn": True,
}

# Architecture values of the 300M-448px-V2_5 column of spec §1.
ARCH_300M = dict(
    num_channels=3, patch_size=14, image_size=448, hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
    num_hidden_layers=24, qkv_bias=True, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6,
    hidden_act="gelu", dropout=0.0, attention_dropout=0.0, initializer_range=0.02, use_flash_attn=True,
)


def assert_fields(config: InternVisionConfig, expected: dict) -> None:
    got = {k: getattr(config, k) for k in expected}
    assert got == expected


def test_fixture_matches_spec_file_size():
    # Spec §1: the 300M-V2_5 config.json is 748 bytes and 30 lines at 2-space indentation.
    data = CONFIG_300M.read_bytes()
    assert len(data) == 748
    assert data.count(b"\n") == 30


def test_official_300m_round_trip():
    file_dict = json.loads(CONFIG_300M.read_text())
    config = InternVisionConfig.from_json(CONFIG_300M)
    assert config.to_dict() == file_dict
    assert config.extra == {
        "architectures": ["InternVisionModel"],
        "auto_map": file_dict["auto_map"],
        "model_type": "intern_vit_6b",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2",
    }
    assert_fields(config, ARCH_300M | {"drop_path_rate": 0.1, "initializer_factor": 1.0})
    assert config.head_dim == 64
    assert config.grid_size == 32
    assert config.num_positions == 1025


def test_to_json_round_trip(tmp_path):
    config = InternVisionConfig.from_json(CONFIG_300M)
    config.to_json(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(CONFIG_300M.read_text())
    assert InternVisionConfig.from_json(tmp_path / "config.json") == config


def test_300m_preset_matches_official_file():
    assert_fields(PRESETS["300m"], ARCH_300M | {"drop_path_rate": 0.1, "initializer_factor": 1.0})


def test_6b_column():
    config = InternVisionConfig.from_dict(CONFIG_6B)
    assert_fields(
        config,
        dict(hidden_size=3200, num_attention_heads=25, intermediate_size=12800, num_hidden_layers=45,
             qkv_bias=False, qk_normalization=True, norm_type="rms_norm", layer_norm_eps=1e-6,
             initializer_range=1e-10, initializer_factor=0.1, image_size=448, patch_size=14),
    )
    assert config.head_dim == 128
    assert config.extra["transformers_version"] == "4.37.2"
    preset = PRESETS["6b"]
    for name in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "qkv_bias",
                 "qk_normalization", "norm_type", "initializer_factor", "image_size", "patch_size"):
        assert getattr(preset, name) == getattr(config, name), name


def test_chat_config_uses_vision_config():
    vision = json.loads(CONFIG_300M.read_text()) | {"drop_path_rate": 0.0}  # chat checkpoints ship 0.0 (spec §1)
    chat = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "force_image_size": 448,
        "select_layer": -1,
        "template": "internvl2_5",
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "num_hidden_layers": 24},
        "vision_config": vision,
    }
    config = InternVisionConfig.from_dict(chat)
    assert_fields(config, ARCH_300M | {"drop_path_rate": 0.0, "initializer_factor": 1.0})
    assert "llm_config" not in config.extra and "downsample_ratio" not in config.extra


def test_chat_config_from_json(tmp_path):
    vision = json.loads(CONFIG_300M.read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "vision_config": vision}))
    assert InternVisionConfig.from_json(tmp_path / "config.json").hidden_size == 1024


def test_transformers_native_config():
    transformers = pytest.importorskip("transformers")
    default = transformers.InternVLVisionConfig().to_dict()
    assert default["model_type"] == "internvl_vision"
    config = InternVisionConfig.from_dict(default)
    # transformers' defaults (spec/peers.md §2): 300M shapes, attention_bias False, layer_scale_init_value 0.1.
    assert_fields(
        config,
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             image_size=448, patch_size=14, qkv_bias=False, qk_normalization=False, norm_type="layer_norm",
             layer_norm_eps=1e-6, initializer_factor=0.1),
    )
    # The converter's renames: qkv_bias -> attention_bias, qk_normalization -> use_qk_norm.
    converted = transformers.InternVLVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56,
        patch_size=14, attention_bias=True, use_qk_norm=True, norm_type="rms_norm", layer_scale_init_value=0.5,
    ).to_dict()
    config = InternVisionConfig.from_dict(converted)
    assert_fields(
        config,
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56,
             patch_size=14, qkv_bias=True, qk_normalization=True, norm_type="rms_norm", initializer_factor=0.5),
    )
    # transformers' full InternVLConfig nests the tower under vision_config too.
    full = transformers.InternVLConfig(vision_config=converted).to_dict()
    assert InternVisionConfig.from_dict(full).hidden_size == 64


def test_bad_norm_type():
    with pytest.raises(ValueError, match=r"norm_type.*'batch_norm'"):
        PRESETS["tiny"].replace(norm_type="batch_norm")


def test_heads_must_divide_hidden():
    with pytest.raises(ValueError, match=r"hidden_size=100.*num_attention_heads=16"):
        InternVisionConfig(hidden_size=100, num_hidden_layers=2, num_attention_heads=16, intermediate_size=64)


def test_missing_required_field():
    d = json.loads(CONFIG_300M.read_text())
    del d["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        InternVisionConfig.from_dict(d)


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        InternVisionConfig.from_json(tmp_path / "config.json")


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        PRESETS["300m"].hidden_size = 3  # type: ignore[misc]
