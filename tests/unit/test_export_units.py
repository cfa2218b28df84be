"""The small pieces of export and backends that need no runtime: layers, kNN overlap, hidden states, auto, resume."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.unit


def test_parse_layers_and_output_names():
    from internvit.export import ExportError, output_names, parse_layers

    assert parse_layers("12,18,-1", 24) == (12, 18)  # the last layer is last_hidden_state itself
    assert parse_layers([-25, 0, 0], 24) == (0,)
    assert parse_layers(None, 24) == ()
    assert output_names((0, 12), 24) == ["last_hidden_state", "hidden_state_0", "hidden_state_12"]
    for bad in ("25", "-26", "a,b"):
        with pytest.raises(ExportError):
            parse_layers(bad, 24)


def test_knn_overlap_counts_shared_neighbours():
    from internvit.export import knn_overlap

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 16, generator=g)
    assert knn_overlap(x, x) == 1.0
    assert knn_overlap(x, 3 * x + 0.0) == 1.0  # cosine neighbours ignore scale
    shuffled = x[torch.randperm(30, generator=g)]
    assert knn_overlap(x, shuffled) < 0.6  # unrelated features share few neighbours
    assert knn_overlap(x[:1], x[:1]) is None
    assert knn_overlap(x[:4], x[:4], k=10) == 1.0  # k shrinks to n - 1


def test_exported_hidden_states_name_the_missing_layer():
    from internvit.runtime import ExportedHiddenStates, LayerNotExportedError

    a, b = torch.zeros(1), torch.ones(1)
    hs = ExportedHiddenStates({3: a, 24: b}, 24, "out/ov")
    assert len(hs) == 25 and hs[3] is a and hs[-1] is b and hs[24] is b
    with pytest.raises(LayerNotExportedError, match=r"out/ov: layer 5 .* export again with --layers 5"):
        hs[5]
    with pytest.raises(IndexError):
        hs[25]


def test_auto_backend_prefers_openvino_on_cpu(monkeypatch):
    import internvit.backends as b

    have = {"openvino": True, "onnxruntime": True}
    monkeypatch.setattr(b, "installed", lambda name: name == "torch" or have[name])
    assert b.auto_backend("cpu", "bf16")[0] == "openvino"
    assert b.auto_backend("cuda", "bf16")[0] == "torch"
    assert b.auto_backend("cpu", "fp16")[0] == "torch"
    have["openvino"] = False
    assert b.auto_backend("cpu", "fp32")[0] == "onnxruntime"
    assert b.auto_backend("cpu", "bf16")[0] == "torch"  # onnxruntime has no bf16 CPU kernels
    have["onnxruntime"] = False
    backend, why = b.auto_backend("cpu", "fp32")
    assert backend == "torch" and "is installed" in why


def test_resume_check_reads_outputs_of_earlier_versions():
    from internvit.extract.store import OutputMismatchError, check_compatible

    run = {"model": "m", "backend": "torch", "compute_precision": "bf16", "stored_dtype": "float32", "decode": "exact",
           "jpeg_decoder": "pillow"}
    before_backends = {"model": "m", "dtype": "bfloat16"}  # torch computed in `dtype`, decoded exactly
    check_compatible(before_backends, run, path="f")
    with pytest.raises(OutputMismatchError, match="decode: file has 'exact', this run 'fast'"):
        check_compatible(before_backends, {**run, "decode": "fast"}, path="f")
    with pytest.raises(OutputMismatchError, match="jpeg_decoder: file has 'pillow', this run 'device'"):
        check_compatible(before_backends, {**run, "decode": "fast", "jpeg_decoder": "device"}, path="f")
    with pytest.raises(OutputMismatchError, match="backend: file has 'torch', this run 'openvino'"):
        check_compatible(before_backends, {**run, "backend": "openvino"}, path="f")
    # an OpenVINO bf16 run recorded its float32 inputs as `dtype` and the compute precision as `precision`
    openvino = {"model": "m", "dtype": "float32", "backend": "openvino", "precision": "bf16"}
    check_compatible(openvino, {**run, "backend": "openvino"}, path="f")
    with pytest.raises(OutputMismatchError, match="compute_precision: file has 'bf16', this run 'fp32'"):
        check_compatible(openvino, {**run, "backend": "openvino", "compute_precision": "fp32"}, path="f")


def test_missing_runtime_names_the_extra(monkeypatch, tmp_path):
    import builtins

    import internvit
    from internvit.weights import init_checkpoint

    ckpt = init_checkpoint(tmp_path / "tiny", preset="tiny", dtype="fp32")
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    monkeypatch.setattr("internvit.backends.installed", lambda name: name != "openvino")
    monkeypatch.setattr("importlib.import_module", lambda name, *a: no_openvino(name))
    with pytest.raises(ImportError, match=r"pip install 'internvit\[openvino\]'"):
        internvit.from_pretrained(ckpt, backend="openvino")
