"""internvit: InternViT-300M-448px-V2_5 in plain PyTorch, the official checkpoint unchanged.

Public API (see README.md):
    from_pretrained, InternVisionConfig, InternVisionModel, PRESETS          the encoder
    ImageProcessor, open_image, tile_transform                              preprocessing
    dynamic_tiles, tile_image, encode_images, visual_tokens, load_frames    the InternVL 2.5 pipeline
    Projector, load_projector, pixel_unshuffle                              the ViT -> LLM glue
    extract_features                                                        files -> Parquet
    InternVLChatModel                                                       ViT + mlp1 + LLM: chat, training
"""

from importlib import import_module as _import_module

from internvit.config import PRESETS as PRESETS
from internvit.config import InternVisionConfig as InternVisionConfig
from internvit.model.vision import InternVisionModel as InternVisionModel
from internvit.model.vision import InternVisionOutput as InternVisionOutput
from internvit.checkpoint import CheckpointError as CheckpointError

__version__ = "0.1.0"

# Loaded on first use, so that `import internvit` pulls in neither Pillow nor pyarrow.
_LAZY = {
    "from_pretrained": "internvit.backends",
    "ImageProcessor": "internvit.preprocess",
    "ImageLoadError": "internvit.preprocess",
    "open_image": "internvit.preprocess",
    "tile_transform": "internvit.preprocess",
    "dynamic_tiles": "internvit.preprocess.tiling",
    "TileLayout": "internvit.preprocess.tiling",
    "load_frames": "internvit.preprocess.video",
    "tile_image": "internvit.preprocess.tiling",
    "encode_images": "internvit.features",
    "visual_tokens": "internvit.features",
    "Projector": "internvit.model.projector",
    "load_projector": "internvit.model.projector",
    "pixel_unshuffle": "internvit.model.projector",
    "extract_features": "internvit.extract",
    "InternVLChatModel": "internvit.model.chat",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'internvit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})  # tab completion lists the names loaded on first use
