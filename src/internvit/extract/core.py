"""The extraction core every engine drives (local, Ray, the HTTP server): one options object, the preprocessing of
one input, the model as loaded for extraction, the encoding of a batch into rows, and the output's schema.

An engine only decides where inputs come from, where its workers run and where rows go:
    options = ExtractOptions(model=..., tiles="dynamic", layers=(12,))   # validated once
    loaded = load_model(options, device)                                 # encoder, projector, preprocessing
    prepare = Prepare.for_model(options, loaded)                         # path or bytes -> Item (picklable)
    encoder = RowEncoder(loaded, options)                                # [Item] -> the columns of their rows
    schema = output_schema(options, loaded)                              # columns + what a resume must match

Preprocessing per input:
    - images, `tiles="none"` (default): the model card's CLIP processor, one 448 tile;
    - images, `tiles="dynamic"`: InternVL's dynamic tiles (1..max_tiles) plus a thumbnail (spec §4);
    - videos (by extension): `frames` frames sampled as the model card's `get_index`, each squashed to one tile.

What a row holds is decided by `features.TiledFeatures`: `cls` is the CLS of the view that saw the whole image
(the thumbnail of a tiled image, else its single tile; for a video the mean over frames), `mean` the mean of the
patch tokens of every tile the encoder saw, `patch_tokens` the stitched map of the grid tiles. See the README.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from internvit.backends import auto_backend, from_pretrained
from internvit.checkpoint import check_state_dict, parse_dtype, state_dict_fingerprint
from internvit.extract.store import feature_schema
from internvit.features import TiledFeatures
from internvit.model.projector import Projector, load_projector, unshuffle_tokens
from internvit.model.vision import InternVisionModel, layer_indices
from internvit.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    ImageProcessor,
    Normalization,
    open_image,
    tile_pixels,
)
from internvit.preprocess.device_decode import (
    DevicePlan,
    clip_plan,
    decode_tiles,
    device_jpeg_size,
    jpeg_decoder_available,
)
from internvit.preprocess.tiling import MAX_TILES, TileLayout, choose_grid, dynamic_tile_pixels, tile_layout
from internvit.preprocess.video import is_video_name, load_frames
from internvit.registry import DEFAULT_MAX_TILES, DEFAULT_MODEL
from internvit.runtime import export_format, is_export
from internvit.sources import Member, read_member
from internvit.weights import load_checkpoint

TILE_MODES = ("none", "dynamic")
DECODE_MODES = ("exact", "fast", "device")
MAX_DEVICE_JPEG_BYTES = 1 << 28  # larger files are no photos: the CPU path looks at them
BACKENDS = ("torch", "openvino", "onnxruntime", "auto")


@dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    """What determines an extraction, the same for every engine; validated when built (before anything loads).

    Attributes:
        model: a name or path for `internvit.from_pretrained`, or a loaded `InternVisionModel` (local engine).
        revision: Hub revision of `model`.
        dtype: compute dtype (bf16 is the reference dtype and the fastest on CPUs with AVX-512 BF16). None: bf16,
            or for an `internvit export` folder its own precision (the only one an int8 export runs in).
        device: "cpu", "cuda", ...; default CUDA when available.
        batch_size: tiles per forward (tiles of many inputs fill each one); bounds the activation memory.
        decode: "exact" (Pillow decodes every pixel: the reference) or "fast" (a JPEG at least twice the size it
            is resized to is decoded at 1/2, 1/4 or 1/8 scale by libjpeg; on CUDA with torchvision, JPEGs are
            decoded on the GPU by nvJPEG and resized there, as with "device"; docs/performance.md has the fidelity)
            or "device" (JPEGs decoded and resized by torchvision on the model's device, nvJPEG on CUDA;
            preprocess/device_decode.py).
        allow_tf32: let CUDA run fp32 convolutions and matmuls in TF32 (faster, ~1e-3 off); off by default, so
            fp32 on a GPU matches the CPU.
        compile: `torch.compile` the encoder (torch backend); the first forwards pay the compilation.
        tiles: "none" (CLIP preprocessing, one tile) or "dynamic" (InternVL tiles + thumbnail).
        max_tiles: the dynamic tiling budget per image.
        frames: frames sampled per video.
        layers: extra layers to pool, as `hidden_states` indices (0 = embeddings, -1 = last; `layer_indices`).
        patch_tokens: also store the patch-token map (the stitched map for tiled images; not for videos).
        visual_tokens: also store InternVL's visual tokens (pixel-unshuffled, or projected with `projector`).
        projector: an InternVL chat checkpoint whose `mlp1` projects the visual tokens (implies visual_tokens).
        exif_transpose: apply the EXIF orientation.
        max_pixels: refuse larger images (decompression bombs); None = the library default.
        retry_errors: recompute inputs whose earlier row is an error.
        progress: show a progress bar on stderr.
        backend: "torch" (the reference), "openvino", "onnxruntime" or "auto" (the fastest installed here; the
            summary says which). None: torch, or for an `internvit export` folder its own runtime.
    """

    model: object = DEFAULT_MODEL
    revision: str | None = None
    dtype: str | torch.dtype | None = None
    device: str | torch.device | None = None
    batch_size: int = 8
    decode: str = "exact"
    allow_tf32: bool = False
    compile: bool = False
    tiles: str = "none"
    max_tiles: int = DEFAULT_MAX_TILES
    frames: int = 8
    layers: tuple[int, ...] = ()
    patch_tokens: bool = False
    visual_tokens: bool = False
    projector: str | None = None
    exif_transpose: bool = True
    max_pixels: int | None = None
    retry_errors: bool = False
    progress: bool = True
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"--decode {self.decode!r}: choose one of {', '.join(DECODE_MODES)}")
        if self.tiles not in TILE_MODES:
            raise ValueError(f"tiles must be one of {TILE_MODES}, got {self.tiles!r}")
        if not 1 <= self.max_tiles <= MAX_TILES:
            raise ValueError(f"--max-tiles must be from 1 to {MAX_TILES}, got {self.max_tiles}")
        for name, value in (("--batch-size", self.batch_size), ("--frames", self.frames)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.dtype is None and not (isinstance(self.model, (str, os.PathLike)) and is_export(self.model)):
            object.__setattr__(self, "dtype", "bf16")
        if self.projector is not None:
            object.__setattr__(self, "visual_tokens", True)


def options_from(options: ExtractOptions | None, fields: dict) -> ExtractOptions:
    """An engine's `options` argument, or the `ExtractOptions` its keyword fields make (not both)."""
    if options is None:
        return ExtractOptions(**fields)
    if fields:
        raise TypeError(f"pass the options as ExtractOptions or as keywords, not both ({', '.join(fields)})")
    return options


@dataclass
class ExtractSummary:
    out: Path
    inputs: int  # distinct inputs named by the sources
    skipped: int  # already in the output from an earlier run
    processed: int  # rows written by this run
    failed: int  # rows with an error in the final output
    seconds: float  # wall time of the whole call
    load_seconds: float = 0.0  # of which loading the model
    model_seconds: float = 0.0  # of which the encoder was busy (its share of the rest is the pipeline's efficiency)
    tiles: int = 0  # tiles encoded by this run
    backend: str = "torch"  # that ran the encoder (what --backend auto chose)
    precision: str = ""  # its compute precision

    @property
    def ok(self) -> bool:
        return self.failed == 0


@dataclass
class Item:
    """One input after preprocessing: its uint8 tiles [T, 3, S, S], how to normalize them, and where they came
    from; or the error that stopped it. The encoder adds each tile's results (`outputs`)."""

    path: str
    pixels: torch.Tensor | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height) as opened (full size, also with --decode fast)
    layout: TileLayout | None = None  # dynamic tiles: their grid and thumbnail (None: one tile, or a video)
    frame_indices: list[int] | None = None  # videos
    norm: Normalization = field(default_factory=Normalization)  # rescale + mean/std, applied on the device
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)  # per encoded batch, its tiles' results
    jpeg: bytes | None = None  # to be decoded on the device (`Prepare.decode_on_device`), as `plan` says
    plan: DevicePlan | None = None

    @property
    def num_tiles(self) -> int:
        return 0 if self.pixels is None else int(self.pixels.shape[0])


