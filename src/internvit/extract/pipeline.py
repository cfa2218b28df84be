"""The overlapped extraction pipeline: while the device encodes batch k, batch k+1 is packed and copied to it and
batch k-1 is pooled into rows and written. The local engine drives it; the stages are threads, so the overlap is
the same on a GPU and on a CPU (where an encoder that only sleeps shows it, tests/unit/test_pipeline.py).

    loader workers (processes)   decode + resize -> `Item`s of uint8 tiles         a few inputs per task
    packer (the calling thread)  tiles of many items -> batches of `batch_size` tiles, in pinned buffers;
                                 with `--decode fast` on a GPU, first the items' JPEGs decoded there (nvJPEG)
    encoder thread               copy to the device (a side stream on CUDA), normalize in fp32, forward, pool
                                 per tile, start the one copy back (`RowEncoder.encode`)
    writer thread                wait for the batch's results, finished items -> rows -> the store (Parquet)

Memory is bounded: the queues between the stages have fixed depths and the buffers are a fixed pool, so the tiles
in flight do not grow with the run. The device never waits for the host: the encoder thread only waits for a
batch's upload (to reuse its buffer), never for its results.

References:
    - PyTorch's pinned-memory and non-blocking copy notes (https://pytorch.org/tutorials/intermediate/
      pinmem_nonblock.html): a host-to-device copy overlaps compute only from pinned memory, and on another stream.
    - NVIDIA DALI and torchvision's GPU decoding also hand over uint8 images (4x fewer bytes than float32 through
      shared memory and over PCIe).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from internvit.extract.core import Encoded, Item, Prepare, RowEncoder, scatter

QUEUE_DEPTH = 2  # batches waiting between two stages
DECODE_BATCH = 32  # inputs whose JPEGs are decoded on the device in one call (`Prepare.device_decode`)


@dataclass
class _Batch:
    buffer: torch.Tensor | None  # uint8 [batch_size, 3, S, S]; None for a batch of errors only
    tiles: list[tuple[Item, int]] = field(default_factory=list)  # (item, tile index) per filled row of `buffer`
    done: list[Item] = field(default_factory=list)  # items whose last tile is in this batch or an earlier one
    encoded: Encoded | None = None


class Pipeline:
    """Encode the items of `chunks` (lists of `Item`s, in order) and `write` their rows, the stages overlapped.

    Args:
        encoder: the model's `RowEncoder`; its `micro_batch` is the batch size in tiles.
        write: called in the writer thread with each batch's finished items and their columns, in input order.
        prepare: the workers' `Prepare`, when it hands over JPEGs to decode on the encoder's device
            (`device_decode`): the packer decodes them, `DECODE_BATCH` inputs at a time (on a side stream on CUDA,
            beside the forward).
    """

    def __init__(self, encoder: RowEncoder, write: Callable[[list[Item], dict], None],
                 prepare: Prepare | None = None) -> None:
        self.encoder, self.write = encoder, write
        self.prepare = prepare if prepare is not None and prepare.device_decode else None
        cuda = encoder.device.type == "cuda"
        self._decode_stream = torch.cuda.Stream(encoder.device) if cuda and self.prepare is not None else None
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(QUEUE_DEPTH + 2):  # one filling, QUEUE_DEPTH waiting, one uploading
            self._free.put(torch.empty(0, dtype=torch.uint8))  # given its shape when first taken
        self._to_encode: queue.Queue[_Batch | None] = queue.Queue(QUEUE_DEPTH)
        self._to_write: queue.Queue[_Batch | None] = queue.Queue(QUEUE_DEPTH)
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._stage, args=(self._to_encode, self._encode, self._to_write),
                                          name="internvit-encode", daemon=True),
                         threading.Thread(target=self._stage, args=(self._to_write, self._write, None),
                                          name="internvit-write", daemon=True)]

    def run(self, chunks: Iterable[list[Item]]) -> None:
        for t in self._threads:
            t.start()
        try:
            self._pack(chunks)
        except BaseException as e:  # Ctrl-C included: the stages stop after their current batch
            self._errors.append(e)
            raise
        finally:
            self._to_encode.put(None)
            for t in self._threads:
                t.join()
        if self._errors:
            raise self._errors[0]

    # ---- the stages ------------------------------------------------------------------------------------

    def _pack(self, chunks: Iterable[list[Item]]) -> None:
        """Fill batches of exactly `micro_batch` tiles (the last one less) with the tiles of consecutive items."""
        batch = _Batch(None)
        with torch.cuda.stream(self._decode_stream) if self._decode_stream is not None else nullcontext():
            for chunk in chunks if self.prepare is None else self._decoded(chunks):
                for item in chunk:
                    batch = self._add(batch, item)
        if batch.tiles or batch.done:
            self._send(batch)

    def _decoded(self, chunks: Iterable[list[Item]]) -> Iterator[list[Item]]:
        """The chunks, their JPEGs decoded on the device `DECODE_BATCH` inputs at a time (the batched decoder's
        cost per call is paid once for many images)."""
        pending: list[list[Item]] = []
        for chunk in chunks:
            pending.append(chunk)
            if sum(map(len, pending)) >= DECODE_BATCH:
                self.prepare.decode_on_device([it for c in pending for it in c], self.encoder.device)
                yield from pending
                pending = []
        if pending:
            self.prepare.decode_on_device([it for c in pending for it in c], self.encoder.device)
            yield from pending

    def _add(self, batch: _Batch, item: Item) -> _Batch:
        """Put `item`'s tiles in `batch` (and the batches after it); returns the batch now filling."""
        B, t, pixels = self.encoder.micro_batch, 0, item.pixels
        if batch.buffer is not None and pixels is not None and (batch.buffer.shape[1:] != pixels.shape[1:] or
                                                                batch.buffer.device != pixels.device):
            batch = self._send(batch)  # tiles of another size (a video's beside CLIP crops) never share one
        while t < item.num_tiles:
            if batch.buffer is None:
                batch.buffer = self._buffer(pixels)
            n = min(B - len(batch.tiles), item.num_tiles - t)
            batch.buffer[len(batch.tiles):len(batch.tiles) + n].copy_(pixels[t:t + n])
            batch.tiles += [(item, i) for i in range(t, t + n)]
            t += n
            if len(batch.tiles) == B:
                batch = self._send(batch)
        batch.done.append(item)
        return batch

    def _buffer(self, tiles: torch.Tensor) -> torch.Tensor:
        """A free buffer of `micro_batch` tiles like these, where they are (pinned on the host for CUDA); waits
        while all are in flight."""
        buffer = self._free.get()
        shape = (self.encoder.micro_batch, *tiles.shape[1:])
        if buffer.shape != shape or buffer.device != tiles.device:
            pin = tiles.device.type == "cpu" and self.encoder.device.type == "cuda"
            buffer = torch.empty(shape, dtype=torch.uint8, device=tiles.device, pin_memory=pin)
        return buffer

    def _send(self, batch: _Batch) -> _Batch:
        if self._errors:
            raise self._errors[0]
        if self._decode_stream is not None:
            self._decode_stream.synchronize()  # the tiles decoded and copied on the device, before the forward
        self._to_encode.put(batch)
        return _Batch(None)

    def _encode(self, batch: _Batch) -> None:
        if batch.tiles:
            n = len(batch.tiles)
            batch.encoded = self.encoder.encode(batch.buffer[:n], [it.norm for it, _ in batch.tiles])
            batch.encoded.uploaded()
        if batch.buffer is not None:
            self._release(batch)

    def _release(self, batch: _Batch) -> None:
        """Give the batch's buffer back to the pool. A device buffer (decoded tiles) is left to the caching
        allocator instead, which knows the forward still reads it (`record_stream`); its slot stays in the pool."""
        self._free.put(batch.buffer if batch.buffer.device.type == "cpu" else torch.empty(0, dtype=torch.uint8))
        batch.buffer = None

    def _write(self, batch: _Batch) -> None:
        if batch.encoded is not None:
            scatter(batch.encoded.wait(), batch.tiles)
        if batch.done:
            self.write(batch.done, self.encoder.rows(batch.done))

    def _stage(self, inbox: queue.Queue, work: Callable[[_Batch], None], outbox: queue.Queue | None) -> None:
        """Take batches until the end; after an error (here or elsewhere) only pass the end on."""
        while (batch := inbox.get()) is not None:
            if self._errors:
                if batch.buffer is not None:
                    self._release(batch)  # the packer may be waiting for one
                continue
            try:
                work(batch)
            except BaseException as e:  # noqa: BLE001 - raised in the calling thread by `run`
                self._errors.append(e)
                if batch.buffer is not None:
                    self._release(batch)
                continue
            if outbox is not None:
                outbox.put(batch)
        if outbox is not None:
            outbox.put(None)
