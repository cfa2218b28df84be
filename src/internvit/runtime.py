"""An exported InternViT graph (`internvit export`) run by OpenVINO or onnxruntime behind `InternVisionModel`'s
inference surface: `ExportedEncoder`.

What `features.encode_tiles` / `encode_images` / `visual_tokens` and both extract engines use of an encoder, and
what `ExportedEncoder` provides: `config`, `dtype` (of inputs and outputs: float32 here), `device`, `eval()`,
`checkpoint` (source, fingerprint, preprocessing), `forward_intermediates` and `encoder(pixel_values,
output_hidden_states=...)` returning an `InternVisionOutput`. Its `hidden_states` holds the layers the graph
outputs; asking for another names them.

Compute precision (`precision`): fp32 or bf16 for OpenVINO (its `INFERENCE_PRECISION_HINT`; OpenVINO picks bf16
by itself on CPUs with AVX-512 BF16 or AMX, so fp32 is asked for explicitly), fp32 for onnxruntime, int8 for an
int8 export. In bf16 the LayerNorms (MVN and its affine) and the residual stream stay fp32 on every CPU
(`keep_fp32`, `read_marked`: OpenVINO's `DisablePrecisionConversion` mark, which its CPU plugin honours for bf16
too), as torch keeps its norms; matrix products and attention run in bf16.

Outputs are checked: a compiled graph first runs a deterministic probe input (`probe_pixels`), and every output
is checked to be finite; non-finite outputs are never returned (docs/export.md, "Non-finite outputs"). In bf16 a
probe that fails is retried without OpenVINO's fused attention kernel (`SAFER_BF16`; the encoder's `notes` and a
warning say so), and an encoder still non-finite raises `NonFiniteOutputError` naming the export, the runtime,
the CPU, the precision and the way out.

This module runs exports; `export.py` writes them (and validates them with this runtime) and `backends.py`
chooses a backend and exports a checkpoint on demand.
"""

from __future__ import annotations

import importlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from internvit.checkpoint import files_fingerprint, parse_dtype
from internvit.config import InternVisionConfig
from internvit.machine import cpu_name
from internvit.model.vision import InternVisionOutput

MANIFEST_NAME = "internvit_export.json"
BACKENDS = ("torch", "openvino", "onnxruntime")
EXTRAS = {"openvino": "openvino", "onnxruntime": "onnx"}
MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


class ExportError(ValueError):
    """An export that cannot be made or does not meet its tolerance; the message says which and why."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or fail naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the {module} package ({e}); install it with "
                          f"pip install 'internvit[{extra}]'") from None


def cache_root() -> Path:
    """Where exports of ordinary checkpoints and OpenVINO's compiled blobs are kept: `$INTERNVIT_CACHE`, else
    `$XDG_CACHE_HOME/internvit`, else `~/.cache/internvit`."""
    if os.environ.get("INTERNVIT_CACHE"):
        return Path(os.environ["INTERNVIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "internvit"


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is an export folder (or a file in one) written by `export`."""
    p = Path(os.fspath(path).removeprefix("local-dir:"))
    return (p / MANIFEST_NAME).is_file() or (p.is_file() and (p.parent / MANIFEST_NAME).is_file()
                                              and p.suffix in (".onnx", ".xml"))


def export_format(path: str | os.PathLike) -> str:
    """"onnx" or "openvino": the format of the export folder (or file in one) at `path`."""
    p = Path(os.fspath(path).removeprefix("local-dir:"))
    folder = p.parent if p.is_file() else p
    return json.loads((folder / MANIFEST_NAME).read_text())["format"]


class NonFiniteOutputError(ExportError):
    """An exported encoder whose outputs are NaN or infinite on this machine; the message says what to do."""


class LayerNotExportedError(ValueError):
    """A `hidden_states` layer the exported graph does not output."""


