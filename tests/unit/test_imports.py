"""`import internvit` stays light: heavy or optional libraries load only where they are used (STYLE.md §9)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def test_import_is_light():
    # tqdm is left out: torch itself imports it.
    heavy = ("transformers", "timm", "pyarrow", "PIL", "huggingface_hub", "torchvision", "av", "safetensors",
             "openvino", "onnxruntime", "onnx", "onnxscript", "nncf")
    code = f"import sys, internvit; print([m for m in {heavy!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_loading_imports_no_compiler(tiny_ckpt):
    # torch's meta kernels for randn, normal_ and mul are Python functions whose first call imports torch._dynamo
    # and sympy: ~1.5 s of a fresh process's from_pretrained, until the model was built without them (issue 21).
    code = (f"import sys, internvit; internvit.from_pretrained({str(tiny_ckpt)!r}); "
            "print([m for m in ('torch._dynamo', 'sympy') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_names_loaded_on_first_use_are_listed_and_resolve():
    import internvit

    lazy = {"from_pretrained", "ImageProcessor", "tile_image", "encode_images", "extract_features", "load_frames",
            "InternVLChatModel"}
    assert lazy <= set(dir(internvit))
    assert all(callable(getattr(internvit, name)) for name in lazy)
    assert internvit.from_pretrained.__module__ == "internvit.backends"


# ---- imports run downward (CONTRIBUTING.md "Layout") -------------------------------------------------------

SRC = Path(__file__).parents[2] / "src" / "internvit"

# Each module's layer: a module imports only from its own layer or the ones below (by the longest matching prefix).
LAYERS = {
    "_fileio": 0, "config": 0, "registry": 0,
    "checkpoint": 1, "preprocess": 1,  # files and pixels: nothing of the model
    "model": 2,  # the encoder, projector and chat model: config, checkpoint, preprocess
    "internvit": 3, "features": 3, "weights": 3, "sources": 3, "runtime": 3, "machine": 3,  # `internvit` = the package itself
    "export": 4,  # writes graphs from weights, validated by the runtime
    "autotune": 4,  # measured CPU choices (attention path, chunk, backend), cached per machine
    "backends": 5,  # from_pretrained: torch, an export, or a checkpoint exported on demand
    "extract": 6, "feature_table": 6,
    "index": 7, "probe": 7, "viz": 7,
    "serve": 8, "serve_http": 8, "train": 8,
    "cli": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def layer(module: str) -> int:
    name = module.removeprefix("internvit.") if module != "internvit" else "internvit"
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer in LAYERS: add it")


def own_imports(path: Path, me: str) -> list[tuple[ast.stmt, str, bool]]:
    """(statement, imported internvit module, at module level?) for every import of our own code in module `me`."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                names = [package + (f".{node.module}" if node.module else "")]
            elif node.module and node.module.split(".")[0] == "internvit":
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "internvit"]
        found += [(node, name, id(node) in top) for name in names]
    return found


def test_own_modules_are_imported_at_the_top():
    # cli.py is the exception: each command imports its module when it runs (several need an extra: serve,
    # train, Ray), so `internvit --help` and argument errors need none of them.
    late = [f"{p.relative_to(SRC)}:{node.lineno} imports {name}"
            for p in sorted(SRC.rglob("*.py")) if p.name != "cli.py"
            for node, name, at_top in own_imports(p, module_name(p)) if not at_top]
    assert late == []


def upward_imports(path: Path, me: str) -> list[str]:
    return [f"{me} (layer {layer(me)}) imports {name} (layer {layer(name)}), line {node.lineno}"
            for node, name, at_top in own_imports(path, me) if at_top and layer(name) > layer(me)]


def test_imports_run_downward():
    assert [line for p in sorted(SRC.rglob("*.py")) for line in upward_imports(p, module_name(p))] == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text("import torch\n\nfrom internvit.config import PRESETS\nfrom internvit.extract.core import Item\n")
    assert upward_imports(fake, "internvit.model.fake") == [
        "internvit.model.fake (layer 2) imports internvit.extract.core (layer 6), line 4"]
