"""Choices by measurement, not by vendor: the CPU attention path and chunk of the torch model, and `backend="auto"`.

Which attention path (`sdpa` or `blocked`), how many images per CPU pass, and which backend is fastest depend on
the CPU (AMX or AVX-512 BF16, cache sizes), the library versions and the dtype: on AMD EPYC the blocked attention
is 2.5x faster than torch's flash kernel in bf16 and OpenVINO beats torch, on an Intel Xeon with AMX both are the
other way round (docs/performance.md). So they are measured on first use:

- `tune_torch(model)`: one encoder layer of the model in use, at its real shapes ([chunk, N, C], its dtype),
  timed for each attention path and chunk of 1, 2 or 4 images (about a second for the 300M, milliseconds for the
  tiny test model); the fastest per image is applied with `InternVisionModel.set_cpu_plan`.
- `choose_backend(...)`: each candidate backend of the requested precision (torch, OpenVINO, onnxruntime for fp32)
  runs a batch of `BACKEND_BATCH` probe tiles; the fastest is used. Precision never changes: only paths of the
  dtype asked for are compared.

Results are cached in `cache_root()/autotune.json`, keyed by the machine (CPU model, threads, library versions:
`machine_key`) and the choice (model shape, dtype, batch), with the figures they were chosen on
(`internvit doctor` prints them). `INTERNVIT_AUTOTUNE=0` turns measuring off: then the static defaults
(`static_plan`, `backends.static_backend`) apply. A forced choice (`attn_implementation="sdpa"`,
`backend="openvino"`) is never overridden.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from internvit._fileio import atomic_write
from internvit.machine import cpu_flags, cpu_name, versions
from internvit.model.vision import CPU_INFERENCE_CHUNK, InternVisionModel
from internvit.runtime import cache_root, probe_pixels

ENV = "INTERNVIT_AUTOTUNE"
CACHE_NAME = "autotune.json"
ATTENTIONS = ("sdpa", "blocked")
CHUNKS = (1, 2, 4)
BACKEND_BATCH = 2  # tiles per timed call when choosing a backend (extract's and serve's usual micro-batch)
REPEATS = 3  # timed runs after one warm-up; the best counts


def enabled() -> bool:
    """Whether measuring is on (`INTERNVIT_AUTOTUNE` is not "0")."""
    return os.environ.get(ENV, "1").strip() != "0"


def cache_path() -> Path:
    return cache_root() / CACHE_NAME


def machine_key() -> str:
    """What a measurement holds for: the CPU model, the threads torch uses and the library versions."""
    v = versions()
    libs = " ".join(f"{k}={v[k].split('+')[0]}" for k in ("internvit", "torch", "openvino", "onnxruntime") if k in v)
    return f"{cpu_name()} | threads={torch.get_num_threads()} | {libs}"


def shape_key(config) -> str:
    """The model shape a measurement was made at (width, depth, heads, MLP width, tile size)."""
    return (f"C{config.hidden_size}-L{config.num_hidden_layers}-H{config.num_attention_heads}-"
            f"I{config.intermediate_size}-S{config.image_size}")


def cached_choices() -> dict[str, dict]:
    """This machine's cached choices: {choice key: {"choice", "figures", "measured"}} ({} when none)."""
    try:
        return json.loads(cache_path().read_text()).get(machine_key(), {})
    except (OSError, ValueError):
        return {}


def _store(key: str, entry: dict) -> None:
    """Add one choice to the cache file (read, update, atomic rename: a lost race only means a re-measurement)."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault(machine_key(), {})[key] = entry
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n"))


def _measured(key: str, measure: Callable[[], tuple[object, dict]]) -> tuple[object, dict, bool]:
    """(choice, figures, from the cache?) of `key`: cached, else measured now and stored."""
    hit = cached_choices().get(key)
    if hit is not None:
        return hit["choice"], hit["figures"], True
    choice, figures = measure()
    _store(key, {"choice": choice, "figures": figures, "measured": dt.datetime.now().isoformat(timespec="seconds")})
    return choice, figures, False


def _best_seconds(run: Callable[[], object]) -> float:
    run()
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


# ---- the torch model's CPU inference plan -------------------------------------------------------------------


def static_plan(dtype: torch.dtype) -> dict:
    """The documented defaults where nothing is measured: blocked attention for bf16/fp16, SDPA for fp32, and
    `CPU_INFERENCE_CHUNK` images per pass."""
    return {"attention": "blocked" if dtype in (torch.bfloat16, torch.float16) else "sdpa",
            "chunk": CPU_INFERENCE_CHUNK}


@torch.inference_mode()
def _measure_layer(model: InternVisionModel, attentions: tuple[str, ...]) -> tuple[dict, dict]:
    """Seconds per image of one encoder layer, per attention path and chunk, at the model's real token count."""
    config, layer = model.config, model.encoder.layers[0]
    N = 1 + config.grid_size**2
    gen = torch.Generator().manual_seed(0)
    figures: dict[str, dict[str, float]] = {}
    try:
        for attention in attentions:
            layer.attn.implementation = attention
            figures[attention] = {}
            for chunk in CHUNKS:
                x = torch.randn(chunk, N, config.hidden_size, generator=gen).to(model.dtype)
                figures[attention][str(chunk)] = _best_seconds(lambda: layer(x)) / chunk
    finally:
        layer.attn.choose_implementation()
    attention, chunk = min(((a, int(c)) for a in figures for c in figures[a]), key=lambda ac: figures[ac[0]][str(ac[1])])
    return {"attention": attention, "chunk": chunk}, {"seconds_per_image_per_layer": figures}


