"""`internvit init` and `internvit extract` as a user runs them: real photos, broken files, resume after kill -9.

The features of the extract run are checked against an independent pipeline: transformers' CLIPImageProcessorPil
for the pixels and timm's ViT for the forward pass, loaded with the same checkpoint through a key mapping written
here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import PHOTOS, official_to_timm
from PIL import Image
from safetensors.torch import load_file

from internvit import PRESETS

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "internvit.cli"]


def run_cli(*args: str, check_rc: int | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def test_init_writes_an_official_layout_checkpoint(tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    run_cli("init", str(a), "--preset", "tiny", "--seed", "3", "--dtype", "fp32", check_rc=0)
    run_cli("init", str(b), "--preset", "tiny", "--seed", "3", "--dtype", "fp32", check_rc=0)
    run_cli("init", str(c), "--preset", "tiny", "--seed", "4", check_rc=0)
    assert sorted(p.name for p in a.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()  # the seed decides
    config = json.loads((a / "config.json").read_text())
    tiny = PRESETS["tiny"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (tiny.hidden_size, tiny.num_hidden_layers)
    sa, sc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    key = "embeddings.patch_embedding.weight"
    assert sa[key].shape == (tiny.hidden_size, 3, tiny.patch_size, tiny.patch_size)
    assert (sa[key].dtype, sc[key].dtype) == (torch.float32, torch.bfloat16)  # bf16 unless --dtype says otherwise
    assert not torch.equal(sa[key].bfloat16(), sc[key])


def test_extract_folder_with_broken_files(tiny_ckpt, messy_dir, tmp_path):
    root, bad = messy_dir
    listing = tmp_path / "more.txt"
    listing.write_text(f"# a list file\n{root / 'missing.jpg'}\n{root / 'coffee.jpg'}\n\n")  # coffee: a duplicate
    out = tmp_path / "features.parquet"
    proc = run_cli("extract", str(root), str(listing), "--out", str(out), "--model", str(tiny_ckpt),
                   "--dtype", "fp32", "--batch-size", "3", "--workers", "2", "--max-pixels", "1000000",
                   "--layers", "1,-1")
    assert proc.returncode == 1, proc.stderr  # some inputs failed
    table = pq.read_table(out)
    rows = {Path(r["path"]).name: r for r in table.to_pylist()}
    assert table.num_rows == len(rows) == len(PHOTOS) + 1 + len(bad)  # one row per input, none twice
    assert all(os.path.isabs(p) for p in table.column("path").to_pylist())
    for name, fragment in bad.items():
        assert rows[name]["error"] is not None and name in rows[name]["error"]
        assert fragment in rows[name]["error"], rows[name]["error"]
        assert rows[name]["cls"] is None and rows[name]["mean"] is None
    for name in [f"{p}.jpg" for p in PHOTOS] + ["camera.png"]:
        r = rows[name]
        assert r["error"] is None
        assert len(r["cls"]) == len(r["mean"]) == 64
        assert np.isfinite(r["cls"]).all() and np.isfinite(r["mean"]).all()
        assert r["cls_l2"] == r["cls"]  # --layers -1 is the last layer (2 in the tiny preset)
        assert len(r["mean_l1"]) == 64 and r["mean_l1"] != r["mean"]
    assert (rows["astronaut.jpg"]["width"], rows["astronaut.jpg"]["height"]) == (512, 512)
    assert "5 failed" in proc.stderr or f"{len(bad)} failed" in proc.stderr


def test_extract_matches_independent_pipeline(tiny_ckpt, photo_dir, tmp_path):
    """cls/mean from the CLI equal timm's forward on transformers' CLIP preprocessing, same weights (fp32)."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "f.parquet"
    run_cli("extract", str(photo_dir), "--out", str(out), "--model", str(tiny_ckpt), "--dtype", "fp32",
            "--workers", "0", "--quiet", check_rc=0)
    rows = {Path(r["path"]).name: r for r in pq.read_table(out).to_pylist()}

    sd = official_to_timm(load_file(tiny_ckpt / "model.safetensors"))
    vit = timm.create_model("vit_intern300m_patch14_448", pretrained=False, depth=2, embed_dim=64, num_heads=4,
                            mlp_ratio=2, img_size=56).eval()
    vit.load_state_dict(sd, strict=True)
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(str(tiny_ckpt))
    # timm resamples the 4x4 position grid to 32x32 with antialias by default; the official code does not.
    import functools

    import timm.models.vision_transformer as tvt

    original = tvt.resample_abs_pos_embed
    tvt.resample_abs_pos_embed = functools.partial(original, antialias=False)
    try:
        for name in [f"{p}.jpg" for p in PHOTOS] + ["nested/deeper/camera.png"]:
            image = Image.open(photo_dir / name).convert("RGB")
            pixels = torch.as_tensor(np.asarray(processor(image)["pixel_values"]))
            with torch.no_grad():
                tokens = vit.forward_features(pixels)[0]
            row = rows[Path(name).name]
            np.testing.assert_allclose(row["cls"], tokens[0].numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(row["mean"], tokens[1:].mean(0).numpy(), atol=1e-4, rtol=0)
    finally:
        tvt.resample_abs_pos_embed = original
    del transformers


def test_resume_after_kill_9(tiny_ckpt, photo_dir, tmp_path):
    src = Image.open(photo_dir / "astronaut.jpg").resize((1200, 900))
    imgs = tmp_path / "many"
    imgs.mkdir()
    n = 150
    for i in range(n):
        src.save(imgs / f"img{i:04d}.jpg", quality=85)
    out = tmp_path / "f.parquet"
    parts = tmp_path / "f.parquet.parts"
    args = CLI + ["extract", str(imgs), "--out", str(out), "--model", str(tiny_ckpt), "--batch-size", "2",
                  "--workers", "0", "--flush-seconds", "0", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("part-*.parquet"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"

    # What the killed run leaves is readable and holds whole rows only.
    saved = []
    for part in sorted(parts.glob("part-*.parquet")):
        saved += pq.read_table(part, columns=["path"]).column("path").to_pylist()
    assert 0 < len(saved) < n

    resumed = run_cli(*args[len(CLI):], check_rc=0)
    assert f"{len(saved)} already done" in resumed.stderr
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in imgs.iterdir())  # each input exactly once
    assert not parts.exists()  # consolidated

    # A third run has nothing to do and changes nothing.
    again = run_cli(*args[len(CLI):], check_rc=0)
    assert f"{n} already done" in again.stderr
    assert pq.read_table(out).num_rows == n


def test_extract_refuses_incompatible_resume_and_bad_model(tiny_ckpt, photo_dir, tmp_path):
    out = tmp_path / "f.parquet"
    run_cli("extract", str(photo_dir / "coffee.jpg"), "--out", str(out), "--model", str(tiny_ckpt),
            "--quiet", "--workers", "0", check_rc=0)
    proc = run_cli("extract", str(photo_dir), "--out", str(out), "--model", str(tiny_ckpt), "--dtype", "fp32",
                   "--quiet", check_rc=2)
    assert "other settings" in proc.stderr and "compute_precision: file has 'bf16', this run 'fp32'" in proc.stderr
    proc = run_cli("extract", str(photo_dir), "--out", str(tmp_path / "g.parquet"), "--model",
                   str(tmp_path / "nowhere"), check_rc=2)
    assert "nowhere" in proc.stderr and "no such file" in proc.stderr

