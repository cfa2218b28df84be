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

Flow: the event loop only parses requests. Each request is a lane: its images are decoded and tiled in a thread
pool, in order, a few at a time (at most about two forwards' worth of tiles decoded and not yet encoded, so a
request's memory is bounded whatever its size), and queued in the lane. One encoder thread takes items round-robin
across the lanes that want the same features (layers, patch and visual tokens), one item per lane in turn, up to
`max_batch_tiles` tiles, waiting at most `max_wait_ms` for more after the first, and runs them in one forward
(`encode_tiles` splits it in micro-batches); so a 1-image request waits about one forward behind a 256-image one,
not for all of it. A request's rows are all it keeps of an encoded item; a client that disconnects stops its
request's work. Admission is bounded: at most `max_queue` requests are in the server at once; the next gets 503
with `Retry-After` at once, never an unbounded wait. A request's tiles are capped (`max_request_tiles`, 413 past
it). Connections have an idle timeout, a read deadline and a cap (`serve_http.py`).

Differs from OpenAI: `input` holds images (data URLs or bare base64), never text, paths or URLs (the server reads
no files and fetches nothing: no path traversal, no SSRF); `usage` counts the encoder's tokens (1025 per
448-px tile).
"""

import asyncio
import base64
import binascii
import hmac
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from internvit import __version__
from internvit.extract.cluster import connect
from internvit.extract.core import ExtractOptions, Item, Prepare, RowEncoder, load_model
from internvit.model.vision import layer_indices
from internvit.registry import DEFAULT_MAX_TILES, DEFAULT_MODEL
from internvit.serve_http import ConnectionLimits

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (`Request`) at run time.

MAX_INPUTS = 256  # images per request


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """What `internvit serve` takes (see `build_app`); fixed for the life of the server."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: str | None = None  # bf16, or an export folder's own precision
    device: str | None = None
    tiles: str = "none"
    max_tiles: int = DEFAULT_MAX_TILES
    max_batch_tiles: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_body_mb: float = 64.0
    max_pixels: int | None = None
    max_request_tiles: int = 1024
    api_key: str | None = None
    decode_threads: int = 2
    exif_transpose: bool = True
    backend: str | None = None
    timeout_keep_alive: float = 5.0
    timeout_read: float = 30.0
    max_connections: int = 512

    def __post_init__(self) -> None:
        self.extract_options()  # validates the options shared with extract
        for name in ("max_queue", "decode_threads", "max_request_tiles", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.max_body_mb <= 0:
            raise ValueError("--max-wait-ms must be >= 0 and --max-body-mb > 0")
        if not (self.timeout_keep_alive > 0 and self.timeout_read > 0):
            raise ValueError("--timeout-keep-alive and --timeout-read must be > 0 seconds")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    def connection_limits(self) -> ConnectionLimits:
        """The limits of `serve_http.py`: the rest of a refused body is discarded within the bounds of a body (at
        least 16 MiB, more than a client's socket buffers hold; at most --timeout-read seconds)."""
        return ConnectionLimits(keep_alive=self.timeout_keep_alive, read=self.timeout_read,
                                max_connections=self.max_connections,
                                linger_bytes=max(self.max_body_bytes, 16 << 20), linger_seconds=self.timeout_read)

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


class RequestTooLarge(ValueError):
    """A request over `max_request_tiles` (answered 413)."""


@dataclass
class _Job:
    item: Item
    done: Callable[[dict | BaseException], None]
    tiles: int = field(init=False)

    def __post_init__(self) -> None:
        self.tiles = int(self.item.pixels.shape[0])


@dataclass(eq=False)
class Lane:
    """One request's decoded items waiting for the encoder, in order: the unit the encoder serves round-robin."""

    want: FeatureRequest
    jobs: deque[_Job] = field(default_factory=deque)


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
    """The model, the decode pool and the encoder thread, which serves the requests' lanes round-robin."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        extract = options.extract_options()
        self.loaded = load_model(extract)
        self.vit, self.source = self.loaded.vit, self.loaded.source
        self.prepare = Prepare.for_model(extract, self.loaded)
        self.metrics = Metrics()
        self.decoders = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="internvit-decode")
        self._lanes: list[Lane] = []  # the open requests, least recently served first
        self._work = threading.Condition()  # guards the lanes and `_stopping`
        self._stopping = False
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

    # ---- one request (on the event loop) ---------------------------------------------------------------

    def window(self) -> int:
        """Images a request may have decoding or decoded and not yet encoded: about two forwards' worth of tiles
        (one being encoded while the next is decoded), and at least one per decode thread."""
        per_image = 1 if self.options.tiles == "none" else self.options.max_tiles + 1  # + the thumbnail
        return max(self.options.decode_threads, 2 * self.options.max_batch_tiles // per_image)

    async def encode(self, datas: list[bytes], want: FeatureRequest) -> tuple[list[dict], int]:
        """One request's images -> their rows, and the tokens the encoder saw for them.

        Images are decoded in order, at most `decode_threads` at once and `window()` not yet encoded, so that a
        request holds a bounded number of tiles whatever its size, and keeps only the rows of encoded ones. A bad
        image (`BadInput`) or too many tiles (`RequestTooLarge`) fails the request at once; its queued items are
        dropped.
        """
        loop = asyncio.get_running_loop()
        lane = self.open_lane(want)
        window, decoding = asyncio.Semaphore(self.window()), asyncio.Semaphore(self.options.decode_threads)
        rows: list = [None] * len(datas)
        count = {"tiles": 0, "tokens": 0}
        patch = self.vit.config.patch_size

        async def one(i: int, data: bytes) -> None:
            try:
                async with decoding:
                    item = await loop.run_in_executor(self.decoders, self.decode, i, data)
                t, _, h, w = item.pixels.shape
                count["tiles"] += t
                count["tokens"] += t * (1 + (h // patch) * (w // patch))
                if count["tiles"] > self.options.max_request_tiles:
                    raise RequestTooLarge(f"the images come to over --max-request-tiles "
                                          f"{self.options.max_request_tiles} tiles (at input[{i}])")
                row = loop.create_future()
                self.submit(lane, item, lambda r: loop.call_soon_threadsafe(_settle, row, r))
                del item  # from here on the lane holds it, and drops it once encoded
                rows[i] = await row
            finally:
                window.release()

        running: set[asyncio.Future] = set()
        try:
            for i, data in enumerate(datas):
                await window.acquire()
                for task in [t for t in running if t.done()]:
                    running.discard(task)
                    task.result()  # a failed image fails the request now
                running.add(asyncio.ensure_future(one(i, data)))
            await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()
            self.close_lane(lane)
        return rows, count["tokens"]

    # ---- lanes (any thread) ----------------------------------------------------------------------------

    def decode(self, index: int, data: bytes) -> Item:
        """Bytes -> tiles, as `extract` prepares a file (in a decode thread)."""
        item = self.prepare(f"input[{index}]", data)
        if item.error is not None:
            raise BadInput(item.error)
        return item

    def open_lane(self, want: FeatureRequest) -> Lane:
        lane = Lane(want)
        with self._work:
            self._lanes.append(lane)
        return lane

    def submit(self, lane: Lane, item: Item, done: Callable[[dict | BaseException], None]) -> None:
        """Queue a decoded item; `done` gets its row (a dict) or the exception that failed its forward."""
        job = _Job(item, done)
        with self._work:
            lane.jobs.append(job)
            self.metrics.waiting_tiles.inc(job.tiles)
            self._work.notify()

    def close_lane(self, lane: Lane) -> None:
        """The request is over: its items not yet encoded are dropped."""
        with self._work:
            self._lanes.remove(lane)
            self.metrics.waiting_tiles.dec(sum(job.tiles for job in lane.jobs))
            lane.jobs.clear()

    def warm_up(self) -> None:
        """One forward before /ready says yes, so that the first request does not pay for lazy initialisation."""
        from PIL import Image

        size = self.vit.config.image_size
        item = self.prepare("warm-up", _png(Image.new("RGB", (size, size), (127, 127, 127))))
        done: Future = Future()
        lane = self.open_lane(FeatureRequest())
        try:
            self.submit(lane, item, done.set_result)
            result = done.result()
        finally:
            self.close_lane(lane)
        if isinstance(result, BaseException):
            raise result
        self.ready = True

    def close(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify()
        self._thread.join(timeout=60)
        self.decoders.shutdown(wait=False, cancel_futures=True)

    # ---- the encoder thread ----------------------------------------------------------------------------

    def _encode_loop(self) -> None:
        while True:
            with self._work:
                batch = self._next_batch()
            if batch is None:
                return
            if batch[0]:  # empty when the lanes it waited for closed meanwhile
                self._run(*batch)

    def _next_batch(self) -> tuple[list[_Job], FeatureRequest, int] | None:
        """The items of the next forward, the features they want and how many requests they serve (None: stop).

        The least recently served lane with items sets the features; lanes that want the same then give one item
        each in turn while the tiles fit (a lane whose next item does not fit gives no more, so its items stay in
        order), after waiting up to `max_wait_ms` for `max_batch_tiles` tiles. Served lanes go to the back.
        """
        while not self._stopping and not any(lane.jobs for lane in self._lanes):
            self._work.wait()
        if self._stopping:
            for lane in self._lanes:
                for job in lane.jobs:
                    job.done(RuntimeError("the server is shutting down"))
                lane.jobs.clear()
            return None
        want = next(lane for lane in self._lanes if lane.jobs).want
        limit = self.options.max_batch_tiles
        deadline = time.monotonic() + self.options.max_wait_ms / 1000
        while sum(job.tiles for lane in self._lanes if lane.want == want for job in lane.jobs) < limit:
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping:
                break
            self._work.wait(left)
        batch, tiles, served = [], 0, []
        lanes = [lane for lane in self._lanes if lane.want == want and lane.jobs]
        while lanes:
            for lane in list(lanes):
                if batch and tiles + lane.jobs[0].tiles > limit:
                    lanes.remove(lane)
                    continue
                job = lane.jobs.popleft()
                batch.append(job)
                tiles += job.tiles
                if lane not in served:
                    served.append(lane)
                if not lane.jobs:
                    lanes.remove(lane)
        self._lanes = [lane for lane in self._lanes if lane not in served] + served
        self.metrics.waiting_tiles.dec(tiles)
        return batch, want, len(served)

    def _run(self, batch: list[_Job], want: FeatureRequest, requests: int) -> None:
        tiles = sum(job.tiles for job in batch)
        try:
            encoder = self._encoders.get(want)
            if encoder is None:
                encoder = self._encoders[want] = RowEncoder(
                    self.loaded, layers=want.layers, patch_tokens=want.patch_tokens,
                    visual_tokens=want.visual_tokens, micro_batch=self.options.max_batch_tiles)
            start = time.perf_counter()
            columns = encoder([job.item for job in batch])
            self.metrics.encoded(tiles, requests, time.perf_counter() - start)
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
    from starlette.requests import ClientDisconnect

    class AsciiJSON(JSONResponse):
        """JSON escaped to ASCII: a lone surrogate a client sent (`"\\ud800"`) cannot fail the response."""

        def render(self, content) -> bytes:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["engine"] = engine or await asyncio.to_thread(Engine, options)
        await asyncio.to_thread(state["engine"].warm_up)
        yield
        if engine is None:
            await asyncio.to_thread(state["engine"].close)

    app = FastAPI(title="internvit", version=_version(), lifespan=lifespan, default_response_class=AsciiJSON)
    limit = options.max_body_bytes

    def error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
              headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
        return AsciiJSON(body, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # Answered before the body is read: `Connection: close`, and serve_http.py discards the rest (bounded).
        if request.url.path.startswith("/v1/"):
            if options.api_key is not None:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
                    _engine_metrics(state, "unauthorized")
                    return error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                 kind="authentication_error", headers={"Connection": "close"})
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                _engine_metrics(state, "too_large")
                return error(413, f"request body of {int(declared)} bytes is over --max-body-mb "
                             f"{options.max_body_mb:g}", kind="request_too_large", headers={"Connection": "close"})
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        body = bytearray()
        try:
            async for chunk in request.stream():  # a chunked body has no content-length: count as it comes
                body += chunk
                if len(body) > limit:
                    _engine_metrics(state, "too_large")
                    raise _HTTPError(413, f"request body is over --max-body-mb {options.max_body_mb:g}",
                                     "request_too_large", headers={"Connection": "close"})
        except ClientDisconnect:  # gone, or cut at --timeout-read: nobody reads the answer
            raise _HTTPError(400, "the client disconnected before sending the whole body") from None
        return parse_json(bytes(body))

    async def compute(request: Request, payload: dict, want: FeatureRequest) -> tuple[list[dict], int]:
        """The rows of a request's images, and the tokens the encoder saw for them; a client that disconnects
        meanwhile stops its request's work (its queued images are dropped)."""
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
            datas = [decode_image_input(i, v) for i, v in enumerate(inputs)]
            work = asyncio.ensure_future(eng.encode(datas, want))
            watch = asyncio.ensure_future(request.receive())  # the body is read: the next message is a disconnect
            try:
                await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done() and not watch.cancelled() and watch.exception() is None \
                        and watch.result()["type"] == "http.disconnect":
                    eng.metrics.rejected.labels("disconnected").inc()
                    raise _HTTPError(400, "the client disconnected")  # nobody reads it
                rows, tokens = await work
            finally:
                watch.cancel()
                work.cancel()
        except BadInput as e:
            eng.metrics.rejected.labels("bad_input").inc()
            raise _HTTPError(400, str(e), param=str(e).split(":")[0]) from None
        except RequestTooLarge as e:
            eng.metrics.rejected.labels("too_many_tiles").inc()
            raise _HTTPError(413, str(e), "request_too_large", param="input") from None
        finally:
            eng.release()
        for i, row in enumerate(rows):
            if row["error"] is not None:  # e.g. non-finite features
                raise _HTTPError(500, f"input[{i}]: {row['error'].split(': ', 1)[-1]}", "encoder_error")
        return rows, tokens

    @app.exception_handler(_HTTPError)
    async def http_error(request: Request, e: _HTTPError):
        return error(e.status, e.message, kind=e.kind, param=e.param, headers=e.headers)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        start = time.perf_counter()
        payload = await read_json(request)
        fmt = _choice(payload, "encoding_format", ("float", "base64"))
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise _HTTPError(400, f"model must be a string, got {_shown(model)}", param="model")
        rows, tokens = await compute(request, payload, FeatureRequest())
        data = []
        for i, row in enumerate(rows):
            vec = np.asarray(row["cls"], dtype=np.float32)
            emb = base64.b64encode(vec.astype("<f4").tobytes()).decode() if fmt == "base64" else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        state["engine"].metrics.latency.labels("embeddings").observe(time.perf_counter() - start)
        return {"object": "list", "data": data, "model": model or state["engine"].source,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/features")
    async def features(request: Request):
        start = time.perf_counter()
        payload = await read_json(request)
        eng: Engine = state["engine"]
        layers = payload.get("layers", [])
        if not isinstance(layers, list) or not all(type(i) is int for i in layers):
            raise _HTTPError(400, "layers must be a list of integers", param="layers")
        try:
            layers = layer_indices(layers, eng.vit.config.num_hidden_layers)
        except ValueError as e:
            raise _HTTPError(400, f"layers: {e}", param="layers") from None
        flags = {}
        for name in ("patch_tokens", "visual_tokens"):
            flags[name] = payload.get(name, False)
            if not isinstance(flags[name], bool):
                raise _HTTPError(400, f"{name} must be true or false, got {_shown(flags[name])}", param=name)
        want = FeatureRequest(layers, **flags)
        fmt = _choice(payload, "format", ("json", "arrow"))
        rows, _ = await compute(request, payload, want)
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


def parse_json(body: bytes) -> dict:
    """A request body -> its JSON object, or a 400 naming the cause: not UTF-8, not JSON, nested too deeply for the
    parser, a duplicate key (ambiguous: parsers keep the first or the last), NaN or Infinity, not an object."""
    def no_duplicates(pairs: list) -> dict:
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"duplicate key {_shown(key)}")
            obj[key] = value
        return obj

    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        payload = json.loads(body, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except RecursionError:
        raise _HTTPError(400, "the body is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # also UnicodeDecodeError and the limit on an integer's digits
        raise _HTTPError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(payload, dict):
        raise _HTTPError(400, f"the body must be a JSON object, got {_shown(payload)}")
    return payload


def _choice(payload: dict, name: str, choices: tuple[str, ...]) -> str:
    value = payload.get(name, choices[0])
    if not isinstance(value, str) or value not in choices:
        raise _HTTPError(400, f"{name} must be {' or '.join(choices)}, got {_shown(value)}", param=name)
    return value


def _shown(value: object) -> str:
    """A client's value in an error message: a short string's repr, else its JSON type (never a deep repr)."""
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    return {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


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

    # h11 (not httptools): its 16 KiB bound on request headers, and serve_http.py's limits on its protocol.
    server = uvicorn.Server(uvicorn.Config(build_app(options), host=host, port=port, log_level=log_level,
                                           http=options.connection_limits().protocol(),
                                           timeout_keep_alive=options.timeout_keep_alive,
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
