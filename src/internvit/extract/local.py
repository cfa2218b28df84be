"""`extract_features`: images on disk -> one Parquet file of InternViT features, on one machine.

Images are opened and preprocessed in DataLoader worker processes while the model runs on the previous batch;
a file that cannot be read becomes a row with its error and the run goes on. Rows are made durable in small
part files as they finish (see `store.py`), so a killed run loses at most the batches in flight and a rerun with
the same output resumes.

Columns: `path` (absolute), `error` (null or the message), `width`/`height` (of the image as opened, after
EXIF orientation), `cls` (the CLS token of the last layer, no final norm: there is none), `mean` (mean of the
last layer's patch tokens), `cls_l{i}`/`mean_l{i}` for each extra layer i (0 = embeddings, i = output of layer
i), and `patch_tokens` ([h*w, C], with `patch_tokens=True`). Vectors are float32 fixed-size lists.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from internvit.extract.sources import expand_sources
from internvit.extract.store import FeatureStore, feature_schema
from internvit.registry import DEFAULT_MODEL


@dataclass
class ExtractSummary:
    out: Path
    inputs: int  # distinct inputs named by the sources
    skipped: int  # already in the output from an earlier run
    processed: int  # rows written by this run
    failed: int  # rows with an error in the final output
    seconds: float

    @property
    def ok(self) -> bool:
        return self.failed == 0


class _ImageDataset(torch.utils.data.Dataset):
    """Opens and preprocesses one image; never raises: failures come back as an error string."""

    def __init__(self, paths: list[str], processor, *, exif_transpose: bool, max_pixels: int | None) -> None:
        self.paths = paths
        self.processor = processor
        self.exif_transpose = exif_transpose
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, tuple[int, int] | None, str | None]:
        from internvit.preprocess import ImageLoadError, open_image

        path = self.paths[i]
        try:
            image = open_image(path, exif_transpose=self.exif_transpose, max_pixels=self.max_pixels)
            return path, self.processor(image), image.size, None
        except ImageLoadError as e:
            return path, None, None, str(e)
        except Exception as e:  # a decoder bug must not stop a million-image run
            return path, None, None, f"{path}: {e.__class__.__name__}: {e}"


def _collate(items):
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
    layers=(),
    patch_tokens: bool = False,
    exif_transpose: bool = True,
    max_pixels: int | None = None,
    retry_errors: bool = False,
    flush_seconds: float = 10.0,
    revision: str | None = None,
    progress: bool = True,
) -> ExtractSummary:
    """Extract features of every image named by `sources` into the Parquet file `out`.

    Args:
        sources: files, folders (recursive), globs or `.txt` list files (see `expand_sources`).
        out: the Parquet file; if it (or its `.parts/` folder) exists, finished inputs are skipped.
        model: a name or path for `internvit.from_pretrained`, or a loaded `InternVisionModel`.
        dtype: compute dtype (bf16 is the reference dtype and the fastest on CPUs with AVX-512 BF16).
        device: "cpu", "cuda", ...; default CUDA when available.
        batch_size: images per forward.
        num_workers: preprocessing processes (0 = in the main process).
        layers: extra layers to pool, as `hidden_states` indices (0 = embeddings, -1 = last).
        patch_tokens: also store the last layer's patch tokens.
        exif_transpose: apply the EXIF orientation.
        max_pixels: refuse larger images (decompression bombs); None = the library default.
        retry_errors: recompute inputs whose earlier row is an error.
        flush_seconds: make finished rows durable at least this often (0 = after every batch).
        revision: Hub revision of `model`.
        progress: show a progress bar on stderr.
    """
    from internvit.preprocess import DEFAULT_MAX_PIXELS, ImageProcessor
    from internvit.weights import from_pretrained

    start = time.perf_counter()
    paths = expand_sources(sources)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, torch.nn.Module):
        vit, source = model.to(device), getattr(getattr(model, "checkpoint", None), "source", "in-memory model")
    else:
        vit, source = from_pretrained(model, dtype=dtype, device=device, revision=revision), str(model)
    vit.eval()
    ckpt = getattr(vit, "checkpoint", None)
    processor = (ImageProcessor.from_json(ckpt.preprocessor_path)
                 if ckpt is not None and ckpt.preprocessor_path else ImageProcessor())
    config = vit.config
    layers = normalize_layers(layers, config.num_hidden_layers)
    n_patches = (processor.crop_size // config.patch_size) ** 2 if patch_tokens else 0
    metadata = {
        "model": source, "dtype": str(vit.dtype).removeprefix("torch."), "layers": list(layers),
        "patch_tokens": bool(patch_tokens), "preprocess": processor.to_dict(), "hidden_size": config.hidden_size,
    }
    schema = feature_schema(config.hidden_size, layers=layers, patch_tokens=n_patches, metadata=metadata)
    store = FeatureStore(out, schema, flush_seconds=flush_seconds)
    done = store.finished(include_errors=not retry_errors)
    todo = [p for p in paths if p not in done]

    loader = torch.utils.data.DataLoader(
        _ImageDataset(todo, processor, exif_transpose=exif_transpose,
                      max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels),
        batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers else None, prefetch_factor=2 if num_workers else None,
    )
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="extract", dynamic_ncols=True)
    failed_now = 0
    try:
        for items in loader:
            rows = _encode(vit, items, layers=layers, n_patches=n_patches)
            store.add(rows)
            failed_now += sum(e is not None for e in rows["error"])
            if bar is not None:
                bar.update(len(items))
                bar.set_postfix(failed=failed_now)
    finally:
        if bar is not None:
            bar.close()
        store.consolidate()  # also on Ctrl-C: finished rows are kept, the rerun resumes

    import pyarrow.parquet as pq

    failed = 0
    if Path(out).is_file():
        errors = pq.read_table(out, columns=["error"]).column("error")
        failed = len(errors) - errors.null_count
    return ExtractSummary(Path(out), len(paths), len(paths) - len(todo), len(todo), failed, time.perf_counter() - start)


@torch.inference_mode()
def _encode(vit, items, *, layers: tuple[int, ...], n_patches: int) -> dict:
    """One batch through the model: a row for every item, errors included, in input order."""
    ok = [i for i, (_, pixels, _, _) in enumerate(items) if pixels is not None]
    valid = np.zeros(len(items), dtype=bool)
    valid[ok] = True
    C = vit.config.hidden_size
    vectors = {name: np.zeros((len(items), C), np.float32)
               for name in ["cls", "mean"] + [f"{p}_l{i}" for i in layers for p in ("cls", "mean")]}
    if n_patches:
        vectors["patch_tokens"] = np.zeros((len(items), n_patches, C), np.float32)
    if ok:
        pixels = torch.stack([items[i][1] for i in ok]).to(vit.device, vit.dtype)
        output = vit(pixels, output_hidden_states=bool(layers))
        named = [("", output.last_hidden_state)] + [(f"_l{i}", output.hidden_states[i]) for i in layers]
        for suffix, h in named:
            vectors["cls" + suffix][ok] = h[:, 0].float().cpu().numpy()
            vectors["mean" + suffix][ok] = h[:, 1:].float().mean(dim=1).cpu().numpy()
        if n_patches:
            vectors["patch_tokens"][ok] = output.last_hidden_state[:, 1:].float().cpu().numpy()
    columns: dict = {
        "path": [path for path, _, _, _ in items],
        "error": [error for _, _, _, error in items],
        "width": [size[0] if size else None for _, _, size, _ in items],
        "height": [size[1] if size else None for _, _, size, _ in items],
    }
    columns.update((name, _fixed_size_lists(values, valid)) for name, values in vectors.items())
    return columns


def _fixed_size_lists(values: np.ndarray, valid: np.ndarray):
    """[rows, ..., C] float32 -> nested Arrow fixed-size lists, without a Python loop; null rows where not valid."""
    import pyarrow as pa

    flat = pa.array(values.reshape(-1))
    for size in reversed(values.shape[2:]):  # inner dimensions first
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(~valid))
