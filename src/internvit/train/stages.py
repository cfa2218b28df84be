"""InternVL 2.5's three training stages as small deltas over one default (spec/internvit.md §6.1, [S8, S10]).

| | trainable | LR (cosine) | warmup | weight decay | ViT drop-path |
|---|---|---|---|---|---|
| stage 1, MLP warmup | mlp1 | 2e-4 | 100 steps | 0.01 (1B-4B; 0.05 for 8B+) | 0.0 |
| stage 1.5, ViT incremental | ViT + mlp1 | 1e-5 | 100 steps | 0.05 | 0.1 (300M) |
| stage 2, full instruction tuning | ViT + mlp1 + LLM | 4e-5 (<= 8B) | 3% of steps | 0.01 (1B-4B) | 0.1 |

All stages, as every script of `internvl_chat/shell/internvl2.5/stage*/` runs them: `max_seq_length` 16384, packing
on (`use_packed_ds`: 16384 tokens, 48 tiles, 20 pending buffers per pack), video frames drawn at random, 8 to 32 per
video (`min_num_frame`, `max_num_frame`, `sample='rand'`); AdamW (0.9, 0.999, eps 1e-8) decaying every trainable
tensor (DeepSpeed's optimizer), grad-norm clip 1.0, bf16, square loss averaging, dynamic tiles up to 12 with a
thumbnail. Freezing as InternVL: a frozen ViT keeps train mode (its drop-path stays active), a frozen LLM is put
in eval mode. The other choices stay one `--set` away: `pack=false`, `max_seq_length=8192` (the 2nd-finetune
scripts' values), `weight_decay_1d=false`, `sampling_method=middle`, `shrink_embeddings=false`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from internvit.registry import DEFAULT_MAX_TILES


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    stage: str = "2"
    train_vision: bool = True
    train_mlp: bool = True
    train_llm: bool = True
    lr: float = 4e-5
    warmup_steps: int = 0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    weight_decay_1d: bool = True  # decay biases, norm weights and ls1/ls2 too (InternVL's DeepSpeed AdamW)
    drop_path_rate: float = 0.1
    unfreeze_vit_layers: int = 0  # with a frozen ViT: train layers[k:] anyway (InternVL's flag; -4 = last 4)
    vit_lora_rank: int = 0  # > 0: the ViT learns through LoRA adapters of this rank (InternVL's use_backbone_lora)
    llm_lora_rank: int = 0  # > 0: the LLM learns through LoRA adapters (use_llm_lora; 16 in the LoRA scripts)
    lora_dropout: float = 0.05
    max_steps: int = 1000
    batch_size: int = 1  # per process
    grad_accum: int = 1
    max_seq_length: int = 16384
    max_tiles: int = DEFAULT_MAX_TILES
    min_num_frame: int = 8  # frames per training video: drawn from min_num_frame..max_num_frame (InternVL's flags)
    max_num_frame: int = 32
    sampling_method: str = "rand"  # a random frame per segment; "middle": each segment's middle frame
    pack: bool = True  # InternVL 2.5's stage scripts pack (spec §6.4); then batch_size counts packs
    max_packed_tokens: int = 16384
    max_packed_tiles: int = 48
    max_buffers: int = 20
    loss_reduction: str = "square"
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    bf16: bool = True  # autocast on CUDA (and on CPU when asked with cpu_bf16)
    cpu_bf16: bool = False
    grad_checkpointing: bool = True
    fsdp: bool = False  # under torchrun: shard the LLM and ViT layers (FSDP) instead of replicating (DDP)
    data_threads: int = 2  # samples loaded (decoded, tiled, tokenized) at once, ahead of the step
    seed: int = 0
    shrink_embeddings: bool = True  # LLM embeddings resized to len(tokenizer) when tokens are added (InternVL)
    save_every: int = 100  # steps between saves of last/ (and at the end, and on Ctrl-C / SIGTERM)
    log_every: int = 1
    save_dtype: str = "bf16"  # RUN/vision/'s dtype (the official InternViT release is bf16); final/ keeps fp32

    def __post_init__(self) -> None:
        if not 1 <= self.min_num_frame <= self.max_num_frame:
            raise ValueError(f"min_num_frame={self.min_num_frame}, max_num_frame={self.max_num_frame}: need "
                             "1 <= min_num_frame <= max_num_frame")
        if self.sampling_method not in ("rand", "middle"):
            raise ValueError(f"sampling_method={self.sampling_method!r}: expected 'rand' or 'middle'")
        if self.save_dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"save_dtype={self.save_dtype!r}: expected fp32, bf16 or fp16")

    def replace(self, **changes) -> "TrainConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def stage1(**overrides) -> TrainConfig:
    """MLP warmup: only mlp1 learns."""
    return TrainConfig(stage="1", train_vision=False, train_llm=False, lr=2e-4, warmup_steps=100, warmup_ratio=0.0,
                       weight_decay=0.01, drop_path_rate=0.0).replace(**overrides)


def stage1_5(**overrides) -> TrainConfig:
    """ViT incremental learning: ViT and mlp1 learn with the frozen LLM's next-token loss."""
    return TrainConfig(stage="1.5", train_llm=False, lr=1e-5, warmup_steps=100, warmup_ratio=0.0,
                       weight_decay=0.05, drop_path_rate=0.1).replace(**overrides)


def stage2(**overrides) -> TrainConfig:
    """Full instruction tuning: everything learns."""
    return TrainConfig(stage="2").replace(**overrides)


STAGES = {"1": stage1, "1.5": stage1_5, "2": stage2}