@dataclass
class Prepare:
    """Path (or encoded bytes) -> `Item`; a plain picklable object that runs in loader workers and Ray tasks.

    It decodes and resizes (uint8 out); the rescale and normalization run with the encoder, on its device. With
    `device_decode` (`--decode fast` on a GPU, local engine), a JPEG the device can decode is handed over undecoded,
    with its plan, and `decode_on_device` makes its tiles there (preprocess/device_decode.py)."""

    processor: object
    tiles: str
    max_tiles: int
    frames: int
    tile_size: int
    exif_transpose: bool
    max_pixels: int
    decode: str = "exact"
    device_decode: bool = False

    @classmethod
    def for_model(cls, options: ExtractOptions, loaded: LoadedModel, *, device_decode: bool = False) -> Prepare:
        return cls(loaded.processor, options.tiles, options.max_tiles, options.frames, loaded.vit.config.image_size,
                   options.exif_transpose, DEFAULT_MAX_PIXELS if options.max_pixels is None else options.max_pixels,
                   options.decode, device_decode)

    def __call__(self, path: str, data: bytes | None = None) -> Item:
        """`data`: the input's encoded bytes when they come from elsewhere (a Parquet column, a remote file, a
        tar shard, a request); `path` then only names the input (in its row and its error)."""
        try:
            if is_video_name(path):
                if data is not None:
                    return self._video_from_bytes(path, data)
                frames, indices = load_frames(path, num_segments=self.frames, max_pixels=self.max_pixels)
                pixels = torch.stack([tile_pixels(f, size=self.tile_size) for f in frames])
                return Item(path, pixels, size=frames[0].size, frame_indices=indices)
            if self.device_decode and (item := self._for_device(path, data)) is not None:
                return item
            full = _FullSize(self)
            image = open_image(path if data is None else data, exif_transpose=self.exif_transpose,
                               max_pixels=self.max_pixels, draft=full if self.decode == "fast" else None)
            size = full.size or image.size
            if self.tiles == "dynamic":
                pixels, layout = dynamic_tile_pixels(image, max_tiles=self.max_tiles, tile_size=self.tile_size,
                                                     source_size=size)
                return Item(path, pixels, size=size, layout=layout)
            return Item(path, self.processor.pixels(image, source_size=size)[None], size=size,
                        norm=self.processor.normalization)
        except ImageLoadError as e:
            message = str(e)
            if data is not None:  # open_image names bytes "<bytes>"; the row's path is the useful name
                message = message.replace("<bytes>", path, 1)
            return Item(path, error=message)
        except ValueError as e:  # preprocessing refused the image (e.g. too elongated for the CLIP resize)
            return Item(path, error=f"{path}: {e}")
        except Exception as e:  # a decoder bug must not stop a million-image run
            return Item(path, error=f"{path}: {e.__class__.__name__}: {e}")

    def member(self, path: str, member: Member | None, error: str | None = None) -> Item:
        """An input found in a tar shard (both engines): `error` when the shard itself could not be listed, else
        the member's bytes read at their offset and prepared as `__call__` does."""
        if error is not None:
            return Item(path, error=error)
        try:
            data = read_member(member)
        except Exception as e:  # a shard cut inside this member, a vanished file, a network error
            return Item(path, error=f"{path}: {e}")
        return self(path, data)

    def _for_device(self, path: str, data: bytes | None) -> Item | None:
        """An undecoded JPEG and its plan, or None where the CPU path must decode (preprocess/device_decode.py)."""
        if data is None:
            try:
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_DEVICE_JPEG_BYTES:
                    return None  # FIFOs, devices, folders, huge files: `open_image` names them
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                return None
        size = device_jpeg_size(data, exif_transpose=self.exif_transpose, max_pixels=self.max_pixels)
        if size is None:
            return None
        if self.tiles == "dynamic":
            layout = tile_layout(size, max_tiles=self.max_tiles, tile_size=self.tile_size)
            return Item(path, size=size, layout=layout, jpeg=data, plan=DevicePlan.for_layout(layout))
        plan = clip_plan(self.processor, *size)
        if plan is None:
            return None
        return Item(path, size=size, norm=self.processor.normalization, jpeg=data, plan=plan)

    def decode_on_device(self, items: list[Item], device: torch.device) -> None:
        """Decode the JPEGs that `items` carry on `device` (one batch) into their tiles. A JPEG the device decoder
        refuses goes the CPU path (pixels, or the error Pillow reports)."""
        todo = [it for it in items if it.jpeg is not None]
        if not todo:
            return
        try:
            tiles = decode_tiles([it.jpeg for it in todo], [it.plan for it in todo], device)
        except RuntimeError:  # the batch decoder gives nothing when one fails: find it
            tiles = []
            for it in todo:
                try:
                    tiles += decode_tiles([it.jpeg], [it.plan], device)
                except RuntimeError:
                    tiles.append(None)
        cpu = dataclasses.replace(self, device_decode=False)
        for it, pixels in zip(todo, tiles):
            if pixels is None:
                redo = cpu(it.path, it.jpeg)
                it.pixels, it.error, it.size, it.layout = redo.pixels, redo.error, redo.size, redo.layout
            else:
                it.pixels = pixels
            it.jpeg = it.plan = None

    def _video_from_bytes(self, path: str, data: bytes) -> Item:
        """PyAV reads files: spill the bytes to a temporary one, and name `path` in errors."""
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=Path(path).suffix) as f:
            f.write(data)
            f.flush()
            item = self(f.name)
        item.path = path
        if item.error is not None:
            item.error = item.error.replace(f.name, path)
        return item


