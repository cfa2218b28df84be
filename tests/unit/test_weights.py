"""Checkpoint loading, writing and conversion (internvit.weights) on test-written tiny checkpoints.

Layouts: official standalone (spec/internvit.md §2.1), InternVL chat (`vision_model.` prefix, sharded), the Hugging
Face cache, timm and transformers (spec/peers.md §1-2). Official-layout tensors come from the spec's key table
(tests/fixtures/make_keys_300m.py); timm and transformers checkpoints are written by timm and transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import internvit
from helpers import (
    official_config_300m,
    official_shapes,
    random_official_state_dict,
    randomize_,
    save_safetensors,
    write_official_checkpoint,
)
from internvit import PRESETS, CheckpointError, from_pretrained
from internvit.weights import convert, init_checkpoint

pytestmark = pytest.mark.unit

TINY = PRESETS["tiny"]
REPO = "OpenGVLab/InternViT-300M-448px-V2_5"
# spec §3.1
PREPROCESSOR_CONFIG = {
    "crop_size": 448, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 448,
}


def tiny_config_json() -> dict:
    """The official 300M config.json with the tiny sizes written in (what a tiny official checkpoint ships)."""
    return official_config_300m() | dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, image_size=56)


def tiny_shapes() -> dict[str, list[int]]:
    return official_shapes(hidden=64, layers=2, intermediate=128, patch=14, grid=4)


def read_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        want = v.to(dtype) if dtype else v
        assert got[k].dtype == want.dtype, k
        assert torch.equal(got[k], want), k


@pytest.fixture
def tiny_sd() -> dict[str, torch.Tensor]:
    return random_official_state_dict(TINY, seed=5)


@pytest.fixture
def official_dir(tmp_path, tiny_sd) -> Path:
    folder = write_official_checkpoint(tmp_path / "official", tiny_sd, tiny_config_json())
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    return folder


# ---- (a) official layout ----------------------------------------------------------------------------


def test_init_checkpoint_writes_the_official_layout(tmp_path):
    out = init_checkpoint(tmp_path / "ckpt", preset="tiny", seed=3)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "intern_vit_6b" and config["architectures"] == ["InternVisionModel"]
    assert config["torch_dtype"] == "bfloat16"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 4)
    # the model card's CLIP preprocessing to the preset's own tile size (56: exports of it take 56-px tiles)
    assert json.loads((out / "preprocessor_config.json").read_text()) == {**PREPROCESSOR_CONFIG, "size": 56,
                                                                          "crop_size": 56}
    stored = read_file(out / "model.safetensors")
    assert {k: list(v.shape) for k, v in stored.items()} == tiny_shapes()
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    assert all(v.float().abs().sum() > 0 for v in stored.values())  # nothing left empty

    model = from_pretrained(out)  # dtype=None keeps the stored dtype
    assert not model.training
    assert model.dtype == torch.bfloat16
    assert_state_equal(model, stored)
    y = model(torch.randn(1, 3, 56, 56, dtype=torch.bfloat16)).last_hidden_state
    assert y.shape == (1, 17, 64) and torch.isfinite(y).all()

    model32 = from_pretrained(out, dtype="fp32")
    assert_state_equal(model32, stored, torch.float32)
    model16 = from_pretrained(out, dtype=torch.float16)
    assert_state_equal(model16, stored, torch.float16)


def test_init_checkpoint_fp32_and_seeds(tmp_path):
    a = read_file(init_checkpoint(tmp_path / "a", preset="tiny", seed=0, dtype="fp32") / "model.safetensors")
    b = read_file(init_checkpoint(tmp_path / "b", preset="tiny", seed=1, dtype="fp32") / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in a.values())
    assert not torch.equal(a["encoder.layers.0.attn.qkv.weight"], b["encoder.layers.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        init_checkpoint(tmp_path / "c", preset="huge")


def test_load_test_written_official_checkpoint(official_dir, tiny_sd):
    model = from_pretrained(official_dir)
    assert model.config.hidden_size == 64 and model.config.extra["transformers_version"] == "4.37.2"
    assert_state_equal(model, tiny_sd)  # fp32 as stored
    assert model.checkpoint.preprocessor_path == official_dir / "preprocessor_config.json"
    # the weight file itself and `local-dir:` resolve to the same checkpoint
    for name in (official_dir / "model.safetensors", f"local-dir:{official_dir}"):
        assert_state_equal(from_pretrained(name), tiny_sd)


def test_bf16_load_keeps_file_tensors(tmp_path, tiny_sd):
    folder = write_official_checkpoint(tmp_path / "bf16", tiny_sd, tiny_config_json(), dtype=torch.bfloat16)
    model = from_pretrained(folder)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_state_equal(model, read_file(folder / "model.safetensors"))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the Linux memory map")
def test_load_in_stored_dtype_is_memory_mapped(tmp_path, tiny_sd):
    folder = write_official_checkpoint(tmp_path / "mmap", tiny_sd, tiny_config_json(), dtype=torch.bfloat16)
    model = from_pretrained(folder)
    weights = str((folder / "model.safetensors").resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(weights):
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            perms = line.split()[1]
            assert "p" in perms  # a private (copy-on-write) mapping: changing the model never writes the file
            ranges.append((start, end))
    assert ranges, "model.safetensors is not mapped into memory"
    outside = [n for n, p in model.named_parameters() if not any(a <= p.data_ptr() < b for a, b in ranges)]
    assert outside == []  # every parameter's data lives in the file mapping: no copy was made
    # a training step on the loaded model leaves the file unchanged
    with torch.no_grad():
        model.encoder.layers[0].ls1.add_(1.0)
    assert torch.equal(read_file(folder / "model.safetensors")["encoder.layers.0.ls1"],
                       tiny_sd["encoder.layers.0.ls1"].bfloat16())


def test_unknown_dtype(official_dir):
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        from_pretrained(official_dir, dtype="int8")


# ---- (b) Hugging Face cache, offline ----------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_cache_run(tmp_path_factory) -> tuple[dict, dict]:
    """A hub cache written by hand, then internvit run in a subprocess with HF_HUB_OFFLINE=1 and HF_HUB_CACHE."""
    root = tmp_path_factory.mktemp("hfcache")
    hub = root / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hub / "models--OpenGVLab--InternViT-300M-448px-V2_5"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    sd = random_official_state_dict(TINY, seed=7)
    snapshot = write_official_checkpoint(repo_dir / "snapshots" / commit, sd, tiny_config_json(),
                                         dtype=torch.bfloat16)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    script = textwrap.dedent(
        """
        import json, internvit
        out = {}
        for name in ["OpenGVLab/InternViT-300M-448px-V2_5", "internvit-300m-448px-v2_5",
                     "hf-hub:OpenGVLab/InternViT-300M-448px-V2_5"]:
            m = internvit.from_pretrained(name)
            out[name] = dict(hidden=m.config.hidden_size, dtype=str(m.dtype),
                             sum=float(m.embeddings.patch_embedding.weight.float().sum()),
                             weights=str(m.checkpoint.weight_files[0]))
        try:
            internvit.from_pretrained("OpenGVLab/InternViT-6B-448px-V2_5")
        except Exception as e:
            out["absent"] = dict(type=type(e).__name__, message=str(e))
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(root / "home")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), {"sd": sd, "snapshot": snapshot}


