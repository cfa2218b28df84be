"""Shared fixtures: seeding, the tiny config and checkpoint, photos, and the one random 300M of the parity tests.

Plain helpers (random weights, key renames written from spec/peers.md, checkpoint writers, the spec's forward
pass) are in tests/helpers.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from helpers import (
    PHOTOS,
    assign_weights,
    official_config_300m,
    randomize_,
    save_safetensors,
    timm_to_official,
    write_official_checkpoint,
)
from torch import nn

import internvit
from internvit.weights import init_checkpoint


# ---- seeding and threads ----------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)
    # Exports of checkpoints and OpenVINO's compiled blobs go to a folder of this session, never to ~/.cache
    # (set before any Ray instance starts, so that its workers inherit it).
    import os
    import tempfile

    os.environ["INTERNVIT_CACHE"] = config._internvit_cache = tempfile.mkdtemp(prefix="internvit-cache-")
    # The documented static CPU choices, not timings of a loaded CI machine (tests/unit/test_autotune.py turns
    # measuring on where it is the point).
    os.environ["INTERNVIT_AUTOTUNE"] = "0"


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    if getattr(config, "_internvit_cache", None):
        shutil.rmtree(config._internvit_cache, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> internvit.InternVisionConfig:
    return internvit.PRESETS["tiny"]


@pytest.fixture
def randomize():
    return randomize_


# ---- files the integration tests share: a tiny checkpoint, photographs, and bad files among them --------------


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint (fp32, seed 3) in the official layout; tests read it and never change it."""
    return init_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=3, dtype="fp32")


@pytest.fixture(scope="session")
def tiny_ckpt_448(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_ckpt` with the model card's 448-px CLIP preprocessing (tiny's own is 56 px), for tests where the size
    of a tile matters (its cost, a resize's memory)."""
    import json
    import shutil

    from internvit.registry import PREPROCESSOR_CONFIG

    out = shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("ckpt448") / "tiny448")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    return out


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photographs: the four of PHOTOS as JPEG, and a grayscale PNG two folders down."""
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("photos")
    (root / "nested" / "deeper").mkdir(parents=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skdata, name)()).save(root / f"{name}.jpg", quality=92)
    Image.fromarray(skdata.camera()).save(root / "nested" / "deeper" / "camera.png")
    return root


@pytest.fixture
def messy_dir(photo_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of photo_dir plus every kind of bad file; returns the folder and the expected error fragment per bad
    file (`missing.jpg` is not in the folder: a test names it to get the "no such file" row)."""
    root = tmp_path / "messy"
    for p in photo_dir.rglob("*.*"):
        target = root / p.relative_to(photo_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not a picture\n")
    good = (root / "astronaut.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (2000, 1500), (10, 20, 30)).save(root / "huge.png")  # over a --max-pixels of 1e6
    (root / "README.md").write_text("not an image extension: skipped by the folder walk\n")
    return root, {"empty.jpg": "empty", "notes.jpg": "not an image", "truncated.jpg": "truncated",
                  "huge.png": "max_pixels", "missing.jpg": "no such file"}


# ---- one random 300M, written once per module that uses it; its users build one model at a time ----------


@dataclass
class Random300M:
    """One set of random 300M weights on disk, in timm's and the official layout (no model kept in memory: the
    parity tests build each implementation in turn, so that at most two 1.2 GB models are alive at once)."""

    timm_file: Path  # timm's state dict as saved by timm (timm layout), no config.json next to it
    official_dir: Path  # the same weights, official keys (test-written renames) + the official config.json

    def timm_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return {k: v.to(dtype) for k, v in load_file(self.timm_file).items()}

    def timm_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """timm's `vit_intern300m_patch14_448` with these weights, built on the meta device and given the loaded
        tensors (no second copy), in eval mode."""
        import timm

        with torch.device("meta"):
            model = timm.create_model("vit_intern300m_patch14_448", pretrained=False)
        return assign_weights(model, self.timm_state_dict(dtype))


@pytest.fixture(scope="module")
def random_300m(tmp_path_factory: pytest.TempPathFactory) -> Random300M:
    """One random InternViT-300M: timm's model with randomised weights, written in timm's and the official layout."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_intern300m_patch14_448", pretrained=False)
    randomize_(model, seed=300)
    root = tmp_path_factory.mktemp("random_300m")
    sd = model.state_dict()
    timm_file = save_safetensors(sd, root / "timm" / "model.safetensors")
    official_dir = write_official_checkpoint(root / "official", timm_to_official(sd), official_config_300m())
    return Random300M(timm_file=timm_file, official_dir=official_dir)