@dataclass
class _FullSize:
    """`open_image`'s `draft` target for `--decode fast`: the size the image is resized to (the largest resize of
    its pipeline); it also keeps the full size, which the row and the tiling use."""

    prepare: Prepare
    size: tuple[int, int] | None = None

    def __call__(self, width: int, height: int) -> tuple[int, int]:
        self.size = (width, height)
        p = self.prepare
        if p.tiles == "dynamic":
            cols, rows = choose_grid(width, height, max_tiles=p.max_tiles, tile_size=p.tile_size)
            return cols * p.tile_size, rows * p.tile_size
        return p.processor.resized_size(width, height)


def check_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (default CUDA when available), refused with a clear message if this machine lacks it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r}: not a device ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, {build}, "
                             f"{torch.cuda.device_count()} GPUs visible); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"--device {device}: unsupported device type; use cpu or cuda")
    return device


def model_name(model: str | os.PathLike) -> str:
    """The model as recorded in an output: a local path made absolute and canonical (`dir/` = `dir`), else as given."""
    name = os.fspath(model)
    return os.path.realpath(name) if os.path.exists(name) else name


@dataclass
class LoadedModel:
    """The encoder as an extraction uses it: on its device in eval mode, with what identifies it in outputs."""

    vit: torch.nn.Module
    source: str  # the model as recorded in the output
    fingerprint: str  # of the weights (files, or the tensors of an in-memory model)
    processor: object  # the checkpoint's own CLIP preprocessing (or the model card's)
    projector: Projector | None = None

    @property
    def backend(self) -> str:
        return getattr(self.vit, "backend", "torch")

    @property
    def precision(self) -> str:
        """The compute precision recorded in outputs: an exported encoder's own, else its torch dtype's short name."""
        return getattr(self.vit, "precision", None) or dtype_precision(self.vit.dtype)


def dtype_precision(dtype: torch.dtype) -> str:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def resolve_backend(options: ExtractOptions, device: str | torch.device | None = None) -> str:
    """`auto` -> the fastest backend installed for this device and dtype (measured once per CPU,
    `backends.auto_backend`); None -> torch. For an export folder both mean its own runtime, and for a loaded
    encoder its backend."""
    backend, model = options.backend, options.model
    if backend not in (None, "auto"):
        return backend
    if not isinstance(model, (str, os.PathLike)):
        return getattr(model, "backend", "torch")
    if is_export(model):
        return "openvino" if export_format(model) == "openvino" else "onnxruntime"
    if backend != "auto":
        return "torch"
    return auto_backend(device, options.dtype, model, revision=options.revision, layers=tuple(options.layers))[0]


