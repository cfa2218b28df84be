"""`internvit serve` under load: throughput and latency at 1, 4, 16 and 64 clients, against offline `extract`.

In one run on this machine:
    1. makes N real-sized JPEG photos (bench_extract's) and a random checkpoint (the 300M by default);
    2. offline: `extract_features` over the photos (`--tiles none`, one tile each): tiles/s of the wall time after
       loading, the reference a server should approach at saturation;
    3. starts `internvit serve` on 127.0.0.1 (a free port) with dynamic batching on (`--max-batch-tiles 16`), then
       again with batching off (`--max-batch-tiles 1`: every forward one request's tile); for each server and each
       concurrency a closed loop of clients, each sending one photo per request and the next as soon as the answer
       comes, for `--seconds` (bounded also by `--max-requests`): answered tiles/s, p50/p99 latency of answered
       requests, the share answered 503, and the mean forward time from the server's own metrics;
    4. overload: a server with `--max-queue Q` and 10*Q clients: p99 of the accepted requests stays bounded by
       the queue (about Q forwards), whatever the load;
    5. mixed: `--small-clients` closed-loop clients of one photo each, alone and then beside `--big-clients`
       clients that send requests of 256 images (8x8 PNGs, one tile each: the most a request may hold), on one
       server: the small requests' p50/p99 both ways (fair scheduling keeps them about a forward behind, not
       behind whole big requests), the big requests' tiles/s, and the server's peak RSS.
Writes benchmarks/results/serve_<cpu>_<date>.{json,md} (and a chart with matplotlib); `--parts mixed` alone
writes serve-mixed_<cpu>_<date>.{json,md}.

    python benchmarks/bench_serve.py [--preset 300m] [--dtype bf16] [--seconds 40] [--photos 16]
                                     [--parts load,overload,mixed] [--small-clients 4] [--big-clients 2]

Needs the `serve` and `bench` extras and scikit-image.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import free_port

RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-m", "internvit.cli"]


class Server:
    def __init__(self, model: Path, dtype: str, *args: str) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(CLI + ["serve", "--model", str(model), "--dtype", dtype, "--port",
                                            str(self.port), *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"internvit serve {' '.join(args)} exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.5)

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=300)


def load(server: Server, bodies: list[dict], clients: int, seconds: float, max_requests: int) -> dict:
    """A closed loop of `clients` threads for `seconds` (or `max_requests` requests in all)."""
    import httpx

    latencies: list[float] = []
    codes: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    forwards0 = server.metric("internvit_batch_tiles_count")
    busy0 = server.metric("internvit_encoder_seconds_total")

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            i = k
            while time.monotonic() < stop:
                with lock:
                    if len(codes) >= max_requests:
                        return
                t = time.perf_counter()
                r = http.post(f"{server.url}/v1/embeddings", json=bodies[i % len(bodies)])
                with lock:
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t)
                i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    forwards = server.metric("internvit_batch_tiles_count") - forwards0
    busy = server.metric("internvit_encoder_seconds_total") - busy0
    latencies.sort()
    ok = len(latencies)
    return {
        "clients": clients, "requests": len(codes), "answered": ok, "rejected_share": 1 - ok / max(len(codes), 1),
        "tiles_per_s": ok / elapsed, "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": latencies[min(ok - 1, int(0.99 * ok))] if latencies else None,
        "forward_s": busy / forwards if forwards else None, "forwards": forwards, "seconds": elapsed,
    }


def mixed(server: Server, bodies: list[dict], small_clients: int, big_clients: int, seconds: float,
          max_requests: int) -> dict:
    """Small requests' latency alone, then beside clients that keep 256-image requests in flight."""
    import io

    import httpx
    import numpy as np
    from PIL import Image

    def png(seed: int) -> str:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), np.uint8)).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    big = {"input": [png(i) for i in range(256)]}
    alone = load(server, bodies, small_clients, seconds, max_requests)
    stop, big_done, lock = threading.Event(), [], threading.Lock()

    def big_client() -> None:
        with httpx.Client(timeout=1200) as http:
            while not stop.is_set():
                t = time.perf_counter()
                r = http.post(f"{server.url}/v1/embeddings", json=big)
                with lock:
                    big_done.append((r.status_code, time.perf_counter() - t))

    threads = [threading.Thread(target=big_client) for _ in range(big_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    while server.metric("internvit_queue_depth") < big_clients:
        time.sleep(0.1)
    beside = load(server, bodies, small_clients, seconds, max_requests)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
    return {"small_clients": small_clients, "big_clients": big_clients, "alone": alone, "beside_big": beside,
            "big_requests": len(big_done), "big_ok": sum(code == 200 for code, _ in big_done),
            "big_mean_s": statistics.mean(s for _, s in big_done) if big_done else None,
            "big_tiles_per_s": 256 * sum(code == 200 for code, _ in big_done) / elapsed, "server_peak_rss_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="300m", choices=["300m", "tiny"])
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--photos", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=40.0, help="per concurrency level")
    ap.add_argument("--max-requests", type=int, default=2000, help="per concurrency level")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--max-queue", type=int, default=8, help="of the overload run, which has 10x as many clients")
    ap.add_argument("--parts", default="load,overload,mixed", help="of load, overload, mixed")
    ap.add_argument("--small-clients", type=int, default=4, help="of the mixed run")
    ap.add_argument("--big-clients", type=int, default=2, help="of the mixed run: each keeps a 256-image request")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine, make_photos, write_results

    from internvit.extract import extract_features
    from internvit.registry import PREPROCESSOR_CONFIG
    from internvit.weights import init_checkpoint

    levels = [int(c) for c in args.clients.split(",")]
    report = {"date": dt.date.today().isoformat(), "machine": machine(), "preset": args.preset, "dtype": args.dtype,
              "photos": args.photos, "seconds_per_level": args.seconds, "load_average_before": os.getloadavg()[0],
              "parts": sorted(parts)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        photos = make_photos(tmp / "photos", args.photos)
        bodies = [{"input": ["data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()]} for p in photos]
        model = init_checkpoint(tmp / "model", preset=args.preset, dtype=args.dtype)
        # 448-px tiles whatever the preset (tiny's own preprocessing is 56 px): a request costs a real tile's work
        (model / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")

        s = extract_features(photos, tmp / "offline.parquet", model=str(model), dtype=args.dtype, progress=False)
        report["offline"] = {"tiles_per_s": s.tiles / (s.seconds - s.load_seconds),
                             "model_tiles_per_s": s.tiles / s.model_seconds, "tiles": s.tiles}
        print(f"offline extract: {report['offline']['tiles_per_s']:.3f} tiles/s", flush=True)

        for name, extra in (("batching", ["--max-batch-tiles", "16"]), ("no batching", ["--max-batch-tiles", "1"])):
            if "load" not in parts:
                break
            server = Server(model, args.dtype, *extra, "--max-queue", "256")
            try:
                report[name] = []
                for clients in levels:
                    row = load(server, bodies, clients, args.seconds, args.max_requests)
                    report[name].append(row)
                    print(f"{name}, {clients} clients: {row}", flush=True)
            finally:
                server.close()

        if "overload" in parts:
            q = args.max_queue
            server = Server(model, args.dtype, "--max-queue", str(q), "--max-batch-tiles", "16")
            try:
                report["overload"] = {"max_queue": q, **load(server, bodies, 10 * q, args.seconds, args.max_requests)}
                print(f"overload: {report['overload']}", flush=True)
            finally:
                server.close()
        if "mixed" in parts:
            server = Server(model, args.dtype, "--max-queue", "256", "--max-batch-tiles", "16")
            try:
                report["mixed"] = mixed(server, bodies, args.small_clients, args.big_clients, args.seconds,
                                        args.max_requests)
                print(f"mixed: {report['mixed']}", flush=True)
            finally:
                server.close()

    md = markdown(report)
    stem = write_results(args.out, "serve" if "load" in parts else "serve-" + "-".join(sorted(parts)), report, md)
    if "load" in parts:
        chart(report, stem.with_suffix(".png"))
    print(md)


def markdown(report: dict) -> str:
    m = report["machine"]
    off = report["offline"]["tiles_per_s"]
    lines = [
        f"# internvit serve under load ({report['date']}): {', '.join(report['parts'])}",
        "",
        f"{m['cpu']} (family {m['cpu_family']}), {m['cores']} cores, torch {m['versions']['torch']}; random "
        f"{report['preset']} weights in {report['dtype']}; one JPEG photo (one tile) per request; closed-loop "
        f"clients on 127.0.0.1, {report['seconds_per_level']:.0f} s per level; load average before the run "
        f"{report['load_average_before']:.2f}.",
        "",
        f"Offline `extract` of the same photos: **{off:.3f} tiles/s** (wall time after loading; the encoder alone "
        f"{report['offline']['model_tiles_per_s']:.3f}).",
        "",
    ]
    if "batching" in report:
        lines += ["| server | clients | tiles/s | vs offline | p50 s | p99 s | mean forward s | p50 / forward "
                  "| 503 share |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("batching", "no batching"):
        for r in report.get(name, ()):
            fwd = r["forward_s"]
            ratio = f"{r['p50_s'] / fwd:.2f}" if r["p50_s"] and fwd else "-"
            lines.append(f"| {name} | {r['clients']} | {r['tiles_per_s']:.3f} | {r['tiles_per_s'] / off:.2f}x | "
                         f"{_s(r['p50_s'])} | {_s(r['p99_s'])} | {_s(fwd)} | {ratio} | {r['rejected_share']:.0%} |")
    if "overload" in report:
        o = report["overload"]
        lines += ["", f"Overload: `--max-queue {o['max_queue']}` and {o['clients']} clients: {o['tiles_per_s']:.3f} "
                  f"tiles/s answered, {o['rejected_share']:.0%} answered 503 at once, p50 {_s(o['p50_s'])} s and "
                  f"p99 {_s(o['p99_s'])} s of the accepted (mean forward {_s(o['forward_s'])} s).", ""]
    if "mixed" in report:
        m = report["mixed"]
        a, b = m["alone"], m["beside_big"]
        lines += ["", f"Mixed (`--max-batch-tiles 16`): {m['small_clients']} clients of one photo each, alone and "
                  f"beside {m['big_clients']} clients each keeping a 256-image request in flight:", "",
                  "| small requests | answered | p50 s | p99 s | mean forward s |", "|---|---|---|---|---|",
                  f"| alone | {a['answered']} | {_s(a['p50_s'])} | {_s(a['p99_s'])} | {_s(a['forward_s'])} |",
                  f"| beside big ones | {b['answered']} | {_s(b['p50_s'])} | {_s(b['p99_s'])} | "
                  f"{_s(b['forward_s'])} |", "",
                  f"Big requests: {m['big_ok']} of {m['big_requests']} answered, {_s(m['big_mean_s'])} s each on "
                  f"average, {m['big_tiles_per_s']:.2f} tiles/s; server peak RSS {m['server_peak_rss_mb']:.0f} MB.",
                  ""]
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def chart(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("batching", "no batching"):
        xs = [r["clients"] for r in report[name]]
        a.plot(xs, [r["tiles_per_s"] for r in report[name]], marker="o", label=name)
        b.plot(xs, [r["p50_s"] or 0 for r in report[name]], marker="o", label=f"{name} p50")
        b.plot(xs, [r["p99_s"] or 0 for r in report[name]], marker="x", linestyle="--", label=f"{name} p99")
    a.axhline(report["offline"]["tiles_per_s"], color="grey", linestyle=":", label="offline extract")
    for ax, title in ((a, "tiles/s answered"), (b, "latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"internvit serve, {report['preset']} {report['dtype']}, {report['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