class ExportedHiddenStates(Sequence):
    """`hidden_states` of an exported graph: L + 1 entries like torch's, of which only the exported ones exist."""

    def __init__(self, by_layer: dict[int, torch.Tensor], num_layers: int, source: str) -> None:
        self._by_layer, self._n, self._source = by_layer, num_layers + 1, source

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(self._n)))
        j = i + self._n if i < 0 else i
        if j in self._by_layer:
            return self._by_layer[j]
        if not 0 <= j < self._n:
            raise IndexError(f"hidden_states index {i} out of range ({self._n} entries)")
        raise LayerNotExportedError(
            f"{self._source}: layer {j} of hidden_states is not in this export (it has {sorted(self._by_layer)}); "
            f"export again with --layers {j}")

    def __iter__(self):
        return (self[j] for j in range(self._n))


class ExportCheckpoint:
    """What an extract run records of an export folder: its path, fingerprint and preprocessing."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.source = str(folder)
        self.directory = folder
        self.manifest = manifest
        pre = folder / "preprocessor_config.json"
        self.preprocessor_path = pre if pre.is_file() else None
        self.config_path = folder / "config.json"

    def fingerprint(self) -> str:
        """The export's own files (an int8 model differs from its source); the source's is in the manifest."""
        if not hasattr(self, "_fingerprint"):
            files = sorted(p for p in self.directory.iterdir() if p.is_file() and p.suffix in (".onnx", ".xml", ".bin", ".data"))
            self._fingerprint = files_fingerprint(files)
        return self._fingerprint


class ExportedEncoder:
    """An exported InternViT graph behind `InternVisionModel`'s inference surface (see module docstring)."""

    dtype = torch.float32

    def __init__(self, runner, *, config: InternVisionConfig, manifest: dict, folder: Path, backend: str,
                 precision: str, checkpoint=None, load_seconds: float = 0.0, notes: Sequence[str] = ()) -> None:
        self._run = runner
        self.notes = tuple(notes)  # how the graph was compiled, where that differs from the plain precision
        self.config = config
        self.manifest = manifest
        self.folder = folder
        self.backend = backend
        self.precision = precision
        self.checkpoint = checkpoint if checkpoint is not None else ExportCheckpoint(folder, manifest)
        self.layers = tuple(manifest["layers"])  # hidden_states indices output, the last layer included
        self.batch = manifest["batch"] if manifest["batch"] != "dynamic" else None
        self.load_seconds = load_seconds
        self.device = torch.device("cpu")  # where inputs are read from and outputs returned
        self.training = False

    def __repr__(self) -> str:
        return f"ExportedEncoder({self.folder}, backend={self.backend}, precision={self.precision})"

    # -- the nn.Module-like surface
    def eval(self) -> ExportedEncoder:
        return self

    def to(self, *args, **kwargs) -> ExportedEncoder:
        return self  # a compiled graph stays where it was compiled; inputs and outputs are CPU tensors

    def require_layers(self, wanted: Sequence[int]) -> None:
        """Fail before any work if `wanted` (hidden_states indices, -1 = last) asks for a layer not exported."""
        L = self.config.num_hidden_layers
        missing = sorted({L if i == -1 else (i + L + 1 if i < 0 else i) for i in wanted} - set(self.layers))
        if missing:
            raise LayerNotExportedError(
                f"{self.folder}: layer(s) {missing} are not in this export (it outputs hidden_states "
                f"{list(self.layers)}); export again with --layers {','.join(map(str, missing))}")

    def __call__(self, pixel_values: torch.Tensor | None = None, *, output_hidden_states: bool = False,
                 **kwargs) -> InternVisionOutput:
        return self.forward(pixel_values, output_hidden_states=output_hidden_states, **kwargs)

    def forward(self, pixel_values: torch.Tensor | None = None, *, output_hidden_states: bool = False,
                pixel_embeds=None) -> InternVisionOutput:
        if pixel_embeds is not None:
            raise ValueError(f"{self.folder}: pixel_embeds need the torch backend (the graph starts at the pixels)")
        if pixel_values is None:
            raise ValueError("pass pixel_values [B, 3, H, W]")
        S = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"{self.folder}: the exported graph takes [B, 3, {S}, {S}] tiles, got "
                             f"{tuple(pixel_values.shape)} (other sizes need the torch backend)")
        x = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        B = x.shape[0]
        if self.batch is None:
            outs = self._run(x)
        else:  # a fixed batch: full batches, the last one padded
            parts = []
            for i in range(0, B, self.batch):
                chunk = x[i:i + self.batch]
                n = chunk.shape[0]
                if n < self.batch:
                    chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), chunk.dtype)])
                parts.append([o[:n] for o in self._run(chunk)])
            outs = [np.concatenate(p) for p in zip(*parts)]
        bad = nonfinite_fraction(outs)
        if bad:
            raise NonFiniteOutputError(nonfinite_message(self.folder, self.backend, self.precision, bad,
                                                         "this input", self.notes))
        tensors = [torch.from_numpy(np.ascontiguousarray(o, dtype=np.float32)) for o in outs]
        last = tensors[0]
        hidden = None
        if output_hidden_states:
            by_layer = {self.config.num_hidden_layers: last}
            by_layer.update(zip(self.layers[:-1], tensors[1:]))
            hidden = ExportedHiddenStates(by_layer, self.config.num_hidden_layers, str(self.folder))
        return InternVisionOutput(last_hidden_state=last, pooler_output=last[:, 0], hidden_states=hidden)

    def forward_intermediates(self, pixel_values: torch.Tensor, indices: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        """timm's `forward_intermediates` surface: the hidden states at `indices` (0 = embeddings, -1 = last),
        one tensor per index, each of them an output of the graph (else the error names the `--layers` needed)."""
        self.require_layers(indices)
        out = self.forward(pixel_values, output_hidden_states=True)
        return [out.hidden_states[i] for i in indices]

    # -- loading
    @classmethod
    def load(cls, folder: str | os.PathLike, *, backend: str | None = None, dtype=None,
             device: str | torch.device | None = None, cache: bool = True, checkpoint=None) -> ExportedEncoder:
        """Load an export folder with OpenVINO (IR or ONNX) or onnxruntime (ONNX)."""
        folder = Path(os.fspath(folder).removeprefix("local-dir:"))
        if folder.is_file():
            folder = folder.parent
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        fmt = manifest["format"]
        if backend in (None, "auto"):
            backend = "openvino" if fmt == "openvino" else "onnxruntime"
        if backend == "torch":
            raise ExportError(f"{folder}: an exported {fmt} model, not a checkpoint; load it with backend="
                              f"'{'openvino' if fmt == 'openvino' else 'onnxruntime'}', or load its source "
                              f"{manifest['source']['model']} with the torch backend")
        if backend not in ("openvino", "onnxruntime"):
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "onnxruntime" and fmt != "onnx":
            raise ExportError(f"{folder}: an OpenVINO IR; onnxruntime runs ONNX exports (--format onnx); use "
                              "backend='openvino'")
        exported = manifest["precision"]
        want = parse_dtype(dtype)
        precision = exported
        if want is not None and exported == "int8":
            raise ExportError(f"{folder}: an int8 export runs in int8; leave dtype unset (or load the source "
                              f"{manifest['source']['model']} for {str(want).removeprefix('torch.')})")
        if want is not None:
            precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(want)
            if precision is None or (backend == "onnxruntime" and precision != "fp32"):
                allowed = "fp32 or bf16" if backend == "openvino" else "fp32"
                raise ExportError(f"{folder}: dtype {str(want).removeprefix('torch.')} is not available with the "
                                  f"{backend} backend (use {allowed})")
        config = InternVisionConfig.from_json(folder / "config.json")
        t = time.perf_counter()
        model_path = folder / manifest["model_file"]
        probe = probe_pixels(config.image_size, manifest["batch"] if manifest["batch"] != "dynamic" else 1)
        if backend == "openvino":
            runner, notes = _openvino_runner(model_path, precision, device, cache, probe, folder)
        else:
            runner, notes = _onnxruntime_runner(model_path, device), []
            bad = nonfinite_fraction(runner(probe))
            if bad:
                raise NonFiniteOutputError(nonfinite_message(folder, backend, precision, bad, "its probe input", ()))
        for note in notes:
            warnings.warn(f"{folder}: {note}", RuntimeWarning, stacklevel=2)
        return cls(runner, config=config, manifest=manifest, folder=folder, backend=backend, precision=precision,
                   checkpoint=checkpoint, load_seconds=time.perf_counter() - t, notes=notes)


# ---- checking outputs ------------------------------------------------------------------------------------------

PROBE_SEED = 0


def probe_pixels(image_size: int, batch: int = 1) -> np.ndarray:
    """The probe input every compiled graph runs first: [batch, 3, S, S] normal noise clipped to +-2.5 (the range
    of normalized pixels), the same on every machine."""
    rng = np.random.default_rng(PROBE_SEED)
    return rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32).clip(-2.5, 2.5)


