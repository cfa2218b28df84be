"""Backends behind one contract, and `internvit.from_pretrained`: a name or path to an encoder on any of them.

`from_pretrained(name_or_path, backend=...)`:
    - "torch" (default for checkpoints): `InternVisionModel` (`weights.from_checkpoint`), the reference;
    - "openvino" / "onnxruntime" on an export folder (`internvit export`): that graph, loaded directly
      (`runtime.ExportedEncoder`, which also documents the shared inference surface);
    - "openvino" / "onnxruntime" on an ordinary checkpoint: exported once (fp32 graph, validated like
      `internvit export`) into the cache, keyed by the weights' content fingerprint, the layers it outputs and
      the versions that made it; later loads reuse it. OpenVINO's compiled-blob cache (`CACHE_DIR`) is on, so
      a later process also skips most of the compilation;
    - "auto": `auto_backend`, the fastest one installed for this CPU and dtype, measured once (`autotune.py`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from internvit import autotune
from internvit.checkpoint import CONFIG_NAME, parse_dtype, resolve
from internvit.config import InternVisionConfig
from internvit.export import export, parse_layers, versions
from internvit.model.vision import InternVisionModel
from internvit.runtime import (
    BACKENDS,
    EXTRAS,
    MANIFEST_NAME,
    MODULES,
    ExportedEncoder,
    ExportError,
    cache_root,
    is_export,
    require,
)
from internvit.weights import from_checkpoint


def installed(backend: str) -> bool:
    if backend == "torch":
        return True
    return importlib.util.find_spec(MODULES[backend]) is not None


def static_backend(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> tuple[str, str]:
    """The backend `auto` picks without measuring (`INTERNVIT_AUTOTUNE=0`, or no checkpoint to measure), and
    why: on CPU OpenVINO where installed (faster than torch on AMD EPYC in fp32 and bf16, benchmarks/results/
    vit_*), else onnxruntime for fp32; torch on a GPU and for fp16."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    dt = parse_dtype(dtype)
    if dev.type != "cpu":
        return "torch", f"{dev.type}: torch's CUDA kernels"
    if dt == torch.float16:
        return "torch", "fp16 is torch's only"
    if installed("openvino"):
        return "openvino", "the static CPU default where OpenVINO is installed (not measured)"
    if installed("onnxruntime") and dt in (torch.float32, None):
        return "onnxruntime", "OpenVINO is not installed; onnxruntime is faster than torch in fp32 (not measured)"
    return "torch", "neither OpenVINO nor (for fp32) onnxruntime is installed"


