"""Training data for InternVL 2.5: meta JSON of datasets, JSONL conversations, tiles, tokens and label masks.

References (spec/internvit.md §4, §6.2, §6.3; InternVL `train/dataset.py`, `internvl_chat_finetune.py` [S4, S5]):
    - meta JSON: {name: {"root", "annotation", "data_augment", "repeat_time", "length", ["max_dynamic_patch"]}};
      `repeat_time` < 1 keeps the first floor(n*r) lines, > 1 repeats the list (an int);
    - JSONL samples: single image, multi-image (one `<image>` per image, each image
      `max(1, max_dynamic_patch // n)` tiles), video (`"Frame-i: <image>"` per frame, one tile each), pure text (a
      dummy tile with image_flags 0), optional first system turn;
    - `preprocess_internvl2_5`: each turn tokenized on its own; system and user turns ignored (-100); in assistant
      turns the `<|im_start|>assistant\\n` prefix and the final `\\n` ignored, so the loss covers the answer and
      `<|im_end|>`; truncation to `max_seq_length`, then a guard: a sample whose image tokens were cut is an error.
    - JPEG augmentation: each tile re-encoded at a random quality in 75..100 before the resize (`data_augment`).
    - packing (spec §6.4, InternVL `dataset_packed.py` [S6]): samples are merged greedily into the first pending
      buffer (most tiles first) that stays within the tile and token budgets; a buffer leaves when it holds exactly
      `max_tiles` tiles or `max_tokens` tokens, or when more than `max_buffers` are pending (the fullest leaves).
      Position ids restart at every sample and no 2D attention mask is passed, which transformers' native LLMs
      turn into block-diagonal causal attention (sdpa, eager and flash-attention alike).

Differs from InternVL's packing: one seeded permutation of all samples per epoch instead of sampling datasets in
proportion to their length (the same mix in expectation, and a position that can be saved); a sample is never
split across packs (samples are truncated to `max_seq_length` <= the pack's token budget instead); buffers keep
sample indices, not tensors, and a pack's samples are loaded again when it leaves (no GBs of pending tiles).
"""

from __future__ import annotations

import io
import json
import os
import random
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from internvit.model.chat import DEFAULT_SYSTEM, IGNORE_INDEX, IMG_END_TOKEN, image_tokens
from internvit.train.loss import token_weights

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


class SampleError(ValueError):
    """A sample that cannot be used (bad media, placeholder mismatch, truncated image tokens); names the sample."""


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    name: str
    root: str
    annotation: str
    data_augment: bool = False
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    length: int | None = None