def load_model(options: ExtractOptions, device: str | torch.device | None = None) -> LoadedModel:
    """Load `options.model` (and the projector) the one way every engine does; `device` defaults to the options'.

    With a backend other than torch (an `internvit export` folder, or a checkpoint exported once into the cache),
    the graph must output the extra `layers` and the projector's `select_layer`: it is loaded with them, and a
    layer it lacks is refused before any work.
    """
    device = check_device(options.device if device is None else device)
    backend = resolve_backend(options, device)
    model = options.model
    proj = None
    if options.projector is not None and backend != "torch":  # first: its select_layer is a layer the graph needs
        proj = load_projector(options.projector, dtype=torch.float32, device=device)
    wanted = (*options.layers, proj.config.select_layer) if proj is not None else tuple(options.layers)
    if not isinstance(model, (str, os.PathLike)):  # a loaded encoder (torch module or exported)
        vit, source = model.to(device), getattr(getattr(model, "checkpoint", None), "source", "in-memory model")
    else:
        vit = from_pretrained(model, dtype=options.dtype, device=device, revision=options.revision, backend=backend,
                              **({"layers": tuple(wanted)} if backend != "torch" else {}))
        source = model_name(model)
    vit.eval()
    if options.compile:
        if backend != "torch":
            raise ValueError(f"--compile: compiles the torch encoder; the {backend} backend runs its own graph")
        # The first forward compiles (tens of seconds for the 300M; docs/performance.md), and a batch of another
        # size (the last one) compiles once more, with dynamic shapes.
        vit.forward_intermediates = torch.compile(vit.forward_intermediates)
    if options.projector is not None and proj is None:
        proj = load_projector(options.projector, dtype=vit.dtype, device=device)
        wanted = (*options.layers, proj.config.select_layer)
    if hasattr(vit, "require_layers"):
        vit.require_layers(wanted)
    ckpt = getattr(vit, "checkpoint", None)
    fingerprint = ckpt.fingerprint() if ckpt is not None else state_dict_fingerprint(vit.state_dict())
    return LoadedModel(vit, source, fingerprint, _processor(ckpt), proj)


def inspect_model(options: ExtractOptions) -> LoadedModel:
    """`load_model` without reading the weights, for a driver that only needs the schema: the checkpoint resolved
    and checked, the model built on the meta device in the run's dtype, its fingerprint and preprocessing."""
    if isinstance(options.model, torch.nn.Module):
        raise TypeError("pass the model as a name or path, not a module: each worker loads its own")
    if resolve_backend(options, "cpu") != "torch":
        # An exported graph is loaded here once; for an ordinary checkpoint that also makes the cached export, so
        # that every worker only loads it.
        return load_model(options, "cpu")
    ckpt, config, sd = load_checkpoint(options.model, revision=options.revision)  # memory-mapped, not read
    with torch.device("meta"):
        vit = InternVisionModel(config).to(parse_dtype(options.dtype) or sd["embeddings.patch_embedding.weight"].dtype)
    check_state_dict(vit, sd, source=ckpt.source)
    processor = _processor(ckpt)
    proj = None
    if options.projector is not None:
        proj = load_projector(options.projector)
    return LoadedModel(vit, model_name(options.model), ckpt.fingerprint(), processor, proj)


def _processor(ckpt):
    """The checkpoint's own `preprocessor_config.json`, else the model card's CLIP settings."""
    if ckpt is not None and ckpt.preprocessor_path:
        return ImageProcessor.from_json(ckpt.preprocessor_path)
    return ImageProcessor()


def device_decoding(options: ExtractOptions, device: str | torch.device) -> bool:
    """Whether JPEGs are decoded on the encoder's `device`: `--decode device`, or `--decode fast` on CUDA with
    torchvision installed.

    Raises:
        ValueError: `--decode device` without torchvision.
    """
    if options.decode == "device" and not jpeg_decoder_available():
        raise ValueError("--decode device needs torchvision (pip install torchvision, the build matching torch)")
    cuda = torch.device(device).type == "cuda"
    return options.decode == "device" or (options.decode == "fast" and cuda and jpeg_decoder_available())


