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

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from internvit.backends import auto_backend, from_pretrained
from internvit.checkpoint import check_state_dict, parse_dtype, state_dict_fingerprint
from internvit.extract.store import feature_schema
from internvit.features import TiledFeatures, encode_tiles
from internvit.model.projector import Projector, load_projector, unshuffle_tokens
from internvit.model.vision import InternVisionModel, layer_indices
from internvit.preprocess import DEFAULT_MAX_PIXELS, ImageLoadError, ImageProcessor, open_image, tile_transform
from internvit.preprocess.tiling import MAX_TILES, TileLayout, tile_image
from internvit.preprocess.video import is_video_name, load_frames
from internvit.registry import DEFAULT_MAX_TILES, DEFAULT_MODEL
from internvit.runtime import export_format, is_export
from internvit.weights import load_checkpoint

TILE_MODES = ("none", "dynamic")
BACKENDS = ("torch", "openvino", "onnxruntime", "auto")


@dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    """What determines an extraction, the same for every engine; validated when built (before anything loads).

    Attributes:
        model: a name or path for `internvit.from_pretrained`, or a loaded `InternVisionModel` (local engine).
        revision: Hub revision of `model`.
        dtype: compute dtype (bf16 is the reference dtype and the fastest on CPUs with AVX-512 BF16).
        device: "cpu", "cuda", ...; default CUDA when available.
        batch_size: tiles per forward (also inputs per loading batch); bounds the activation memory.
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
    dtype: str | torch.dtype | None = "bf16"
    device: str | torch.device | None = None
    batch_size: int = 8
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
        if self.tiles not in TILE_MODES:
            raise ValueError(f"tiles must be one of {TILE_MODES}, got {self.tiles!r}")
        if not 1 <= self.max_tiles <= MAX_TILES:
            raise ValueError(f"--max-tiles must be from 1 to {MAX_TILES}, got {self.max_tiles}")
        for name, value in (("--batch-size", self.batch_size), ("--frames", self.frames)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        object.__setattr__(self, "layers", tuple(self.layers))
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
    """One input after preprocessing: its tiles [T, 3, S, S] and where they came from, or the error that stopped it."""

    path: str
    pixels: torch.Tensor | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height) as opened
    layout: TileLayout | None = None  # dynamic tiles: their grid and thumbnail (None: one tile, or a video)
    frame_indices: list[int] | None = None  # videos
    tokens: list[torch.Tensor] = field(default_factory=list)  # per encoded layer [T, N, C], after encoding


@dataclass
class Prepare:
    """Path (or encoded bytes) -> `Item`; a plain picklable object that runs in loader workers and Ray tasks."""

    processor: object
    tiles: str
    max_tiles: int
    frames: int
    tile_size: int
    exif_transpose: bool
    max_pixels: int

    @classmethod
    def for_model(cls, options: ExtractOptions, loaded: LoadedModel) -> Prepare:
        return cls(loaded.processor, options.tiles, options.max_tiles, options.frames, loaded.vit.config.image_size,
                   options.exif_transpose, DEFAULT_MAX_PIXELS if options.max_pixels is None else options.max_pixels)

    def __call__(self, path: str, data: bytes | None = None) -> Item:
        """`data`: the input's encoded bytes when they come from elsewhere (a Parquet column, a remote file, a
        request); `path` then only names the input (in its row and its error)."""
        try:
            if is_video_name(path):
                if data is not None:
                    return self._video_from_bytes(path, data)
                frames, indices = load_frames(path, num_segments=self.frames, max_pixels=self.max_pixels)
                pixels = torch.stack([tile_transform(f, size=self.tile_size) for f in frames])
                return Item(path, pixels, size=frames[0].size, frame_indices=indices)
            source = path if data is None else data
            image = open_image(source, exif_transpose=self.exif_transpose, max_pixels=self.max_pixels)
            if self.tiles == "dynamic":
                tiled = tile_image(image, max_tiles=self.max_tiles, tile_size=self.tile_size)
                return Item(path, tiled.pixel_values, size=image.size, layout=tiled.layout)
            return Item(path, self.processor(image)[None], size=image.size)
        except ImageLoadError as e:
            message = str(e)
            if data is not None:  # open_image names bytes "<bytes>"; the row's path is the useful name
                message = message.replace("<bytes>", path, 1)
            return Item(path, error=message)
        except ValueError as e:  # preprocessing refused the image (e.g. too elongated for the CLIP resize)
            return Item(path, error=f"{path}: {e}")
        except Exception as e:  # a decoder bug must not stop a million-image run
            return Item(path, error=f"{path}: {e.__class__.__name__}: {e}")

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
    """`auto` -> the fastest backend installed for this device and dtype; None -> torch. For an export folder
    both mean its own runtime, and for a loaded encoder its backend."""
    backend, model = options.backend, options.model
    if backend not in (None, "auto"):
        return backend
    if not isinstance(model, (str, os.PathLike)):
        return getattr(model, "backend", "torch")
    if is_export(model):
        return "openvino" if export_format(model) == "openvino" else "onnxruntime"
    return auto_backend(device, options.dtype)[0] if backend == "auto" else "torch"


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


def output_schema(options: ExtractOptions, loaded: LoadedModel):
    """The output's columns and its `internvit` metadata (what a resumed run must agree with)."""
    config = loaded.vit.config
    layers = layer_indices(options.layers, config.num_hidden_layers)
    width = loaded.projector.config.llm_hidden_size if loaded.projector is not None else 4 * config.hidden_size
    metadata = {
        "model": loaded.source, "weights_fingerprint": loaded.fingerprint,
        "backend": loaded.backend, "compute_precision": loaded.precision, "layers": list(layers),
        "patch_tokens": bool(options.patch_tokens), "visual_tokens": bool(options.visual_tokens),
        "projector": model_name(options.projector) if options.projector is not None else None,
        "tiles": options.tiles, "max_tiles": options.max_tiles if options.tiles == "dynamic" else None,
        "frames": options.frames, "preprocess": loaded.processor.to_dict(),
        "exif_transpose": bool(options.exif_transpose), "hidden_size": config.hidden_size,
    }
    return feature_schema(config.hidden_size, layers=layers, patch_tokens=options.patch_tokens,
                          visual_tokens=width if options.visual_tokens else 0, metadata=metadata)