def nonfinite_fraction(outputs: Sequence[np.ndarray]) -> float:
    """The fraction of NaN or infinite values over all `outputs` (0.0 when all are finite)."""
    bad = sum(int(o.size - np.count_nonzero(np.isfinite(o))) for o in outputs)
    return bad / max(1, sum(o.size for o in outputs))


def nonfinite_message(folder, backend: str, precision: str, fraction: float, what: str, notes: Sequence[str]) -> str:
    """What `NonFiniteOutputError` says: the export, the runtime, the CPU, the precision, and the way out."""
    if backend == "openvino":
        ov = importlib.import_module("openvino")
        runtime = f"OpenVINO {ov.get_version().split('-')[0]}"
    else:
        runtime = f"onnxruntime {importlib.import_module('onnxruntime').__version__}"
    way_out = {"bf16": "load it with dtype='fp32' (--dtype fp32), or use backend='torch' with dtype bf16",
               "int8": "use an fp32 export or the torch backend"}.get(precision, "use the torch backend")
    tried = f" (tried: {'; '.join(notes)})" if notes else ""
    return (f"{folder}: the exported encoder returned non-finite values ({fraction:.1%} NaN or inf) on {what}, "
            f"{runtime} in {precision} on {cpu_name()}{tried}; {way_out} (docs/export.md, 'Non-finite outputs')")