def output_schema(options: ExtractOptions, loaded: LoadedModel, *, jpeg_decoder: str = "pillow"):
    """The output's columns and its `internvit` metadata (what a resumed run must agree with). `jpeg_decoder`:
    "pillow", or "device" where `device_decoding` holds (nvJPEG on CUDA)."""
    config = loaded.vit.config
    layers = layer_indices(options.layers, config.num_hidden_layers)
    width = loaded.projector.config.llm_hidden_size if loaded.projector is not None else 4 * config.hidden_size
    metadata = {
        "model": loaded.source, "weights_fingerprint": loaded.fingerprint,
        "backend": loaded.backend, "compute_precision": loaded.precision, "layers": list(layers),
        "patch_tokens": bool(options.patch_tokens), "visual_tokens": bool(options.visual_tokens),
        "projector": model_name(options.projector) if options.projector is not None else None,
        "tiles": options.tiles, "max_tiles": options.max_tiles if options.tiles == "dynamic" else None,
        "frames": options.frames, "preprocess": loaded.processor.to_dict(), "decode": options.decode,
        "jpeg_decoder": jpeg_decoder,
        "exif_transpose": bool(options.exif_transpose), "hidden_size": config.hidden_size,
    }
    return feature_schema(config.hidden_size, layers=layers, patch_tokens=options.patch_tokens,
                          visual_tokens=width if options.visual_tokens else 0, metadata=metadata)