def load_meta(path: str | os.PathLike) -> list[DatasetSpec]:
    """Read a meta JSON; relative `root`/`annotation` paths are relative to the meta file's folder."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the meta JSON ({e})") from None
    specs = []
    for name, d in meta.items():
        missing = [k for k in ("root", "annotation") if k not in d]
        if missing:
            raise ValueError(f"{path}: dataset {name!r} lacks {missing}")
        specs.append(DatasetSpec(
            name=name, root=str((path.parent / d["root"]).resolve()),
            annotation=str((path.parent / d["annotation"]).resolve()), data_augment=bool(d.get("data_augment", False)),
            repeat_time=float(d.get("repeat_time", 1.0)), max_dynamic_patch=d.get("max_dynamic_patch"),
            length=d.get("length")))
    return specs


def read_samples(spec: DatasetSpec) -> list[dict]:
    """The dataset's JSONL lines after `repeat_time` (spec §6.2)."""
    with open(spec.annotation, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if spec.repeat_time < 1:
        lines = lines[: int(len(lines) * spec.repeat_time)]
    elif spec.repeat_time > 1:
        if spec.repeat_time != int(spec.repeat_time):
            raise ValueError(f"{spec.name}: repeat_time > 1 must be an integer, got {spec.repeat_time}")
        lines = lines * int(spec.repeat_time)
    return lines


def media_count(sample: dict) -> tuple[list[str], str | None]:
    """The sample's image paths (a list) and its video path (or None)."""
    images = sample.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else list(images)
    return images, sample.get("video")


def preprocess_internvl2_5(conversations: list[dict], tokenizer, num_patches_list: list[int], *,
                           num_image_token: int = 256, max_seq_length: int = 8192,
                           system: str = DEFAULT_SYSTEM, sample_id: str = "sample") -> dict:
    """Tokens and labels of one conversation (spec §6.3); `<image>` placeholders expanded in order."""
    turns = list(conversations)
    if turns and turns[0]["from"] == "system":
        system = turns.pop(0)["value"]
    images_left = list(num_patches_list)
    pieces: list[tuple[str, bool]] = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for turn in turns:
        role, value = turn["from"], turn["value"]
        if role == "human":
            while IMAGE_PLACEHOLDER in value:
                if not images_left:
                    raise SampleError(f"{sample_id}: more {IMAGE_PLACEHOLDER} placeholders than images")
                value = value.replace(IMAGE_PLACEHOLDER, image_tokens(images_left.pop(0), num_image_token), 1)
            pieces.append((f"<|im_start|>user\n{value}<|im_end|>\n", False))
        elif role == "gpt":
            pieces.append((f"<|im_start|>assistant\n{value}<|im_end|>\n", True))
        else:
            raise SampleError(f"{sample_id}: unknown role {role!r} (expected system, human, gpt)")
    if images_left:
        raise SampleError(f"{sample_id}: {len(num_patches_list)} images but fewer {IMAGE_PLACEHOLDER} placeholders")
    prefix_len = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids)
    input_ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)  # InternLM: BOS only at the very start
        labels.append(IGNORE_INDEX)
    for text, is_answer in pieces:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        input_ids += ids
        if is_answer:
            lab = list(ids)
            lab[:prefix_len] = [IGNORE_INDEX] * prefix_len
            lab[-1] = IGNORE_INDEX  # the final "\n"
            labels += lab
        else:
            labels += [IGNORE_INDEX] * len(ids)
    input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    end_id = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
    if sum(1 for t in input_ids if t == end_id) != len(num_patches_list):
        raise SampleError(f"{sample_id}: image tokens are truncated by max_seq_length={max_seq_length}")
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}


