"""`extract_features`: images and videos on disk -> one Parquet file of InternViT features, on one machine.

Inputs are opened and preprocessed in DataLoader worker processes while the model runs on the previous batch;
an input that cannot be read becomes a row with its error and the run goes on. The tiles of all images in a
batch share the encoder's micro-batches (`features.encode_tiles`). Rows are made durable in small part files as
they finish (see `store.py`), so a killed run loses at most the last seconds of work, and a rerun with the same
output resumes.

Preprocessing per input:
    - images, `tiles="none"` (default): the model card's CLIP processor, one 448 tile;
    - images, `tiles="dynamic"`: InternVL's dynamic tiles (1..max_tiles) plus a thumbnail (spec §4);
    - videos (by extension): `frames` frames sampled as the model card's `get_index`, each squashed to one tile.

Pooled columns: `cls` is the CLS token of the thumbnail for tiled images (the whole-image view), of the single
tile otherwise, and the mean over frames for videos; `mean` is the mean of the patch tokens of every tile the
encoder saw (grid tiles, thumbnail, frames). See the README for every column.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from internvit.extract.sources import expand_sources
from internvit.extract.store import FeatureStore, feature_schema, output_lock
from internvit.registry import DEFAULT_MODEL
from internvit.weights import state_dict_fingerprint

TILE_MODES = ("none", "dynamic")


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
class _Item:
    """One input after preprocessing: its tiles [T, 3, S, S] or the error that stopped it."""

    path: str
    pixels: torch.Tensor | None = None
    error: str | None = None
    size: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None
    thumbnail: bool = False
    frame_indices: list[int] | None = None
    tokens: list[torch.Tensor] = field(default_factory=list)  # per requested layer [T, N, C], after encoding


@dataclass
class _Prepare:
    """Path -> `_Item`, run in the worker processes (a plain picklable object)."""

    processor: object
    tiles: str
    max_tiles: int
    frames: int
    tile_size: int
    exif_transpose: bool
    max_pixels: int | None

    def __call__(self, path: str, data: bytes | None = None) -> _Item:
        """`data`: the input's encoded bytes when they come from elsewhere (a Parquet column, a remote file);
        `path` then only names the input (in its row and its error)."""
        from internvit.features import tile_image
        from internvit.preprocess import ImageLoadError, open_image, tile_transform
        from internvit.preprocess.video import is_video_name, load_frames

        try:
            if is_video_name(path):
                if data is not None:
                    return self._video_from_bytes(path, data)
                frames, indices = load_frames(path, num_segments=self.frames, max_pixels=self.max_pixels)
                pixels = torch.stack([tile_transform(f, size=self.tile_size) for f in frames])
                return _Item(path, pixels, size=frames[0].size, frame_indices=indices)
            source = path if data is None else data
            image = open_image(source, exif_transpose=self.exif_transpose, max_pixels=self.max_pixels)
            if self.tiles == "dynamic":
                tiled = tile_image(image, max_tiles=self.max_tiles, tile_size=self.tile_size)
                return _Item(path, tiled.pixel_values, size=image.size, grid=tiled.layout.grid,
                             thumbnail=tiled.layout.thumbnail)
            return _Item(path, self.processor(image)[None], size=image.size)
        except ImageLoadError as e:
            message = str(e)
            if data is not None:  # open_image names bytes "<bytes>"; the row's path is the useful name
                message = message.replace("<bytes>", path, 1)
            return _Item(path, error=message)
        except ValueError as e:  # preprocessing refused the image (e.g. too elongated for the CLIP resize)
            return _Item(path, error=f"{path}: {e}")
        except Exception as e:  # a decoder bug must not stop a million-image run
            return _Item(path, error=f"{path}: {e.__class__.__name__}: {e}")

    def _video_from_bytes(self, path: str, data: bytes) -> _Item:
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


class _Inputs(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], prepare: _Prepare) -> None:
        self.paths, self.prepare = paths, prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> _Item:
        return self.prepare(self.paths[i])


def _collate(items: list[_Item]) -> list[_Item]:
    return items


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the model owns the cores; a worker only decodes and resizes


def normalize_layers(layers, num_hidden_layers: int) -> tuple[int, ...]:
    """Layer indices as in `hidden_states`: 0 = embeddings, L = last layer; negative counts from the end."""
    out = []
    for i in layers:
        j = i + num_hidden_layers + 1 if i < 0 else i
        if not 0 <= j <= num_hidden_layers:
            raise ValueError(f"layer {i} is out of range for a {num_hidden_layers}-layer model (0..{num_hidden_layers})")
        out.append(j)
    return tuple(dict.fromkeys(out))


def extract_features(
    sources,
    out: str | os.PathLike,
    *,
    model: str | torch.nn.Module = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = "bf16",
    device: str | torch.device | None = None,
    batch_size: int = 8,
    num_workers: int = 2,
    tiles: str = "none",
    max_tiles: int = 12,
    frames: int = 8,
    layers=(),
    patch_tokens: bool = False,
    visual_tokens: bool = False,
    projector: str | None = None,
    exif_transpose: bool = True,
    max_pixels: int | None = None,
    retry_errors: bool = False,
    flush_seconds: float = 10.0,
    revision: str | None = None,
    progress: bool = True,
    backend: str | None = None,
) -> ExtractSummary:
    """Extract features of every image and video named by `sources` into the Parquet file `out`.

    Args:
        sources: files, folders (recursive), globs or `.txt` list files (see `expand_sources`).
        out: the Parquet file; if it (or its `.parts/` folder) exists, finished inputs are skipped.
        model: a name or path for `internvit.from_pretrained`, or a loaded `InternVisionModel`.
        dtype: compute dtype (bf16 is the reference dtype and the fastest on CPUs with AVX-512 BF16).
        device: "cpu", "cuda", ...; default CUDA when available.
        batch_size: tiles per forward (also inputs per loader batch); bounds the activation memory.
        num_workers: preprocessing processes (0 = in the main process).
        tiles: "none" (CLIP preprocessing, one tile) or "dynamic" (InternVL tiles + thumbnail).
        max_tiles: the dynamic tiling budget per image.
        frames: frames sampled per video.
        layers: extra layers to pool, as `hidden_states` indices (0 = embeddings, -1 = last).
        patch_tokens: also store the patch-token map (the stitched map for tiled images; not for videos).
        visual_tokens: also store InternVL's visual tokens (pixel-unshuffled, or projected with `projector`).
        projector: an InternVL chat checkpoint whose `mlp1` projects the visual tokens (implies visual_tokens).
        exif_transpose: apply the EXIF orientation.
        max_pixels: refuse larger images (decompression bombs); None = the library default.
        retry_errors: recompute inputs whose earlier row is an error.
        flush_seconds: make finished rows durable at least this often (0 = after every batch).
        revision: Hub revision of `model`.
        progress: show a progress bar on stderr.
        backend: "torch" (the reference), "openvino", "onnxruntime" or "auto" (the fastest installed here;
            `summary.backend` says which). None: torch, or for an `internvit export` folder its own runtime.
    """
    from internvit.preprocess import DEFAULT_MAX_PIXELS

    check_options(tiles=tiles, max_tiles=max_tiles, batch_size=batch_size, frames=frames)
    start = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; the local engine writes one Parquet file (the ray engine "
                         "writes folders)")
    paths = expand_sources(sources)
    device = check_device(device)
    with output_lock(out):
        t_load = time.perf_counter()
        vit, source, proj = _load_encoder(model, dtype=dtype, device=device, revision=revision, projector=projector,
                                          backend=backend, layers=layers)
        visual_tokens = visual_tokens or proj is not None
        load_seconds = time.perf_counter() - t_load
        ckpt = getattr(vit, "checkpoint", None)
        processor = _processor_for(ckpt)
        config = vit.config
        layers = normalize_layers(layers, config.num_hidden_layers)
        schema = _output_schema(
            config, source=source, dtype=vit.dtype, backend=backend_of(vit), precision=precision_of(vit),
            processor=processor, layers=layers, patch_tokens=patch_tokens,
            visual_tokens=visual_tokens, projector=projector,
            projector_width=proj.config.llm_hidden_size if proj is not None else None,
            tiles=tiles, max_tiles=max_tiles, frames=frames, exif_transpose=exif_transpose,
            fingerprint=ckpt.fingerprint() if ckpt is not None else state_dict_fingerprint(vit.state_dict()),
        )
        store = FeatureStore(out, schema, flush_seconds=flush_seconds)
        done = store.finished(include_errors=not retry_errors)
        todo = [p for p in paths if p not in done]

        prepare = _Prepare(processor, tiles, max_tiles, frames, config.image_size, exif_transpose,
                           DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
        loader = torch.utils.data.DataLoader(
            _Inputs(todo, prepare), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
            worker_init_fn=_worker_init if num_workers else None, prefetch_factor=2 if num_workers else None,
        )
        encoder = _Encoder(vit, layers=layers, micro_batch=batch_size, patch_tokens=patch_tokens,
                           visual_tokens=visual_tokens, projector=proj)
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="input", desc="extract", dynamic_ncols=True)
        failed_now = 0
        try:
            for items in loader:
                store.add(encoder(items))
                failed_now += sum(item.error is not None for item in items)
                if bar is not None:
                    bar.update(len(items))
                    bar.set_postfix(failed=failed_now)
        finally:
            if bar is not None:
                bar.close()
            store.consolidate()  # also on Ctrl-C: finished rows are kept, the rerun resumes

        import pyarrow.parquet as pq

        failed = 0
        if store.out.is_file():
            errors = pq.read_table(store.out, columns=["error"]).column("error")
            failed = len(errors) - errors.null_count
        return ExtractSummary(store.out, len(paths), len(paths) - len(todo), len(todo), failed,
                              time.perf_counter() - start, load_seconds, encoder.seconds, encoder.tiles,
                              backend_of(vit), precision_of(vit))


def check_options(*, tiles: str, max_tiles: int, batch_size: int, frames: int) -> None:
    """Refuse option values that cannot work, before anything is loaded (shared by both engines)."""
    from internvit.preprocess.tiling import MAX_TILES

    if tiles not in TILE_MODES:
        raise ValueError(f"tiles must be one of {TILE_MODES}, got {tiles!r}")
    if not 1 <= max_tiles <= MAX_TILES:
        raise ValueError(f"--max-tiles must be from 1 to {MAX_TILES}, got {max_tiles}")
    for name, value in (("--batch-size", batch_size), ("--frames", frames)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


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


BACKENDS = ("torch", "openvino", "onnxruntime", "auto")


def resolve_backend(backend: str | None, *, model, device, dtype) -> str:
    """`auto` -> the fastest backend installed for this device and dtype; None -> torch. For an export folder
    both mean its own runtime, and for a loaded encoder its backend."""
    from internvit.backends import auto_backend
    from internvit.export import is_export

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend not in (None, "auto"):
        return backend
    if not isinstance(model, (str, os.PathLike)):
        return backend_of(model)
    if is_export(model):
        import json

        from internvit.export import MANIFEST_NAME

        folder = Path(os.fspath(model).removeprefix("local-dir:"))
        folder = folder.parent if folder.is_file() else folder
        return "openvino" if json.loads((folder / MANIFEST_NAME).read_text())["format"] == "openvino" \
            else "onnxruntime"
    return auto_backend(device, dtype)[0] if backend == "auto" else "torch"


def backend_of(vit) -> str:
    return getattr(vit, "backend", "torch")


def precision_of(vit) -> str:
    """The compute precision recorded in outputs: an exported encoder's own, else its torch dtype's short name."""
    return getattr(vit, "precision", None) or dtype_precision(vit.dtype)


def dtype_precision(dtype: torch.dtype) -> str:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def _load_encoder(model, *, dtype, device, revision, projector, backend: str = "torch",
                  layers=()) -> tuple[torch.nn.Module, str, torch.nn.Module | None]:
    """The encoder (eval mode, on `device`), the name recorded in the output, and the projector if any.

    Shared by the local engine and the Ray engine's actors, so both load the same model the same way. With a
    non-torch backend, `layers` (and the projector's `select_layer`) are the hidden states the graph must output.
    """
    from internvit.weights import from_pretrained

    from internvit.model.projector import load_projector

    backend = resolve_backend(backend, model=model, device=device, dtype=dtype)
    proj = None
    if projector is not None and backend != "torch":  # first: its select_layer is a layer the graph must output
        proj = load_projector(projector, dtype=torch.float32, device=device)
    wanted = (*layers, proj.config.select_layer) if proj is not None else tuple(layers)
    if not isinstance(model, (str, os.PathLike)):  # a loaded encoder (torch module or exported)
        vit, source = model.to(device), getattr(getattr(model, "checkpoint", None), "source", "in-memory model")
    elif backend == "torch":
        vit = from_pretrained(model, dtype=dtype, device=device, revision=revision, backend="torch")
        source = model_name(model)
    else:
        vit = from_pretrained(model, dtype=dtype, device=device, revision=revision, backend=backend,
                              layers=tuple(wanted))
        source = model_name(model)
    vit.eval()
    if projector is not None and proj is None:
        proj = load_projector(projector, dtype=vit.dtype, device=device)
        wanted = (*layers, proj.config.select_layer)
    if hasattr(vit, "require_layers"):
        vit.require_layers(wanted)
    return vit, source, proj


def _processor_for(ckpt):
    """The checkpoint's own `preprocessor_config.json`, else the model card's CLIP settings."""
    from internvit.preprocess import ImageProcessor

    if ckpt is not None and ckpt.preprocessor_path:
        return ImageProcessor.from_json(ckpt.preprocessor_path)
    return ImageProcessor()


def _output_schema(config, *, source: str, dtype: torch.dtype, backend: str, precision: str, processor,
                   layers: tuple[int, ...],
                   patch_tokens: bool, visual_tokens: bool, projector: str | None, projector_width: int | None,
                   tiles: str, max_tiles: int, frames: int, exif_transpose: bool, fingerprint: str):
    """The output's columns and its `internvit` metadata (what a resumed run must agree with)."""
    vt_width = (projector_width or 4 * config.hidden_size) if visual_tokens else 0
    metadata = {
        "model": source, "weights_fingerprint": fingerprint, "dtype": str(dtype).removeprefix("torch."),
        "backend": backend, "precision": precision,
        "layers": list(layers), "patch_tokens": bool(patch_tokens), "visual_tokens": bool(visual_tokens),
        "projector": model_name(projector) if projector is not None else None,
        "tiles": tiles, "max_tiles": max_tiles if tiles == "dynamic" else None, "frames": frames,
        "preprocess": processor.to_dict(), "exif_transpose": bool(exif_transpose),
        "hidden_size": config.hidden_size,
    }
    return feature_schema(config.hidden_size, layers=layers, patch_tokens=patch_tokens, visual_tokens=vt_width,
                          metadata=metadata)


class _Encoder:
    """A loader batch of `_Item`s -> the columns of their rows (errors included, input order kept)."""

    def __init__(self, vit, *, layers, micro_batch, patch_tokens, visual_tokens, projector) -> None:
        self.vit, self.layers, self.micro_batch = vit, layers, micro_batch
        self.patch_tokens, self.visual_tokens, self.projector = patch_tokens, visual_tokens, projector
        from internvit.features import hidden_index

        self.visual_layer = hidden_index(projector.config.select_layer if projector is not None else -1, vit)
        self.wanted = tuple(dict.fromkeys((-1, *layers, self.visual_layer)))
        self.seconds = 0.0  # time in the encoder
        self.tiles = 0

    @torch.inference_mode()
    def __call__(self, items: list[_Item]) -> dict:
        from internvit.features import encode_tiles

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
        columns: dict = {
            "path": [it.path for it in items],
            "error": [it.error for it in items],
            "width": [it.size[0] if it.size else None for it in items],
            "height": [it.size[1] if it.size else None for it in items],
            "num_tiles": [int(it.pixels.shape[0]) if it.pixels is not None else None for it in items],
            "grid_cols": [it.grid[0] if it.grid else None for it in items],
            "grid_rows": [it.grid[1] if it.grid else None for it in items],
            "frame_indices": [it.frame_indices for it in items],
        }
        C = self.vit.config.hidden_size
        for name, layer in [("", -1)] + [(f"_l{i}", i) for i in self.layers]:
            k = self.wanted.index(layer)
            cls, mean = np.zeros((len(items), C), np.float32), np.zeros((len(items), C), np.float32)
            for n, it in enumerate(items):
                if it.pixels is not None:
                    cls[n], mean[n] = self._pool(it, it.tokens[k])
            columns["cls" + name] = _fixed_size_lists(cls, valid)
            columns["mean" + name] = _fixed_size_lists(mean, valid)
        if self.patch_tokens:
            maps = [self._patch_map(it) if it.pixels is not None and it.frame_indices is None else None
                    for it in items]
            columns["map_height"] = [m.shape[0] if m is not None else None for m in maps]
            columns["map_width"] = [m.shape[1] if m is not None else None for m in maps]
            columns["patch_tokens"] = _token_lists([m.reshape(-1, C) if m is not None else None for m in maps], C)
        if self.visual_tokens:
            vis = [self._visual(it) if it.pixels is not None else None for it in items]
            width = self.projector.config.llm_hidden_size if self.projector is not None else 4 * C
            columns["visual_tokens"] = _token_lists(vis, width)
        return columns

    @staticmethod
    def _pool(it: _Item, tokens_TNC: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        t = tokens_TNC.float()
        if it.frame_indices is not None:
            cls = t[:, 0].mean(0)  # a video: the mean of its frames
        else:
            cls = t[-1, 0] if it.thumbnail else t[0, 0]  # the thumbnail sees the whole image
        return cls.cpu().numpy(), t[:, 1:].mean((0, 1)).cpu().numpy()

    def _patch_map(self, it: _Item) -> np.ndarray:
        """The patch-token map: one tile's grid, or the stitched grid tiles of a tiled image."""
        from internvit.features import stitch_tiles

        t = it.tokens[0][:, 1:].float()
        T, M, C = t.shape
        side = int(round(M**0.5))
        return stitch_tiles(t.reshape(T, side, side, C), it.grid or (1, 1)).cpu().numpy()

    def _visual(self, it: _Item) -> np.ndarray:
        from internvit.model.projector import unshuffle_tokens

        hidden = it.tokens[self.wanted.index(self.visual_layer)]
        v = self.projector(hidden) if self.projector is not None else unshuffle_tokens(hidden)
        return v.reshape(-1, v.shape[-1]).float().cpu().numpy()


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
