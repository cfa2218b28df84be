"""`internvit serve`: InternViT features over HTTP, with dynamic batching and overload control.

References:
    - OpenAI's embeddings API (`POST /v1/embeddings`: `input`, `encoding_format` float | base64, the `list` /
      `embedding` objects and `usage`), so that the `openai` client works unchanged; OpenAI's error object.
    - infinity (dynamic batching of concurrent requests) and text-embeddings-inference (a bounded queue, overload
      answered at once with an error, Prometheus metrics): spec/peers.md.
    - Ray Serve's FastAPI ingress (`serve.ingress`) for scale-out: the same app, one model per replica.

The features are `internvit extract`'s: the server is one more engine over the extraction core (`extract/core.py`:
`ExtractOptions`, `load_model`, `Prepare`, `RowEncoder`), so an embedding equals the `cls` row that `extract`
writes for the same file and options.

Flow: the event loop only parses requests. Images are decoded and tiled in a thread pool, then queued as items for
one encoder thread, which takes every waiting item with the same feature request (layers, patch and visual
tokens) up to `max_batch_tiles` tiles, waiting at most `max_wait_ms` for more after the first, and runs them in one
forward (`encode_tiles` splits it in micro-batches). Admission is bounded: at most `max_queue` requests are in the
server at once; the next gets 503 with `Retry-After` at once, never an unbounded wait.

Differs from OpenAI: `input` holds images (data URLs or bare base64), never text, paths or URLs (the server reads
no files and fetches nothing: no path traversal, no SSRF); `usage` counts the encoder's tokens (1025 per
448-px tile).
"""

import asyncio
import base64
import binascii
import hmac
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from internvit import __version__
from internvit.extract.cluster import connect
from internvit.extract.core import ExtractOptions, Item, Prepare, RowEncoder, load_model
from internvit.model.vision import layer_indices
from internvit.registry import DEFAULT_MAX_TILES, DEFAULT_MODEL

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (`Request`) at run time.