def jpeg_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """Re-encode as JPEG at a quality drawn from 75..100 (InternVL's RandomChoice of 26 qualities)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=rng.randint(75, 100))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


class ConversationDataset(torch.utils.data.Dataset):
    """All datasets of a meta JSON as one list of samples -> model inputs.

    Args:
        specs: from `load_meta`.
        tokenizer: with InternVL's special tokens added (`internvit.model.chat.add_special_tokens`).
        max_tiles: default `max_dynamic_patch` for datasets that do not set one.
        num_frames: frames per video sample.
        seed: for the JPEG augmentation.
    """

    def __init__(self, specs: list[DatasetSpec], tokenizer, *, max_tiles: int = 12, num_image_token: int = 256,
                 max_seq_length: int = 8192, tile_size: int = 448, num_frames: int = 8, seed: int = 0) -> None:
        self.items = [(spec, s) for spec in specs for s in read_samples(spec)]
        if not self.items:
            raise ValueError("the meta JSON lists no samples")
        self.tokenizer = tokenizer
        self.max_tiles, self.num_image_token, self.max_seq_length = max_tiles, num_image_token, max_seq_length
        self.tile_size, self.num_frames, self.seed = tile_size, num_frames, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from internvit.features import tile_image
        from internvit.preprocess import IMAGENET_MEAN, IMAGENET_STD, open_image, to_tensor_normalized
        from internvit.preprocess.tiling import dynamic_tiles, tile_budget
        from internvit.preprocess.video import load_frames

        spec, sample = self.items[i]
        sid = f"{spec.name}[{sample.get('id', i)}]"
        rng = random.Random(hash((self.seed, i)))
        images, video = media_count(sample)
        conversations = [dict(t) for t in sample["conversations"]]
        first_human = next((t for t in conversations if t["from"] == "human"), None)
        tiles: list[torch.Tensor] = []
        num_patches: list[int] = []
        try:
            if video is not None:
                frames, _ = load_frames(os.path.join(spec.root, video), num_segments=self.num_frames,
                                        bound=tuple(sample["clip"]) if sample.get("clip") else None)
                prefix = "".join(f"Frame-{k + 1}: {IMAGE_PLACEHOLDER}\n" for k in range(len(frames)))
                if first_human is not None:
                    v = first_human["value"]
                    first_human["value"] = v.replace(VIDEO_PLACEHOLDER + "\n", prefix) if VIDEO_PLACEHOLDER in v \
                        else prefix + v
                for f in frames:  # one squashed tile per frame, no tiling, no augmentation (spec §4)
                    tiles.append(tile_image(f, max_tiles=1, tile_size=self.tile_size).pixel_values)
                    num_patches.append(1)
            elif images:
                budget = tile_budget(len(images), spec.max_dynamic_patch or self.max_tiles)
                if len(images) == 1 and first_human is not None and IMAGE_PLACEHOLDER not in first_human["value"]:
                    first_human["value"] = IMAGE_PLACEHOLDER + "\n" + first_human["value"]
                for path in images:
                    image = open_image(os.path.join(spec.root, path))
                    pil_tiles, _ = dynamic_tiles(image, max_tiles=budget, tile_size=self.tile_size)
                    if spec.data_augment:  # per tile, before build_transform's (identity) resize
                        pil_tiles = [jpeg_augment(p, rng) for p in pil_tiles]
                    tiles.append(torch.stack([to_tensor_normalized(p, IMAGENET_MEAN, IMAGENET_STD) for p in pil_tiles]))
                    num_patches.append(len(pil_tiles))
        except (OSError, ValueError) as e:
            raise SampleError(f"{sid}: {e}") from None
        out = preprocess_internvl2_5(conversations, self.tokenizer, num_patches,
                                     num_image_token=self.num_image_token, max_seq_length=self.max_seq_length,
                                     sample_id=sid)
        if tiles:
            out["pixel_values"] = torch.cat(tiles)
            out["image_flags"] = torch.ones(out["pixel_values"].shape[0], dtype=torch.long)
        else:  # pure text: one dummy tile that runs through the ViT and is dropped (spec §4)
            out["pixel_values"] = torch.zeros(1, 3, self.tile_size, self.tile_size)
            out["image_flags"] = torch.zeros(1, dtype=torch.long)
        return out


def collate(batch: list[dict], pad_token_id: int, reduction: str = "square") -> dict:
    """Right-padded batch: input_ids, labels (-100 on padding), attention_mask, position_ids, loss_weight, tiles."""
    n = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        input_ids[i, :k], labels[i, :k], attention_mask[i, :k] = b["input_ids"], b["labels"], 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # spec §6.3
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids,
            "loss_weight": token_weights(labels, reduction), "num_tokens": sum(len(b["input_ids"]) for b in batch),
            "pixel_values": torch.cat([b["pixel_values"] for b in batch]),
            "image_flags": torch.cat([b["image_flags"] for b in batch])}


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
                 start: int = 0) -> Iterator[int]:
    """Dataset indices for one process, epoch after epoch, from item `start` of its stream on.

    Each epoch is a seeded permutation of all n samples; process `rank` takes every `world`-th, cut to a multiple of
    `multiple` so that every process sees the same number; one process with batch b and b processes with batch 1
    thus see the same global batches.
    """
    per_epoch = (n // (world * multiple)) * multiple
    if per_epoch == 0:
        raise ValueError(f"{n} samples cannot fill one batch of {multiple} on each of {world} processes")
    epoch, k = divmod(start, per_epoch)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        yield from perm[rank::world][k:per_epoch]
        epoch, k = epoch + 1, 0


class Packer:
    """InternVL's greedy packing (spec §6.4) over (index, tokens, tiles) records; returns index lists of packs.

    Pending buffers are kept most tiles first; a new sample joins the first buffer with room for its tiles and its
    tokens, else starts a buffer. The state is plain lists, saved with the training checkpoint.
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
        self.buffers = [dict(b, indices=list(b["indices"])) for b in state["buffers"]]


