"""`internvit export`: the encoder as an ONNX graph or an OpenVINO IR that validates itself against torch.

References:
    - `torch.onnx.export(..., dynamo=True)` (torch.export, then ONNX): the graph is traced from `_Graph`, which
      calls `InternVisionModel._run_chunk` directly, so the CPU micro-batching in `forward` (a Python loop over
      the batch) stays out of the graph and the batch axis stays symbolic.
    - OpenVINO reads the ONNX file (`ov.convert_model`); the IR is that graph, saved. A user of optimum-intel
      gets the same graph the same way, so `benchmarks/bench_vit.py` compares like with like.
    - NNCF post-training quantization (`nncf.quantize`, transformer preset): int8 weights and activations.
      Activations are quantized per tensor, so a few input channels 50-100x the rest (the "massive activations"
      of ViTs, Sun et al. 2024) leave the other channels a handful of int8 steps. SmoothQuant (Xiao et al. 2023)
      moves that range into the weights, per channel, before the ranges are measured; the shipped recipe keeps
      it on (`INT8_RECIPES`), and the fidelity report says what it achieved on the user's own held-out tiles.

What an export folder holds: the model (`model.onnx` or `openvino_model.xml/.bin`), `config.json` and
`preprocessor_config.json` of the source checkpoint, `internvit_export.json` (the manifest: source and its
weights fingerprint, format, precision, batch, outputs, versions, validation) and, for int8,
`fidelity_report.json`. `internvit.from_pretrained(folder)` loads it (see `backends.py`).

Outputs of the graph: `last_hidden_state` [B, N, C], then `hidden_state_{i}` for each requested layer i
(`hidden_states` indices: 0 = embeddings, L = last layer, which is `last_hidden_state` itself).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from internvit._fileio import atomic_write
from internvit.checkpoint import PREPROCESSOR_NAME, check_target
from internvit.machine import versions
from internvit.preprocess import ImageLoadError, ImageProcessor, open_image
from internvit.preprocess.tiling import tile_image
from internvit.preprocess.video import is_video_name
from internvit.runtime import MANIFEST_NAME, ExportedEncoder, ExportError, require
from internvit.sources import expand_sources
from internvit.weights import from_checkpoint

FIDELITY_NAME = "fidelity_report.json"
MODEL_FILES = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}
FORMATS = tuple(MODEL_FILES)
PRECISIONS = ("fp32", "bf16", "int8")
INPUT_NAME = "pixel_values"

# The stated tolerances (README "Export"). fp32: the max-abs bound. bf16 and int8: the cosine of each
# token with the fp32 torch output (int8: of the CLS tokens; every number is in the fidelity report). bf16: what
# bf16 arithmetic guarantees for the depth of the net (`bf16_min_cosine`), never one CPU's measured figure.
FP32_MAX_ABS = 1e-4
INT8_MIN_CLS_COSINE = 0.99
BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: round-to-nearest is off by at most 2^-8 relative
BF16_ROUNDINGS_PER_LAYER = 16  # 12 activation roundings (norm outs, qkv, scores, probs, attn out, proj, fc1, GELU,
                               # fc2, 2 residual adds) + 4 weight matrices (qkv, proj, fc1, fc2)
BF16_GAIN = 3.0  # growth of an error through the rest of the net (LayerNorm, softmax), a margin over torch's own


def bf16_min_cosine(num_layers: int) -> float:
    """The lowest per-token cosine with fp32 that bf16 arithmetic allows for a `num_layers`-deep InternViT.

    Each of R roundings per layer puts a relative error uniform in [-u, u] (u = 2^-8) on a tensor, rms u/sqrt(3);
    independent errors add in quadrature over L layers and grow by at most G through the rest of the net, so a
    token's relative error r = |y - y_ref| / |y_ref| has r^2 <= G^2 L R u^2 / 3, and its cosine with the fp32 token
    is 1 - r^2 / 2 (an error orthogonal to y_ref; any parallel part only rescales). R = 16, G = 3: 0.99927 for the
    2-layer test model, 0.99121 for the 24-layer 300M, 0.98242 for the 48-layer 6B (docs/export.md).
    """
    r2 = BF16_GAIN**2 * num_layers * BF16_ROUNDINGS_PER_LAYER * BF16_UNIT_ROUNDOFF**2 / 3
    return 1 - r2 / 2
KNN = 10  # neighbours compared in the fidelity report
HELDOUT_TILES = 32  # held-out tiles at most (the torch fp32 reference runs on each)
SYNTHETIC_IMAGE = (1000, 500)  # the validation image when no calibration images are given (2 tiles + thumbnail)


def output_names(layers: Sequence[int], num_hidden_layers: int) -> list[str]:
    """The graph's outputs: `last_hidden_state`, then `hidden_state_{i}` per extra layer (see module doc)."""
    return ["last_hidden_state"] + [f"hidden_state_{i}" for i in layers if i != num_hidden_layers]


