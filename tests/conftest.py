"""Shared fixtures: the tiny config, seeding, random weights that expose mis-mapped keys, and test-written checkpoints.

Every checkpoint the tests load is written here or in the test itself, in the official layout (names and shapes
from the table of spec/internvit.md §2.1, via tests/fixtures/make_keys_300m.py) or in a peer's own layout.
The key renames between layouts below are written from spec/peers.md §1-2, independently of
`internvit.weights`, so that a loader bug cannot hide behind a shared mapping.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import internvit

FIXTURES = Path(__file__).parent / "fixtures"


def _load_keys_script():
    spec = importlib.util.spec_from_file_location("make_keys_300m", FIXTURES / "make_keys_300m.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


official_shapes = _load_keys_script().official_shapes


# ---- seeding and threads ----------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)
    # Exports of checkpoints and OpenVINO's compiled blobs go to a folder of this session, never to ~/.cache
    # (set before any Ray instance starts, so that its workers inherit it).
    import os
    import tempfile

    os.environ["INTERNVIT_CACHE"] = config._internvit_cache = tempfile.mkdtemp(prefix="internvit-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    if getattr(config, "_internvit_cache", None):
        shutil.rmtree(config._internvit_cache, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> internvit.InternVisionConfig:
    return internvit.PRESETS["tiny"]


# ---- random weights ---------------------------------------------------------------------------------

_LAYER_SCALE = re.compile(r"(^|\.)(ls[12]|ls[12]\.gamma|lambda_[12])$")  # ours/official, timm, transformers
_NORM_WEIGHT = re.compile(r"norm[^.]*\.weight$|layernorm_(before|after)\.weight$")


def random_tensor(name: str, shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A random value for the parameter `name`, by role, so that every tensor matters in the output.

    Layer scales uniform in [0.5, 1.5], norm weights 1 + N(0, 0.1), biases N(0, 0.05) (never all zero),
    class/position embeddings N(0, 0.3), matrices N(0, 1/fan_in) so activations keep unit scale at any width.
    """
    shape = tuple(shape)
    if _LAYER_SCALE.search(name):
        return 0.5 + torch.rand(shape, generator=generator)
    if _NORM_WEIGHT.search(name):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if len(shape) <= 1:
        return 0.05 * torch.randn(shape, generator=generator)
    if re.search(r"class_embedding|position_embedding|cls_token|pos_embed", name):
        return 0.3 * torch.randn(shape, generator=generator)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=generator) * fan_in**-0.5


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter of `module` in place with `random_tensor` values (seeded)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        p.copy_(random_tensor(name, p.shape, g).to(p.dtype))
    return module


@pytest.fixture
def randomize():
    return randomize_


def random_official_state_dict(config: internvit.InternVisionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 tensors under the official names and shapes of spec §2.1, for any config."""
    shapes = official_shapes(
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        intermediate=config.intermediate_size,
        patch=config.patch_size,
        grid=config.image_size // config.patch_size,
        qkv_bias=config.qkv_bias,
        qk_norm=config.qk_normalization,
        layer_norm=config.norm_type == "layer_norm",
    )
    g = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, s, g) for k, s in shapes.items()}


# ---- layout renames written from spec/peers.md (independent of internvit.weights) -------------------


def timm_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `vit_intern300m_patch14_448` keys -> official keys (spec/peers.md §1 table)."""
    out = {}
    for k, v in sd.items():
        if k == "cls_token":
            k = "embeddings.class_embedding"
        elif k == "pos_embed":
            k = "embeddings.position_embedding"
        elif k.startswith("patch_embed.proj."):
            k = "embeddings.patch_embedding." + k.removeprefix("patch_embed.proj.")
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
            assert m, f"unexpected timm key {k}"
            i, rest = m.groups()
            rest = {"ls1.gamma": "ls1", "ls2.gamma": "ls2"}.get(rest, rest)
            k = f"encoder.layers.{i}.{rest}"
        out[k] = v
    return out


def timm_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm keys -> transformers `InternVLVisionModel` keys (spec/peers.md §1 and §2 tables, fused qkv split)."""
    out = {}
    for k, v in sd.items():
        if k == "cls_token":
            out["embeddings.cls_token"] = v
        elif k == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.removeprefix("patch_embed.proj.")] = v
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
            assert m, f"unexpected timm key {k}"
            i, rest = m.groups()
            p = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                suffix = rest.removeprefix("attn.qkv.")
                C = v.shape[0] // 3
                # rows [q | k | v]: [:C], [C:2C], [2C:] (spec §2.1; the converter's [:dim], [dim:2dim], [-dim:])
                out[p + "attention.q_proj." + suffix] = v[:C]
                out[p + "attention.k_proj." + suffix] = v[C : 2 * C]
                out[p + "attention.v_proj." + suffix] = v[2 * C :]
                continue
            renames = {
                "ls1.gamma": "lambda_1",
                "ls2.gamma": "lambda_2",
                "norm1.weight": "layernorm_before.weight",
                "norm1.bias": "layernorm_before.bias",
                "norm2.weight": "layernorm_after.weight",
                "norm2.bias": "layernorm_after.bias",
                "attn.proj.weight": "attention.projection_layer.weight",
                "attn.proj.bias": "attention.projection_layer.bias",
            }
            out[p + renames.get(rest, rest)] = v  # mlp.fc1/fc2 keep their names
    return out


# ---- checkpoint writing -----------------------------------------------------------------------------


def save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    return path


def write_official_checkpoint(
    folder: Path, sd: dict[str, torch.Tensor], config: dict, *, dtype: torch.dtype | None = None
) -> Path:
    """config.json + model.safetensors, written by the test (no internvit code involved)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.to(dtype) if dtype else v for k, v in sd.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def official_config_300m() -> dict:
    """The official 300M-448px-V2_5 config.json (spec §1), as stored in tests/fixtures/config_300m.json."""
    return json.loads((FIXTURES / "config_300m.json").read_text())


# ---- one random 300M, built once per session --------------------------------------------------------


@dataclass
class Random300M:
    timm_model: nn.Module  # timm vit_intern300m_patch14_448, random weights, fp32, eval
    timm_file: Path  # timm's state dict as saved by timm (timm layout), no config.json next to it
    official_dir: Path  # the same weights, official keys (test-written renames) + the official config.json

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        return self.timm_model.state_dict()


@pytest.fixture(scope="session")
def random_300m(tmp_path_factory: pytest.TempPathFactory) -> Random300M:
    """One random InternViT-300M: timm's model with randomised weights, written in timm's and the official layout."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_intern300m_patch14_448", pretrained=False)
    randomize_(model, seed=300)
    model.eval()
    root = tmp_path_factory.mktemp("random_300m")
    sd = model.state_dict()
    timm_file = save_safetensors(sd, root / "timm" / "model.safetensors")
    official = timm_to_official(sd)
    official_dir = write_official_checkpoint(root / "official", official, official_config_300m())
    return Random300M(timm_model=model, timm_file=timm_file, official_dir=official_dir)
