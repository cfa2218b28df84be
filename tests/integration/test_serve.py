"""`internvit serve` as a client sees it: a real server process on 127.0.0.1 and a free port, real HTTP clients.

The reference for every feature is `internvit extract` on the same files with the same options (the same model
and preprocessing by construction of the server; this checks that the HTTP path loses and mixes nothing).
"""

from __future__ import annotations

import base64
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "internvit.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: Path, *args: str, ready_timeout: float = 180):
    port = free_port()
    proc = subprocess.Popen(CLI + ["serve", "--model", str(model), "--dtype", "fp32", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.stderr.close()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    paths = []
    for i, (w, h) in enumerate([(80, 60), (64, 96), (100, 100), (90, 70)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = root / f"p{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(tiny_ckpt, photos, tmp_path_factory) -> pa.Table:
    """`internvit extract` rows for the photos, in their order, with layer 1 and the patch tokens."""
    from internvit.cli import main

    out = tmp_path_factory.mktemp("ref") / "f.parquet"
    assert main(["extract", *map(str, photos), "--out", str(out), "--model", str(tiny_ckpt), "--dtype", "fp32",
                 "--workers", "0", "--quiet", "--layers", "1", "--patch-tokens"]) == 0
    table = pq.read_table(out)
    order = {p: i for i, p in enumerate(table.column("path").to_pylist())}
    return table.take([order[str(p)] for p in photos])


def ref_cls(reference: pa.Table, i: int) -> np.ndarray:
    return np.asarray(reference.column("cls")[i].as_py(), np.float32)


def test_openai_client_equals_extract(tiny_ckpt, photos, reference):
    import openai

    with server(tiny_ckpt) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        got = client.embeddings.create(model="internvit", input=[data_url(p) for p in photos])
        assert [d.index for d in got.data] == [0, 1, 2, 3] and got.object == "list"
        worst = max(np.abs(np.asarray(d.embedding, np.float32) - ref_cls(reference, i)).max()
                    for i, d in enumerate(got.data))
        print(f"[serve] /v1/embeddings (openai client) vs extract cls, fp32: max abs {worst:.2e}")
        assert worst <= 1e-5
        raw = httpx.post(f"{url}/v1/embeddings", json={"input": base64.b64encode(photos[2].read_bytes()).decode(),
                                                         "encoding_format": "base64"}).json()
        vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
        assert np.abs(vec - ref_cls(reference, 2)).max() <= 1e-5
        # One tile of the checkpoint's CLIP crop (448: the tiny test checkpoint keeps the official preprocessing).
        assert raw["usage"]["prompt_tokens"] == 1 + (448 // 14) ** 2

        # The native call: extra layers and the patch-token map, as JSON and as Arrow IPC.
        body = {"input": [data_url(p) for p in photos], "layers": [1], "patch_tokens": True}
        rows = httpx.post(f"{url}/v1/features", json=body).json()["data"]
        arrow = httpx.post(f"{url}/v1/features", json={**body, "format": "arrow"})
        assert arrow.headers["content-type"] == "application/vnd.apache.arrow.stream"
        table = pa.ipc.open_stream(arrow.content).read_all()
        for i, row in enumerate(rows):
            for column in ("cls", "mean", "cls_l1", "mean_l1", "patch_tokens"):
                want = np.asarray(reference.column(column)[i].as_py(), np.float32)
                assert np.abs(np.asarray(row[column], np.float32) - want).max() <= 1e-5, column
                assert np.abs(np.asarray(table.column(column)[i].as_py(), np.float32) - want).max() <= 1e-5
            assert (row["map_height"], row["map_width"]) == (reference.column("map_height")[i].as_py(),
                                                             reference.column("map_width")[i].as_py())


def test_concurrent_requests_share_forwards(tiny_ckpt, photos, reference):
    with server(tiny_ckpt, "--max-wait-ms", "200", "--max-batch-tiles", "64") as (url, _):
        results: dict[int, httpx.Response] = {}

        def call(i: int) -> None:
            results[i] = httpx.post(f"{url}/v1/embeddings", json={"input": [data_url(photos[i % 4])]}, timeout=120)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, r in results.items():
            assert r.status_code == 200, r.text
            assert np.abs(np.asarray(r.json()["data"][0]["embedding"]) - ref_cls(reference, i % 4)).max() <= 1e-5
        metrics = httpx.get(f"{url}/metrics").text
        forwards = _metric(metrics, "internvit_batch_requests_count")
        single = _metric(metrics, 'internvit_batch_requests_bucket{le="1.0"}')
        print(f"[serve] 32 concurrent requests: {forwards:.0f} forwards, {forwards - single:.0f} with several requests")
        assert forwards - single >= 1 and forwards < 33  # the warm-up is one forward too


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_overload_answers_503_at_once(tiny_ckpt, photos, reference):
    with server(tiny_ckpt, "--max-queue", "2", "--max-batch-tiles", "1", "--max-wait-ms", "0") as (url, _):
        results: list[httpx.Response] = []

        def call(i: int) -> None:
            results.append(httpx.post(f"{url}/v1/embeddings", json={"input": [data_url(p) for p in photos]},
                                      timeout=120))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        print(f"[serve] 40 concurrent requests, --max-queue 2: {codes.count(200)} answered, {codes.count(503)} 503")
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
        for r in results:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_overloaded"
            else:
                got = np.asarray([d["embedding"] for d in r.json()["data"]], np.float32)
                want = np.stack([ref_cls(reference, i) for i in range(4)])
                assert np.abs(got - want).max() <= 1e-5
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.post(f"{url}/v1/embeddings", json={"input": [data_url(photos[0])]}).status_code == 200
        assert _metric(httpx.get(f"{url}/metrics").text, 'internvit_rejected_requests_total{reason="overloaded"}') \
            == codes.count(503)


def test_bad_requests(tiny_ckpt, photos, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((120, 120, 3), np.uint8)).save(big)  # 14,400 pixels > --max-pixels 10000
    headers = {"Authorization": "Bearer s3cret"}
    with server(tiny_ckpt, "--api-key", "s3cret", "--max-body-mb", "0.05", "--max-pixels", "10000") as (url, _):
        def post(body, **kw) -> httpx.Response:
            return httpx.post(f"{url}/v1/embeddings", json=body, headers=kw.get("headers", headers), timeout=60)

        assert post({"input": [data_url(photos[0])]}, headers={}).status_code == 401
        assert post({"input": [data_url(photos[0])]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        cases = {
            "input[1]: not valid base64": [data_url(photos[0]), "***"],
            "input[0]: not an image": [base64.b64encode(b"hello, not a picture").decode()],
            "input[1]: 120x120 = 14400 pixels exceeds max_pixels=10000": [data_url(photos[0]), data_url(big)],
            "input[0]: URLs are not fetched": ["http://127.0.0.1:1/x.png"],
            "input[0]: not an image data URL (text/plain)": ["data:text/plain;base64,aGVsbG8="],
        }
        for message, inputs in cases.items():
            r = post({"input": inputs})
            assert r.status_code == 400 and r.json()["error"]["message"].startswith(message), r.text
        r = post({"input": ["A" * 80_000]})
        assert r.status_code == 413, r.text
        assert post({"input": [data_url(photos[0])]}).status_code == 200  # the server is fine afterwards


def medium_checkpoint(folder: Path) -> Path:
    """A checkpoint slow enough on the CPU (448-px tiles, 6 layers) to keep requests in flight for a while."""
    import torch

    from internvit.config import PRESETS
    from internvit.model.vision import InternVisionModel
    from internvit.weights import save_pretrained

    config = PRESETS["tiny"].replace(hidden_size=256, num_hidden_layers=6, intermediate_size=1024, image_size=448)
    model = InternVisionModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    return save_pretrained(model.state_dict(), config, folder)


def test_sigterm_finishes_requests_in_flight(photos, tmp_path):
    model = medium_checkpoint(tmp_path / "medium")
    with server(model, "--max-batch-tiles", "1", "--max-wait-ms", "0") as (url, proc):
        results: list[int] = []

        def call() -> None:
            r = httpx.post(f"{url}/v1/embeddings", json={"input": [data_url(p) for p in photos]}, timeout=300)
            results.append(r.status_code)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while _metric(httpx.get(f"{url}/metrics").text, "internvit_queue_depth") < 6:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert proc.wait(timeout=120) == 0
    assert results == [200] * 6


def test_ray_serve_replica_answers_as_the_local_server(tiny_ckpt, photos, reference):
    with server(tiny_ckpt, "--engine", "ray", "--replicas", "1", ready_timeout=300) as (url, _):
        got = httpx.post(f"{url}/v1/embeddings", json={"input": [data_url(p) for p in photos]}, timeout=120)
        assert got.status_code == 200, got.text
        worst = max(np.abs(np.asarray(d["embedding"], np.float32) - ref_cls(reference, i)).max()
                    for i, d in enumerate(got.json()["data"]))
        print(f"[serve] Ray Serve replica vs extract cls: max abs {worst:.2e}")
        assert worst <= 1e-5
