"""`extract_features_ray`: the local engine's extraction step, scaled out on Ray Data.

References:
    - Ray Data batch inference: https://docs.ray.io/en/latest/data/batch_inference.html (a pool of actors, one
      model each, fed by CPU tasks);
    - `extract/core.py`: the options, the per-input preprocessing (`Prepare`), the encoder and its columns
      (`RowEncoder`) and the output schema, used here unchanged, so the engines cannot drift apart; the inputs
      (`sources.list_inputs`), the shard folder (`store.ShardStore`) and the cluster (`cluster`: connect, size
      the actor pool, shut down) have their own modules.

The pipeline is one streamed Ray Data dataset:

    inputs: paths (local folders, globs, list files, remote URIs) and Parquet tables of paths or image bytes
      -> prepare: open, decode and tile each input            CPU tasks, 1 CPU each (`Prepare`; with device
                                                               decoding a JPEG's header only)
      -> encode:  a fixed pool of actors, one model each       GPU or CPU, fractional CPUs (`RowEncoder`;
                                                               device decoding: the JPEGs decoded there first)
      -> write:   a Parquet shard per `rows_per_shard` rows    CPU tasks, each shard written whole, then renamed

The driver only lists the inputs, reads which of them the output already holds, sizes the actor pool from the
resources Ray reports, and watches progress: a run finishes, or fails with a message; it never waits silently.

Differs from the local engine:
    - `out` is a folder of shards `part-<hash of its paths>.parquet` (the local engine writes one file); rows are
      in no particular order; a shard is named by its inputs, so a retried write task replaces its own shard;
    - a killed run loses the rows not yet in a shard (at most `rows_per_shard` per write task, plus those in
      flight); there is no consolidation step (read the folder with `pyarrow.parquet.read_table(out)`);
    - when a path has rows in two shards (a retried error, a path listed twice) the newest shard's row is kept and
      the older shard is rewritten without it, at the start and the end of every run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from internvit._fileio import filesystem, is_uri
from internvit.extract.cluster import TASK_CPUS, RayRunError, connect, shutdown, size_pool
from internvit.extract.core import (
    ExtractOptions,
    ExtractSummary,
    Item,
    Prepare,
    RowEncoder,
    device_decoding,
    inspect_model,
    load_model,
    options_from,
    output_schema,
)
from internvit.sources import Member, list_inputs, read_bytes
from internvit.extract.store import ShardStore, output_lock, shard_name, write_whole

PREPARE_MEMORY = 1 << 30  # what each prepare task reserves: a worker with torch (~450 MB) + a 100 MP image (300 MB)
SHARD_BYTES = 256 << 20  # the size a default shard stays under
MAX_INPUT_BLOCKS = 1000  # path lists are cut into at most this many blocks (25k take the driver a minute)


@dataclass
class RayExtractSummary(ExtractSummary):
    """`ExtractSummary`; `load_seconds` is the time to start or reach Ray, `model_seconds` the mean busy time of an
    actor's encoder."""

    num_actors: int = 0


# ---- the three stages (module level: Ray imports them by name on the workers) ----------------------------


def _prepare_batch(batch, *, prepare: Prepare, skip: frozenset):
    """Rows (path, maybe data) -> one pickled `Item` per input: its tiles, or the error that stopped it."""
    import pyarrow as pa

    torch.set_num_threads(1)  # as the local engine's loader workers: the encoder owns the cores
    paths = batch.column("path").to_pylist()
    column = {name: batch.column(name).to_pylist() if name in batch.column_names else [None] * len(paths)
              for name in ("data", "error", "shard", "offset", "size")}
    items = []
    for i, (path, data) in enumerate(zip(paths, column["data"])):
        if path in skip:
            continue
        shard, error = column["shard"][i], column["error"][i]
        if shard is not None or error is not None:  # in a tar shard (or a broken one)
            member = Member(shard, path[len(shard) + 1:], column["offset"][i], column["size"][i]) if shard else None
            items.append(pickle.dumps(prepare.member(path, member, error), protocol=5))
            continue
        if data is None and is_uri(path):
            try:
                data = read_bytes(path)
            except Exception as e:  # missing, no permission, network: the input's row says so
                items.append(pickle.dumps(Item(path, error=f"{path}: {e.__class__.__name__}: {e}"), protocol=5))
                continue
        items.append(pickle.dumps(prepare(path, data), protocol=5))
    return pa.table({"item": pa.array(items, pa.large_binary())})