def test_offline_cache_repo_id(offline_cache_run):
    result, written = offline_cache_run
    got = result[REPO]
    assert got["hidden"] == 64 and got["dtype"] == "torch.bfloat16"
    assert got["weights"] == str(written["snapshot"] / "model.safetensors")
    expected = written["sd"]["embeddings.patch_embedding.weight"].bfloat16().float().sum().item()
    assert got["sum"] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_offline_cache_registry_name_and_hf_hub_prefix(offline_cache_run):
    result, _ = offline_cache_run
    assert result["internvit-300m-448px-v2_5"] == result[REPO]
    assert result[f"hf-hub:{REPO}"] == result[REPO]


def test_offline_cache_absent_repo(offline_cache_run):
    result, _ = offline_cache_run
    absent = result["absent"]
    assert absent["type"] == "CheckpointError"
    message = absent["message"]
    assert "OpenGVLab/InternViT-6B-448px-V2_5" in message
    assert "offline" in message.lower() or "HF_HUB_OFFLINE" in message
    assert "cache" in message


# ---- (c) InternVL chat checkpoint, sharded ----------------------------------------------------------


def write_chat_checkpoint(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    """`vision_model.` + official keys, the `mlp1` projector and a dummy LLM in 3 shards, plus an index."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(11)
    vision = {"vision_model." + k: v for k, v in sd.items()}
    first = {k: v for k, v in vision.items() if ".layers.1." not in k}
    second = {k: v for k, v in vision.items() if ".layers.1." in k}
    # projector of spec §5: LayerNorm(4C) -> Linear -> GELU -> Linear into a 32-wide toy LLM
    second |= {"mlp1.0.weight": torch.randn(256, generator=g), "mlp1.0.bias": torch.randn(256, generator=g),
               "mlp1.1.weight": torch.randn(32, 256, generator=g), "mlp1.1.bias": torch.randn(32, generator=g),
               "mlp1.3.weight": torch.randn(32, 32, generator=g), "mlp1.3.bias": torch.randn(32, generator=g)}
    llm = {"language_model.model.embed_tokens.weight": torch.randn(100, 32, generator=g),
           "language_model.lm_head.weight": torch.randn(100, 32, generator=g)}
    shards = {"model-00001-of-00003.safetensors": first, "model-00002-of-00003.safetensors": second,
              "model-00003-of-00003.safetensors": llm}
    weight_map = {}
    for name, tensors in shards.items():
        save_safetensors(tensors, folder / name)
        weight_map |= dict.fromkeys(tensors, name)
    total = sum(v.numel() * v.element_size() for t in shards.values() for v in t.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    vision_config = tiny_config_json() | {"drop_path_rate": 0.0}
    chat_config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
                   "force_image_size": 56, "select_layer": -1, "template": "internvl2_5",
                   "llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 32},
                   "vision_config": vision_config}
    (folder / "config.json").write_text(json.dumps(chat_config, indent=2))
    return folder


@pytest.fixture
def chat_dir(tmp_path, tiny_sd) -> Path:
    folder = write_chat_checkpoint(tmp_path / "chat", tiny_sd)
    # The LLM shard is never needed for the vision tower: remove it to prove it is never opened.
    (folder / "model-00003-of-00003.safetensors").unlink()
    return folder


def test_chat_checkpoint_loads_like_the_standalone(chat_dir, official_dir, tiny_sd):
    chat = from_pretrained(chat_dir)
    standalone = from_pretrained(official_dir)
    assert_state_equal(chat, tiny_sd)
    assert chat.config.hidden_size == 64 and chat.config.drop_path_rate == 0.0
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(chat(x).last_hidden_state, standalone(x).last_hidden_state)
    # the index file itself is an accepted entry point too
    assert_state_equal(from_pretrained(chat_dir / "model.safetensors.index.json"), tiny_sd)


def test_chat_checkpoint_missing_vision_shard(chat_dir):
    (chat_dir / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        from_pretrained(chat_dir)


def test_chat_checkpoint_unsharded(tmp_path, tiny_sd):
    sd = {"vision_model." + k: v for k, v in tiny_sd.items()} | {"mlp1.0.weight": torch.ones(256),
                                                                 "language_model.lm_head.weight": torch.ones(4, 4)}
    folder = tmp_path / "chat1"
    save_safetensors(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "vision_config": tiny_config_json()}))
    assert_state_equal(from_pretrained(folder), tiny_sd)


# ---- (d) timm and transformers layouts -------------------------------------------------------------


def tiny_timm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_intern300m_patch14_448", pretrained=False, depth=2, embed_dim=64, num_heads=4,
                              mlp_ratio=2, img_size=56)
    return randomize_(model, seed=21).eval()


def tiny_transformers(**overrides):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56,
                  patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                  layer_norm_eps=1e-6, use_mean_pooling=True, layer_scale_init_value=0.1) | overrides
    config = transformers.InternVLVisionConfig(**kwargs, attn_implementation="eager")
    model = transformers.InternVLVisionModel(config)
    return randomize_(model, seed=22).eval()


@torch.no_grad()
def test_timm_layout(tmp_path):
    timm_model = tiny_timm()
    path = save_safetensors(timm_model.state_dict(), tmp_path / "timm" / "model.safetensors")  # timm's own keys
    ours = from_pretrained(path)  # no config.json: the architecture is read from the shapes
    assert (ours.config.hidden_size, ours.config.num_hidden_layers, ours.config.num_attention_heads) == (64, 2, 4)
    assert ours.config.intermediate_size == 128 and ours.config.qkv_bias and ours.config.norm_type == "layer_norm"
    x = torch.randn(2, 3, 56, 56)
    want = timm_model.forward_features(x)
    got = ours(x)
    diff = (got.last_hidden_state - want).abs().max().item()
    assert diff <= 1e-5, diff
    torch.testing.assert_close(got.pooler_output, timm_model.forward_head(want, pre_logits=True), atol=1e-5, rtol=0)


@torch.no_grad()
def test_timm_layout_pickle(tmp_path):
    timm_model = tiny_timm()
    torch.save({"state_dict": timm_model.state_dict()}, tmp_path / "checkpoint.pth")  # a training-style wrapper
    ours = from_pretrained(tmp_path / "checkpoint.pth")
    x = torch.randn(1, 3, 56, 56)
    assert (ours(x).last_hidden_state - timm_model.forward_features(x)).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize(
    "overrides",
    [{}, dict(attention_bias=False, use_qk_norm=True, norm_type="rms_norm")],
    ids=["300m-flavour", "6b-flavour"],
)
def test_transformers_layout(tmp_path, overrides):
    hf = tiny_transformers(**overrides)
    hf.save_pretrained(tmp_path / "hf")  # transformers' own keys and config.json (model_type internvl_vision)
    ours = from_pretrained(tmp_path / "hf")
    assert ours.config.qk_normalization == overrides.get("use_qk_norm", False)
    for hw in [(56, 56), (56, 84)]:
        x = torch.randn(2, 3, *hw)
        diff = (ours(x).last_hidden_state - hf(x).last_hidden_state).abs().max().item()
        assert diff <= 1e-5, (hw, diff)


@torch.no_grad()
def test_transformers_full_model_prefix(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = tiny_transformers()
    sd = {"model.vision_tower." + k: v for k, v in hf.state_dict().items()}
    sd["model.multi_modal_projector.linear_1.weight"] = torch.ones(8, 256)
    save_safetensors(sd, tmp_path / "full" / "model.safetensors")
    full_config = transformers.InternVLConfig(vision_config=hf.config.to_dict()).to_dict()
    (tmp_path / "full" / "config.json").write_text(json.dumps(full_config))
    ours = from_pretrained(tmp_path / "full")
    x = torch.randn(1, 3, 56, 56)
    assert (ours(x).last_hidden_state - hf(x).last_hidden_state).abs().max() <= 1e-5


# ---- (e) clear failures -----------------------------------------------------------------------------


def test_truncated_file(official_dir):
    path = official_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        from_pretrained(official_dir)
    assert str(path) in str(info.value)


def test_empty_file(official_dir):
    path = official_dir / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty") as info:
        from_pretrained(official_dir)
    assert str(path) in str(info.value)


def test_garbage_pickle(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        from_pretrained(tmp_path)


def test_wrong_size_config(tmp_path, tiny_sd):
    folder = write_official_checkpoint(tmp_path / "mismatch", tiny_sd, official_config_300m())  # 300M config.json
    with pytest.raises(CheckpointError) as info:
        from_pretrained(folder)
    message = str(info.value)
    assert "mis-shaped" in message
    assert "embeddings.patch_embedding.weight: checkpoint (64, 3, 14, 14) vs model (1024, 3, 14, 14)" in message
    assert "missing (308): encoder.layers.10." in message  # 22 layers x 14 tensors are not in the tiny file
    assert "mis-shaped (32)" in message  # every tiny tensor has the wrong width


def test_missing_and_unexpected_keys(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    del sd["encoder.layers.1.ls2"]
    del sd["encoder.layers.0.attn.qkv.bias"]
    sd["encoder.layers.0.attn.bogus.weight"] = torch.zeros(3)
    folder = write_official_checkpoint(tmp_path / "keys", sd, tiny_config_json())
    with pytest.raises(CheckpointError) as info:
        from_pretrained(folder)
    message = str(info.value)
    assert "missing (2): encoder.layers.0.attn.qkv.bias, encoder.layers.1.ls2" in message
    assert "unexpected (1): encoder.layers.0.attn.bogus.weight" in message


def test_not_an_internvit_checkpoint(tmp_path):
    save_safetensors({"foo.weight": torch.zeros(2)}, tmp_path / "other" / "model.safetensors")
    with pytest.raises(CheckpointError, match="not an InternViT checkpoint.*foo.weight"):
        from_pretrained(tmp_path / "other")


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_config_json()))
    with pytest.raises(CheckpointError, match=r"no weights found.*config\.json"):
        from_pretrained(folder)


def test_not_a_weight_file(official_dir):
    with pytest.raises(CheckpointError, match="not a weight file"):
        from_pretrained(official_dir / "config.json")


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(CheckpointError, match="no such file or folder") as info:
        from_pretrained(missing)
    assert str(missing) in str(info.value)


def test_registry_name_that_is_also_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("internvit-300m-448px-v2_5").mkdir()
    with pytest.raises(CheckpointError, match=r"hf-hub:OpenGVLab/InternViT-300M-448px-V2_5.*local-dir:"):
        from_pretrained("internvit-300m-448px-v2_5")


# ---- (f) conversion to the official layout ----------------------------------------------------------


def test_convert_sharded_chat_checkpoint(tmp_path, chat_dir, tiny_sd):
    out = convert(chat_dir, tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    stored = read_file(out / "model.safetensors")
    assert {k: list(v.shape) for k, v in stored.items()} == tiny_shapes()  # no prefix, no mlp1, no LLM
    for k, v in tiny_sd.items():
        assert torch.equal(stored[k], v), k
    config = json.loads((out / "config.json").read_text())
    assert "vision_config" not in config and "llm_config" not in config
    assert config["hidden_size"] == 64 and config["model_type"] == "intern_vit_6b"
    assert config["torch_dtype"] == "float32"
    assert_state_equal(from_pretrained(out), tiny_sd)


def test_convert_timm_layout_to_bf16(tmp_path):
    timm_model = tiny_timm()
    path = save_safetensors(timm_model.state_dict(), tmp_path / "timm" / "model.safetensors")
    out = convert(path, tmp_path / "converted", dtype="bf16")
    stored = read_file(out / "model.safetensors")
    assert {k: list(v.shape) for k, v in stored.items()} == official_shapes(
        hidden=64, layers=2, intermediate=128, patch=14, grid=4)
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # the timm blocks.N.ls1.gamma became encoder.layers.N.ls1 with the same values
    assert torch.equal(stored["encoder.layers.1.ls1"], timm_model.blocks[1].ls1.gamma.detach().bfloat16())
    converted = from_pretrained(out, dtype="fp32")
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        want = timm_model.forward_features(x)
        got = converted(x).last_hidden_state
    # bf16-rounded weights: close, not identical
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos >= 0.999


def test_convert_keeps_preprocessor_config(tmp_path, official_dir):
    custom = PREPROCESSOR_CONFIG | {"size": 224, "crop_size": 224}
    (official_dir / "preprocessor_config.json").write_text(json.dumps(custom))
    out = convert(official_dir, tmp_path / "converted")
    assert json.loads((out / "preprocessor_config.json").read_text()) == custom


def test_public_names():
    assert internvit.CheckpointError is CheckpointError
    assert issubclass(CheckpointError, ValueError)