MAX_INPUTS = 256  # images per request


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """What `internvit serve` takes (see `build_app`); fixed for the life of the server."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: str = "bf16"
    device: str | None = None
    tiles: str = "none"
    max_tiles: int = DEFAULT_MAX_TILES
    max_batch_tiles: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_body_mb: float = 64.0
    max_pixels: int | None = None
    api_key: str | None = None
    decode_threads: int = 2
    exif_transpose: bool = True
    backend: str | None = None

    def __post_init__(self) -> None:
        self.extract_options()  # validates the options shared with extract
        for name in ("max_queue", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.max_body_mb <= 0:
            raise ValueError("--max-wait-ms must be >= 0 and --max-body-mb > 0")


    def extract_options(self) -> ExtractOptions:
        """The options an `internvit extract` run with the same features would take."""
        return ExtractOptions(model=self.model, revision=self.revision, dtype=self.dtype, device=self.device,
                              batch_size=self.max_batch_tiles, tiles=self.tiles, max_tiles=self.max_tiles,
                              max_pixels=self.max_pixels, exif_transpose=self.exif_transpose, progress=False,
                              backend=self.backend)


class BadInput(ValueError):
    """An item of a request that cannot be used; the message names the item (`input[i]: ...`)."""


@dataclass(frozen=True)
class FeatureRequest:
    """What a request wants computed; items with the same request share a forward."""

    layers: tuple[int, ...] = ()
    patch_tokens: bool = False
    visual_tokens: bool = False


@dataclass
class _Job:
    item: Item
    want: FeatureRequest
    done: Callable[[dict | BaseException], None]
    tiles: int = field(init=False)

    def __post_init__(self) -> None:
        self.tiles = int(self.item.pixels.shape[0])


class Metrics:
    """Prometheus metrics of one server (its own registry, so two servers in one process do not mix)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("internvit_queue_depth", "Requests admitted and not yet answered",
                                 registry=self.registry)
        self.waiting_tiles = Gauge("internvit_waiting_tiles", "Tiles decoded and waiting for the encoder",
                                   registry=self.registry)
        self.batch_tiles = Histogram("internvit_batch_tiles", "Tiles per encoder forward", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_requests = Histogram("internvit_batch_requests", "Requests whose tiles share one forward",
                                        registry=self.registry, buckets=(1, 2, 3, 4, 8, 16, 32, 64))
        self.latency = Histogram("internvit_request_seconds", "Latency of answered requests", ["endpoint"],
                                 registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120))
        self.rejected = Counter("internvit_rejected_requests", "Requests refused", ["reason"], registry=self.registry)
        self.tiles = Counter("internvit_tiles", "Tiles encoded", registry=self.registry)
        self.encoder_seconds = Counter("internvit_encoder_seconds", "Time the encoder was busy", registry=self.registry)
        self.tiles_per_second = Gauge("internvit_tiles_per_second", "Tiles encoded per second over the last minute",
                                      registry=self.registry)
        self._recent: list[tuple[float, int]] = []

    def encoded(self, tiles: int, requests: int, seconds: float) -> None:
        now = time.monotonic()
        self.batch_tiles.observe(tiles)
        self.batch_requests.observe(requests)
        self.tiles.inc(tiles)
        self.encoder_seconds.inc(seconds)
        self._recent = [(t, n) for t, n in self._recent if now - t < 60] + [(now, tiles)]
        span = max(now - self._recent[0][0] + seconds, 1e-9)
        self.tiles_per_second.set(sum(n for _, n in self._recent) / span)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Engine:
    """The model, the decode pool and the encoder thread with its batching queue."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        extract = options.extract_options()
        self.loaded = load_model(extract)
        self.vit, self.source = self.loaded.vit, self.loaded.source
        self.prepare = Prepare.for_model(extract, self.loaded)
        self.metrics = Metrics()
        self.decoders = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="internvit-decode")
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._encoders: dict[FeatureRequest, RowEncoder] = {}
        self._admitted = 0
        self._lock = threading.Lock()
        self.ready = False
        self._thread = threading.Thread(target=self._encode_loop, name="internvit-encoder", daemon=True)
        self._thread.start()

    # ---- admission -------------------------------------------------------------------------------------

    def admit(self) -> bool:
        """Take a place in the bounded queue, or say there is none (the caller answers 503)."""
        with self._lock:
            if self._admitted >= self.options.max_queue:
                return False
            self._admitted += 1
            self.metrics.queue_depth.set(self._admitted)
            return True

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1
            self.metrics.queue_depth.set(self._admitted)

    # ---- work ------------------------------------------------------------------------------------------

    def decode(self, index: int, data: bytes) -> Item:
        """Bytes -> tiles, as `extract` prepares a file (in a decode thread)."""
        item = self.prepare(f"input[{index}]", data)
        if item.error is not None:
            raise BadInput(item.error)
        return item

    def warm_up(self) -> None:
        """One forward before /ready says yes, so that the first request does not pay for lazy initialisation."""
        from PIL import Image

        size = self.vit.config.image_size
        item = self.prepare("warm-up", _png(Image.new("RGB", (size, size), (127, 127, 127))))
        done: Future = Future()
        self.submit(item, FeatureRequest(), done.set_result)
        result = done.result()
        if isinstance(result, BaseException):
            raise result
        self.ready = True

    def submit(self, item: Item, want: FeatureRequest, done: Callable[[dict | BaseException], None]) -> None:
        job = _Job(item, want, done)
        self.metrics.waiting_tiles.inc(job.tiles)
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)
        self.decoders.shutdown(wait=False, cancel_futures=True)

    def _encode_loop(self) -> None:
        pending: list[_Job] = []
        while True:
            if not pending:
                job = self._jobs.get()
                if job is None:
                    return
                pending.append(job)
            want = pending[0].want
            batch, rest, tiles = [], [], 0
            for job in pending:  # the oldest request's kind first; others wait for the next forward
                if job.want == want and (not batch or tiles + job.tiles <= self.options.max_batch_tiles):
                    batch.append(job)
                    tiles += job.tiles
                else:
                    rest.append(job)
            deadline = time.monotonic() + self.options.max_wait_ms / 1000
            stop = False
            while tiles < self.options.max_batch_tiles:
                try:
                    job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                if job.want == want and tiles + job.tiles <= self.options.max_batch_tiles:
                    batch.append(job)
                    tiles += job.tiles
                else:
                    rest.append(job)
            pending = rest
            self._run(batch, want)
            if stop:
                for job in pending:
                    job.done(RuntimeError("the server is shutting down"))
                return

    def _run(self, batch: list[_Job], want: FeatureRequest) -> None:
        tiles = sum(job.tiles for job in batch)
        self.metrics.waiting_tiles.dec(tiles)
        try:
            encoder = self._encoders.get(want)
            if encoder is None:
                encoder = self._encoders[want] = RowEncoder(
                    self.loaded, layers=want.layers, patch_tokens=want.patch_tokens,
                    visual_tokens=want.visual_tokens, micro_batch=self.options.max_batch_tiles)
            start = time.perf_counter()
            columns = encoder([job.item for job in batch])
            self.metrics.encoded(tiles, len({id(job.done) for job in batch}), time.perf_counter() - start)
            rows = _rows(columns)
        except BaseException as e:  # noqa: BLE001 - a failed forward fails its requests, not the server
            for job in batch:
                job.done(e)
            return
        for job, row in zip(batch, rows):
            job.done(row)


def _rows(columns: dict) -> list[dict]:
    """The encoder's columns (lists and Arrow arrays) -> one dict per item."""
    import pyarrow as pa

    table = pa.table({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()})
    return table.to_pylist()


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_image_input(index: int, value: object) -> bytes:
    """A request item -> encoded image bytes: a `data:image/...;base64,` URL or bare base64, nothing else."""
    if not isinstance(value, str):
        raise BadInput(f"input[{index}]: expected a base64 string or a data URL, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise BadInput(f"input[{index}]: a data URL must be data:image/...;base64,<data>")
        if not header[5:].startswith("image/"):
            raise BadInput(f"input[{index}]: not an image data URL ({header[5:].split(';')[0] or 'no type'})")
    elif "://" in text[:16]:  # a path is not base64 either; neither is ever opened or fetched
        raise BadInput(f"input[{index}]: URLs are not fetched; send the image itself, base64-encoded")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadInput(f"input[{index}]: not valid base64 ({e})") from None
    if not data:
        raise BadInput(f"input[{index}]: empty image")
    return data


# ---- the HTTP app ---------------------------------------------------------------------------------------


def build_app(options: ServeOptions, *, engine: Engine | None = None):
    """The FastAPI app: `/v1/embeddings`, `/v1/features`, `/health`, `/ready`, `/metrics`.

    The model is loaded (and warmed up) in the app's lifespan, so that the same app runs under uvicorn and in a
    Ray Serve replica. `engine` lets a caller hand in one already built.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["engine"] = engine or await asyncio.to_thread(Engine, options)
        await asyncio.to_thread(state["engine"].warm_up)
        yield
        if engine is None:
            await asyncio.to_thread(state["engine"].close)

    app = FastAPI(title="internvit", version=_version(), lifespan=lifespan)
    limit = int(options.max_body_mb * (1 << 20))

    def error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
              headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if options.api_key is not None:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
                    _engine_metrics(state, "unauthorized")
                    return error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                 kind="authentication_error")
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                _engine_metrics(state, "too_large")
                return error(413, f"request body of {int(declared)} bytes is over --max-body-mb "
                             f"{options.max_body_mb:g}", kind="request_too_large")
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        body = bytearray()
        async for chunk in request.stream():  # a chunked body has no content-length: count as it comes
            body += chunk
            if len(body) > limit:
                raise _HTTPError(413, f"request body is over --max-body-mb {options.max_body_mb:g}",
                                 "request_too_large")
        import json

        try:
            payload = json.loads(body)
        except ValueError as e:
            raise _HTTPError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(payload, dict):
            raise _HTTPError(400, "the body must be a JSON object")
        return payload

    async def compute(payload: dict, want: FeatureRequest) -> tuple[list[dict], int]:
        """The rows of a request's images, and the tokens the encoder saw for them."""
        eng: Engine = state["engine"]
        inputs = payload.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise _HTTPError(400, "input must be an image (base64 or a data URL) or a non-empty list of them",
                             param="input")
        if len(inputs) > MAX_INPUTS:
            raise _HTTPError(400, f"at most {MAX_INPUTS} images per request, got {len(inputs)}", param="input")
        if not eng.admit():
            eng.metrics.rejected.labels("overloaded").inc()
            raise _HTTPError(503, f"the server is at capacity ({options.max_queue} requests); retry shortly",
                             "server_overloaded", headers={"Retry-After": "1"})
        try:
            loop = asyncio.get_running_loop()
            try:
                datas = [decode_image_input(i, v) for i, v in enumerate(inputs)]
                items = await asyncio.gather(*(loop.run_in_executor(eng.decoders, eng.decode, i, d)
                                               for i, d in enumerate(datas)))
            except BadInput as e:
                eng.metrics.rejected.labels("bad_input").inc()
                raise _HTTPError(400, str(e), param=str(e).split(":")[0]) from None
            futures = [loop.create_future() for _ in items]
            for item, fut in zip(items, futures):
                eng.submit(item, want, lambda r, fut=fut: loop.call_soon_threadsafe(_settle, fut, r))
            rows = await asyncio.gather(*futures)
        finally:
            eng.release()
        for i, row in enumerate(rows):
            if row["error"] is not None:  # e.g. non-finite features
                raise _HTTPError(500, f"input[{i}]: {row['error'].split(': ', 1)[-1]}", "encoder_error")
        patch = eng.vit.config.patch_size
        tokens = sum(t * (1 + (h // patch) * (w // patch)) for t, _, h, w in (it.pixels.shape for it in items))
        return rows, tokens

    @app.exception_handler(_HTTPError)
    async def http_error(request: Request, e: _HTTPError):
        return error(e.status, e.message, kind=e.kind, param=e.param, headers=e.headers)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        start = time.perf_counter()
        payload = await read_json(request)
        fmt = payload.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise _HTTPError(400, f"encoding_format must be float or base64, got {fmt!r}", param="encoding_format")
        rows, tokens = await compute(payload, FeatureRequest())
        data = []
        for i, row in enumerate(rows):
            vec = np.asarray(row["cls"], dtype=np.float32)
            emb = base64.b64encode(vec.astype("<f4").tobytes()).decode() if fmt == "base64" else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        state["engine"].metrics.latency.labels("embeddings").observe(time.perf_counter() - start)
        return {"object": "list", "data": data, "model": payload.get("model") or state["engine"].source,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/features")
    async def features(request: Request):
        start = time.perf_counter()
        payload = await read_json(request)
        eng: Engine = state["engine"]
        try:
            layers = layer_indices(payload.get("layers") or (), eng.vit.config.num_hidden_layers)
        except (TypeError, ValueError) as e:
            raise _HTTPError(400, f"layers: {e}", param="layers") from None
        want = FeatureRequest(layers, bool(payload.get("patch_tokens")), bool(payload.get("visual_tokens")))
        fmt = payload.get("format", "json")
        if fmt not in ("json", "arrow"):
            raise _HTTPError(400, f"format must be json or arrow, got {fmt!r}", param="format")
        rows, _ = await compute(payload, want)
        for i, row in enumerate(rows):
            row["index"] = i
            row.pop("path"), row.pop("error"), row.pop("frame_indices")
        eng.metrics.latency.labels("features").observe(time.perf_counter() - start)
        if fmt == "arrow":
            import pyarrow as pa

            table = pa.Table.from_pylist(rows)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            return Response(sink.getvalue().to_pybytes(), media_type="application/vnd.apache.arrow.stream")
        return {"object": "list", "data": rows, "model": eng.source}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        eng = state.get("engine")
        if eng is None or not eng.ready:
            return error(503, "the model is loading", kind="not_ready")
        return {"status": "ready", "model": eng.source}

    @app.get("/metrics")
    async def metrics():
        eng = state.get("engine")
        body = eng.metrics.render() if eng is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def _settle(fut: asyncio.Future, result: dict | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def _engine_metrics(state: dict, reason: str) -> None:
    eng = state.get("engine")
    if eng is not None:
        eng.metrics.rejected.labels(reason).inc()


def _version() -> str:
    return __version__


# ---- running it -----------------------------------------------------------------------------------------


def serve(options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app under uvicorn until SIGTERM or Ctrl-C; both stop accepting and finish the requests in flight."""
    import signal

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(build_app(options), host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=120))
    # uvicorn re-raises the signal that stopped it once it is done; by then the shutdown was graceful.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise RuntimeError(f"the server did not start on {host}:{port} (see the log above)")


def serve_ray(options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
              address: str | None = None, blocking: bool = True):
    """Deploy the same app on Ray Serve (one model per replica) behind Ray's HTTP proxy on host:port.

    Without `address` a local Ray instance bound to loopback is started. With `blocking`, runs until Ctrl-C or
    SIGTERM, then shuts Serve down; else returns the deployment handle.
    """
    connect(address)
    from ray import serve as ray_serve

    app = build_app(options)

    @ray_serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0})
    @ray_serve.ingress(app)
    class InternViTReplica:
        pass

    ray_serve.start(http_options={"host": host, "port": port})
    handle = ray_serve.run(InternViTReplica.bind(), name="internvit", route_prefix="/")
    if not blocking:
        return handle
    import signal

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray_serve.shutdown()
    return None
