"""The machine and libraries a run is on: CPU model and ISA flags, library versions.

What the autotuning cache is keyed by (`autotune.py`), what `internvit doctor` prints and what the errors of an
exported encoder name. Linux reads /proc/cpuinfo; elsewhere `platform.processor()` and no flags.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import platform

from internvit import __version__

# The ISA flags that decide which CPU kernels run (bf16/int8 matrix units), as /proc/cpuinfo spells them.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU model, with vendor family/model where the model name is generic ("AMD EPYC family 25 model 17")."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']} model {info['model']})"
    return name


def cpu_flags() -> tuple[str, ...]:
    """Which of `ISA_FLAGS` this CPU has."""
    have = set(_cpuinfo().get("flags", "").split())
    return tuple(f for f in ISA_FLAGS if f in have)


def versions() -> dict[str, str]:
    """internvit, Python and the installed versions of the numerical libraries."""
    out = {"internvit": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
