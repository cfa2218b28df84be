"""Choices by measurement (autotune.py): the cache round trip, the switch, forced choices win, `internvit doctor`.

Never asserts on timings (a loaded CI machine would make them flaky): what is checked is that a measurement is
made, stored with its figures, read back instead of measured again, applied, and overridden by explicit choices.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import random_official_state_dict, reference_forward

import internvit
from internvit import autotune
from internvit.model.vision import InternVisionModel

pytestmark = pytest.mark.unit


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Measuring on, into a cache folder of this test."""
    monkeypatch.setenv("INTERNVIT_AUTOTUNE", "1")
    monkeypatch.setenv("INTERNVIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "autotune.json"


def write_choice(path, key: str, choice, figures: dict) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault(autotune.machine_key(), {})[key] = {"choice": choice, "figures": figures, "measured": "then"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_measured_once_stored_with_its_figures_then_read_back(tiny_ckpt, tuning):
    model = internvit.from_pretrained(tiny_ckpt, dtype="bf16")  # the torch backend measures on first use
    entries = json.loads(tuning.read_text())[autotune.machine_key()]
    (key, entry), = entries.items()
    assert key.startswith("torch|C64-L2-H4-I128-S56|bfloat16")
    per = entry["figures"]["seconds_per_image_per_layer"]
    assert set(per) == {"sdpa", "blocked"} and all(set(v) == {"1", "2", "4"} for v in per.values())
    best = min(((a, int(c)) for a in per for c in per[a]), key=lambda ac: per[ac[0]][str(ac[1])])
    assert (entry["choice"]["attention"], entry["choice"]["chunk"]) == best  # the fastest measured is chosen
    assert {layer.attn.implementation for layer in model.encoder.layers} == {best[0]}
    assert model.cpu_chunks[torch.bfloat16] == best[1]

    # Read back, not measured again: a choice written into the cache is what the next load applies.
    other = "blocked" if best[0] == "sdpa" else "sdpa"
    write_choice(tuning, key, {"attention": other, "chunk": 3}, entry["figures"])
    plan = autotune.tune_torch(internvit.from_pretrained(tiny_ckpt, dtype="bf16"))
    assert plan["source"] == "cache" and plan["attention"] == other and plan["chunk"] == 3
    # The plan applies to the dtype it was measured in; fp32 is measured on its own.
    again = internvit.from_pretrained(tiny_ckpt, dtype="bf16")
    assert again.encoder.layers[0].attn.implementation == other and again.cpu_chunks[torch.bfloat16] == 3
    assert again.float().encoder.layers[0].attn.implementation == "sdpa"  # no fp32 entry: the static default


def test_autotune_off_keeps_the_static_defaults(tiny_ckpt, tuning, monkeypatch):
    monkeypatch.setenv("INTERNVIT_AUTOTUNE", "0")
    model = internvit.from_pretrained(tiny_ckpt, dtype="bf16")
    assert autotune.tune_torch(model)["source"] == "static"
    assert {layer.attn.implementation for layer in model.encoder.layers} == {"blocked"}
    assert model.cpu_chunks == {} and not tuning.exists()
    assert internvit.backends.auto_backend("cpu", "bf16", tiny_ckpt) == internvit.backends.static_backend("cpu", "bf16")


def test_forced_choices_win(tiny_ckpt, tuning):
    shape = "C64-L2-H4-I128-S56"
    write_choice(tuning, f"torch|{shape}|bfloat16|sdpa/blocked", {"attention": "blocked", "chunk": 1}, {})
    forced = internvit.from_pretrained(tiny_ckpt, dtype="bf16", attn_implementation="sdpa")
    assert {layer.attn.implementation for layer in forced.encoder.layers} == {"sdpa"}  # the chunk is still measured
    # backend="auto" measured torch fastest: the torch model, in the precision asked for
    names = "/".join(sorted(b for b in internvit.backends.BACKENDS if internvit.backends.installed(b)))
    write_choice(tuning, f"backend|{shape}|float32|batch{autotune.BACKEND_BATCH}|{names}", "torch",
                 {"tiles_per_s": {"torch": 2.0}})
    auto = internvit.from_pretrained(tiny_ckpt, backend="auto", dtype="fp32")
    assert isinstance(auto, InternVisionModel) and auto.dtype == torch.float32
    explicit = internvit.from_pretrained(tiny_ckpt, backend="torch", dtype="fp32")
    assert isinstance(explicit, InternVisionModel)
    if internvit.backends.installed("openvino"):  # a named backend is never second-guessed by the cache
        assert internvit.from_pretrained(tiny_ckpt, backend="openvino", dtype="fp32").backend == "openvino"


@pytest.mark.parametrize("attention,chunk", [("sdpa", 1), ("blocked", 3)])
def test_any_plan_gives_the_spec_outputs(tiny_config, attention, chunk):
    sd = random_official_state_dict(tiny_config, seed=3)
    model = InternVisionModel(tiny_config).eval()
    model.load_state_dict(sd)
    model.set_cpu_plan(torch.float32, attention=attention, chunk=chunk)
    assert model.encoder.layers[0].attn.implementation == attention
    x = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        got = model(x).last_hidden_state
    torch.testing.assert_close(got, reference_forward(sd, tiny_config, x)[-1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention must be"):
        model.set_cpu_plan(torch.float32, attention="eager", chunk=2)


def test_doctor_prints_the_machine_and_the_choices(tuning):
    from internvit.machine import cpu_name

    write_choice(tuning, "backend|C64-L2-H4-I128-S56|bfloat16|batch2|openvino/torch", "torch",
                 {"tiles_per_s": {"openvino": 1.5, "torch": 2.02}})
    proc = subprocess.run([sys.executable, "-m", "internvit.cli", "doctor"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"machine: {cpu_name()}" in out and "ISA:" in out and f"torch {torch.__version__.split('+')[0]}" in out
    assert "backend auto C64-L2-H4-I128-S56 bfloat16 batch2: torch (tiles/s: openvino 1.5, torch 2.02" in out


def test_bf16_tolerance_follows_from_the_arithmetic():
    from internvit.export import bf16_min_cosine

    # r^2 = G^2 L R u^2 / 3 with u = 2^-8, R = 16, G = 3; cosine = 1 - r^2 / 2 (export.bf16_min_cosine)
    for layers, want in ((2, 0.999267), (24, 0.991211), (48, 0.982422)):
        assert bf16_min_cosine(layers) == pytest.approx(want, abs=1e-6)
