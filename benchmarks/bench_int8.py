"""int8 fidelity and speed of the 300M with outlier channels: the shipped recipe against NNCF as it comes and plain
per-tensor int8.

In one run: a random 300M checkpoint whose every linear layer reads a few channels 50-100x the rest
(`inject_outlier_channels`, also used by the int8 tests: LayerNorm weight and bias x s, the next linear's input
columns / s, so the fp32 function is unchanged), exported to ONNX once; each recipe quantizes that graph with NNCF
on the same calibration tiles (scikit-image photographs through the dynamic tiling), then runs on the same
held-out tiles; the fidelity report (`internvit.export.compare`) is against the fp32 torch model on those tiles,
and each model's speed at batch 1 against torch bf16, interleaved in this process.
Writes benchmarks/results/int8_<cpu>_<date>.{json,md}.

    python benchmarks/bench_int8.py [--calibration-size 8] [--heldout 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def inject_outlier_channels(sd, num_layers: int, *, channels: int = 3, seed: int = 0):
    """A few channels 50-100x the rest in the normalized residual stream that every linear layer reads.

    The LayerNorm weight and bias of `channels` channels are scaled by s in [50, 100] and the matching input
    columns of qkv / fc1 by 1/s: the fp32 function is unchanged, but the activations quantized at those inputs
    have the outlier channels of real ViTs (Sun et al. 2024's massive activations; Bondarenko et al. 2021).
    Also the input of the int8 tests (tests/integration/test_export.py, through tests/helpers.py).
    """
    import torch

    sd = {k: v.clone() for k, v in sd.items()}
    g = torch.Generator().manual_seed(seed)
    C = sd["encoder.layers.0.norm1.weight"].shape[0]
    for i in range(num_layers):
        idx = torch.randperm(C, generator=g)[:channels]
        scale = 50 + 50 * torch.rand(channels, generator=g)
        for norm, linear in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
            sd[f"encoder.layers.{i}.{norm}.weight"][idx] *= scale
            sd[f"encoder.layers.{i}.{norm}.bias"][idx] *= scale
            sd[f"encoder.layers.{i}.{linear}.weight"][:, idx] /= scale
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration-size", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--photos", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import numpy as np
    import openvino as ov
    import torch

    import internvit
    from internvit.export import (
        INT8_RECIPES,
        calibration_tiles,
        compare,
        export_onnx,
        quantize_int8,
        torch_reference,
    )
    from internvit.weights import save_pretrained

    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine, make_photos, write_results

    def say(line: str) -> None:
        print(f"[bench] {line}", file=sys.stderr, flush=True)

    report = {"date": dt.date.today().isoformat(), "machine": machine(), "calibration_size": args.calibration_size,
              "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = internvit.PRESETS["300m"]
        model = internvit.InternVisionModel(config)
        model.init_weights(torch.Generator().manual_seed(0))
        sd = inject_outlier_channels(model.state_dict(), config.num_hidden_layers)
        del model
        save_pretrained(sd, config, tmp / "ckpt")
        del sd
        (tmp / "photos").mkdir()
        make_photos(tmp / "photos", args.photos)
        vit = internvit.from_pretrained(tmp / "ckpt", dtype="fp32", attn_implementation="sdpa")
        tiles = calibration_tiles([tmp / "photos"], tile_size=448, calibration_size=args.calibration_size,
                                  heldout_size=args.heldout)
        report["heldout_tiles"], report["heldout_images"] = len(tiles.heldout), tiles.heldout_images
        say(f"torch fp32 reference on {len(tiles.heldout)} held-out tiles")
        ref = torch_reference(vit, tiles.heldout, ())
        (tmp / "onnx").mkdir()
        t = time.perf_counter()
        export_onnx(vit, tmp / "onnx" / "model.onnx", layers=(), batch=None)
        report["export_onnx_s"] = time.perf_counter() - t
        del vit
        core = ov.Core()
        compiled = {}
        for recipe in INT8_RECIPES:
            say(f"int8, {recipe} recipe")
            t = time.perf_counter()
            q = quantize_int8(ov.convert_model(tmp / "onnx" / "model.onnx"), tiles.calibration, hidden_size=1024,
                              recipe=recipe)
            quantize_s = time.perf_counter() - t
            compiled[recipe] = core.compile_model(q, "CPU")
            del q
            out = torch.from_numpy(np.concatenate([compiled[recipe](tiles.heldout[i:i + 1].numpy())[0]
                                                   for i in range(len(tiles.heldout))]))
            result = compare(ref, [out], ["last_hidden_state"])
            result["quantize_s"] = quantize_s
            report["recipes"][recipe] = result
            say(f"  CLS cosine min {result['cls_cosine']['min']:.4f}")

        say("speed at batch 1, interleaved with torch bf16")
        bf16 = internvit.from_pretrained(tmp / "ckpt", dtype="bf16")
        forwards = {"torch bf16": lambda x: bf16(x.to(torch.bfloat16))}
        forwards.update({f"int8 {r}": (lambda x, c=c: c(x.numpy())) for r, c in compiled.items()})
        x = tiles.heldout[:1]
        times = {k: [] for k in forwards}
        with torch.inference_mode():
            for f in forwards.values():
                f(x)
            for _ in range(args.rounds):
                for k, f in forwards.items():
                    t = time.perf_counter()
                    f(x)
                    times[k].append(time.perf_counter() - t)
        report["speed"] = {k: {"seconds": v, "tiles_per_s": 1 / min(v)} for k, v in times.items()}
    md = markdown(report)
    write_results(args.out, "int8", report, md)
    print(md)


def markdown(r: dict) -> str:
    m = r["machine"]
    base = r["speed"]["torch bf16"]["tiles_per_s"]
    lines = [
        f"# int8 on a 300M with outlier channels, {m['cpu']} (family {m['cpu_family']}), {r['date']}",
        "",
        f"{m['cores']} cores; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) +
        f". Random 300M weights with three channels 50-100x the rest at every linear layer's input (fp32 function "
        f"unchanged); {r['calibration_size']} calibration tiles; fidelity vs the fp32 torch model on "
        f"{r['heldout_tiles']} held-out tiles of {r['heldout_images']} other photographs; speed at batch 1, best "
        "of the rounds, interleaved with torch bf16 in one process.",
        "",
        "| recipe | CLS cosine min / mean | patch cosine min / mean | kNN overlap (k) | tiles/s | vs torch bf16 |",
        "|---|---|---|---|---|---|",
    ]
    for recipe, f in r["recipes"].items():
        s = r["speed"][f"int8 {recipe}"]["tiles_per_s"]
        lines.append(f"| {recipe} | {f['cls_cosine']['min']:.4f} / {f['cls_cosine']['mean']:.4f} | "
                     f"{f['patch_cosine']['min']:.4f} / {f['patch_cosine']['mean']:.4f} | "
                     f"{f['knn']['overlap']:.3f} ({f['knn']['k']}) | {s:.3f} | {s / base:.2f}x |")
    lines.append(f"| torch bf16 | | | | {base:.3f} | 1.00x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