# ---- OpenVINO: what stays fp32 in bf16 ------------------------------------------------------------------------

# The retry of a bf16 graph whose probe is not finite: the attention, the kernel whose inner dimensions (head size,
# token count) are not multiples of the AMX tile (docs/export.md), is compiled without OpenVINO's fused
# (snippets) attention kernel, and kept in fp32 where OpenVINO keeps the SDPA node whole.
SAFER_BF16 = "compiled without the fused bf16 attention kernel (SNIPPETS_MODE=DISABLE, attention nodes marked fp32): " \
             "the default bf16 compilation gave non-finite values on the probe input"


def _is_const(value) -> bool:
    node = value.get_node()
    while node.get_type_name() == "Convert" and node.get_input_size():  # fp16-compressed weights
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def keep_fp32(ov_model, *, attention: bool = False) -> list[str]:
    """The names of the precision-sensitive nodes of a graph that a bf16 compilation keeps in fp32.

    Always: the LayerNorms (MVN, then its scale and shift) and the residual stream (an Add of two computed
    tensors, and the layer-scale Multiply feeding it), as torch keeps its norms in fp32. With `attention`: also the
    attention (the SDPA node, Softmax, and the MatMuls of two computed tensors)."""
    names = []
    for node in ov_model.get_ordered_ops():
        kind = node.get_type_name()
        computed = [v for v in node.input_values() if not _is_const(v)]
        if kind == "MVN":
            names.append(node.get_friendly_name())
            for affine in _consumers(node, ("Multiply",)):  # LayerNorm's weight, then its bias
                names.append(affine.get_friendly_name())
                names += [bias.get_friendly_name() for bias in _consumers(affine, ("Add",))]
        elif kind == "Add" and len(computed) == 2:  # residual: x + f(x) (* ls)
            names.append(node.get_friendly_name())
            for v in computed:
                scale = v.get_node()
                if scale.get_type_name() == "Multiply" and any(_is_const(u) for u in scale.input_values()):
                    names.append(scale.get_friendly_name())
        elif attention and (kind in ("ScaledDotProductAttention", "Softmax")
                            or (kind == "MatMul" and len(computed) == 2)):
            names.append(node.get_friendly_name())
    return names