def parse_layers(layers: Sequence[int] | str | None, num_hidden_layers: int) -> tuple[int, ...]:
    """`--layers I,J` as sorted `hidden_states` indices (negative counts from the end; the last layer dropped)."""
    if layers is None:
        return ()
    if isinstance(layers, str):
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise ExportError(f"--layers {layers!r}: expected comma-separated layer indices like 12,18") from None
    L = num_hidden_layers
    out = set()
    for i in layers:
        j = i + L + 1 if i < 0 else i
        if not 0 <= j <= L:
            raise ExportError(f"--layers: layer {i} is out of range for a {L}-layer model (0..{L}, or -{L + 1}..-1)")
        if j != L:
            out.add(j)
    return tuple(sorted(out))


class _Graph(nn.Module):
    """What is exported: pixels -> (last_hidden_state, *requested hidden states), one pass, no Python loop."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        last, states = self.model._run_chunk(pixel_values, None, self.layers, None)
        return (last, *(states[i] for i in self.layers))


def export_onnx(model: nn.Module, path: Path, *, layers: tuple[int, ...], batch: int | None) -> None:
    """Write the encoder's graph as ONNX: a symbolic batch axis (`batch=None`) or a fixed one; 448 tiles."""
    require("onnxscript", "onnx", "ONNX export")
    size = model.config.image_size
    graph = _Graph(model, layers).eval()
    example = torch.zeros(batch or 2, 3, size, size)
    dynamic = None if batch else {"pixel_values": {0: torch.export.Dim("batch", min=1, max=4096)}}
    with torch.no_grad(), quiet_torch_onnx():
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME],
                          output_names=output_names(layers, model.config.num_hidden_layers),
                          dynamic_shapes=dynamic, dynamo=True, external_data=True, verbose=False)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def quiet_torch_onnx() -> Iterator[None]:
    """Hide what `torch.onnx.export` says that tells our users nothing, for the call only: its progress lines
    (stdout); "torchvision is not installed. Skipping torchvision::nms" (and roi_align, ...), logged as its op
    registry loads without torchvision, which the encoder never uses; pytree's FutureWarning that
    `isinstance(treespec, LeafSpec)` is deprecated, raised by torch's own exporter (torch 2.13). Its other
    warnings and errors, and ours, still show."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    drop = _DropMessages("torchvision is not installed")
    registry.addFilter(drop)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registry.removeFilter(drop)


# ---- tiles: calibration, held out, synthetic -----------------------------------------------------------------


@dataclass
class Tiles:
    """Normalized tiles [T, 3, S, S] for calibration and for the held-out comparison, and where they came from."""

    calibration: torch.Tensor
    heldout: torch.Tensor
    calibration_images: int
    heldout_images: int
    source: str


def calibration_tiles(sources, *, tile_size: int, calibration_size: int, max_tiles: int = 12,
                      heldout_size: int = HELDOUT_TILES, processor=None) -> Tiles:
    """The user's images through InternVL's dynamic tiling (+ thumbnail), as `extract --tiles dynamic` tiles them.

    Images are shuffled with a fixed seed; every fourth is held out (never calibrated on). Tiles are taken round
    robin over the images (thumbnails first), so N calibration tiles come from as many images as possible.
    """
    paths = [p for p in expand_sources(sources) if not is_video_name(p)]
    random.Random(0).shuffle(paths)
    if len(paths) < 2:
        raise ExportError(f"--calibration {' '.join(map(str, sources))}: found {len(paths)} image(s); need at least 2 "
                          "(every fourth image, and at least one, is held out to measure fidelity)")
    held = set(range(3, len(paths), 4)) or {len(paths) - 1}
    mean = std = None
    if processor is not None:
        mean, std = processor.image_mean, processor.image_std
    kwargs = {} if mean is None else {"mean": mean, "std": std}

    def tiles_of(indices: list[int], budget: int) -> tuple[torch.Tensor, int]:
        per_image: list[list[torch.Tensor]] = []
        for i in indices:
            if sum(len(t) for t in per_image) >= budget and len(per_image) >= budget:
                break
            try:
                tiled = tile_image(open_image(paths[i]), max_tiles=max_tiles, tile_size=tile_size, **kwargs)
            except (ImageLoadError, ValueError) as e:
                raise ExportError(f"--calibration: {paths[i]}: cannot be used ({e})") from None
            pv = tiled.pixel_values
            per_image.append([pv[-1], *pv[:-1]] if tiled.layout.thumbnail else list(pv))
        out: list[torch.Tensor] = []
        for k in range(max((len(t) for t in per_image), default=0)):  # round robin, thumbnails first
            out += [t[k] for t in per_image if k < len(t)]
        out = out[:budget]
        return (torch.stack(out) if out else torch.empty(0, 3, tile_size, tile_size)), len(per_image)

    cal_idx = [i for i in range(len(paths)) if i not in held]
    calibration, n_cal = tiles_of(cal_idx, calibration_size)
    heldout, n_held = tiles_of(sorted(held), heldout_size)
    return Tiles(calibration, heldout, n_cal, n_held, f"{len(paths)} image(s) from {', '.join(map(str, sources))}")


def synthetic_tiles(tile_size: int) -> Tiles:
    """Real tiles of a synthetic photo-like image (gradients, shapes, texture), through the dynamic tiling.

    Used to validate fp32/bf16 exports when no images are given: the pixels follow the same preprocessing as
    real inputs, so the values the graph sees are in their usual range.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    w, h = SYNTHETIC_IMAGE
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([120 + 100 * np.sin(6 * xx + 1), 110 + 90 * np.cos(5 * yy), 90 + 80 * np.sin(4 * (xx + yy))], -1)
    base += rng.normal(0, 12, base.shape)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(24):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        box = (x0, y0, x0 + int(rng.integers(20, w // 3)), y0 + int(rng.integers(20, h // 3)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    tiles = tile_image(image, max_tiles=2, tile_size=tile_size).pixel_values
    return Tiles(tiles[:0], tiles, 0, 1, f"a synthetic {w}x{h} image ({len(tiles)} tiles)")


# ---- comparing with the torch model --------------------------------------------------------------------------


@torch.inference_mode()
def torch_reference(model: nn.Module, tiles: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """The fp32 torch model's outputs (the graph's outputs, in order) on `tiles`, two tiles per forward."""
    graph = _Graph(model, layers).eval()
    parts = [graph(tiles[i:i + 2].to(model.dtype)) for i in range(0, len(tiles), 2)]
    return [torch.cat([p[k] for p in parts]).float() for k in range(len(parts[0]))]


def run_encoder(encoder, tiles: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """An exported encoder's outputs on `tiles`: the first tile alone, then the rest in one batch (so a dynamic
    batch axis is exercised at two sizes)."""
    chunks = [tiles[:1], tiles[1:]] if len(tiles) > 1 else [tiles]
    outs = [encoder(c, output_hidden_states=bool(layers)) for c in chunks]
    result = [torch.cat([o.last_hidden_state for o in outs]).float()]
    for i in layers:
        result.append(torch.cat([o.hidden_states[i] for o in outs]).float())
    return result


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def knn_overlap(ref_cls: torch.Tensor, test_cls: torch.Tensor, k: int = KNN) -> float | None:
    """Mean over items of |kNN_ref ∩ kNN_test| / k, neighbours by cosine among the items (self excluded);
    None for fewer than 2 items."""
    n = ref_cls.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return None

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.double(), dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(k, dim=-1).indices

    a, b = neighbours(ref_cls), neighbours(test_cls)
    return float(sum(len(set(a[i].tolist()) & set(b[i].tolist())) for i in range(n)) / (n * k))


def compare(ref: list[torch.Tensor], test: list[torch.Tensor], names: list[str]) -> dict:
    """Max abs difference per output, and the fidelity figures of the last layer (CLS, patch tokens, kNN)."""
    out = {"max_abs": {n: float((r - t).abs().max()) for n, r, t in zip(names, ref, test)},
           "ref_max_abs_value": {n: float(r.abs().max()) for n, r in zip(names, ref)}}
    r, t = ref[0], test[0]
    cls, patch = _cosine(r[:, 0], t[:, 0]), _cosine(r[:, 1:], t[:, 1:])
    out.update({
        "tiles": int(r.shape[0]),
        "cls_cosine": {"min": float(cls.min()), "mean": float(cls.mean())},
        "patch_cosine": {"min": float(patch.min()), "mean": float(patch.mean())},
        "knn": {"k": min(KNN, int(r.shape[0]) - 1), "overlap": knn_overlap(r[:, 0], t[:, 0])},
    })
    if len(names) > 1:
        out["hidden_cosine_min"] = {n: float(_cosine(a, b).min()) for n, a, b in zip(names[1:], ref[1:], test[1:])}
    return out


def check_tolerance(precision: str, result: dict, *, force: bool, num_layers: int) -> tuple[bool, str]:
    """Whether `result` meets the stated tolerance of `precision` (bf16: for a `num_layers`-deep net); the reason
    as a sentence."""
    if precision == "fp32":
        worst = max(result["max_abs"].items(), key=lambda kv: kv[1])
        ok = worst[1] <= FP32_MAX_ABS
        why = f"max abs difference from the fp32 torch model {worst[1]:.3g} ({worst[0]}), tolerance {FP32_MAX_ABS:g}"
    elif precision == "bf16":
        worst = min(result["cls_cosine"]["min"], result["patch_cosine"]["min"],
                    *result.get("hidden_cosine_min", {}).values())
        tolerance = bf16_min_cosine(num_layers)
        ok = worst >= tolerance
        why = (f"min token cosine with the fp32 torch model {worst:.5f}, tolerance {tolerance:.5f} (bf16 "
               f"arithmetic over {num_layers} layers)")
    else:
        worst = result["cls_cosine"]["min"]
        ok = worst >= INT8_MIN_CLS_COSINE
        why = (f"min CLS cosine with the fp32 torch model {worst:.4f} (threshold {INT8_MIN_CLS_COSINE}); patch "
               f"cosine min {result['patch_cosine']['min']:.4f}, {result['knn']['k']}-NN overlap "
               f"{result['knn']['overlap'] if result['knn']['overlap'] is None else round(result['knn']['overlap'], 3)}")
    if not ok and force:
        why += "; written anyway (--force)"
    return ok, why


# ---- int8 ------------------------------------------------------------------------------------------------------

# "shipped": NNCF's transformer preset (mixed: symmetric weights per channel, asymmetric activations per
# tensor; attention, norms and GELU left in float) with SmoothQuant on every MatMul (alpha 0.95, NNCF's own
# default for transformers), so outlier channels do not set the activation range, and the attention output
# projection (`attn.proj`, 1/12 of a layer's linear FLOPs) left in float: on the outlier test checkpoint it
# is the one linear whose int8 input still cost CLS fidelity after smoothing (min cosine 0.989 -> 0.9996).
# "transformer": NNCF's transformer preset as it comes (SmoothQuant 0.95, every linear in int8), what a user of
# NNCF gets. "plain": per-tensor int8 of every MatMul input and no smoothing, what a generic recipe does (tests/
# show what both cost on outliers).
INT8_RECIPES = ("shipped", "transformer", "plain")
SMOOTH_QUANT_ALPHA = 0.95


def attention_projections(ov_model, hidden_size: int) -> list[str]:
    """The MatMuls of `attn.proj`: InternViT's only linear with a square [C, C] weight (qkv is 3C x C, fc1 4C x C,
    fc2 C x 4C), found by shape because the ONNX exporter numbers its nodes."""
    names = []
    for op in ov_model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input_value(1).get_node()
        while weight.get_type_name() in ("Convert", "Transpose") and weight.get_input_size():
            weight = weight.input_value(0).get_node()
        if weight.get_type_name() == "Constant" and list(weight.get_output_shape(0)) == [hidden_size, hidden_size]:
            names.append(op.get_friendly_name())
    return names


def quantize_int8(ov_model, calibration: torch.Tensor, *, hidden_size: int, recipe: str = "shipped"):
    """NNCF post-training quantization of an OpenVINO model, calibrated on `calibration` tiles [T, 3, S, S]."""
    nncf = require("nncf", "openvino", "int8 quantization")

    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    if recipe not in INT8_RECIPES:
        raise ValueError(f"recipe must be one of {INT8_RECIPES}, got {recipe!r}")
    if len(calibration) == 0:
        raise ExportError("int8 needs calibration tiles: pass --calibration SOURCES (images like yours)")
    nncf.set_log_level(logging.ERROR)
    data = nncf.Dataset([calibration[i:i + 1].numpy() for i in range(len(calibration))])
    if recipe == "plain":
        kwargs = dict(preset=nncf.QuantizationPreset.PERFORMANCE)
    elif recipe == "transformer":
        kwargs = dict(model_type=nncf.ModelType.TRANSFORMER)
    else:
        kwargs = dict(model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
                      ignored_scope=nncf.IgnoredScope(names=attention_projections(ov_model, hidden_size)),
                      advanced_parameters=AdvancedQuantizationParameters(
                          smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=SMOOTH_QUANT_ALPHA)))
    return nncf.quantize(ov_model, data, subset_size=len(calibration), **kwargs)


# ---- the command --------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    path: Path  # the folder
    manifest: dict
    seconds: float


def _parse_batch(batch: str | int | None) -> int | None:
    if batch is None or batch == "dynamic":
        return None
    try:
        value = int(batch)
    except (TypeError, ValueError):
        raise ExportError(f"--batch {batch!r}: expected 'dynamic' or a positive integer") from None
    if value < 1:
        raise ExportError(f"--batch {batch!r}: expected 'dynamic' or a positive integer")
    return value


def export(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str,
    precision: str = "fp32",
    batch: str | int | None = "dynamic",
    calibration: Sequence[str | os.PathLike] | None = None,
    calibration_size: int = 32,
    layers: Sequence[int] | str | None = None,
    force: bool = False,
    overwrite: bool = False,
    revision: str | None = None,
    int8_recipe: str = "shipped",
    heldout_size: int = HELDOUT_TILES,
    log=None,
) -> ExportResult:
    """Export a checkpoint to `out_dir` as ONNX or OpenVINO IR, validated against the torch model in fp32.

    Args:
        model: a checkpoint name or path (anything `internvit.from_pretrained` loads with the torch backend).
        out_dir: the export folder; a non-empty one is refused unless `overwrite`.
        format: "onnx" or "openvino".
        precision: "fp32"; "bf16" (OpenVINO only: bf16 inference, fp16-compressed weights on disk); "int8"
            (OpenVINO only: NNCF post-training quantization calibrated on `calibration`).
        batch: "dynamic" (a symbolic batch axis) or a fixed batch size.
        calibration: image files, folders, globs or list files (as `extract`); needed for int8, and used for
            validation when given (held-out images), else a synthetic image is tiled for it.
        calibration_size: calibration tiles for int8.
        layers: extra `hidden_states` outputs (0 = embeddings); the last layer is always output.
        force: write an int8 model under the fidelity threshold (the report says so).
        int8_recipe: "shipped" (default), or "transformer" / "plain" for comparisons (see `INT8_RECIPES`).
        heldout_size: held-out tiles at most (each is also run through the fp32 torch model).
        log: a callable taking progress lines (the CLI passes a stderr printer).

    Raises:
        ExportError: bad options, or an exported model outside its tolerance (nothing is written then).
    """
    start = time.perf_counter()
    say = log or (lambda _: None)
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if format == "onnx" and precision != "fp32":
        raise ExportError(f"--precision {precision} is for --format openvino: onnxruntime's CPU provider has no bf16 "
                          "kernels, and int8 is NNCF's OpenVINO recipe; export ONNX in fp32")
    if precision == "int8" and not calibration:
        raise ExportError("--precision int8 needs --calibration SOURCES: images like the ones you will encode, "
                          "tiled as extract tiles them (a few hundred tiles' worth is plenty)")
    if calibration_size < 1:
        raise ExportError(f"--calibration-size must be a positive integer, got {calibration_size}")
    if int8_recipe not in INT8_RECIPES:
        raise ExportError(f"int8_recipe must be one of {', '.join(INT8_RECIPES)}, got {int8_recipe!r}")
    batch_n = _parse_batch(batch)
    check_target(out_dir, overwrite=overwrite)
    require("onnxscript", "onnx", "ONNX export")
    if format == "openvino" or precision != "fp32":
        require("openvino", "openvino", "OpenVINO export")
    else:
        require("onnxruntime", "onnx", "validating an ONNX export")

    say(f"loading {model} (fp32, torch)")
    vit = from_checkpoint(model, dtype="fp32", revision=revision, attn_implementation="sdpa")
    ckpt, config = vit.checkpoint, vit.config
    layers = parse_layers(layers, config.num_hidden_layers)
    names = output_names(layers, config.num_hidden_layers)

    processor = None
    if ckpt.preprocessor_path:
        processor = ImageProcessor.from_json(ckpt.preprocessor_path)
    if calibration:
        tiles = calibration_tiles(list(calibration), tile_size=config.image_size,
                                  calibration_size=calibration_size, processor=processor, heldout_size=heldout_size)
        if len(tiles.heldout) < 2:
            raise ExportError(f"--calibration: the held-out images gave {len(tiles.heldout)} tile(s); give more images")
    else:
        tiles = synthetic_tiles(config.image_size)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        say(f"exporting the graph (ONNX, batch {batch_n or 'dynamic'}, outputs {', '.join(names)})")
        (tmp / "onnx").mkdir()
        export_onnx(vit, tmp / "onnx" / "model.onnx", layers=layers, batch=batch_n)
        export_seconds = time.perf_counter() - t
        stage = tmp / "model"
        stage.mkdir()
        if format == "onnx":
            for f in (tmp / "onnx").iterdir():
                shutil.move(str(f), stage / f.name)
        else:
            import openvino as ov

            ov_model = ov.convert_model(tmp / "onnx" / "model.onnx")
            if precision == "int8":
                say(f"quantizing to int8 (NNCF, {int8_recipe} recipe) on {len(tiles.calibration)} calibration "
                    f"tiles from {tiles.calibration_images} image(s)")
                ov_model = quantize_int8(ov_model, tiles.calibration, hidden_size=config.hidden_size,
                                         recipe=int8_recipe)
            ov.save_model(ov_model, stage / MODEL_FILES["openvino"], compress_to_fp16=precision == "bf16")
            del ov_model

        say(f"validating on {len(tiles.heldout)} held-out tile(s) ({tiles.source}) against the fp32 torch model")
        ref = torch_reference(vit, tiles.heldout, layers)
        manifest = {
            "format": format, "precision": precision, "batch": batch_n or "dynamic",
            "model_file": MODEL_FILES[format], "input": INPUT_NAME, "outputs": names,
            "layers": [*layers, config.num_hidden_layers], "image_size": config.image_size,
            "source": {"model": _source_name(model), "weights_fingerprint": ckpt.fingerprint()},
            "versions": versions(),
        }
        (stage / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        config.to_json(stage / "config.json")
        encoder = ExportedEncoder.load(stage, backend="openvino" if format == "openvino" else "onnxruntime",
                                       cache=False)
        t = time.perf_counter()
        result = compare(ref, run_encoder(encoder, tiles.heldout, layers), names)
        result["seconds"] = time.perf_counter() - t
        del encoder
        ok, why = check_tolerance(precision, result, force=force, num_layers=config.num_hidden_layers)
        result.update({"passed": ok, "verdict": why, "heldout": tiles.source,
                       "heldout_images": tiles.heldout_images})
        manifest["validation"] = result
        if precision == "int8":
            manifest["int8"] = {"recipe": int8_recipe, "smooth_quant_alpha": {"shipped": SMOOTH_QUANT_ALPHA,
                                "transformer": "nncf default"}.get(int8_recipe),
                                "kept_in_float": ["attn.proj"] if int8_recipe == "shipped" else [], "calibration_tiles": len(tiles.calibration),
                                "calibration_images": tiles.calibration_images, "forced": bool(force and not ok)}
        manifest["export_seconds"] = round(export_seconds, 1)
        if not ok and not (force and precision == "int8"):
            hint = " (pass --force to write it anyway)" if precision == "int8" else ""
            raise ExportError(f"{out}: not written: the exported model is outside its tolerance: {why}{hint}")
        say(why)

        # Written: the model files, then config, preprocessing and (last) the manifest that marks a complete export.
        for name in MODEL_FILES.values():
            for old in out.glob(Path(name).stem + "*"):
                old.unlink()
        for f in stage.iterdir():
            if f.name != MANIFEST_NAME:
                os.replace(f, out / f.name)
        if ckpt.preprocessor_path:
            shutil.copyfile(ckpt.preprocessor_path, out / PREPROCESSOR_NAME)
        else:
            (out / PREPROCESSOR_NAME).write_text(json.dumps(ImageProcessor().to_dict(), indent=2) + "\n")
        if precision == "int8":
            report = {k: manifest[k] for k in ("source", "int8")} | {"fidelity": result}
            atomic_write(out / FIDELITY_NAME, lambda p: Path(p).write_text(json.dumps(report, indent=2) + "\n"))
        manifest["seconds"] = round(time.perf_counter() - start, 1)
        atomic_write(out / MANIFEST_NAME, lambda p: Path(p).write_text(json.dumps(manifest, indent=2) + "\n"))
    return ExportResult(out, manifest, time.perf_counter() - start)


def _source_name(model) -> str:
    name = os.fspath(model)
    return os.path.realpath(name) if os.path.exists(name) else name