class RowEncoder:
    """A batch of `Item`s -> the columns of their rows (errors included, input order kept).

    Args:
        loaded: the model.
        layers: extra layers to pool (`hidden_states` indices); patch_tokens, visual_tokens: columns to add.
        micro_batch: tiles per forward.
    """

    def __init__(self, loaded: LoadedModel, *, layers=(), patch_tokens: bool = False, visual_tokens: bool = False,
                 micro_batch: int = 8) -> None:
        self.vit, self.projector, self.micro_batch = loaded.vit, loaded.projector, micro_batch
        self.patch_tokens, self.visual_tokens = patch_tokens, visual_tokens or loaded.projector is not None
        L = self.vit.config.num_hidden_layers
        self.layers = layer_indices(layers, L)
        select = self.projector.config.select_layer if self.projector is not None else -1
        self.visual_layer = layer_indices((select,), L)[0]
        self.wanted = layer_indices((L, *self.layers, self.visual_layer), L)  # the last layer first
        self.seconds = 0.0  # time in the encoder
        self.tiles = 0

    @classmethod
    def for_options(cls, loaded: LoadedModel, options: ExtractOptions) -> RowEncoder:
        return cls(loaded, layers=options.layers, patch_tokens=options.patch_tokens,
                   visual_tokens=options.visual_tokens, micro_batch=options.batch_size)

    @torch.inference_mode()
    def __call__(self, items: list[Item]) -> dict:
        ok = [it for it in items if it.pixels is not None]
        t = time.perf_counter()
        encoded = encode_tiles(self.vit, [it.pixels for it in ok], micro_batch=self.micro_batch, layers=self.wanted)
        self.seconds += time.perf_counter() - t
        self.tiles += sum(int(it.pixels.shape[0]) for it in ok)
        for it, tokens in zip(ok, encoded):
            it.tokens = tokens
            if not all(bool(torch.isfinite(t).all()) for t in tokens):  # broken weights or inputs: not a success
                it.error = f"{it.path}: non-finite features (NaN or inf in the encoder output)"
                it.pixels = None
        valid = np.array([it.pixels is not None for it in items], dtype=bool)
        grids = [it.layout.grid if it.layout is not None else None for it in items]
        columns: dict = {
            "path": [it.path for it in items],
            "error": [it.error for it in items],
            "width": [it.size[0] if it.size else None for it in items],
            "height": [it.size[1] if it.size else None for it in items],
            "num_tiles": [int(it.pixels.shape[0]) if it.pixels is not None else None for it in items],
            "grid_cols": [g[0] if g else None for g in grids],
            "grid_rows": [g[1] if g else None for g in grids],
            "frame_indices": [it.frame_indices for it in items],
        }
        C = self.vit.config.hidden_size
        for name, layer in [("", self.wanted[0])] + [(f"_l{i}", i) for i in self.layers]:
            k = self.wanted.index(layer)
            cls, mean = np.zeros((len(items), C), np.float32), np.zeros((len(items), C), np.float32)
            for n, it in enumerate(items):
                if it.pixels is not None:
                    cls[n], mean[n] = _pool(it, it.tokens[k])
            columns["cls" + name] = _fixed_size_lists(cls, valid)
            columns["mean" + name] = _fixed_size_lists(mean, valid)
        if self.patch_tokens:
            maps = [_features(it, it.tokens[0]).feature_map().cpu().numpy()
                    if it.pixels is not None and it.frame_indices is None else None for it in items]
            columns["map_height"] = [m.shape[0] if m is not None else None for m in maps]
            columns["map_width"] = [m.shape[1] if m is not None else None for m in maps]
            columns["patch_tokens"] = _token_lists([m.reshape(-1, C) if m is not None else None for m in maps], C)
        if self.visual_tokens:
            vis = [self._visual(it) if it.pixels is not None else None for it in items]
            width = self.projector.config.llm_hidden_size if self.projector is not None else 4 * C
            columns["visual_tokens"] = _token_lists(vis, width)
        return columns

    def _visual(self, it: Item) -> np.ndarray:
        hidden = it.tokens[self.wanted.index(self.visual_layer)]
        v = self.projector(hidden) if self.projector is not None else unshuffle_tokens(hidden)
        return v.reshape(-1, v.shape[-1]).float().cpu().numpy()


def _features(it: Item, tokens_TNC: torch.Tensor) -> TiledFeatures:
    """An image's tokens as `TiledFeatures` (an untiled image: one tile covering it)."""
    layout = it.layout
    if layout is None:
        w, h = it.size
        layout = TileLayout((w, h), (1, 1), ((0.0, 0.0, float(w), float(h)),), False, int(it.pixels.shape[-1]))
    return TiledFeatures.from_tokens(layout, tokens_TNC.float())


def _pool(it: Item, tokens_TNC: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(cls, mean) of one input at one layer: the CLS that saw the whole image (a video: the mean over its frames)
    and the mean of every tile's patch tokens."""
    t = tokens_TNC.float()
    cls = t[:, 0].mean(0) if it.frame_indices is not None else _features(it, t).image_cls
    return cls.cpu().numpy(), t[:, 1:].mean((0, 1)).cpu().numpy()


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