def tune_torch(model: InternVisionModel) -> dict:
    """Measure (or read from the cache) the fastest CPU attention path and chunk for `model`'s shape and dtype on
    this machine, and apply it (`set_cpu_plan`). Returns {"attention", "chunk", "figures", "source"}; source is
    "measured", "cache", "static" (measuring off, or not a CPU model) or "forced" (the attention was chosen by
    the caller: then only the chunk is measured)."""
    dtype = model.dtype
    forced = model.encoder.layers[0].attn.attn_implementation if model.encoder.layers else "auto"
    if model.device.type != "cpu" or not enabled():
        return static_plan(dtype) | {"figures": {}, "source": "static"}
    attentions = ATTENTIONS if forced == "auto" else (forced,)
    key = f"torch|{shape_key(model.config)}|{str(dtype).removeprefix('torch.')}|{'/'.join(attentions)}"
    choice, figures, hit = _measured(key, lambda: _measure_layer(model, attentions))
    model.set_cpu_plan(dtype, attention=choice["attention"] if forced == "auto" else None, chunk=choice["chunk"])
    source = "forced" if forced != "auto" else ("cache" if hit else "measured")
    return dict(choice) | {"figures": figures, "source": source}


# ---- backend="auto" -------------------------------------------------------------------------------------------


def choose_backend(config, dtype: torch.dtype, candidates: dict[str, Callable[[], object]]) -> tuple[str, dict, bool]:
    """The fastest of `candidates` ({backend: a loader of that backend's encoder in `dtype`}) on a batch of
    `BACKEND_BATCH` probe tiles: (backend, figures in tiles/s, from the cache?). Each encoder is loaded, timed and
    dropped in turn, so one model is in memory at a time."""
    names = sorted(candidates)
    key = f"backend|{shape_key(config)}|{str(dtype).removeprefix('torch.')}|batch{BACKEND_BATCH}|{'/'.join(names)}"

    def measure() -> tuple[str, dict]:
        x = torch.from_numpy(probe_pixels(config.image_size, BACKEND_BATCH)).to(dtype)
        figures = {}
        for name in names:
            encoder = candidates[name]()
            with torch.inference_mode():
                figures[name] = BACKEND_BATCH / _best_seconds(lambda: encoder(x))
            del encoder
        return max(figures, key=figures.get), {"tiles_per_s": figures}

    choice, figures, hit = _measured(key, measure)
    return choice, figures, hit


# ---- internvit doctor -----------------------------------------------------------------------------------------


def describe() -> str:
    """What `internvit doctor` prints: the machine, the libraries, the switch, the cache and every choice
    measured on this machine with the figures it was made on."""
    flags = cpu_flags()
    amx = "AMX" if "amx_bf16" in flags else "no AMX"
    lines = [f"machine: {cpu_name()}; {os.cpu_count()} CPUs, torch uses {torch.get_num_threads()} threads; "
             f"ISA: {' '.join(flags) or '-'} ({amx})",
             "libraries: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
             f"autotune: {'on' if enabled() else 'off'} ({ENV}=0 turns it off); cache {cache_path()}",
             f"static defaults: attention blocked for bf16/fp16, sdpa for fp32; {CPU_INFERENCE_CHUNK} images per "
             "CPU pass"]
    choices = cached_choices()
    if not choices:
        lines.append("measured on this machine: nothing yet (a model loaded with attn_implementation='auto' or "
                     "backend='auto' measures its choices; `internvit doctor --model M` does it now)")
    else:
        lines.append("measured on this machine:")
    for key, entry in sorted(choices.items()):
        kind, shape, dtype, *rest = key.split("|")
        figures = entry["figures"]
        if kind == "torch":
            c = entry["choice"]
            per = figures["seconds_per_image_per_layer"]
            table = "; ".join(f"{a}: " + ", ".join(f"{k} img {1e3 * s:.3g}" for k, s in sorted(per[a].items(),
                              key=lambda kv: int(kv[0]))) for a in sorted(per))
            lines.append(f"  torch {shape} {dtype}: attention {c['attention']}, {c['chunk']} images per pass "
                         f"(ms per image per layer: {table}; {entry['measured']})")
        else:
            rates = ", ".join(f"{b} {r:.3g}" for b, r in sorted(figures["tiles_per_s"].items()))
            lines.append(f"  backend auto {shape} {dtype} {rest[0]}: {entry['choice']} (tiles/s: {rates}; "
                         f"{entry['measured']})")
    return "\n".join(lines)

