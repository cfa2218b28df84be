"""What the benchmarks share: the machine and versions, where results go, timers and memory readings, the official
-> timm key map, and real-sized photos made from scikit-image's photographs. Each `bench_*.py` imports this module
(`sys.path` holds the benchmarks folder when a script runs); no benchmark imports another."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GFLOP_PER_TILE = 723.6  # the 300M at 448 px: 24 x (25.80 linears + 4.30 attention) + 1.23 patch embedding
SIZES = [(4032, 3024), (3024, 4032), (4000, 2250), (2250, 4000), (3000, 2000), (2048, 1536), (1920, 1080),
         (2448, 3264)]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in benchmarks stay on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(field: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def to_timm(sd: dict) -> dict:
    """Official keys -> timm's (spec/peers.md §1)."""
    ren = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
           "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
           "embeddings.patch_embedding.bias": "patch_embed.proj.bias"}
    out = {}
    for k, v in sd.items():
        if k in ren:
            out[ren[k]] = v
        else:
            k = k.replace("encoder.layers.", "blocks.")
            out[k + ".gamma" if k.endswith((".ls1", ".ls2")) else k] = v
    return out


def write_results(out: Path, theme: str, report: dict, md: str) -> Path:
    """Write `<out>/<theme>_<cpu>-fam<family>_<date>.{json,md}` (STYLE.md: `[theme]_[hardware]_[date]`); returns the
    path without suffix. `report` holds "machine" (from `machine()`) and "date"."""
    m = report["machine"]
    stem = out / f"{theme}_{m['cpu'].lower().replace(' ', '-')}-fam{m['cpu_family']}_{report['date']}"
    out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    return stem


def machine() -> dict:
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    fam = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("cpu family")), "?")
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model\t")), "?")
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    import importlib.metadata as md

    for name in ("timm", "transformers", "internvit", "openvino", "nncf", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cpu_family": fam, "cpu_model": model, "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags, "threads": torch.get_num_threads(),
            "versions": versions}


def make_photos(folder: Path, n: int) -> list[Path]:
    """Real-sized JPEGs: scikit-image's colour photographs, cropped, flipped and resized to camera sizes."""
    import numpy as np
    import skimage.data as data
    from PIL import Image, ImageOps

    sources = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "immunohistochemistry"):
        try:
            sources.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
        except Exception:  # a data file that would need a download
            pass
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = sources[i % len(sources)]
        w, h = SIZES[i % len(SIZES)]
        x0, y0 = int(rng.integers(0, img.width // 8)), int(rng.integers(0, img.height // 8))
        crop = img.crop((x0, y0, img.width - int(rng.integers(0, img.width // 8)), img.height))
        if i % 3 == 1:
            crop = ImageOps.mirror(crop)
        path = folder / f"photo_{i:03d}.jpg"
        crop.resize((w, h), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths
