"""InternViT-300M forward speed: internvit's backends against timm, transformers, OpenVINO and onnxruntime used
directly, and against this machine's GEMM peak.

One run measures, on this machine, in one process per dtype with the implementations interleaved:
    - tiles/s and achieved GFLOP/s at batch 1 and 13 (12 tiles + a thumbnail), fp32 and bf16, the same random
      weights in every implementation (loaded through each one's own key layout);
    - the machine's matmul peak for the model's shapes (the four linears of a layer at the batch's row count),
      measured in the same process between the forwards, so ratios do not suffer from drift;
    - the peak RSS of a process that builds each implementation and runs one forward at the largest batch;
and, in a fresh process, the load time and RSS of a bf16 300M checkpoint with `internvit.from_pretrained`.
Writes benchmarks/results/vit_<cpu>_<date>.{json,md,png}.

Implementations (`--impls`):
    internvit, timm, transformers   torch, in the worker's dtype;
    openvino                        OpenVINO direct, as a user of optimum-intel would: the project's ONNX
                                    (`internvit export --format onnx`) compiled by `ov.Core().compile_model`,
                                    INFERENCE_PRECISION_HINT f32 or bf16;
    onnxruntime                     that ONNX in a default onnxruntime session (fp32 only);
    internvit-openvino              `internvit.from_pretrained(ckpt, backend="openvino", dtype=...)`: the cached
                                    export, compiled with internvit's settings;
    internvit-onnxruntime           `internvit.from_pretrained(ckpt, backend="onnxruntime")` (fp32 only);
    openvino-int8                   NNCF's transformer preset as it comes, on the project's ONNX (a user's int8);
    internvit-int8                  `internvit export --precision int8` (the shipped recipe).
The int8 rows are measured in the bf16 process, interleaved with torch bf16, the baseline of their ratio. Every
file-based implementation reads the same random weights, exported once by the driver before the workers run
(`--calibration-size` tiles of scikit-image photographs calibrate int8; the export times are reported).

    python benchmarks/bench_vit.py                   # the full table (about 15 minutes on 2 cores)
    python benchmarks/bench_vit.py --batches 1 --rounds 1 --impls internvit,timm   # quicker

Needs the `bench` extra (timm, transformers, matplotlib). A 448 tile is 723.6 GFLOP (spec/cpu_baseline.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    GFLOP_PER_TILE, RESULTS, machine, make_photos, reset_peak_rss, rss_mb, timed, to_timm, write_results)

TOKENS, HIDDEN, MLP = 1025, 1024, 4096
LINEAR_SHAPES = [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, MLP), (MLP, HIDDEN)]  # (in, out): qkv, proj, fc1, fc2


# ---- the worker: one implementation, one dtype ------------------------------------------------------------


def matmul_peak(torch, dtype, rows: int, repeats: int = 3) -> dict:
    """GFLOP/s of the model's four linears at `rows` rows (and at one tile's 1025 rows, the faster on CPU);
    per shape the better of the two, combined by FLOP weight (time-weighted harmonic mean)."""
    F = torch.nn.functional
    out = {}
    for m in sorted({TOKENS, rows}):
        total_flop, total_s = 0.0, 0.0
        for k, n in LINEAR_SHAPES:
            x, w, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
            F.linear(x, w, b)
            best = min(timed(lambda: F.linear(x, w, b)) for _ in range(repeats))
            total_flop += 2 * m * k * n
            total_s += best
            out.setdefault("per_shape", {})[f"{m}x{k}x{n}"] = round(2 * m * k * n / best / 1e9, 1)
        out[f"rows_{m}"] = total_flop / total_s / 1e9
    best_rate = {}
    for k, n in LINEAR_SHAPES:
        best_rate[(k, n)] = max(out["per_shape"][f"{m}x{k}x{n}"] for m in sorted({TOKENS, rows}))
    flop = [2 * k * n for k, n in LINEAR_SHAPES]
    out["peak"] = sum(flop) / sum(f / best_rate[s] for f, s in zip(flop, LINEAR_SHAPES))
    return out


EXPORTED = {"openvino", "onnxruntime", "internvit-openvino", "internvit-onnxruntime", "openvino-int8",
            "internvit-int8"}
FP32_ONLY = {"onnxruntime", "internvit-onnxruntime"}
INT8 = {"openvino-int8", "internvit-int8"}


def applies(impl: str, dtype_name: str) -> bool:
    """Whether `impl` is measured in the worker of `dtype_name` (int8 ones in the bf16 worker)."""
    if impl in INT8:
        return dtype_name == "bf16"
    return not (impl in FP32_ONLY and dtype_name != "fp32")


def build_exported(impl: str, torch, dtype, exports: Path):
    """The file-based implementations; their forward takes a torch tensor and returns [B, 1025, 1024]."""
    fp32 = dtype == torch.float32
    if impl in ("openvino", "openvino-int8"):
        import openvino as ov

        path = exports / ("onnx/model.onnx" if impl == "openvino" else "nncf-int8/model.xml")
        config = {"INFERENCE_PRECISION_HINT": "f32" if fp32 else "bf16"} if impl == "openvino" else {}
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        return lambda x: torch.from_numpy(compiled(x.float().numpy())[0])
    if impl == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(str(exports / "onnx" / "model.onnx"))
        return lambda x: torch.from_numpy(session.run(None, {"pixel_values": x.float().numpy()})[0])
    import internvit

    if impl == "internvit-int8":
        encoder = internvit.from_pretrained(exports / "int8")
    else:
        backend = impl.removeprefix("internvit-")
        encoder = internvit.from_pretrained(exports / "ckpt", backend=backend, dtype="fp32" if fp32 else "bf16")
    return lambda x: encoder(x).last_hidden_state


def build(impl: str, torch, dtype, state_dict, exports: Path | None = None):
    """The model and its forward returning all tokens [B, 1025, 1024], with the given official weights."""
    if impl in EXPORTED:
        return build_exported(impl, torch, dtype, exports)
    if impl == "internvit":
        import internvit
        import internvit.autotune

        model = internvit.InternVisionModel(internvit.PRESETS["300m"])
        model.load_state_dict(state_dict)
        model = model.to(dtype).eval()
        internvit.autotune.tune_torch(model)  # as from_pretrained does: the CPU path measured fastest here
        return lambda x: model(x).last_hidden_state
    if impl == "timm":
        import timm

        model = timm.create_model("vit_intern300m_patch14_448", pretrained=False)
        model.load_state_dict(to_timm(state_dict))
        model = model.to(dtype).eval()
        return model.forward_features
    if impl == "transformers":
        from transformers import InternVLVisionConfig, InternVLVisionModel

        cfg = InternVLVisionConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=448,
            patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6,
            use_mean_pooling=True, layer_scale_init_value=1.0, attn_implementation="sdpa")
        model = InternVLVisionModel(cfg)
        model.load_state_dict(to_transformers(state_dict))
        model = model.to(dtype).eval()
        return lambda x: model(pixel_values=x).last_hidden_state
    raise ValueError(impl)


def to_transformers(sd: dict) -> dict:
    """Official keys -> transformers' InternVLVisionModel (spec/peers.md §2), qkv split into q/k/v."""
    ren = [("embeddings.class_embedding", "embeddings.cls_token"),
           ("embeddings.position_embedding", "embeddings.position_embeddings"),
           ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
           ("encoder.layers.", "encoder.layer."), (".ls1", ".lambda_1"), (".ls2", ".lambda_2"),
           (".norm1.", ".layernorm_before."), (".norm2.", ".layernorm_after."),
           (".attn.proj.", ".attention.projection_layer.")]
    out = {}
    for k, v in sd.items():
        for a, b in ren:
            k = k.replace(a, b)
        if ".attn.qkv." in k:
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[k.replace(".attn.qkv.", f".attention.{name}_proj.")] = part
        else:
            out[k] = v
    return out


def worker(impls: list[str], dtype_name: str, batches: list[int], rounds: int, threads: int,
           exports: Path | None = None) -> list[dict]:
    """All implementations of one dtype in one process, their forwards interleaved round by round with a
    measurement of the matmul peak, so that the machine's drift (a shared VM) hits every column alike."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    import internvit

    ref = internvit.InternVisionModel(internvit.PRESETS["300m"])
    ref.init_weights(torch.Generator().manual_seed(0))  # the same random weights in every implementation
    sd = ref.state_dict()
    del ref
    impls = [impl for impl in impls if applies(impl, dtype_name)]
    forwards = {impl: build(impl, torch, dtype, sd, exports) for impl in impls}
    del sd
    points = {impl: [] for impl in impls}
    with torch.inference_mode():
        for forward in forwards.values():
            forward(torch.randn(1, 3, 448, 448, dtype=dtype))  # warm-up
        for batch in batches:
            x = torch.randn(batch, 3, 448, 448, dtype=dtype, generator=torch.Generator().manual_seed(1))
            times = {impl: [] for impl in impls}
            peaks = []
            for _ in range(rounds):
                peaks.append(matmul_peak(torch, dtype, batch * TOKENS))
                for impl, forward in forwards.items():
                    times[impl].append(timed(lambda: forward(x)))
            peak = max(peaks, key=lambda p: p["peak"])  # the fastest the GEMMs ran: conservative ratios
            for impl in impls:
                best = min(times[impl])
                points[impl].append({
                    "batch": batch, "seconds": times[impl], "best_s": best, "tiles_per_s": batch / best,
                    "gflops": GFLOP_PER_TILE * batch / best, "matmul_peak_gflops": peak["peak"],
                    "matmul_peak_per_round": [p["peak"] for p in peaks],
                    "matmul_at_batch_rows_gflops": peak[f"rows_{batch * TOKENS}"],
                    "matmul_per_shape": peak["per_shape"],
                })
    return [{"impl": impl, "dtype": "int8" if impl in INT8 else dtype_name, "points": points[impl]}
            for impl in impls]


def memory_worker(impl: str, dtype_name: str, batch: int, threads: int, exports: Path | None = None) -> dict:
    """Peak RSS of one process that builds (loads, compiles) one implementation and runs one forward at `batch`;
    the build time is its load/compile time."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    import internvit

    sd = None
    if impl not in EXPORTED:
        with torch.device("meta"):
            ref = internvit.InternVisionModel(internvit.PRESETS["300m"])
        sd = {k: torch.zeros(v.shape, dtype=dtype) for k, v in ref.state_dict().items()}  # built in the target dtype
    t = time.perf_counter()
    forward = build(impl, torch, dtype, sd, exports)
    load_s = time.perf_counter() - t
    del sd
    with torch.inference_mode():
        x = torch.randn(batch, 3, 448, 448, dtype=dtype)
        loaded = rss_mb()
        reset_peak_rss()  # the peak of the forward with the model loaded, not of building it
        forward(x)
    return {"impl": impl, "dtype": "int8" if impl in INT8 else dtype_name, "batch": batch, "rss_loaded_mb": loaded,
            "peak_rss_mb": rss_mb("VmHWM"), "load_s": load_s}


