"""`import internvit` stays light: heavy or optional libraries load only where they are used (STYLE.md §9)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_import_is_light():
    # tqdm is left out: torch itself imports it.
    heavy = ("transformers", "timm", "pyarrow", "PIL", "huggingface_hub", "torchvision", "av", "safetensors",
             "openvino", "onnxruntime", "onnx", "onnxscript", "nncf")
    code = f"import sys, internvit; print([m for m in {heavy!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
