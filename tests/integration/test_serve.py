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
        # One tile of the checkpoint's CLIP crop (56 px: `init --preset tiny` writes its own tile size).
        assert raw["usage"]["prompt_tokens"] == 1 + (56 // 14) ** 2

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


# ---- abuse: malformed and oversized bodies, idle and slow connections, big requests beside small ones -------------

GUARDED = ["--max-body-mb", "0.05", "--max-request-tiles", "8", "--timeout-keep-alive", "2", "--timeout-read", "3",
           "--max-connections", "8"]


@pytest.fixture(scope="module")
def guarded(tiny_ckpt):
    """A server with small limits: 50 KiB bodies, 8 tiles a request, 2 s idle, 3 s to send a request, 8 connections."""
    with server(tiny_ckpt, *GUARDED) as (url, _):
        yield url


def malformed_bodies(image: str) -> dict[str, bytes]:
    """Bodies no client should be able to turn into a 500: each with a part of the message it must get."""
    ok = '"input": "%s"' % image
    cases = {
        "nested too deeply": b"[" * 5000,
        "nested too deeply ": b'{"input": ' + b"[" * 40_000,
        "must be a JSON object, got an array": b"[" * 500 + b"]" * 500,
        "input[0]: expected a base64 string or a data URL, got list ": b'{"input": ' + b"[" * 500 + b"]" * 500 + b"}",
        "not valid JSON (Expecting value": b"",
        "must be a JSON object, got null": b"null",
        "must be a JSON object, got a number": b"1",
        "not valid JSON (Expecting": b'{"input": }',
        "not valid JSON ('utf-8' codec": b'{"input": "\xff\xfe\xfd"}',
        "input[0]: not valid base64": b'{"input": "\\ud800"}',
        "duplicate key 'input'": ('{%s, %s}' % (ok, ok)).encode(),
        "Exceeds the limit (4300 digits)": b'{"input": ' + b"9" * 5000 + b"}",
        "Infinity is not a JSON number": b'{"input": Infinity}',
        "NaN is not a JSON number": b'{"input": NaN}',
        "input must be an image (base64": b'{"input": 1e999}',
        "input[0]: expected a base64 string or a data URL, got int": b'{"input": [5]}',
        "input[0]: expected a base64 string or a data URL, got NoneType": b'{"input": [null]}',
        "input[0]: expected a base64 string or a data URL, got list": b'{"input": [[]]}',
        "input must be an image (base64 ": b'{"input": {}}',
        "input must be an image (base64  ": b'{"input": []}',
        "input[0]: empty image": b'{"input": ""}',
        "at most 256 images per request": ('{"input": [%s]}' % ",".join(['"AAAA"'] * 257)).encode(),
        "encoding_format must be float or base64, got an array": ('{%s, "encoding_format": ["float"]}' % ok).encode(),
        "encoding_format must be float or base64, got 'floats'": ('{%s, "encoding_format": "floats"}' % ok).encode(),
        "model must be a string, got an object": ('{%s, "model": {"a": [[[1]]]}}' % ok).encode(),
        "over --max-request-tiles 8": ('{"input": [%s]}' % ",".join(['"%s"' % image] * 9)).encode(),
    }
    features = {
        "layers must be a list of integers": [b'"1"', b"[1.5]", b"[true]", b'{"1": 1}', b"[" * 500 + b"]" * 500],
        "layers: layer 99 is out of range": [b"[99]"],
        "layers: layer 1000000000000000000000000000000 is out of range": [b"[1" + b"0" * 30 + b"]"],
    }
    for message, values in features.items():
        for n, value in enumerate(values):
            cases[message + " " * n + "/features"] = b'{%s, "layers": %s}' % (ok.encode(), value)
    cases["patch_tokens must be true or false, got 'yes'/features"] = b'{%s, "patch_tokens": "yes"}' % ok.encode()
    cases["format must be json or arrow, got a number/features"] = b'{%s, "format": 1}' % ok.encode()
    return cases


def tiny_png(seed: int) -> str:
    """An 8x8 PNG of random pixels, base64 (one tile, whatever the model's size)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_malformed_bodies_get_400_and_the_connection_stays_usable(guarded):
    import http.client
    import json

    image = tiny_png(0)
    conn = http.client.HTTPConnection("127.0.0.1", int(guarded.rsplit(":", 1)[1]), timeout=60)

    def post(body: bytes, path: str = "/v1/embeddings") -> tuple[int, dict, str]:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read()), r.getheader("connection", "")

    status, _, _ = post(b"[" * 5000)  # the case: was a plain-text 500 and a closed connection
    assert status == 400
    port = conn.sock.getsockname()[1]
    status, body, _ = post(b'{"input": ["%s"]}' % image.encode())
    assert status == 200 and len(body["data"]) == 1
    for message, raw in malformed_bodies(image).items():
        message, _, path = message.strip().partition("/")
        status, body, connection = post(raw, f"/v1/{path or 'embeddings'}")
        want = 413 if "max-request-tiles" in message else 400
        assert status == want and message.strip() in body["error"]["message"], (message, status, body)
        assert body["error"]["code"] == status and connection != "close"
    assert post(b'{"input": ["%s"]}' % image.encode())[0] == 200
    assert conn.sock.getsockname()[1] == port  # the same connection all along
    conn.close()


def post_raw(url: str, head: bytes, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head + body)
    return sock


def test_oversized_body_gets_413_that_every_client_sees(guarded, photos, tmp_path):
    import json
    import urllib.error
    import urllib.request

    # 12 MB > 50 KiB: more than the client's socket buffers take, so it is still sending when the 413 comes.
    body = json.dumps({"input": ["A" * 12_000_000]}).encode()
    request = urllib.request.Request(f"{guarded}/v1/embeddings", data=body,
                                     headers={"Content-Type": "application/json"})  # urllib sends Connection: close
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 413 and "over --max-body-mb 0.05" in json.loads(e.value.read())["error"]["message"]
    assert e.value.headers["connection"] == "close"

    r = httpx.post(f"{guarded}/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.headers["connection"] == "close"
    pieces = [body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)]  # no length: chunked, counted as it comes
    chunked = httpx.post(f"{guarded}/v1/embeddings", content=iter(pieces))
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "request_too_large"

    (tmp_path / "body.json").write_bytes(body)
    for expect in ([], ["-H", "Expect:"]):  # curl waits for 100-continue on a large body unless told not to
        out = subprocess.run(["curl", "-sS", "-o", str(tmp_path / "answer"), "-w", "%{http_code}", *expect,
                              "-H", "Content-Type: application/json", "--data-binary", f"@{tmp_path / 'body.json'}",
                              f"{guarded}/v1/embeddings"], capture_output=True, text=True, timeout=60)
        assert out.stdout == "413", out.stderr
        assert json.loads((tmp_path / "answer").read_bytes())["error"]["code"] == 413
    assert httpx.post(f"{guarded}/v1/embeddings", json={"input": [data_url(photos[0])]}).status_code == 200


def test_a_refused_body_is_drained_within_bounds(guarded):
    # Content-Length 1 GB: the server answers 413, then discards at most 16 MiB (its bound here) and closes.
    sock = post_raw(guarded, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000000000\r\n\r\n")
    sent, chunk = 0, b"x" * 65536
    with pytest.raises(OSError):  # a reset or a broken pipe once the server has closed
        while sent < 1_000_000_000:
            sock.sendall(chunk)
            sent += len(chunk)
    print(f"[serve] a 1 GB body refused: {sent / 2**20:.1f} MiB sent before the server closed "
          "(bound 16 MiB + socket buffers)")
    assert sent < 128 * 2**20
    sock.close()


def test_idle_and_slow_connections_are_closed(guarded):
    from internvit.cli import build_parser
    from internvit.serve import ServeOptions

    # Defaults: seconds, not forever (nginx's keepalive_timeout is 75 s).
    defaults = build_parser().parse_args(["serve"])
    assert defaults.timeout_keep_alive == ServeOptions().timeout_keep_alive <= 75
    assert defaults.timeout_read == ServeOptions().timeout_read <= 75

    def closed_after(sock: socket.socket) -> float:
        start = time.monotonic()
        while sock.recv(65536):  # a response, if any, then the end of the stream
            pass
        return time.monotonic() - start

    silent = post_raw(guarded, b"")
    assert 1.5 < closed_after(silent) < 10  # --timeout-keep-alive 2
    after_response = post_raw(guarded, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert 1.5 < closed_after(after_response) < 10
    slow = post_raw(guarded, b"")
    start = time.monotonic()
    with pytest.raises(OSError):  # one header byte every 0.2 s: cut at --timeout-read 3
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Padding: " + b"x" * 1000:
            slow.sendall(bytes([byte]))
            time.sleep(0.2)
            assert time.monotonic() - start < 15
    assert 2.5 < time.monotonic() - start < 15
    for sock in (silent, after_response, slow):
        sock.close()

    # --max-connections 8: past it, a connection is closed at once while the others stay open.
    socks = [post_raw(guarded, b"") for _ in range(12)]
    time.sleep(0.5)  # well within --timeout-keep-alive 2
    still_open = []
    for sock in socks:
        sock.setblocking(False)
        try:
            still_open.append(sock.recv(1) != b"")
        except BlockingIOError:
            still_open.append(True)
        sock.close()
    assert 1 <= sum(still_open) <= 8, still_open
    assert httpx.get(f"{guarded}/health").status_code == 200


@pytest.mark.slow
def test_a_small_request_is_not_starved_by_big_ones(tiny_ckpt_448):
    """Two 256-image requests in flight: a 1-image request waits about one forward, and memory stays bounded; when
    their clients go, their work stops. (448-px tiles: the big requests must last.)"""
    big, small = {"input": [tiny_png(i) for i in range(256)]}, {"input": [tiny_png(1000)]}
    with server(tiny_ckpt_448, "--max-batch-tiles", "4") as (url, proc):
        def rss_mb(field: str) -> float:
            text = Path(f"/proc/{proc.pid}/status").read_text()
            return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field))) / 1024

        def timed() -> float:
            start = time.monotonic()
            assert httpx.post(f"{url}/v1/embeddings", json=small, timeout=300).status_code == 200
            return time.monotonic() - start

        idle = min(timed() for _ in range(3))
        before = rss_mb("VmRSS")
        import json

        body = json.dumps(big).encode()
        head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n")
        bigs = [post_raw(url, head % len(body), body) for _ in range(2)]
        deadline = time.monotonic() + 60
        while _metric(httpx.get(f"{url}/metrics").text, "internvit_queue_depth") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # both well under way
        busy = [timed() for _ in range(3)]
        growth = rss_mb("VmHWM") - before
        print(f"[serve] 1-image request: idle {idle:.2f} s, beside two 256-image requests "
              f"{', '.join(f'{b:.2f}' for b in busy)} s; RSS growth {growth:.0f} MB")
        assert max(busy) <= max(3.0, 4 * idle)
        assert growth <= 1024
        assert _metric(httpx.get(f"{url}/metrics").text, "internvit_queue_depth") == 2  # they were beside it
        for sock in bigs:  # clients that give up: their requests' work stops (about 25 s of it left here)
            sock.close()
        deadline = time.monotonic() + 10
        while _metric(httpx.get(f"{url}/metrics").text, "internvit_queue_depth") > 0:
            assert time.monotonic() < deadline, "the abandoned requests were not stopped"
            time.sleep(0.1)