def prepare_exports(exports: Path, impls: list[str], calibration_size: int, log) -> dict:
    """Write the checkpoint (the workers' random weights, fp32) and what the file-based implementations read:
    the project's ONNX, the cached OpenVINO/onnxruntime exports of `from_pretrained(backend=...)`, and the two
    int8 models. Returns the time each took."""
    import os

    import torch

    import internvit
    from internvit.export import export, quantize_int8
    from internvit.weights import init_checkpoint

    os.environ["INTERNVIT_CACHE"] = str(exports / "cache")  # inherited by the workers
    times_file = exports / "export_times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    if not (exports / "ckpt" / "model.safetensors").is_file():
        init_checkpoint(exports / "ckpt", preset="300m", seed=0, dtype="fp32", overwrite=True)
    t = time.perf_counter()
    if {"openvino", "onnxruntime", "openvino-int8"} & set(impls) and "export_onnx_s" not in times:
        log("export: the project's ONNX (internvit export --format onnx)")
        export(exports / "ckpt", exports / "onnx", format="onnx", overwrite=True)
        times["export_onnx_s"] = time.perf_counter() - t
        times_file.write_text(json.dumps(times))
    for backend in ("openvino", "onnxruntime"):
        if f"internvit-{backend}" in impls and f"first_load_{backend}_s" not in times:
            log(f"export: from_pretrained(backend={backend!r}) on a cold cache")
            t = time.perf_counter()
            internvit.from_pretrained(exports / "ckpt", backend=backend, dtype="fp32")
            times[f"first_load_{backend}_s"] = time.perf_counter() - t
            times_file.write_text(json.dumps(times))
    if INT8 & set(impls):

        if not (exports / "photos").is_dir():
            (exports / "photos").mkdir()
            make_photos(exports / "photos", 8)
        if "internvit-int8" in impls and "export_int8_s" not in times:
            log(f"export: int8, shipped recipe, {calibration_size} calibration tiles")
            t = time.perf_counter()
            r = export(exports / "ckpt", exports / "int8", format="openvino", precision="int8",
                       calibration=[exports / "photos"], calibration_size=calibration_size, heldout_size=4,
                       overwrite=True)
            times["export_int8_s"] = time.perf_counter() - t
            times["int8_fidelity"] = r.manifest["validation"]
            times_file.write_text(json.dumps(times))
        if "openvino-int8" in impls and "export_nncf_int8_s" not in times:
            import nncf  # noqa: F401 - as a user would: NNCF's transformer preset on the ONNX, saved, compiled
            import openvino as ov

            from internvit.export import calibration_tiles

            log("export: int8 as an NNCF user would (transformer preset as it comes)")
            t = time.perf_counter()
            tiles = calibration_tiles([exports / "photos"], tile_size=448, calibration_size=calibration_size)
            model = quantize_int8(ov.convert_model(exports / "onnx" / "model.onnx"), tiles.calibration,
                                  hidden_size=1024, recipe="transformer")
            (exports / "nncf-int8").mkdir(exist_ok=True)
            ov.save_model(model, exports / "nncf-int8" / "model.xml")
            times["export_nncf_int8_s"] = time.perf_counter() - t
            times_file.write_text(json.dumps(times))
    del torch
    return times


