"""Image preprocessing: robust loading (`open_image`) and the two pixel pipelines of spec/internvit.md §3.

`ImageProcessor` reproduces the model card's CLIP processor (shortest edge + center crop); `tile_transform`
reproduces InternVL's `build_transform` (squash to 448, used on dynamic tiles). Only Pillow, numpy and torch.
"""

from .image import DEFAULT_MAX_PIXELS as DEFAULT_MAX_PIXELS
from .image import ImageLoadError as ImageLoadError
from .image import open_image as open_image
from .image import to_rgb as to_rgb
from .transforms import IMAGENET_MEAN as IMAGENET_MEAN
from .transforms import IMAGENET_STD as IMAGENET_STD
from .transforms import ImageProcessor as ImageProcessor
from .transforms import tile_transform as tile_transform
from .transforms import Normalization as Normalization
from .transforms import tile_pixels as tile_pixels
from .transforms import to_tensor_normalized as to_tensor_normalized
from .transforms import uint8_pixels as uint8_pixels

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageLoadError",
    "ImageProcessor",
    "Normalization",
    "open_image",
    "tile_pixels",
    "tile_transform",
    "to_rgb",
    "to_tensor_normalized",
    "uint8_pixels",
]
