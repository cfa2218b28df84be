"""Pretrained entries: a short name -> the Hub repository that holds the weights and their preprocessing.

References: timm `PretrainedCfg`, open_clip `_pcfg` (STYLE.md §5). Every entry's repository ships a
`preprocessor_config.json`, which `ImageProcessor.from_pretrained` reads, so weights and preprocessing come from
one place. The layout of each repository (standalone ViT, InternVL 2.5 chat model with a `vision_model.`
prefix) is detected when the weights are read (`internvit.weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "OpenGVLab/InternViT-300M-448px-V2_5"
DEFAULT_MAX_TILES = 12  # the model card's dynamic tiling budget (spec §4)

# The official repository's preprocessor_config.json (spec §3.1), written beside weights that come without one;
# `preprocess.ImageProcessor()` has exactly these defaults (tests/unit/test_preprocess.py pins both to the file).
PREPROCESSOR_CONFIG = {
    "crop_size": 448,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 448,
}


@dataclass(frozen=True, kw_only=True)
class PretrainedEntry:
    repo_id: str
    revision: str = "main"
    description: str = ""


REGISTRY: dict[str, PretrainedEntry] = {
    "internvit-300m-448px-v2_5": PretrainedEntry(
        repo_id="OpenGVLab/InternViT-300M-448px-V2_5", description="InternViT-300M after InternVL 2.5 Stage 1.5"
    ),
    "internvit-300m-448px": PretrainedEntry(
        repo_id="OpenGVLab/InternViT-300M-448px", description="InternViT-300M v1, distilled from InternViT-6B"
    ),
    "internvit-6b-448px-v2_5": PretrainedEntry(repo_id="OpenGVLab/InternViT-6B-448px-V2_5", description="InternViT-6B"),
    # InternVL 2.5 chat checkpoints: only their `vision_model.` shards are downloaded.
    "internvl2_5-1b": PretrainedEntry(repo_id="OpenGVLab/InternVL2_5-1B", description="ViT of InternVL2.5-1B"),
    "internvl2_5-2b": PretrainedEntry(repo_id="OpenGVLab/InternVL2_5-2B", description="ViT of InternVL2.5-2B"),
    "internvl2_5-4b": PretrainedEntry(repo_id="OpenGVLab/InternVL2_5-4B", description="ViT of InternVL2.5-4B"),
    "internvl2_5-8b": PretrainedEntry(repo_id="OpenGVLab/InternVL2_5-8B", description="ViT of InternVL2.5-8B"),
}