class RowEncoder:
    """Tiles -> per-tile results on the host (`encode`), and finished `Item`s -> the columns of their rows (`rows`).

    `encode` is the device's work for one batch of at most `micro_batch` tiles: the uint8 tiles are copied (from
    pinned memory, without blocking), rescaled and normalized in fp32 (`Normalization`), encoded, and pooled per
    tile (CLS, mean of the patch tokens, finiteness); one device-to-host copy brings the batch back. `__call__`
    does both for a list of items (the server, the Ray actors); `extract/pipeline.py` overlaps them.

    Args:
        loaded: the model.
        layers: extra layers to pool (`hidden_states` indices); patch_tokens, visual_tokens: columns to add.
        micro_batch: tiles per forward.
        allow_tf32: on CUDA, let fp32 convolutions and matmuls run in TF32.
    """

    def __init__(self, loaded: LoadedModel, *, layers=(), patch_tokens: bool = False, visual_tokens: bool = False,
                 micro_batch: int = 8, allow_tf32: bool = False) -> None:
        self.vit, self.projector, self.micro_batch = loaded.vit, loaded.projector, micro_batch
        self.patch_tokens, self.visual_tokens = patch_tokens, visual_tokens or loaded.projector is not None
        self.allow_tf32 = allow_tf32
        L = self.vit.config.num_hidden_layers
        self.layers = layer_indices(layers, L)
        select = self.projector.config.select_layer if self.projector is not None else -1
        self.visual_layer = layer_indices((select,), L)[0]
        self.wanted = layer_indices((L, *self.layers, self.visual_layer), L)  # the last layer first
        self.device = torch.device(self.vit.device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.seconds = 0.0  # time in the encoder
        self.tiles = 0

    @classmethod
    def for_options(cls, loaded: LoadedModel, options: ExtractOptions) -> RowEncoder:
        return cls(loaded, layers=options.layers, patch_tokens=options.patch_tokens,
                   visual_tokens=options.visual_tokens, micro_batch=options.batch_size,
                   allow_tf32=options.allow_tf32)

    def __call__(self, items: list[Item]) -> dict:
        """Encode the tiles of `items` (in micro-batches shared between them) and return their rows' columns."""
        if any(it.jpeg is not None for it in items):
            raise ValueError("items hold undecoded JPEGs: call Prepare.decode_on_device first")
        ok = [it for it in items if it.pixels is not None]
        tiles = [(it, t) for it in ok for t in range(it.num_tiles)]
        for start in range(0, len(tiles), self.micro_batch):
            part = tiles[start:start + self.micro_batch]
            pixels = torch.stack([it.pixels[t] for it, t in part])
            scatter(self.encode(pixels, [it.norm for it, _ in part]).wait(), part)
        return self.rows(items)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, norms: list[Normalization]) -> Encoded:
        """uint8 tiles [B, 3, S, S] (pinned on CUDA) and each one's normalization -> their results, on the way to
        the host (`Encoded.wait`). Nothing here waits for the device."""
        cuda, uploaded = self.device.type == "cuda", None
        if cuda:  # the copy runs on a side stream, beside the previous batch's forward
            with torch.cuda.stream(self._copy_stream):
                x = pixels.to(self.device, non_blocking=True)
                uploaded = torch.cuda.Event()
                uploaded.record()
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self._copy_stream)
            x.record_stream(compute)
        else:
            x = pixels.to(self.device)
        timer = _Timer(cuda)
        x_BCSS = torch.empty(x.shape, dtype=torch.float32, device=self.device)
        start = 0
        for norm, n in _runs(norms):  # one run unless videos meet a custom preprocessor_config.json
            x_BCSS[start:start + n] = norm(x[start:start + n])
            start += n
        with _device_flags(self.device, self.allow_tf32):
            states = self.vit.forward_intermediates(x_BCSS.to(self.vit.dtype), self.wanted)
        B, C = x.shape[0], self.vit.config.hidden_size
        cls_BKC = torch.stack([t[:, 0].float() for t in states], 1)
        mean_BKC = torch.stack([t[:, 1:].mean(1, dtype=torch.float32) for t in states], 1)  # float32 sums
        finite_B1 = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in states]).all(0)[:, None]
        out = {"pooled": torch.cat([cls_BKC.reshape(B, -1), mean_BKC.reshape(B, -1), finite_B1.float()], 1)}
        if self.patch_tokens:
            out["tokens"] = states[0].float()
        if self.visual_tokens:
            hidden = states[self.wanted.index(self.visual_layer)]
            v = self.projector(hidden) if self.projector is not None else unshuffle_tokens(hidden)
            out["visual"] = v.float()
        host = {k: _to_host(v) for k, v in out.items()}
        timer.stop()
        self.tiles += B
        return Encoded(host, timer, uploaded, self, len(self.wanted), C)

    def rows(self, items: list[Item]) -> dict:
        """Finished items (tiles encoded, `outputs` filled) -> the columns of their rows, in order."""
        for it in items:
            if it.pixels is not None and not all(o["finite"].all() for o in it.outputs):
                it.error = f"{it.path}: non-finite features (NaN or inf in the encoder output)"
                it.pixels = None
        valid = np.array([it.pixels is not None for it in items], dtype=bool)
        grids = [it.layout.grid if it.layout is not None else None for it in items]
        columns: dict = {
            "path": [it.path for it in items],
            "error": [it.error for it in items],
            "width": [it.size[0] if it.size else None for it in items],
            "height": [it.size[1] if it.size else None for it in items],
            "num_tiles": [it.num_tiles if it.pixels is not None else None for it in items],
            "grid_cols": [g[0] if g else None for g in grids],
            "grid_rows": [g[1] if g else None for g in grids],
            "frame_indices": [it.frame_indices for it in items],
        }
        C = self.vit.config.hidden_size
        results = [_joined(it) if it.pixels is not None else None for it in items]
        for name, layer in [("", self.wanted[0])] + [(f"_l{i}", i) for i in self.layers]:
            k = self.wanted.index(layer)
            cls, mean = np.zeros((len(items), C), np.float32), np.zeros((len(items), C), np.float32)
            for n, (it, r) in enumerate(zip(items, results)):
                if r is not None:
                    cls[n] = r["cls"][:, k].mean(0) if it.frame_indices is not None else r["cls"][_whole_view(it), k]
                    mean[n] = r["mean"][:, k].mean(0)
            columns["cls" + name] = _fixed_size_lists(cls, valid)
            columns["mean" + name] = _fixed_size_lists(mean, valid)
        if self.patch_tokens:
            maps = [_features(it, torch.from_numpy(r["tokens"])).feature_map().numpy()
                    if r is not None and it.frame_indices is None else None for it, r in zip(items, results)]
            columns["map_height"] = [m.shape[0] if m is not None else None for m in maps]
            columns["map_width"] = [m.shape[1] if m is not None else None for m in maps]
            columns["patch_tokens"] = _token_lists([m.reshape(-1, C) if m is not None else None for m in maps], C)
        if self.visual_tokens:
            vis = [r["visual"].reshape(-1, r["visual"].shape[-1]) if r is not None else None for r in results]
            width = self.projector.config.llm_hidden_size if self.projector is not None else 4 * C
            columns["visual_tokens"] = _token_lists(vis, width)
        return columns


