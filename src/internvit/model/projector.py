"""Pixel unshuffle and the `mlp1` projector: InternViT tokens -> InternVL visual tokens for the LLM.

References:
    - InternVL `InternVLChatModel.pixel_shuffle` / `extract_feature` and the `mlp1` Sequential
      (spec/internvit.md §5.1-5.2, [S3]); key names `mlp1.0` (LayerNorm, eps 1e-5), `mlp1.1`, `mlp1.3` (Linear).
    - transformers `InternVLModel.get_image_features` / `InternVLMultiModalProjector` compute the same function
      (spec/peers.md §2); tests/parity compares against it.

Differs from InternVL: `pixel_unshuffle` takes the grid as [T, rows, cols, C] and returns v2's order directly;
v1 (older checkpoints) keeps InternVL's transposed token order. Shapes: T tiles, h/w grid rows/cols, C width.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from internvit.checkpoint import CheckpointError, parse_dtype, read_state_dict, resolve


def pixel_unshuffle(x_ThwC: torch.Tensor, scale_factor: float = 0.5, *, version: str = "v2") -> torch.Tensor:
    """InternVL's `pixel_shuffle(x, 0.5)`: merge each 2x2 block of tokens into one token of 4x the width.

    For v2, output token (a, b) is [x(2a, 2b) | x(2a, 2b+1) | x(2a+1, 2b) | x(2a+1, 2b+1)] (spec §5.2).
    v1 has the same channels but the token grid transposed (column-major), as InternVL 1.x trained it.

    Args:
        x_ThwC: tokens on their grid, [T, h, w, C] (rows, columns), h and w divisible by 1/scale_factor.
        scale_factor: 0.5 in InternVL 2.5.
        version: "v2" (InternVL 2.x) or "v1".

    Returns:
        [T, h*s, w*s, C/s^2].
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"ps_version must be 'v1' or 'v2', got {version!r}")
    # Written with InternVL's own (n, w, h, c) naming and views, so the memory order is theirs exactly.
    n, w, h, c = x_ThwC.shape
    if w * scale_factor != int(w * scale_factor) or h * scale_factor != int(h * scale_factor):
        raise ValueError(f"token grid {w}x{h} is not divisible by {1 / scale_factor:g}")
    x = x_ThwC.reshape(n, w, int(h * scale_factor), int(c / scale_factor))  # merge column pairs
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def unshuffle_tokens(hidden_TNC: torch.Tensor, scale_factor: float = 0.5, *, version: str = "v2") -> torch.Tensor:
    """ViT tokens [T, 1 + h*w, C] (CLS first) -> unshuffled tokens [T, h*w/4, 4C] in InternVL's order."""
    T, N, C = hidden_TNC.shape
    side = math.isqrt(N - 1)
    if side * side != N - 1:
        raise ValueError(f"{N - 1} patch tokens do not form a square grid (InternVL needs square tiles)")
    x = pixel_unshuffle(hidden_TNC[:, 1:].reshape(T, side, side, C), scale_factor, version=version)
    return x.reshape(T, -1, x.shape[-1])


@dataclass(frozen=True, kw_only=True)
class ProjectorConfig:
    """The chat-config fields the projector needs (InternVL 2.5 values as defaults, spec §5.1)."""

    vit_hidden_size: int = 1024
    llm_hidden_size: int = 896
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1

    @classmethod
    def from_chat_config(cls, d: dict) -> ProjectorConfig:
        llm = d.get("llm_config") or d.get("text_config") or {}
        if "hidden_size" not in llm:
            raise ValueError("chat config has no llm_config.hidden_size (is this an InternVL chat config.json?)")
        return cls(
            vit_hidden_size=d.get("vision_config", {}).get("hidden_size", 1024),
            llm_hidden_size=llm["hidden_size"],
            downsample_ratio=d.get("downsample_ratio", 0.5),
            ps_version=d.get("ps_version", "v2"),
            select_layer=d.get("select_layer", d.get("vision_feature_layer", -1)),
        )

    @property
    def merged_size(self) -> int:
        return self.vit_hidden_size * int(round(1 / self.downsample_ratio)) ** 2


class Projector(nn.Module):
    """Drop CLS -> square token grid -> pixel unshuffle -> `mlp1` (LayerNorm, Linear, GELU, Linear)."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(config.merged_size),  # default eps 1e-5, unlike the ViT's 1e-6 (spec §2.6)
            nn.Linear(config.merged_size, config.llm_hidden_size),
            nn.GELU(),
            nn.Linear(config.llm_hidden_size, config.llm_hidden_size),
        )

    def forward(self, hidden_TNC: torch.Tensor) -> torch.Tensor:
        """ViT tokens [T, 1 + h*w, C] -> visual tokens [T, h*w/4, llm_hidden]."""
        return self.mlp1(unshuffle_tokens(hidden_TNC, self.config.downsample_ratio, version=self.config.ps_version))


def load_projector(name_or_path: str | os.PathLike, *, dtype=None, device=None, revision: str | None = None) -> Projector:
    """The `mlp1` projector of an InternVL chat checkpoint (local folder or Hub repo id), with its config."""
    ckpt = resolve(name_or_path, revision=revision, prefixes=("mlp1.",))
    if ckpt.config_path is None:
        raise CheckpointError(f"{ckpt.source}: no config.json, so the projector's sizes are unknown")
    config = ProjectorConfig.from_chat_config(json.loads(ckpt.config_path.read_text()))
    sd = {k[len("mlp1."):]: v for k, v in read_state_dict(ckpt, prefixes=("mlp1.",)).items()}
    if not sd:
        raise CheckpointError(f"{ckpt.source}: no mlp1.* weights (is this an InternVL chat checkpoint?)")
    with torch.device("meta"):
        projector = Projector(config)
    target = parse_dtype(dtype) or next(iter(sd.values())).dtype
    try:
        projector.mlp1.load_state_dict({k: v.to(target) for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.source}: mlp1 weights do not match the config: {e}") from None
    if device is not None:
        projector.to(device)
    return projector.eval()