def read_marked(core, path: Path, names: Sequence[str]):
    """Read the IR at `path` with the layers `names` marked to keep their precision.

    The mark is the IR attribute `DisablePrecisionConversion` (what OpenVINO writes for nodes kept out of f16),
    which the CPU plugin also honours for bf16 inference; it is typed in C++ and not settable from Python, so it
    is written into a copy of the XML (kilobytes), read beside a link to the original weights."""
    import tempfile
    import xml.etree.ElementTree as ET

    tree = ET.parse(path)
    wanted = set(names)
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") in wanted:
            rt = layer.find("rt_info")
            if rt is None:
                rt = ET.Element("rt_info")
                layer.insert(1 if layer.find("data") is not None else 0, rt)
            ET.SubElement(rt, "attribute", {"name": "DisablePrecisionConversion", "version": "0",
                                             "value": "dynamic:f16"})
    with tempfile.TemporaryDirectory(prefix="internvit-ir-") as tmp:
        xml = Path(tmp) / path.name
        tree.write(xml)
        os.symlink(path.with_suffix(".bin").resolve(), xml.with_suffix(".bin"))
        return core.read_model(str(xml))


def _consumers(node, kinds: tuple[str, ...]) -> list:
    return [i.get_node() for i in node.output(0).get_target_inputs() if i.get_node().get_type_name() in kinds]


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _openvino_runner(path: Path, precision: str, device, cache: bool, probe: np.ndarray, folder: Path):
    """Compile the graph for the CPU and check it on `probe`: (run, notes); in bf16, retried with the attention in
    fp32 when the probe's outputs are not finite."""
    ov = require("openvino", "openvino", "the openvino backend")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        raise ExportError(f"--device {dev}: the openvino backend runs on the CPU here (use the onnxruntime "
                          "backend with onnxruntime-gpu for CUDA, or torch)")
    core = ov.Core()
    if cache:
        blobs = cache_root() / "openvino_blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(blobs)})
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": _threads()}
    if precision in ("fp32", "bf16"):
        config["INFERENCE_PRECISION_HINT"] = "f32" if precision == "fp32" else "bf16"
    plain = core.read_model(str(path))
    notes: list[str] = []
    for attention in ((False, True) if precision == "bf16" else (False,)):
        model = plain
        if precision == "bf16" and path.suffix == ".xml":
            model = read_marked(core, path, keep_fp32(plain, attention=attention))
        run = _openvino_run(core.compile_model(model, "CPU", config | ({"SNIPPETS_MODE": "DISABLE"} if attention else {})))
        bad = nonfinite_fraction(run(probe))
        if not bad:
            return run, notes
        if precision == "bf16" and not attention:
            notes.append(SAFER_BF16)
    raise NonFiniteOutputError(nonfinite_message(folder, "openvino", precision, bad, "its probe input", notes))


def _openvino_run(compiled):
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(x: np.ndarray) -> list[np.ndarray]:
        result = request.infer({0: x}, share_inputs=True)
        return [np.array(result[o]) for o in outputs]  # copies: the request's buffers are reused by the next call

    return run


def _onnxruntime_runner(path: Path, device):
    ort = require("onnxruntime", "onnx", "the onnxruntime backend")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    available = ort.get_available_providers()
    if dev.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ExportError(f"--device {dev}: this onnxruntime ({ort.__version__}) has no CUDA provider (it has "
                              f"{', '.join(available)}); install onnxruntime-gpu instead of onnxruntime")
        cuda = ("CUDAExecutionProvider", {"device_id": dev.index or 0})
        providers = ([("TensorrtExecutionProvider", {"device_id": dev.index or 0})]
                     if "TensorrtExecutionProvider" in available else []) + [cuda, "CPUExecutionProvider"]
    elif dev.type == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise ExportError(f"--device {dev}: the onnxruntime backend runs on cpu or cuda")
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=providers)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {name: x})

    return run