def load_worker(path: str, threads: int) -> dict:
    """Load a bf16 checkpoint as a user does; time and memory before the first batch, then one forward."""
    import torch

    torch.set_num_threads(threads)
    import internvit

    base = rss_mb()
    reset_peak_rss()
    t = time.perf_counter()
    model = internvit.from_pretrained(path)
    load_s = time.perf_counter() - t
    peak_before_batch = rss_mb("VmHWM") - base
    t = time.perf_counter()
    with torch.inference_mode():
        model(torch.randn(1, 3, 448, 448))
    first_forward_s = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"load_s": load_s, "rss_growth_before_first_batch_mb": peak_before_batch, "weights_mb": weights / 2**20,
            "rss_over_weights": peak_before_batch * 2**20 / weights, "first_forward_s": first_forward_s,
            "dtype": str(model.dtype)}


# ---- the driver --------------------------------------------------------------------------------------------


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# InternViT-300M forward speed, {m['cpu']} (family {m['cpu_family']} model {m['cpu_model']}), "
        f"{report['date']}",
        "",
        f"{m['cores']} cores, {m['threads']} threads; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". Random weights, the same in every implementation; best of {report['rounds']} timed forwards after a "
        "warm-up, the implementations interleaved in one process; 723.6 GFLOP per 448 tile. Matmul peak: the "
        "model's four linear shapes at one tile's rows and at the batch's rows, the faster of the two per shape, "
        "measured in each round before the forwards; the fastest round is the peak. Peak RSS: a separate process "
        "per implementation that builds the model in the dtype and runs one forward at the largest batch; its build "
        "time is the load/compile column (torch: building from memory; the others: loading and compiling files, "
        "OpenVINO's blob cache cold for openvino, as filled by the workers for internvit-openvino). Groups of "
        "implementations run in separate processes (memory); ratios are within a group, where the implementations "
        "are interleaved, and int8 rows ran in the bf16 process beside torch bf16 (their % is of the bf16 peak).",
        "",
        "| impl | dtype | batch | s/forward | tiles/s | GFLOP/s | % of matmul peak | vs timm | vs OpenVINO-direct "
        "| vs internvit torch bf16 | load/compile s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r.get("group", 0), r["impl"], r["dtype"], p["batch"]): p for r in report["runs"] for p in r["points"]}
    memory = {(m["impl"], m["dtype"]): m for m in report.get("memory", [])}
    order = {impl: i for i, impl in enumerate(dict.fromkeys(r["impl"] for r in report["runs"]))}
    dtype_order = {"fp32": 0, "bf16": 1, "int8": 2}
    for (g, impl, dtype, batch), p in sorted(by.items(), key=lambda kv: (dtype_order.get(kv[0][2], 3), kv[0][3],
                                                                         kv[0][0], order[kv[0][1]])):
        if impl == "internvit" and g > 0 and any(k[:3] == (0, impl, dtype) for k in by):
            continue  # torch's row is shown once (group 0); the other groups' torch runs anchor their ratios
        # int8 rows are measured in the bf16 process of their group, with torch bf16 beside them.
        def ratio(peer, peer_dtype=dtype, g=g):
            q = by.get((g, peer, peer_dtype, batch))
            return f"{p['tiles_per_s'] / q['tiles_per_s']:.2f}x" if q and (peer, peer_dtype) != (impl, dtype) else ""

        direct = "openvino-int8" if dtype == "int8" else "openvino"
        mem = memory.get((impl, dtype), {})
        lines.append(
            f"| {impl} | {dtype} | {batch} | {p['best_s']:.2f} | {p['tiles_per_s']:.3f} | {p['gflops']:.0f} | "
            f"{100 * p['gflops'] / p['matmul_peak_gflops']:.0f}% | {ratio('timm')} | {ratio(direct)} | "
            f"{ratio('internvit', 'bf16')} | {mem.get('load_s', float('nan')):.1f} | "
            f"{mem.get('peak_rss_mb', float('nan')):.0f} |")
    if report.get("exports"):
        ex = report["exports"]
        parts = [f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in ex.items() if k.endswith("_s")]
        lines += ["", "Exports made before the workers ran (fp32 torch reference included in each validation): "
                  + ", ".join(parts) + "."]
        if "int8_fidelity" in ex:
            f = ex["int8_fidelity"]
            lines += [f"int8 (shipped recipe) fidelity on {f['tiles']} held-out tiles of photographs: CLS cosine min "
                      f"{f['cls_cosine']['min']:.4f} / mean {f['cls_cosine']['mean']:.4f}, patch cosine min "
                      f"{f['patch_cosine']['min']:.4f} / mean {f['patch_cosine']['mean']:.4f}."]
    if report.get("load"):
        ld = report["load"]
        lines += ["", f"Loading a bf16 300M checkpoint with `internvit.from_pretrained` (fresh process, file in the page "
                      f"cache): {ld['load_s']:.3f} s; RSS growth before the first batch {ld['rss_growth_before_first_batch_mb']:.0f} MB "
                      f"= {ld['rss_over_weights']:.2f}x the {ld['weights_mb']:.0f} MB of weights; first forward "
                      f"{ld['first_forward_s']:.2f} s."]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    labels = sorted({(r["dtype"], p["batch"]) for r in runs for p in r["points"]})
    impls = list(dict.fromkeys(r["impl"] for r in runs))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = []
        for dtype, batch in labels:
            p = next((p for r in runs if r["impl"] == impl and r["dtype"] == dtype for p in r["points"]
                      if p["batch"] == batch), None)
            vals.append(p["tiles_per_s"] if p else 0)
        ax.bar([x + i * width for x in range(len(labels))], vals, width, label=impl)
    ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(labels))],
                  [f"{d}, batch {b}" for d, b in labels])
    ax.set_ylabel("448 tiles / s")
    ax.set_title(f"InternViT-300M on {report['machine']['cpu']}, {report['machine']['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", default="internvit,timm,openvino,internvit-openvino;"
                    "internvit,onnxruntime,internvit-onnxruntime;internvit,openvino-int8,internvit-int8",
                    help="implementations, comma-separated; ';' separates groups, each measured in its own process "
                    "(per dtype), interleaved within it: ratios are taken within a group. Groups bound the memory: "
                    "each holds its models at once (default: 3 groups, internvit torch in each)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--calibration-size", type=int, default=8, help="int8 calibration tiles (default: 8)")
    ap.add_argument("--exports", type=Path, help="reuse the exports of an earlier run in this folder")
    ap.add_argument("--_exports", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=2, help="timed forwards per point (the best is reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-load", action="store_true", help="skip the checkpoint-loading measurement")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_load", help=argparse.SUPPRESS)
    ap.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args._worker:
        impls, dtype = args._worker
        print(json.dumps(worker(impls.split(","), dtype, batches, args.rounds, args.threads, args._exports)))
        return
    if args._memory:
        impl, dtype, batch = args._memory
        print(json.dumps(memory_worker(impl, dtype, int(batch), args.threads, args._exports)))
        return
    if args._load:
        print(json.dumps(load_worker(args._load, args.threads)))
        return

    report = {"date": dt.date.today().isoformat(), "machine": machine(), "rounds": args.rounds, "runs": []}
    groups = [g.split(",") for g in args.impls.split(";")]
    impls = list(dict.fromkeys(i for g in groups for i in g))
    tmp_exports = None
    exports = args.exports
    if EXPORTED & set(impls):
        if exports is None:
            tmp_exports = tempfile.TemporaryDirectory()
            exports = Path(tmp_exports.name)
        exports.mkdir(parents=True, exist_ok=True)
        os.environ["INTERNVIT_CACHE"] = str(exports / "cache")
        t = time.perf_counter()
        report["exports"] = prepare_exports(
            exports, impls, args.calibration_size, lambda line: print(f"[bench] {line}", file=sys.stderr, flush=True))
        print(f"[bench]   exports ready in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    extra = ["--_exports", str(exports)] if exports else []
    for dtype in args.dtypes.split(","):
        for g, group in enumerate(groups):
            if not [i for i in group if applies(i, dtype) and i != "internvit"]:
                continue
            print(f"[bench] group {g}: {','.join(group)} {dtype} batches {batches} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            runs = run_child(["--_worker", ",".join(group), dtype, "--batches", args.batches,
                              "--rounds", str(args.rounds), "--threads", str(args.threads), *extra])
            report["runs"] += [dict(r, group=g) for r in runs]
            print(f"[bench]   done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    report["memory"] = []
    for dtype in args.dtypes.split(","):
        for impl in impls:
            if not applies(impl, dtype):
                continue
            print(f"[bench] load time and peak RSS: {impl} {dtype} batch {max(batches)} ...", file=sys.stderr,
                  flush=True)
            report["memory"].append(run_child(["--_memory", impl, dtype, str(max(batches)),
                                               "--threads", str(args.threads), *extra]))
    if not args.no_load:
        import internvit.weights

        with tempfile.TemporaryDirectory() as tmp:
            internvit.weights.init_checkpoint(tmp, preset="300m", dtype="bf16")
            report["load"] = run_child(["--_load", tmp, "--threads", str(args.threads)])
    if tmp_exports is not None:
        tmp_exports.cleanup()
    stem = write_results(args.out, "vit", report, markdown(report))
    chart(report, stem.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {stem}.json, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
