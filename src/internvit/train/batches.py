"""What one training process sees: its share of the data stream, packed or padded into micro-batches.

References (spec/internvit.md §6.4, §6.5; InternVL `train/dataset_packed.py` [S6]):
    - packing: samples are merged greedily into the first pending buffer (most tiles first) that stays within the
      tile and token budgets; a buffer leaves when it holds exactly `max_tiles` tiles or `max_tokens` tokens, or
      when more than `max_buffers` are pending (the fullest leaves). Position ids restart at every sample and no
      2D attention mask is passed, which transformers' native LLMs turn into block-diagonal causal attention
      (sdpa, eager and flash-attention alike); each sample keeps its own loss weight.
    - the stream: a seeded permutation per epoch, process `rank` taking every `world`-th sample; its position and
      the pending buffers are saved with a checkpoint. Samples are asked for as `dataset[(index, epoch)]`, so that
      their random draws (video frames, JPEG qualities) are those of their epoch, also when loaded again.

Differs from InternVL's packing: one seeded permutation of all samples per epoch instead of sampling datasets in
proportion to their length (the same mix in expectation, and a position that can be saved); a sample is never
split across packs (samples are truncated to `max_seq_length` <= the pack's token budget instead); buffers keep
sample indices, not tensors, and a pack's samples are loaded again when it leaves (no GBs of pending tiles).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from internvit.model.template import IGNORE_INDEX
from internvit.train.data import SampleError, collate
from internvit.train.loss import token_weights


def collate_packed(packs: list[list[dict]], pad_token_id: int, reduction: str = "square") -> dict:
    """Packed batch: each row holds a pack's samples back to back, position ids restarting at each sample, each
    sample's tokens weighted by its own supervised length (spec §6.5), and no attention_mask (block-diagonal
    attention comes from the position ids). Shorter rows are padded with a separate, unsupervised segment."""
    n = max(sum(len(s["input_ids"]) for s in pack) for pack in packs)
    rows = {k: [] for k in ("input_ids", "labels", "position_ids", "loss_weight")}
    for pack in packs:
        parts = {k: [] for k in rows}
        for s in pack:
            parts["input_ids"].append(s["input_ids"])
            parts["labels"].append(s["labels"])
            parts["position_ids"].append(torch.arange(len(s["input_ids"])))
            parts["loss_weight"].append(token_weights(s["labels"][None], reduction)[0])
        pad = n - sum(len(s["input_ids"]) for s in pack)
        if pad:
            parts["input_ids"].append(torch.full((pad,), pad_token_id, dtype=torch.long))
            parts["labels"].append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
            parts["position_ids"].append(torch.arange(pad))
            parts["loss_weight"].append(torch.zeros(pad))
        for k in rows:
            rows[k].append(torch.cat(parts[k]))
    batch = {k: torch.stack(v) for k, v in rows.items()}
    batch["attention_mask"] = None
    batch["num_tokens"] = sum(len(s["input_ids"]) for pack in packs for s in pack)
    batch["pixel_values"] = torch.cat([s["pixel_values"] for pack in packs for s in pack])
    batch["image_flags"] = torch.cat([s["image_flags"] for pack in packs for s in pack])
    return batch


def index_stream(n: int, *, seed: int, rank: int = 0, world: int = 1, multiple: int = 1,
                 start: int = 0, with_epoch: bool = False) -> Iterator[int] | Iterator[tuple[int, int]]:
    """Dataset indices for one process, epoch after epoch, from item `start` of its stream on.

    Each epoch is a seeded permutation of all n samples; process `rank` takes every `world`-th, cut to a multiple of
    `multiple` so that every process sees the same number; one process with batch b and b processes with batch 1
    thus see the same global batches. `with_epoch`: (index, epoch) pairs.
    """
    per_epoch = (n // (world * multiple)) * multiple
    if per_epoch == 0:
        raise ValueError(f"{n} samples cannot fill one batch of {multiple} on each of {world} processes")
    epoch, k = divmod(start, per_epoch)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for index in perm[rank::world][k:per_epoch]:
            yield (index, epoch) if with_epoch else index
        epoch, k = epoch + 1, 0


class Packer:
    """InternVL's greedy packing (spec §6.4) over (index, tokens, tiles) records; returns index lists of packs.

    Pending buffers are kept most tiles first; a new sample joins the first buffer with room for its tiles and its
    tokens, else starts a buffer. An index is an int or an (index, epoch) pair. The state is plain lists, saved
    with the training checkpoint.
    """

    def __init__(self, *, max_tokens: int = 16384, max_tiles: int = 48, max_buffers: int = 20) -> None:
        self.max_tokens, self.max_tiles, self.max_buffers = max_tokens, max_tiles, max_buffers
        self.buffers: list[dict] = []  # {"indices": [...], "tokens": int, "tiles": int}

    def add(self, index: int, tokens: int, tiles: int) -> list[list[int]]:
        """Add one sample; returns the packs that are complete now (often none)."""
        if tokens > self.max_tokens or tiles > self.max_tiles:
            raise ValueError(f"{tokens} tokens / {tiles} tiles do not fit a pack of {self.max_tokens} tokens and "
                             f"{self.max_tiles} tiles")
        buf = next((b for b in self.buffers
                    if b["tiles"] + tiles <= self.max_tiles and b["tokens"] + tokens <= self.max_tokens), None)
        if buf is None:
            buf = {"indices": [], "tokens": 0, "tiles": 0}
        else:
            self.buffers.remove(buf)
        buf["indices"].append(index)
        buf["tokens"] += tokens
        buf["tiles"] += tiles
        done = []
        if buf["tokens"] == self.max_tokens or buf["tiles"] == self.max_tiles:
            done.append(buf["indices"])
        else:  # stays sorted, most tiles first (stable among equals, as InternVL's insert)
            at = next((i for i, b in enumerate(self.buffers) if b["tiles"] < buf["tiles"]), len(self.buffers))
            self.buffers.insert(at, buf)
        while len(self.buffers) > self.max_buffers:
            done.append(self.buffers.pop(0)["indices"])
        return done

    def state_dict(self) -> dict:
        return {"buffers": [dict(b, indices=list(b["indices"])) for b in self.buffers]}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = [dict(b, indices=[_key(k) for k in b["indices"]]) for b in state["buffers"]]


def _key(k) -> int | tuple[int, int]:
    """A sample key read back from JSON: [index, epoch] -> (index, epoch); an int stays."""
    return tuple(k) if isinstance(k, list) else k


class MicroBatches:
    """The micro-batches one training process sees, packed or padded, skipping unusable samples.

    A sample that raises `SampleError` (unreadable media, placeholder mismatch, truncated image tokens) or another
    ValueError is reported through `on_skip((index, epoch), error)` once and replaced by the next one of the
    stream; a stream in which a whole epoch's worth of samples in a row fails is an error. `state_dict()` is the
    data position (items consumed and pending pack buffers): saved with a checkpoint, it lets a resumed run
    continue with exactly the same batches.

    Args:
        dataset: a `ConversationDataset` (anything with a length whose `dataset[(index, epoch)]` is a sample).
        batch_size: samples per micro-batch, or packs per micro-batch when `packer` is given.
        packer: pack samples (spec §6.4) with this `Packer`.
        threads: load (decode, tile, tokenize) this many samples at once, ahead of the training step, in the order
            of the stream (PIL, tokenizers and torch release the GIL for most of that work); 0 loads in the caller.
    """

    def __init__(self, dataset, *, batch_size: int, pad_token_id: int, reduction: str = "square",
                 packer: Packer | None = None, seed: int = 0, rank: int = 0, world: int = 1,
                 on_skip: Callable[[tuple[int, int], ValueError], None] | None = None, threads: int = 0) -> None:
        self.dataset, self.batch_size, self.pad_token_id, self.reduction = dataset, batch_size, pad_token_id, reduction
        self.packer, self.seed, self.rank, self.world = packer, seed, rank, world
        self.on_skip = on_skip or (lambda key, error: None)
        self.consumed = 0  # stream items handed out (not those loading ahead): the position a checkpoint saves
        self.ready: list[list[int]] = []  # complete packs not yet handed out
        self._stream = None
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="internvit-data") if threads else None
        self._ahead: deque[tuple[tuple[int, int], Future]] = deque()
        self._depth = 4 * threads

    def _load(self, key: tuple[int, int]) -> dict | Exception:
        try:
            return self.dataset[key]
        except ValueError as e:  # SampleError, and the tokenizer's or tiler's own
            return e

    def _next_loaded(self) -> tuple[tuple[int, int], dict | Exception]:
        if self._stream is None:
            self._stream = index_stream(len(self.dataset), seed=self.seed, rank=self.rank, world=self.world,
                                        multiple=1 if self.packer else self.batch_size, start=self.consumed,
                                        with_epoch=True)
            self._ahead.clear()
        self.consumed += 1
        if self._pool is None:
            key = next(self._stream)
            return key, self._load(key)
        while len(self._ahead) <= self._depth:
            key = next(self._stream)
            self._ahead.append((key, self._pool.submit(self._load, key)))
        key, future = self._ahead.popleft()
        return key, future.result()

    def _next_sample(self) -> dict:
        for _ in range(len(self.dataset) + 1):
            key, sample = self._next_loaded()
            if self.packer is not None and not isinstance(sample, Exception):
                try:
                    self.ready += self.packer.add(key, len(sample["input_ids"]), len(sample["pixel_values"]))
                except ValueError as e:  # more tokens or tiles than a pack holds
                    sample = SampleError(str(e), "too_long")
            if not isinstance(sample, Exception):
                return sample
            self.on_skip(key, sample)
        raise RuntimeError(f"{len(self.dataset) + 1} samples in a row could not be used; see the skipped samples")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.packer is None:
            samples = [self._next_sample() for _ in range(self.batch_size)]
            return collate(samples, self.pad_token_id, self.reduction)
        while len(self.ready) < self.batch_size:
            self._next_sample()
        packs, self.ready = self.ready[: self.batch_size], self.ready[self.batch_size:]
        # the samples of a pack are loaded again here: a pending buffer keeps indices, not tensors
        mapper = map if self._pool is None else self._pool.map
        loaded = [list(mapper(self.dataset.__getitem__, pack)) for pack in packs]
        return collate_packed(loaded, self.pad_token_id, self.reduction)

    def close(self) -> None:
        """Stop loading ahead (the samples in flight are dropped; the saved position does not count them)."""
        if self._pool is not None:
            for _, future in self._ahead:
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pool, self._ahead = None, deque()

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "ready": [list(p) for p in self.ready],
                "packer": self.packer.state_dict() if self.packer else None}

    def load_state_dict(self, state: dict) -> None:
        self.consumed, self._stream = state["consumed"], None
        self.ready = [[_key(k) for k in p] for p in state["ready"]]
        if self.packer is not None and state.get("packer"):
            self.packer.load_state_dict(state["packer"])