class MicroBatches:
    """The micro-batches one training process sees, packed or padded, skipping unusable samples.

    A sample that raises `SampleError` (unreadable media, placeholder mismatch, truncated image tokens) is reported
    through `on_skip(index, message)` and replaced by the next one of the stream; a stream in which a whole epoch's
    worth of samples in a row fails is an error. `state_dict()` is the data position (items consumed and pending
    pack buffers): saved with a checkpoint, it lets a resumed run continue with exactly the same batches.

    Args:
        dataset: a `ConversationDataset` (anything indexable that returns its samples).
        batch_size: samples per micro-batch, or packs per micro-batch when `packer` is given.
        packer: pack samples (spec §6.4) with this `Packer`.
        threads: load (decode, tile, tokenize) this many samples at once, ahead of the training step, in the order
            of the stream (PIL, tokenizers and torch release the GIL for most of that work); 0 loads in the caller.
    """

    def __init__(self, dataset, *, batch_size: int, pad_token_id: int, reduction: str = "square",
                 packer: Packer | None = None, seed: int = 0, rank: int = 0, world: int = 1,
                 on_skip: Callable[[int, str], None] | None = None, threads: int = 0) -> None:
        self.dataset, self.batch_size, self.pad_token_id, self.reduction = dataset, batch_size, pad_token_id, reduction
        self.packer, self.seed, self.rank, self.world = packer, seed, rank, world
        self.on_skip = on_skip or (lambda index, message: None)
        self.consumed = 0  # stream items handed out (not those loading ahead): the position a checkpoint saves
        self.ready: list[list[int]] = []  # complete packs not yet handed out
        self._stream = None
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="internvit-data") if threads else None
        self._ahead: deque[tuple[int, Future]] = deque()
        self._depth = 4 * threads

    def _load(self, index: int) -> dict | Exception:
        try:
            return self.dataset[index]
        except (SampleError, ValueError) as e:
            return e

    def _next_loaded(self) -> tuple[int, dict | Exception]:
        if self._stream is None:
            self._stream = index_stream(len(self.dataset), seed=self.seed, rank=self.rank, world=self.world,
                                        multiple=1 if self.packer else self.batch_size, start=self.consumed)
            self._ahead.clear()
        self.consumed += 1
        if self._pool is None:
            index = next(self._stream)
            return index, self._load(index)
        while len(self._ahead) <= self._depth:
            index = next(self._stream)
            self._ahead.append((index, self._pool.submit(self._load, index)))
        index, future = self._ahead.popleft()
        return index, future.result()

    def _next_sample(self) -> tuple[int, dict]:
        for _ in range(len(self.dataset) + 1):
            index, sample = self._next_loaded()
            try:
                if isinstance(sample, Exception):
                    raise sample
                if self.packer is not None:
                    self.ready += self.packer.add(index, len(sample["input_ids"]), len(sample["pixel_values"]))
                return index, sample
            except (SampleError, ValueError) as e:
                self.on_skip(index, str(e))
        raise RuntimeError(f"{len(self.dataset) + 1} samples in a row could not be used; see the skipped samples")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.packer is None:
            samples = [self._next_sample()[1] for _ in range(self.batch_size)]
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
        self.consumed, self.ready, self._stream = state["consumed"], [list(p) for p in state["ready"]], None
        if self.packer is not None and state.get("packer"):
            self.packer.load_state_dict(state["packer"])
