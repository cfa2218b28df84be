"""From a name, a folder, a file or a Hub repo id to an `InternVisionModel` with its weights (`from_checkpoint`,
the torch backend of `internvit.from_pretrained`), and back to disk (`convert`, `init_checkpoint`).

Files are found, read and key-mapped by `internvit.checkpoint` (below `model/`); this module builds the model on
the meta device and assigns the memory-mapped tensors to it in their stored dtype, so a bf16 checkpoint never
passes through fp32 in RAM and loading costs no copy. The mapping is copy-on-write: training the loaded model never
touches the file. The checkpoint names are re-exported here, where earlier versions defined them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from internvit.checkpoint import (  # noqa: F401 - re-exported
    CONFIG_NAME,
    DTYPES,
    PREPROCESSOR_NAME,
    WEIGHT_CANDIDATES,
    WEIGHTS_NAME,
    Checkpoint,
    CheckpointError,
    check_state_dict,
    check_target,
    files_fingerprint,
    save_pretrained,
    hub_kwargs,
    hub_reachable,
    infer_config,
    offline_error,
    parse_dtype,
    read_state_dict,
    resolve,
    select_keys,
    state_dict_fingerprint,
    to_official,
)
from internvit.config import PRESETS, InternVisionConfig
from internvit.model.vision import InternVisionModel
from internvit.registry import PREPROCESSOR_CONFIG


# ---- public entry points ---------------------------------------------------------------------------


def load_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    config: InternVisionConfig | None = None,
    cache_dir: str | None = None,
) -> tuple[Checkpoint, InternVisionConfig, dict[str, torch.Tensor]]:
    """Resolve, read and map a checkpoint: its files, its config and its official-layout state dict."""
    ckpt = resolve(name_or_path, revision=revision, cache_dir=cache_dir)
    sd, _ = to_official(read_state_dict(ckpt), source=ckpt.source)
    if config is None:
        config = InternVisionConfig.from_json(ckpt.config_path) if ckpt.config_path else infer_config(sd)
    return ckpt, config, sd


def from_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    config: InternVisionConfig | None = None,
    attn_implementation: str = "auto",
    cache_dir: str | None = None,
) -> InternVisionModel:
    """The torch backend of `internvit.from_pretrained` (`backends.py`, whose docstring gives the arguments): an
    `InternVisionModel` in eval mode, carrying `model.checkpoint` (the resolved files)."""
    ckpt, config, sd = load_checkpoint(name_or_path, revision=revision, config=config, cache_dir=cache_dir)
    target = parse_dtype(dtype) or sd["embeddings.patch_embedding.weight"].dtype
    with torch.device("meta"):
        model = InternVisionModel(config, attn_implementation=attn_implementation)
    check_state_dict(model, sd, source=ckpt.source)
    sd = {k: v.to(target) for k, v in sd.items()}  # a no-op (no copy) where the stored dtype is the target
    model.load_state_dict(sd, strict=True, assign=True)
    if device is not None:
        model.to(device)
    model.checkpoint = ckpt
    return model.eval()


def convert(
    name_or_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    config: InternVisionConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Rewrite any supported checkpoint (chat, sharded, timm, transformers) in the official standalone layout.

    A non-empty `out_dir` is refused unless `overwrite`; then stale weight files in it are removed.
    """
    check_target(out_dir, overwrite=overwrite)
    ckpt, config, sd = load_checkpoint(name_or_path, revision=revision, config=config)
    with torch.device("meta"):
        check_state_dict(InternVisionModel(config), sd, source=ckpt.source)
    preprocessor = json.loads(ckpt.preprocessor_path.read_text()) if ckpt.preprocessor_path else None
    return save_pretrained(sd, config, out_dir, dtype=dtype, preprocessor=preprocessor)


def init_checkpoint(
    out_dir: str | os.PathLike,
    *,
    preset: str = "300m",
    seed: int = 0,
    dtype: str | torch.dtype = "bf16",
    overwrite: bool = False,
) -> Path:
    """Write a randomly initialised checkpoint in the official layout (for offline trials and tests).

    A non-empty `out_dir` is refused unless `overwrite`.
    """
    check_target(out_dir, overwrite=overwrite)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    with torch.device("meta"):
        model = InternVisionModel(config)
    # Materialise directly in the target dtype: the 6B never exists in fp32 here.
    model = model.to(parse_dtype(dtype)).to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    # The model card's CLIP preprocessing, to the preset's own tile size (a small preset takes small tiles, and its
    # exports are fixed to them).
    preprocessor = {**PREPROCESSOR_CONFIG, "size": config.image_size, "crop_size": config.image_size}
    return save_pretrained(model.state_dict(), config, out_dir, preprocessor=preprocessor)