def auto_backend(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 model: str | os.PathLike | None = None, *, revision: str | None = None,
                 cache_dir: str | None = None, layers: Sequence[int] = ()) -> tuple[str, str]:
    """The fastest installed backend for this CPU, dtype and `model` (a checkpoint), and why.

    On a CPU with a checkpoint given, measured once per machine (`autotune.choose_backend`: the candidates of the
    requested precision, each on a batch of probe tiles at the model's real shapes) and cached; otherwise, and
    with `INTERNVIT_AUTOTUNE=0`, `static_backend`. Precision never changes: bf16 compares torch and OpenVINO in
    bf16, fp32 also onnxruntime; fp16 is torch's only."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    dt = parse_dtype(dtype) or torch.bfloat16
    candidates = [b for b in (("torch", "openvino") if dt == torch.bfloat16 else BACKENDS) if installed(b)]
    if model is None or not autotune.enabled() or dev.type != "cpu" or dt == torch.float16 or len(candidates) < 2:
        return static_backend(device, dtype)
    ckpt = resolve(model, revision=revision, cache_dir=cache_dir)
    if ckpt.config_path is None:
        return static_backend(device, dtype)
    config = InternVisionConfig.from_json(ckpt.config_path)

    def loader(backend: str):
        if backend == "torch":
            return lambda: _torch_model(model, dtype=dt, device=device, revision=revision, cache_dir=cache_dir)
        return lambda: cached(model, backend=backend, dtype=dt, device=device, revision=revision, layers=layers,
                              cache_dir=cache_dir)

    choice, figures, hit = autotune.choose_backend(config, dt, {b: loader(b) for b in candidates})
    rates = ", ".join(f"{b} {r:.3g}" for b, r in sorted(figures["tiles_per_s"].items()))
    return choice, (f"measured fastest on this CPU in {str(dt).removeprefix('torch.')} at batch "
                    f"{autotune.BACKEND_BATCH} ({'cached' if hit else 'just now'}; tiles/s: {rates})")


def _torch_model(name_or_path, *, dtype=None, device=None, revision=None, config=None, attn_implementation="auto",
                 cache_dir=None) -> InternVisionModel:
    """The torch backend: the checkpoint as an `InternVisionModel`, its CPU inference plan measured
    (`autotune.tune_torch`)."""
    model = from_checkpoint(name_or_path, dtype=dtype, device=device, revision=revision, config=config,
                            attn_implementation=attn_implementation, cache_dir=cache_dir)
    autotune.tune_torch(model)
    return model


# ---- from_pretrained(backend=...) --------------------------------------------------------------------------


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    config: InternVisionConfig | None = None,
    attn_implementation: str = "auto",
    cache_dir: str | None = None,
    backend: str | None = None,
    layers: Sequence[int] = (),
) -> InternVisionModel | ExportedEncoder:
    """Load an InternViT encoder, in eval mode.

    Args:
        name_or_path: a local folder or weight file, a Hub repo id (`OpenGVLab/InternViT-300M-448px-V2_5`),
            `hf-hub:ORG/REPO`, `local-dir:PATH`, or a registry name (`internvit-300m-448px-v2_5`). Standalone
            InternViT (300M, 6B), InternVL 2.5 chat checkpoints (sharded or not), timm and transformers layouts;
            or an export folder written by `internvit export`.
        dtype: fp32 | bf16 | fp16 or a torch dtype; None keeps the stored dtype (bf16 for the official files).
        device: where to put the weights; None leaves them on the CPU, memory-mapped.
        revision: a Hub branch, tag or commit.
        config: overrides the checkpoint's config.json (needed for a timm state dict of an unknown size).
        attn_implementation: "auto" (default: on CPU the path measured fastest here, `autotune.tune_torch`),
            "sdpa", "blocked" or "eager" (see `InternVisionModel`); a named one is never overridden.
        cache_dir: a Hugging Face cache folder other than the default.
        backend: "torch" (the default for checkpoints: this `InternVisionModel`), "openvino", "onnxruntime" or
            "auto" (`auto_backend`: measured on this CPU, among the paths of the requested dtype; bf16 when
            dtype is None on a CPU). The others return an `ExportedEncoder` with the same inference surface: an
            export folder loads directly (and is what `None` loads it with); an ordinary checkpoint is exported
            once into the cache, keyed by its weights' fingerprint.
        layers: with an exporting backend, the `hidden_states` indices the graph must also output.

    The loaded model carries `model.checkpoint` (the resolved files), which `ImageProcessor.from_pretrained` and
    `internvit extract` use to find the matching `preprocessor_config.json`.
    """
    exported = is_export(name_or_path)
    if backend == "auto":
        if exported:
            backend, _ = static_backend(device, dtype)  # nothing to compare: the export's own graph
        else:
            if dtype is None and torch.device(device or "cpu").type == "cpu":
                dtype = "bf16"  # what auto compares on a CPU when no dtype is asked for
            backend, _ = auto_backend(device, dtype, name_or_path, revision=revision, cache_dir=cache_dir,
                                      layers=layers)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or auto, got {backend!r}")
    if backend in (None, "torch") and not exported:
        return _torch_model(name_or_path, dtype=dtype, device=device, revision=revision, config=config,
                            attn_implementation=attn_implementation, cache_dir=cache_dir)
    if config is not None:
        raise ValueError(f"config= is for the torch backend (backend={backend!r} reads the checkpoint's own)")
    if backend not in (None, "torch") and not installed(backend):
        require(MODULES[backend], EXTRAS[backend], f"the {backend} backend")
    if exported:
        encoder = ExportedEncoder.load(name_or_path, backend=backend, dtype=dtype, device=device)
        if layers:
            encoder.require_layers(layers)
        return encoder
    return cached(name_or_path, backend=backend, dtype=dtype, device=device, revision=revision, layers=layers,
                  cache_dir=cache_dir)


def cached(name_or_path, *, backend: str, dtype=None, device=None, revision=None, layers: Sequence[int] = (),
           cache_dir: str | None = None) -> ExportedEncoder:
    """Export an ordinary checkpoint once (fp32 graph, dynamic batch) and load it from the cache afterwards."""
    ckpt = resolve(name_or_path, revision=revision, cache_dir=cache_dir)
    if ckpt.config_path is None:
        raise ExportError(f"{ckpt.source}: the {backend} backend needs the checkpoint's {CONFIG_NAME} "
                          "(convert it with `internvit convert` first)")
    config = InternVisionConfig.from_json(ckpt.config_path)
    wanted = parse_layers([i for i in layers if i != -1], config.num_hidden_layers)
    fmt = "openvino" if backend == "openvino" else "onnx"
    v = versions()
    tool = f"ov{v.get('openvino', '-')}" if fmt == "openvino" else f"onnx{v.get('onnx', '-')}"
    base = "-".join([ckpt.fingerprint().split(":")[-1], fmt, "fp32", f"iv{v['internvit']}",
                     f"torch{v['torch'].split('+')[0]}", tool])
    root = cache_root() / "exports"
    folder = _cached_with(root, base, wanted)
    if folder is None:
        key = base + "-l" + ("_".join(map(str, wanted)) or "last")
        folder = root / key
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / (key + ".lock")):  # Ray actors on one machine: one exports, the others wait
            if not (folder / MANIFEST_NAME).is_file():
                staging = root / (key + f".tmp{os.getpid()}")
                shutil.rmtree(staging, ignore_errors=True)
                export(name_or_path, staging, format=fmt, precision="fp32", layers=wanted, revision=revision)
                os.replace(staging, folder)
    precision_dtype = dtype if dtype is not None else ("bf16" if backend == "openvino" else "fp32")
    encoder = ExportedEncoder.load(folder, backend=backend, dtype=precision_dtype, device=device, checkpoint=ckpt)
    return encoder


def _cached_with(root: Path, base: str, wanted: tuple[int, ...]) -> Path | None:
    """A complete cached export of these weights and versions whose outputs include the `wanted` layers."""
    for folder in sorted(root.glob(base + "-l*")):
        manifest = folder / MANIFEST_NAME
        if folder.is_dir() and manifest.is_file() and set(wanted) <= set(json.loads(manifest.read_text())["layers"]):
            return folder
    return None


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
