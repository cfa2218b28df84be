"""`internvit serve` soaked as issue 23 measured it: a 448-px model of 4 layers, 16 closed-loop clients sending
1-4 JPEGs per request (the example photos), for `--seconds`; prints requests, status codes, images/s, p50/p99 and
the server's RSS range (sampled every 2 s), and the exit status after SIGTERM.

    python benchmarks/soak_serve.py [--preset tiny|300m] [--seconds 90] [--clients 16]

`--preset tiny` is width 64 (issue 23's soak figures were of such a model), `300m` width 1024; both 4 layers at
448 px, bf16, random weights. The server runs the `internvit` found on `PYTHONPATH` (set it to another checkout's
`src` to compare versions on one machine).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import free_port

PHOTOS = sorted((Path(__file__).parents[1] / "examples" / "images").glob("*.jpg"))


def write_model(preset: str, out: Path) -> Path:
    import torch

    from internvit.checkpoint import save_pretrained
    from internvit.config import PRESETS
    from internvit.model.vision import InternVisionModel

    config = PRESETS[preset].replace(num_hidden_layers=4, image_size=448)
    torch.manual_seed(0)
    save_pretrained(InternVisionModel(config).state_dict(), config, out, dtype="fp32")
    return out


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=["tiny", "300m"], default="tiny")
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    urls = ["data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode() for p in PHOTOS]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_model(args.preset, Path(tmp) / "ckpt")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-c", "from internvit.cli import main; raise SystemExit(main())",
                                   "serve", "--model", str(ckpt), "--dtype", "bf16", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        while True:
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                if server.poll() is not None:
                    sys.exit(f"soak_serve: the server exited with {server.returncode}")
            time.sleep(0.5)
        latencies, codes, images, rss = [], [], [0], []
        lock, stop = threading.Lock(), time.monotonic() + args.seconds

        def client(k: int) -> None:
            rng = random.Random(k)
            with httpx.Client(timeout=600) as http:
                while time.monotonic() < stop:
                    n, t = rng.randint(1, 4), time.perf_counter()
                    r = http.post(url + "/v1/embeddings", json={"input": [rng.choice(urls) for _ in range(n)]})
                    with lock:
                        codes.append(r.status_code)
                        if r.status_code == 200:
                            latencies.append(time.perf_counter() - t)
                            images[0] += n

        def watch() -> None:
            while time.monotonic() < stop:
                status = Path(f"/proc/{server.pid}/status").read_text()
                rss.append(int(status.split("VmRSS:")[1].split()[0]) / 1e6)
                time.sleep(2)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        threads.append(threading.Thread(target=watch))
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        server.send_signal(signal.SIGTERM)
        q = statistics.quantiles(latencies, n=100)
        print(json.dumps({"preset": args.preset, "clients": args.clients, "seconds": round(wall, 1),
                          "requests": len(codes), "codes": {c: codes.count(c) for c in sorted(set(codes))},
                          "images_per_s": round(images[0] / wall, 2), "p50_s": round(q[49], 3),
                          "p99_s": round(q[98], 3), "rss_gb": [round(min(rss), 2), round(max(rss), 2)],
                          "sigterm_exit": server.wait(timeout=120)}))


if __name__ == "__main__":
    main()
