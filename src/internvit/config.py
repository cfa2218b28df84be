"""InternVisionConfig: the official InternViT `config.json`, field for field.

References:
    - OpenGVLab/InternVL `configuration_intern_vit.py` (spec/internvit.md §1, [S1]).
    - The 300M-448px-V2_5 and 6B-448px-V2_5 `config.json` files on the Hugging Face Hub ([H1], [H4]).

Differs from the official class:
    - A frozen, keyword-only dataclass instead of a `PretrainedConfig`; no transformers import.
    - Keys we do not model (`architectures`, `auto_map`, `torch_dtype`, ...) survive in `extra`, so
      `from_dict(d).to_dict() == d` for an official file.
    - `from_dict` also accepts an InternVL chat config (uses its `vision_config`) and transformers'
      native `internvl_vision` config (renamed fields, spec/peers.md §2).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPE = "intern_vit_6b"  # the official model_type, shared by the 300M and the 6B (spec §1)

# Upper bounds "within reason" (the 6B is 3200 wide, 12800 inner, 45 layers, 25 heads): far above any InternViT,
# far below what would take minutes to build or overflow.
_SIZE_LIMITS = {"hidden_size": 1 << 15, "num_hidden_layers": 512, "num_attention_heads": 1024,
                "intermediate_size": 1 << 17, "image_size": 1 << 14, "patch_size": 1 << 10, "num_channels": 16}
MAX_POSITIONS = 1 << 20


@dataclass(frozen=True, kw_only=True)
class InternVisionConfig:
    """Architecture of an InternViT encoder, spelled like the official `config.json`.

    The 300M and the 6B differ in width and depth and in exactly three flags: `qkv_bias`,
    `qk_normalization` and `norm_type` (spec §1).
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = True
    norm_type: str = "rms_norm"  # "layer_norm" (300M) | "rms_norm" (6B)
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02  # never read by the modeling code (spec §1)
    initializer_factor: float = 0.1  # initial value of ls1/ls2
    use_flash_attn: bool = True  # kept for the file; we always run SDPA unless told otherwise
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked before any module is built: a zero, negative or absurd size otherwise fails deep inside torch
        # (a ZeroDivisionError, a 0-wide Linear) or builds for minutes (a million layers on the meta device).
        for name, limit in _SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise ValueError(f"config: {name} must be an integer from 1 to {limit}, got {value!r}")
        if self.num_channels != 3:
            raise ValueError(f"config: num_channels must be 3 (the official patch embedding is RGB), got {self.num_channels!r}")
        if self.grid_size**2 + 1 > MAX_POSITIONS:
            raise ValueError(f"config: image_size / patch_size = {self.grid_size} gives more than {MAX_POSITIONS} positions")
        for name in ("dropout", "attention_dropout", "drop_path_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"config: {name} must be in [0, 1), got {value!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"config: layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"norm_type must be 'layer_norm' or 'rms_norm', got {self.norm_type!r}")
        if self.hidden_act != "gelu":
            raise ValueError(f"only hidden_act='gelu' (exact erf GELU) is supported, got {self.hidden_act!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Side of the position-embedding grid: 448 / 14 = 32."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1

    def replace(self, **changes: Any) -> InternVisionConfig:
        return dataclasses.replace(self, **changes)

    # ---- JSON -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InternVisionConfig:
        """Build from an official config dict, a chat config (its `vision_config`) or an HF `internvl_vision` one."""
        if "vision_config" in d:  # InternVL chat config or transformers' InternVLConfig
            d = d["vision_config"]
        if d.get("model_type") == "internvl_vision":
            return cls._from_hf_native(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if k not in known]
        if missing:
            raise ValueError(f"config is missing required field(s) {missing}; keys present: {sorted(d)}")
        if "norm_type" not in known:  # the 6B-V1-5 file omits it: the class default applies (spec §1)
            known["norm_type"] = "rms_norm"
        return cls(**known, extra=extra)

    @classmethod
    def _from_hf_native(cls, d: dict[str, Any]) -> InternVisionConfig:
        # transformers' InternVLVisionConfig renames (spec/peers.md §2, convert_internvl_weights_to_hf.py).
        def side(v: Any) -> int:
            return int(v[0] if isinstance(v, (list, tuple)) else v)

        return cls(
            hidden_size=d.get("hidden_size", 1024),
            num_hidden_layers=d.get("num_hidden_layers", 24),
            num_attention_heads=d.get("num_attention_heads", 16),
            intermediate_size=d.get("intermediate_size", 4096),
            image_size=side(d.get("image_size", 448)),
            patch_size=side(d.get("patch_size", 14)),
            num_channels=d.get("num_channels", 3),
            qkv_bias=d.get("attention_bias", False),
            qk_normalization=d.get("use_qk_norm", False),
            norm_type=d.get("norm_type", "layer_norm"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-6),
            attention_dropout=d.get("attention_dropout", 0.0),
            initializer_factor=d.get("layer_scale_init_value", 0.1),
        )

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        d.setdefault("model_type", MODEL_TYPE)
        return dict(sorted(d.items()))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> InternVisionConfig:
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


_OFFICIAL_EXTRA = {
    "architectures": ["InternVisionModel"],
    "auto_map": {
        "AutoConfig": "configuration_intern_vit.InternVisionConfig",
        "AutoModel": "modeling_intern_vit.InternVisionModel",
    },
    "model_type": MODEL_TYPE,
    "torch_dtype": "bfloat16",
}

PRESETS: dict[str, InternVisionConfig] = {
    # InternViT-300M-448px-V2_5 (spec §1, 300M column).
    "300m": InternVisionConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
        drop_path_rate=0.1, initializer_factor=1.0, extra=dict(_OFFICIAL_EXTRA),
    ),
    # InternViT-6B-448px-V2_5 (spec §1, 6B column).
    "6b": InternVisionConfig(
        hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
        qkv_bias=False, qk_normalization=True, norm_type="rms_norm",
        initializer_range=1e-10, initializer_factor=0.1, extra=dict(_OFFICIAL_EXTRA),
    ),
    # A 300M-shaped toy for tests and offline trials: 56 px images, 4x4 patch grid.
    "tiny": InternVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56,
        qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
        initializer_factor=1.0, extra=dict(_OFFICIAL_EXTRA),
    ),
}
