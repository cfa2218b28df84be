"""Next-token loss with InternVL's token / sample / square averaging (spec/internvit.md §6.5, [S3, S5, S6]).

Each sample's supervised tokens get weight len2weight(x), x = its number of supervised tokens: token -> 1,
sample -> 1/x, square -> 1/sqrt(x) (InternVL 2.5's choice), x = 0 -> 0. The loss is sum(w * ce) / W, where W is
the local weight sum, or, under data parallelism, the mean of the ranks' sums (all-reduced): DDP then averages
the ranks' gradients, which makes the result the weighted mean over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from internvit.model.template import IGNORE_INDEX

REDUCTIONS = ("token", "sample", "square")


def len2weight(x: int | torch.Tensor, reduction: str) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    if reduction == "token":
        w = torch.ones_like(x)
    elif reduction == "sample":
        w = 1.0 / x.clamp(min=1)
    elif reduction == "square":
        w = 1.0 / x.clamp(min=1).sqrt()
    else:
        raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return torch.where(x > 0, w, torch.zeros_like(w))


def token_weights(labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """[B, N] weights: each supervised token carries its sample's weight, ignored positions 0."""
    supervised = labels != IGNORE_INDEX
    per_sample = len2weight(supervised.sum(-1), reduction).to(labels.device)
    return supervised.float() * per_sample.unsqueeze(-1)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "square",
                    weights: torch.Tensor | None = None, all_reduce: bool = True) -> torch.Tensor:
    """Shifted, weighted cross-entropy: logits[:, t] predicts labels[:, t + 1].

    `weights` [B, N] (at label positions) are needed for packed rows, which hold several samples; by default each
    row is one sample and its weights follow from `reduction`.
    """
    if weights is None:
        weights = token_weights(labels, reduction)
    weights = weights[:, 1:].to(logits.device, torch.float32)
    logits, labels = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="none")
    total = (ce * weights.reshape(-1)).sum()
    norm = weights.sum()
    if all_reduce and dist.is_available() and dist.is_initialized():
        norm = norm.detach().clone()
        dist.all_reduce(norm)
        norm = norm / dist.get_world_size()
    return total / norm.clamp(min=1e-8)