@dataclass
class Encoded:
    """A batch's results on their way to the host; `wait` returns them as numpy arrays per name, tile-major."""

    host: dict[str, torch.Tensor]
    timer: _Timer
    upload: object  # CUDA: the event after the tiles' copy to the device
    encoder: RowEncoder
    layers: int
    width: int

    def uploaded(self) -> None:
        """Wait until the tiles are on the device (their host buffer may then be refilled)."""
        if self.upload is not None:
            self.upload.synchronize()

    def wait(self) -> dict[str, np.ndarray]:
        self.encoder.seconds += self.timer.wait()
        pooled = self.host["pooled"].numpy()
        B, K, C = pooled.shape[0], self.layers, self.width
        out = {"cls": pooled[:, :K * C].reshape(B, K, C), "mean": pooled[:, K * C:2 * K * C].reshape(B, K, C),
               "finite": pooled[:, -1] > 0}
        out.update({k: v.numpy() for k, v in self.host.items() if k != "pooled"})
        return out


def scatter(results: dict[str, np.ndarray], tiles: list[tuple[Item, int]]) -> None:
    """Give each item its tiles' rows of a batch's results (`tiles`: the batch's (item, tile index), in order)."""
    start = 0
    while start < len(tiles):
        item = tiles[start][0]
        end = start
        while end < len(tiles) and tiles[end][0] is item:
            end += 1
        item.outputs.append({k: v[start:end] for k, v in results.items()})
        start = end


def _joined(it: Item) -> dict[str, np.ndarray]:
    """An item's per-tile results, its batches joined: [T, ...] per name."""
    parts = it.outputs
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _whole_view(it: Item) -> int:
    """The tile that saw the whole image: the thumbnail of a tiled image, else its single tile."""
    return it.num_tiles - 1 if it.layout is not None and it.layout.thumbnail else 0


def _runs(norms: list[Normalization]) -> list[tuple[Normalization, int]]:
    """Consecutive equal normalizations -> (normalization, count)."""
    runs: list[tuple[Normalization, int]] = []
    for norm in norms:
        if runs and runs[-1][0] == norm:
            runs[-1] = (norm, runs[-1][1] + 1)
        else:
            runs.append((norm, 1))
    return runs


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """Start the copy of `x` to the host: into pinned memory without blocking on CUDA; a CPU tensor as it is."""
    if x.device.type != "cuda":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)


class _Timer:
    """The device time of one batch: CUDA events (read once the batch is done), else the wall time."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        if cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.seconds = time.perf_counter() - self.t0

    def wait(self) -> float:
        if self.cuda:
            self.end.synchronize()  # the batch's results are on the host
            return self.start.elapsed_time(self.end) / 1000
        return self.seconds


@contextlib.contextmanager
def _device_flags(device: torch.device, allow_tf32: bool):
    """On CUDA: TF32 as asked (cuDNN's default is on, which puts the patch embedding 2.7e-3 off CPU fp32), and the
    SDPA backends in the order measured fastest (cuDNN's attention first on Hopper and newer)."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if torch.cuda.get_device_capability(device) >= (9, 0):
        order.insert(0, SDPBackend.CUDNN_ATTENTION)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        with sdpa_kernel(order, set_priority=True):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _features(it: Item, tokens_TNC: torch.Tensor) -> TiledFeatures:
    """An image's tokens as `TiledFeatures` (an untiled image: one tile covering it)."""
    layout = it.layout
    if layout is None:
        w, h = it.size
        layout = TileLayout((w, h), (1, 1), ((0.0, 0.0, float(w), float(h)),), False, int(it.pixels.shape[-1]))
    return TiledFeatures.from_tokens(layout, tokens_TNC.float())


def _fixed_size_lists(values: np.ndarray, valid: np.ndarray):
    """[rows, C] float32 -> Arrow fixed-size lists without a Python loop; null rows where not valid."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1], mask=pa.array(~valid))


def _token_lists(arrays: list[np.ndarray | None], width: int):
    """Per row a [n_i, width] array (or None) -> list<fixed_size_list<float32>[width]>, built from one buffer."""
    import pyarrow as pa

    lengths = [0 if a is None else a.shape[0] for a in arrays]
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [a for a in arrays if a is not None]
    flat = np.concatenate(present).reshape(-1) if present else np.zeros(0, np.float32)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
    mask = pa.array([a is None for a in arrays])
    return pa.ListArray.from_arrays(pa.array(offsets), tokens, mask=mask)