class _Progress:
    """A counter the actors report to after each batch (a Ray actor with no CPU), read by the driver."""

    def __init__(self) -> None:
        self.rows = self.failed = self.tiles = 0
        self.seconds = 0.0

    def add(self, rows: int, failed: int, tiles: int, seconds: float) -> None:
        self.rows += rows
        self.failed += failed
        self.tiles += tiles
        self.seconds += seconds

    def get(self) -> tuple[int, int, int, float]:
        return self.rows, self.failed, self.tiles, self.seconds


class _EncodeActor:
    """One model per actor: a batch of pickled `Item`s -> their rows, as `RowEncoder` makes them for every engine."""

    def __init__(self, *, options: ExtractOptions, threads, schema, progress, prepare: Prepare) -> None:
        if threads:
            torch.set_num_threads(threads)
        # Ray hides the GPUs this actor did not ask for: "default" means what it was given.
        loaded = load_model(options, options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = RowEncoder.for_options(loaded, options)
        self.schema, self.progress = schema, progress
        self.prepare = prepare if prepare.device_decode else None  # the tasks handed over undecoded JPEGs

    def __call__(self, batch):
        import pyarrow as pa

        items = [pickle.loads(b) for b in batch.column("item").to_pylist()]
        if not items:
            return self.schema.empty_table()
        seconds, tiles = self.encoder.seconds, self.encoder.tiles
        if self.prepare is not None:
            self.prepare.decode_on_device(items, self.encoder.device)
        table = pa.Table.from_pydict(self.encoder(items), schema=self.schema)
        self.progress.add.remote(len(items), sum(it.error is not None for it in items),
                                 self.encoder.tiles - tiles, self.encoder.seconds - seconds)
        return table


def _write_batch(batch, *, out: str, schema):
    """Rows -> one shard (whole or absent); returns its name and row count for the driver."""
    import pyarrow as pa

    table = batch.select(schema.names).cast(schema).replace_schema_metadata(schema.metadata)
    if table.num_rows == 0:
        return pa.table({"shard": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
    fs, root = filesystem(out)
    name = shard_name(table.column("path").to_pylist())
    write_whole(fs, f"{root.rstrip('/')}/{name}", table)
    return pa.table({"shard": [name], "rows": [table.num_rows]})


def _rows_per_shard(config, *, tiles_per_row: int, pooled: int, patch_tokens: bool, visual_width: int) -> int:
    """Up to 1000 rows, fewer when a row is wide, so that a shard (and a write task's input) stays < SHARD_BYTES."""
    tokens = (config.image_size // config.patch_size) ** 2  # patch tokens per tile: 1024 at 448 px
    floats = 2 * config.hidden_size * pooled  # cls + mean per pooled layer
    floats += patch_tokens * tiles_per_row * tokens * config.hidden_size
    floats += tiles_per_row * tokens // 4 * visual_width  # 256 visual tokens per tile
    return max(1, min(1000, SHARD_BYTES // (4 * floats)))

def extract_features_ray(
    sources,
    out: str | os.PathLike,
    options: ExtractOptions | None = None,
    *,
    address: str | None = None,
    num_actors: int | None = None,
    gpus_per_actor: float = 0,
    cpus_per_actor: float | None = None,
    rows_per_shard: int | None = None,
    path_column: str = "path",
    bytes_column: str = "bytes",
    stall_timeout: float | None = 1800.0,
    **fields,
) -> RayExtractSummary:
    """Extract features of every input named by `sources` into the folder `out`, on Ray Data.

    `options` (an `ExtractOptions`, or its fields as keywords) mean the same as for `extract_features` and give
    the same rows (see the README); `options.device` is the actors' device (default CUDA where the actor has a GPU).
    These are the Ray engine's own:

    Args:
        sources: as `extract_features`, plus URIs (`s3://bucket/photos/`, `gs://...`, any filesystem pyarrow
            opens) and `.parquet` tables with a `path_column` (each row's name) and optionally a `bytes_column`
            (the encoded image; rows without it are opened by path).
        out: a folder (local, shared or a URI) of Parquet shards; inputs that already have a row there are skipped.
        address: a Ray cluster (`ray://head:10001`, `head:6379`, `auto`); None starts a local instance on
            loopback, shut down at the end. An already initialised Ray is used as it is.
        num_actors: encoder actors (one model each); default one per GPU group, or one per node for CPU actors.
        gpus_per_actor: GPUs per actor (0 = CPU actors; 0.5 puts two on a GPU).
        cpus_per_actor: CPUs each actor reserves; default min(1, (CPUs - 1) / num_actors), so that reading
            and preprocessing always keep at least one CPU.
        rows_per_shard: rows per output shard, and the most a killed run loses per write task; default up to
            1000, fewer for wide rows (patch or visual tokens) so that a shard stays under about 256 MB.
        path_column, bytes_column: the columns of input tables.
        stall_timeout: fail with a message after this many seconds without a finished batch (None = never).
    """
    options = options_from(options, fields)
    if isinstance(options.model, torch.nn.Module):
        raise TypeError("the ray engine loads the model in each actor: pass a name or path, not a module")
    out = os.fspath(out)
    with contextlib.ExitStack() as stack:
        if not is_uri(out):  # object stores have no locks: one writer per URI is the user's to keep
            stack.enter_context(output_lock(out.rstrip("/\\") or out))
        start = time.perf_counter()
        loaded = inspect_model(options)  # the driver reads no weights (or makes the cached export once)
        options = dataclasses.replace(options, backend=loaded.backend)  # every actor runs what the driver chose
        # JPEGs decoded by the actors, on their device (the tasks only read headers): as the local engine decides
        device_decode = device_decoding(options, options.device or ("cuda" if gpus_per_actor else "cpu"))
        schema = output_schema(options, loaded, jpeg_decoder="device" if device_decode else "pillow")
        config = loaded.vit.config
        if rows_per_shard is None:
            tiles_per_row = max(options.frames, options.max_tiles + 1 if options.tiles == "dynamic" else 1)
            width = loaded.projector.config.llm_hidden_size if loaded.projector else 4 * config.hidden_size
            rows_per_shard = _rows_per_shard(config, tiles_per_row=tiles_per_row, pooled=1 + len(options.layers),
                                             patch_tokens=options.patch_tokens,
                                             visual_width=width * options.visual_tokens)
        shards = ShardStore(out, schema)
        shards.dedupe()  # a run killed between writing a retried row and removing the old one
        done = shards.finished(include_errors=not options.retry_errors)
        inputs = list_inputs(sources, path_column=path_column, bytes_column=bytes_column)
        todo = [p for p in inputs.paths if p not in done]
        by_bytes = {p for rows in inputs.tables.values() for p in rows}
        summary = RayExtractSummary(Path(out), len(inputs.paths), len(inputs.paths) - len(todo), len(todo), 0, 0.0,
                                    backend=loaded.backend, precision=loaded.precision)
        if todo:
            by_path = [p for p in todo if p not in by_bytes]
            tables = [t for t, rows in inputs.tables.items() if any(p not in done for p in rows)]
            actor_options = dataclasses.replace(options, model=os.fspath(options.model))
            _run(by_path, tables, frozenset(done), members=inputs.members, errors=inputs.errors,
                 prepare=Prepare.for_model(options, loaded, device_decode=device_decode),
                 options=actor_options, schema=schema, out=out, summary=summary, address=address,
                 num_actors=num_actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
                 rows_per_shard=rows_per_shard, path_column=path_column, bytes_column=bytes_column,
                 stall_timeout=stall_timeout)
            shards.dedupe()
        summary.failed = shards.failed()
        summary.seconds = time.perf_counter() - start
        return summary


def _input_block(paths: list[str], members: dict, errors: dict):
    """Paths -> a block of inputs; tar members carry where their bytes are, a broken shard its error."""
    import pyarrow as pa

    block = {"path": paths}
    if any(p in members or p in errors for p in paths):
        found = [members.get(p) for p in paths]
        block.update(shard=[m.shard if m else None for m in found], offset=[m.offset if m else None for m in found],
                     size=[m.size if m else None for m in found], error=[errors.get(p) for p in paths])
    return pa.table(block)


def _run(by_path, tables, done, *, members, errors, prepare, options, schema, out, summary, address, num_actors,
         gpus_per_actor, cpus_per_actor, rows_per_shard, path_column, bytes_column, stall_timeout) -> None:
    started, summary.load_seconds = connect(address)
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # ours below counts inputs; Ray Data's count blocks per operator
    stop = threading.Event()
    threads: list[threading.Thread] = []  # the consumer, for `_shutdown`
    try:
        batch_size = options.batch_size
        # Inputs per block (one prepare task each, and the unit the actors are fed in): one batch, so that small
        # runs spread over every actor, but at most MAX_INPUT_BLOCKS blocks (each is a put by the driver).
        step = batch_size * max(1, -(-len(by_path) // (batch_size * MAX_INPUT_BLOCKS)))
        blocks = [_input_block(by_path[i:i + step], members, errors) for i in range(0, len(by_path), step)]
        pool = size_pool(num_actors, cpus_per_actor, gpus_per_actor, None if tables else len(blocks))
        summary.num_actors = pool.num_actors
        # The memory reservation bounds concurrent decodes of huge images per node, and makes these tasks' remote
        # arguments differ from the actors', which keeps Ray Data from fusing them into the actors (fused, inputs
        # would be decoded inside the actors, in turn with the encoder instead of beside it).
        task_args = dict(num_cpus=TASK_CPUS, memory=PREPARE_MEMORY, batch_format="pyarrow")
        parts = []
        if blocks:
            parts.append(ray.data.from_arrow(blocks).map_batches(
                _prepare_batch, batch_size=batch_size, fn_kwargs={"prepare": prepare, "skip": frozenset()},
                **task_args))
        for table in tables:
            fs, path = filesystem(table)
            ds = ray.data.read_parquet(path, filesystem=fs).select_columns([path_column, bytes_column])
            ds = ds.rename_columns({path_column: "path", bytes_column: "data"})
            parts.append(ds.map_batches(_prepare_batch, batch_size=batch_size,
                                        fn_kwargs={"prepare": prepare, "skip": done}, **task_args))
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

        counter = ray.remote(num_cpus=0)(_Progress).remote()
        # CPU actors take seconds per batch: a batch queued behind a busy actor while another is idle (or still
        # loading its model) costs more than the prefetch saves; GPU actors are fast enough to want one queued.
        in_flight = 2 if pool.gpus_per_actor else 1
        ds = ds.map_batches(
            _EncodeActor, batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool.num_actors, max_tasks_in_flight_per_actor=in_flight),
            num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor or None,
            fn_constructor_kwargs=dict(options=options, threads=pool.threads, schema=schema, progress=counter,
                                       prepare=prepare),
        )
        ds = ds.map_batches(_write_batch, batch_size=rows_per_shard, fn_kwargs={"out": out, "schema": schema},
                            num_cpus=TASK_CPUS, batch_format="pyarrow")
        _watch(ds, counter, todo=summary.processed, summary=summary, stop=stop, threads=threads,
               stall_timeout=stall_timeout, progress=options.progress, pool=pool)
    finally:
        stop.set()
        ctx.enable_progress_bars = saved_bars
        if started:
            shutdown(threads)


def _watch(ds, counter, *, todo, summary, stop, threads, stall_timeout, progress, pool) -> None:
    """Consume the write stage in a thread; here, poll the actors' counter for the bar and for stalls."""
    import queue

    import ray

    events: queue.Queue = queue.Queue()

    def consume() -> None:
        try:
            for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if stop.is_set():
                    return  # leaving the loop closes the iterator, which stops the execution
            events.put(None)
        except BaseException as e:  # surfaced in the driver's thread
            events.put(e)

    thread = threading.Thread(target=consume, name="internvit-ray-consume", daemon=True)
    thread.start()
    threads.append(thread)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=todo, unit="input", desc=f"extract (ray, {pool.num_actors} actor(s))", dynamic_ncols=True)
    last, last_change = None, time.monotonic()
    try:
        while True:
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                event = "tick"
            if isinstance(event, BaseException):
                raise event
            rows, failed, tiles, seconds = ray.get(counter.get.remote(), timeout=60)
            if bar is not None:
                bar.update(min(rows, todo) - bar.n)
                bar.set_postfix(failed=failed)
            if (rows, tiles) != last:
                last, last_change = (rows, tiles), time.monotonic()
            if event is None:
                deadline = time.monotonic() + 5  # the actors' last reports may still be on their way
                while rows < todo and time.monotonic() < deadline:
                    time.sleep(0.05)
                    rows, failed, tiles, seconds = ray.get(counter.get.remote(), timeout=60)
                break
            if stall_timeout is not None and time.monotonic() - last_change > stall_timeout:
                raise RayRunError(
                    f"no batch finished for {stall_timeout:g} s ({rows} of {todo} inputs done); Ray has "
                    f"{ray.available_resources().get('CPU', 0):g} of {ray.cluster_resources().get('CPU', 0):g} CPUs "
                    f"and {ray.available_resources().get('GPU', 0):g} GPUs free; the actors need "
                    f"{pool.cpus_per_actor:g} CPU and {pool.gpus_per_actor:g} GPU each. Rerun to resume."
                )
        summary.tiles, summary.model_seconds = tiles, seconds / pool.num_actors
    finally:
        if bar is not None:
            bar.close()
