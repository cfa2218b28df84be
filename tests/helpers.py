"""Plain helpers shared by the tests (fixtures live in conftest.py): random weights that expose mis-mapped keys,
the key renames between layouts, test-written checkpoints, and the spec's forward pass.

Every checkpoint the tests load is written here or in the test itself, in the official layout (names and shapes
from the table of spec/internvit.md §2.1, via tests/fixtures/make_keys_300m.py) or in a peer's own layout.
The key renames between layouts below are written from spec/peers.md §1-2, independently of
`internvit.weights`, so that a loader bug cannot hide behind a shared mapping.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import internvit

FIXTURES = Path(__file__).parent / "fixtures"


def _load_keys_script():
    spec = importlib.util.spec_from_file_location("make_keys_300m", FIXTURES / "make_keys_300m.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


official_shapes = _load_keys_script().official_shapes


def _load_example(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The worked example's tiny Qwen2 + BPE tokenizer builder (examples/train/make_tiny_llm.py), not shipped in the package.
ROOT = Path(__file__).parents[1]
build_tiny_llm = _load_example(ROOT / "examples" / "train" / "make_tiny_llm.py").build_tiny_llm
# The outlier-channel injection of the int8 benchmark, which the int8 tests reuse (benchmarks import no tests).
inject_outlier_channels = _load_example(ROOT / "benchmarks" / "bench_int8.py").inject_outlier_channels


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


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's bundled photographs (no download)


def assign_weights(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    """A model built on the meta device, given these tensors as its own (strict, no second copy), in eval mode."""
    model.load_state_dict(sd, strict=True, assign=True)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    return model.eval()


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


def official_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> timm `vit_intern300m_patch14_448` keys (the inverse of `timm_to_official`)."""
    renamed = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
               "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
               "embeddings.patch_embedding.bias": "patch_embed.proj.bias"}
    out = {}
    for k, v in sd.items():
        if k in renamed:
            out[renamed[k]] = v
        else:
            k = k.replace("encoder.layers.", "blocks.")
            out[k + ".gamma" if k.endswith((".ls1", ".ls2")) else k] = v
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


# ---- the spec's forward pass, written in the test ---------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # spec §2.5.4: normalise in fp32, cast back to the input dtype, then multiply by the weight
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def reference_embeddings(sd: dict, cfg: internvit.InternVisionConfig, pixels: torch.Tensor) -> torch.Tensor:
    C, g = cfg.hidden_size, cfg.image_size // cfg.patch_size
    patches = F.conv2d(pixels, sd["embeddings.patch_embedding.weight"], sd["embeddings.patch_embedding.bias"],
                       stride=cfg.patch_size)
    B, _, h, w = patches.shape
    tokens = patches.flatten(2).transpose(1, 2)
    pos = sd["embeddings.position_embedding"]
    grid = pos[:, 1:].float().reshape(1, g, g, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    patch_pos = grid.reshape(1, C, h * w).permute(0, 2, 1).to(pos.dtype)
    x = torch.cat([sd["embeddings.class_embedding"].expand(B, 1, C), tokens], dim=1)
    return x + torch.cat([pos[:, :1], patch_pos], dim=1)


def reference_forward(sd: dict, cfg: internvit.InternVisionConfig, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Embedding output, then every layer's output (spec §2.4)."""
    C, H = cfg.hidden_size, cfg.num_attention_heads
    D, eps = C // H, cfg.layer_norm_eps

    def norm(t, key):
        if cfg.norm_type == "layer_norm":
            return F.layer_norm(t, (C,), sd[key + ".weight"], sd[key + ".bias"], eps)
        return rms_norm(t, sd[key + ".weight"], eps)

    x = reference_embeddings(sd, cfg, pixels)
    states = [x]
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{i}."
        B, N, _ = x.shape
        qkv = F.linear(norm(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        if cfg.qk_normalization:  # over the full width H*D, before the heads split
            q = rms_norm(q.transpose(1, 2).flatten(2), sd[p + "attn.q_norm.weight"], eps)
            k = rms_norm(k.transpose(1, 2).flatten(2), sd[p + "attn.k_norm.weight"], eps)
            q, k = (t.reshape(B, N, H, D).transpose(1, 2) for t in (q, k))
        attn = ((q * D**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]) * sd[p + "ls1"]
        h = F.gelu(F.linear(norm(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]) * sd[p + "ls2"]
        states.append(x)
    return states


# ---- InternVL's training frame sampling, transcribed from OpenGVLab/InternVL 2410d1d --------------------------
# internvl_chat/internvl/train/dataset.py: draws from the global `random` and `np.random`, as InternVL does.


def get_frame_indices(num_frames, vlen, sample='rand', fix_start=None, input_fps=1, max_num_frames=-1):
    """dataset.py lines 61-99 (the 'fps' branch left out: the stage scripts sample 'rand')."""
    if sample in ['rand', 'middle']:  # uniform sampling
        acc_samples = min(num_frames, vlen)
        # split the video into `acc_samples` intervals, and sample from each interval.
        intervals = np.linspace(start=0, stop=vlen, num=acc_samples + 1).astype(int)
        ranges = []
        for idx, interv in enumerate(intervals[:-1]):
            ranges.append((interv, intervals[idx + 1] - 1))
        if sample == 'rand':
            try:
                frame_indices = [random.choice(range(x[0], x[1])) for x in ranges]
            except:  # noqa: E722 (as InternVL)
                frame_indices = np.random.permutation(vlen)[:acc_samples]
                frame_indices.sort()
                frame_indices = list(frame_indices)
        elif fix_start is not None:
            frame_indices = [x[0] + fix_start for x in ranges]
        elif sample == 'middle':
            frame_indices = [(x[0] + x[1]) // 2 for x in ranges]
        else:
            raise NotImplementedError

        if len(frame_indices) < num_frames:  # padded with last frame
            padded_frame_indices = [frame_indices[-1]] * num_frames
            padded_frame_indices[:len(frame_indices)] = frame_indices
            frame_indices = padded_frame_indices
    else:
        raise ValueError
    return frame_indices


def read_frames_gif(vlen, num_frames, sample='rand', min_num_frames=4):
    """dataset.py lines 102-123: the indices of the GIF frames it returns (`for index, frame in enumerate(gif): if
    index in frame_indices: frames.append(frame)`)."""
    t_num_frames = np.random.randint(min_num_frames, num_frames + 1)
    frame_indices = get_frame_indices(t_num_frames, vlen, sample=sample)
    return [index for index in range(vlen) if index in frame_indices]
