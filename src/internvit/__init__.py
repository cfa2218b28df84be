"""internvit: InternViT-300M-448px-V2_5 in plain PyTorch, the official checkpoint unchanged.

Public API (see README.md):
    from_pretrained, InternVisionConfig, InternVisionModel, PRESETS, ImageProcessor, open_image, extract_features
"""

from internvit.config import PRESETS as PRESETS
from internvit.config import InternVisionConfig as InternVisionConfig
from internvit.model.vision import InternVisionModel as InternVisionModel
from internvit.model.vision import InternVisionOutput as InternVisionOutput
from internvit.weights import CheckpointError as CheckpointError
from internvit.weights import from_pretrained as from_pretrained

__version__ = "0.1.0"


def __getattr__(name: str):
    # Preprocessing and extraction import PIL/pyarrow; keep `import internvit` light and load them on first use.
    if name in ("ImageProcessor", "open_image", "ImageLoadError", "tile_transform"):
        from internvit import preprocess

        return getattr(preprocess, name)
    if name == "extract_features":
        from internvit.extract import extract_features

        return extract_features
    raise AttributeError(f"module 'internvit' has no attribute {name!r}")
