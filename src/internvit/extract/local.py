"""`extract_features`: images and videos on disk -> one Parquet file of InternViT features, on one machine.

A thin driver over `extract/core.py` and `extract/pipeline.py`: inputs are prepared (`Prepare`, uint8 tiles) in
DataLoader worker processes, a few at a time, while the model encodes earlier batches of `batch_size` tiles and
a writer thread stores the rows of the batch before (`Pipeline`); an input that cannot be read becomes a row with
its error and the run goes on. Rows are made durable in small part files as they finish (`store.FeatureStore`),
so a killed run loses at most the last seconds of work, and a rerun with the same output resumes. The output is
locked for the run (`store.output_lock`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import torch

from internvit.extract.core import (
    ExtractOptions,
    ExtractSummary,
    Item,
    Prepare,
    RowEncoder,
    device_decoding,
    load_model,
    options_from,
    output_schema,
)
from internvit.extract.pipeline import Pipeline
from internvit.extract.store import FeatureStore, output_lock
from internvit.sources import Inputs, find_inputs


LOADER_INPUTS = 4  # inputs per loader task: the loader's unit; tiles of many tasks fill each forward


class _Inputs(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], inputs: Inputs, prepare: Prepare) -> None:
        self.paths, self.members, self.errors, self.prepare = paths, inputs.members, inputs.errors, prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        path = self.paths[i]
        if path in self.members or path in self.errors:  # in a tar shard (or a broken one)
            return self.prepare.member(path, self.members.get(path), self.errors.get(path))
        return self.prepare(path)


def _collate(items: list[Item]) -> list[Item]:
    return items


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the model owns the cores; a worker only decodes and resizes


def default_workers() -> int:
    """Loader processes when not given: one per core this process may use, less one for the main process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def extract_features(sources, out: str | os.PathLike, options: ExtractOptions | None = None, *,
                     num_workers: int | None = None, flush_seconds: float = 10.0, **fields) -> ExtractSummary:
    """Extract features of every image and video named by `sources` into the Parquet file `out`.

    Args:
        sources: files, folders (recursive), globs, `.txt` list files, WebDataset tar shards (files, globs,
            brace ranges `shard-{00000..00099}.tar`: each image member is an input `SHARD.tar/MEMBER`); see
            `sources.find_inputs`.
        out: the Parquet file; if it (or its `.parts/` folder) exists, finished inputs are skipped.
        options: what to extract and how (`ExtractOptions`); or give its fields as keywords (`model=...,
            dtype="fp32", tiles="dynamic", layers=(12,), ...`).
        num_workers: preprocessing processes (0 = in the main process; default `default_workers()`).
        flush_seconds: make finished rows durable at least this often (0 = after every batch).
    """
    options = options_from(options, fields)
    num_workers = default_workers() if num_workers is None else num_workers
    start = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; the local engine writes one Parquet file (the ray engine "
                         "writes folders)")
    inputs = find_inputs(sources)
    paths = inputs.paths
    with output_lock(out):
        t_load = time.perf_counter()
        loaded = load_model(options)
        load_seconds = time.perf_counter() - t_load
        device_decode = device_decoding(options, loaded.vit.device)
        schema = output_schema(options, loaded, jpeg_decoder="device" if device_decode else "pillow")
        store = FeatureStore(out, schema, flush_seconds=flush_seconds)
        done = store.finished(include_errors=not options.retry_errors)
        todo = [p for p in paths if p not in done]
        prepare = Prepare.for_model(options, loaded, device_decode=device_decode)
        loader = torch.utils.data.DataLoader(
            _Inputs(todo, inputs, prepare), batch_size=LOADER_INPUTS,
            num_workers=num_workers, collate_fn=_collate, worker_init_fn=_worker_init if num_workers else None,
            prefetch_factor=2 if num_workers else None,
        )
        encoder = RowEncoder.for_options(loaded, options)
        bar = None
        if options.progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="input", desc="extract", dynamic_ncols=True)
        failed_now = 0

        def write(items: list[Item], columns: dict) -> None:  # in the pipeline's writer thread
            nonlocal failed_now
            store.add(columns)
            failed_now += sum(item.error is not None for item in items)
            if bar is not None:
                bar.update(len(items))
                bar.set_postfix(failed=failed_now)

        try:
            with _restore_sigchld(num_workers > 0):
                Pipeline(encoder, write, prepare).run(loader)
        finally:
            if bar is not None:
                bar.close()
            store.consolidate()  # also on Ctrl-C: finished rows are kept, the rerun resumes
        return ExtractSummary(store.out, len(paths), len(paths) - len(todo), len(todo), store.failed(),
                              time.perf_counter() - start, load_seconds, encoder.seconds, encoder.tiles,
                              loaded.backend, loaded.precision)


@contextlib.contextmanager
def _restore_sigchld(workers: bool):
    """Give SIGCHLD back its handler when the loader's workers are done.

    A DataLoader with workers installs a Python SIGCHLD handler (to notice a dead worker) and leaves it for the
    life of the process. Python's handlers interrupt system calls in every thread (no SA_RESTART); in a process that
    later runs OpenVINO or onnxruntime, each exiting child process (any `subprocess.run`) then interrupts their
    threads, and the process died of SIGSEGV (reproduced: pytest running test_reliability.py, then test_export.py).
    torch's flag is reset so that the next loader with workers installs its handler again.
    """
    if not workers or not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        yield
        return
    from torch.utils.data._utils import signal_handling

    previous, was_set = signal.getsignal(signal.SIGCHLD), signal_handling._SIGCHLD_handler_set
    try:
        yield
    finally:
        if not was_set:  # ours to undo (a handler from an earlier loader of the caller's stays)
            signal.signal(signal.SIGCHLD, previous)
            signal_handling._SIGCHLD_handler_set = False
