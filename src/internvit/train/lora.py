"""LoRA for the ViT and the LLM, as InternVL's `use_backbone_lora` / `use_llm_lora` (spec/internvit.md §6.1).

y = x W^T + b + (alpha / r) * dropout(x) A^T B^T on every Linear of the ViT's encoder layers (attn.qkv, attn.proj,
mlp.fc1, mlp.fc2: InternVL's ViT targets) or of the LLM's decoder layers (attention and MLP projections), with
alpha = 2r and dropout 0.05 as InternVL's scripts; A is Kaiming-uniform, B zero, so training starts at the base
model. The base weights stay frozen; A and B live in a `lora` submodule of each Linear (`...qkv.lora.A`), added by
a forward hook, so the base keys are untouched. `merge_lora` folds a state dict's adapters into the base weights:
the saved chat checkpoint and exported ViT are plain models again.

Differs from InternVL (peft): no peft dependency; a merged checkpoint is written rather than the adapter alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCALE = 2.0  # alpha / r with alpha = 2r


class LoRA(nn.Module):
    """The low-rank update of one Linear: A [r, in], B [out, r]."""

    def __init__(self, linear: nn.Linear, rank: int, *, dropout: float = 0.05,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        a = torch.empty(rank, linear.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear and peft
        w = linear.weight
        self.A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.A.T.to(x.dtype)) @ self.B.T.to(x.dtype) * SCALE


def _add_lora(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.lora(inputs[0])


def add_lora(blocks: list[nn.Module], rank: int, *, dropout: float = 0.05, seed: int = 0) -> None:
    """Give every Linear inside `blocks` a LoRA update of `rank` (once: a Linear that has one keeps it). The
    initial A matrices come from `seed` alone, so every process of a run starts from the same adapters."""
    generator = torch.Generator().manual_seed(seed)
    for block in blocks:
        for linear in [m for m in block.modules() if isinstance(m, nn.Linear) and not hasattr(m, "lora")]:
            linear.lora = LoRA(linear, rank, dropout=dropout, generator=generator)
            linear.register_forward_hook(_add_lora)


def merge_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`X.weight + SCALE * X.lora.B @ X.lora.A` for every adapter, without the adapter keys (a new dict)."""
    out = {k: v for k, v in state_dict.items() if ".lora." not in k}
    for key in state_dict:
        if key.endswith(".lora.A"):
            base = key.removesuffix(".lora.A")
            a, b = state_dict[key].float(), state_dict[base + ".lora.B"].float()
            weight = out[base + ".weight"]
            out[base + ".weight"] = (weight.float() + SCALE * b @ a).to(weight.dtype)
    return out
