"""The Ray engine's cost on one machine: `extract --engine ray` against `extract` (local), and 1 against 2 actors.

In one run on this machine:
    1. makes N real-sized JPEG photos (2 to 12 MP, bench_extract's), and random checkpoints: the 300M (the real
       workload) and the tiny preset (so small that the time left is the pipeline's own: decoding, moving the
       tiles between processes, writing);
    2. starts one local Ray instance on loopback (its start-up time is reported apart: a default
       `internvit extract --engine ray` run pays it once more, and stops the instance at the end);
    3. for each model, `--repeats` rounds, in each: the local engine (`--workers 2`), then the Ray engine with one
       actor (the default here: 1 CPU reserved, 2 torch threads) and with two (0.5 CPU, 1 thread each); every call
       starts from an empty output and loads the model (in its actors, for Ray); the best round is reported.
Writes benchmarks/results/ray_<cpu>_<date>.{json,md}.

    python benchmarks/bench_ray.py [--photos 16] [--repeats 2] [--dtype bf16]

Needs the `ray` and `bench` extras and scikit-image.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback: read when `ray` is imported

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="of the 300M (the tiny runs in fp32)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import ray

    from internvit.extract import extract_features
    from internvit.extract.ray import extract_features_ray
    from internvit.weights import init_checkpoint

    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine, make_photos, write_results

    report = {"date": dt.date.today().isoformat(), "machine": machine(), "photos": args.photos,
              "batch_size": args.batch_size, "repeats": args.repeats, "models": {}}
    report["machine"]["versions"]["ray"] = ray.__version__
    report["load_average_before"] = os.getloadavg()[0]  # other work on the machine skews every figure
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        photos = make_photos(tmp / "photos", args.photos)
        from PIL import Image

        report["megapixels"] = [round(w * h / 1e6, 1) for w, h in (Image.open(p).size for p in photos)]
        models = {"300m": (init_checkpoint(tmp / "300m", preset="300m", dtype=args.dtype), args.dtype),
                  "tiny": (init_checkpoint(tmp / "tiny", preset="tiny", dtype="fp32"), "fp32")}

        t = time.perf_counter()
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        report["ray_start_seconds"] = time.perf_counter() - t
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        report["ray_cpus"] = ray.cluster_resources().get("CPU")
        try:
            for name, (ckpt, dtype) in models.items():
                runs: dict[str, list[dict]] = {"local": [], "ray, 1 actor": [], "ray, 2 actors": []}
                for r in range(args.repeats):
                    for label in runs:
                        out = tmp / f"out-{name}-{r}-{label.replace(' ', '').replace(',', '_')}"
                        print(f"[bench] {name} round {r + 1}: {label} ...", file=sys.stderr, flush=True)
                        common = dict(model=str(ckpt), dtype=dtype, batch_size=args.batch_size, progress=False)
                        t = time.perf_counter()
                        if label == "local":
                            s = extract_features([tmp / "photos"], out.with_suffix(".parquet"), num_workers=2,
                                                 device="cpu", **common)
                        else:
                            s = extract_features_ray([tmp / "photos"], out, num_actors=int(label.split()[1]),
                                                     **common)
                        seconds = time.perf_counter() - t
                        assert s.processed == args.photos and s.failed == 0, s
                        runs[label].append({"seconds": seconds, "images_per_s": args.photos / seconds,
                                            "model_seconds": s.model_seconds, "tiles": s.tiles})
                        shutil.rmtree(out, ignore_errors=True)
                best = {label: min(rs, key=lambda x: x["seconds"]) for label, rs in runs.items()}
                report["models"][name] = {"dtype": dtype, "runs": runs, "best": best}
        finally:
            ray.shutdown()

    report["load_average_after"] = os.getloadavg()[0]
    md = markdown(report)
    write_results(args.out, "ray", report, md)
    print(md)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Ray engine against the local engine, {m['cpu']} (family {m['cpu_family']}), {r['date']}",
        "",
        f"{m['cores']} cores, Ray sees {r['ray_cpus']:g} CPUs; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". {r['photos']} JPEG photos of {min(r['megapixels'])}-{max(r['megapixels'])} MP, `--tiles none` (one "
        f"448 tile each), --batch-size {r['batch_size']}, random weights. Each call from an empty output, model "
        f"loading included (in the actors for Ray); best of {r['repeats']} rounds. One local Ray instance on "
        f"loopback serves every Ray call; starting it took {r['ray_start_seconds']:.1f} s, which a default "
        "`internvit extract --engine ray` run adds. Load average before / after the runs: "
        f"{r['load_average_before']:.2f} / {r['load_average_after']:.2f}.",
        "",
        "| model | engine | seconds | images/s | vs local | encoder busy per actor |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in r["models"].items():
        local = res["best"]["local"]
        for label, b in res["best"].items():  # model_seconds: the local encoder's, or the mean actor's
            lines.append(f"| {name} {res['dtype']} | {label} | {b['seconds']:.1f} | {b['images_per_s']:.3f} | "
                         f"{b['images_per_s'] / local['images_per_s']:.2f}x | "
                         f"{100 * b['model_seconds'] / b['seconds']:.0f}% |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
