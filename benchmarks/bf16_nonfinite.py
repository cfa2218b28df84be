"""Reproducer: does OpenVINO's bf16 inference of an InternViT export return NaN/inf on this CPU?

Exports the tiny test model (56-px tiles, width 64, head size 16, 17 tokens) to an OpenVINO IR once, then loads
it in bf16 in N fresh processes, two ways, and counts the processes whose outputs are not all finite:

- `openvino`: the IR compiled as OpenVINO compiles it (`INFERENCE_PRECISION_HINT=bf16`), no check: the path of the
  issue's report (14 of 15 processes non-finite on an Intel Xeon with AMX, OpenVINO 2026.4.1);
- `internvit`: `internvit.from_pretrained(ir, dtype="bf16")`: the probe at compile time, the fp32 marks and the
  retry (docs/export.md, "Non-finite outputs"). A load either gives finite outputs or raises
  `NonFiniteOutputError`; non-finite outputs returned silently are a bug.

Prints one line per process and a summary with the machine; exits 1 if an `internvit` load returned non-finite
values.

    python benchmarks/bf16_nonfinite.py [--processes 15] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def child(folder: str, mode: str, batch: int) -> dict:
    """One fresh process: load the export in bf16 (`mode`), run a fixed input twice, report what came out."""
    import numpy as np

    x = np.random.default_rng(1).standard_normal((batch, 3, 56, 56), dtype=np.float32).clip(-2.5, 2.5)
    if mode == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(Path(folder) / "openvino_model.xml"), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "bf16"})
        outs = [np.array(compiled(x)[0]) for _ in range(2)]
        notes: list[str] = []
    else:
        import torch

        import internvit
        from internvit.runtime import NonFiniteOutputError

        try:
            enc = internvit.from_pretrained(folder, dtype="bf16")
            outs = [enc(torch.from_numpy(x)).last_hidden_state.numpy() for _ in range(2)]
        except NonFiniteOutputError as e:
            return {"mode": mode, "nonfinite": None, "error": str(e)}
        notes = list(enc.notes)
    bad = sum(int(o.size - np.isfinite(o).sum()) for o in outs) / sum(o.size for o in outs)
    return {"mode": mode, "nonfinite": bad, "error": None, "notes": notes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.batch)))
        return 0

    from internvit.export import export
    from internvit.machine import cpu_flags, cpu_name, versions
    from internvit.weights import init_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint(Path(tmp) / "tiny", preset="tiny", dtype="fp32")
        folder = export(ckpt, Path(tmp) / "tiny-ov", format="openvino").path
        counts = {}
        for mode in ("openvino", "internvit"):
            nonfinite = errors = 0
            for i in range(args.processes):
                proc = subprocess.run([sys.executable, __file__, "--child", str(folder), mode, "--batch",
                                       str(args.batch)], capture_output=True, text=True, timeout=300)
                if proc.returncode:
                    raise SystemExit(f"process {i} ({mode}) failed:\n{proc.stderr}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                errors += r["error"] is not None
                nonfinite += bool(r["nonfinite"])
                what = (f"refused: {r['error']}" if r["error"] else
                        f"{r['nonfinite']:.1%} non-finite" + (f" ({'; '.join(r['notes'])})" if r["notes"] else ""))
                print(f"{mode:9s} process {i + 1:2d}: {what}", flush=True)
            counts[mode] = (nonfinite, errors)
    v = versions()
    print(f"{cpu_name()} [{' '.join(cpu_flags())}], OpenVINO {v.get('openvino')}, torch {v['torch']}: "
          f"OpenVINO bf16 directly: {counts['openvino'][0]} of {args.processes} processes non-finite; internvit: "
          f"{counts['internvit'][0]} non-finite returned, {counts['internvit'][1]} refused with an error")
    return 1 if counts["internvit"][0] else 0


if __name__ == "__main__":
    sys.exit(main())
