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
    - video (`video_get_item`, `read_frames_*` with `sample='rand'`): 8 to 32 frames drawn at random per sample
      (`min_num_frame`, `max_num_frame`), one random frame per segment (`internvit.preprocess.video.train_frames`),
      each frame one tile, JPEG-augmented like an image tile when the dataset has `data_augment`.
    - JPEG augmentation: each tile re-encoded at a random quality in 75..100 before the resize (`data_augment`).

Random draws (frames, JPEG qualities) are seeded per (seed, sample index, epoch): a sample loaded again (a pack
leaving its buffer, a resumed run) gets the same frames; the next epoch draws new ones, as InternVL's do.

Packing and the micro-batches a training process sees are in `internvit.train.batches`.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from internvit.model.template import DEFAULT_SYSTEM, IGNORE_INDEX, IMG_END_TOKEN, image_tokens
from internvit.preprocess import IMAGENET_MEAN, IMAGENET_STD, open_image, to_tensor_normalized
from internvit.preprocess.tiling import dynamic_tiles, tile_budget, tile_image
from internvit.preprocess.video import train_frames
from internvit.registry import DEFAULT_MAX_TILES
from internvit.train.loss import token_weights

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


class SampleError(ValueError):
    """A sample that cannot be used (bad media, placeholder mismatch, truncated image tokens); names the sample.

    `reason` is the kind, in `internvit data check`'s words: missing_media, unreadable_media, placeholder_mismatch,
    mixed_media, empty_media_path, bad_format, too_long."""

    def __init__(self, message: str, reason: str = "unusable") -> None:
        super().__init__(message)
        self.reason = reason


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


def read_samples(spec: DatasetSpec) -> list[tuple[int, dict]]:
    """The dataset's JSONL lines after `repeat_time` (spec §6.2), as (line number, sample)."""
    lines = []
    try:
        with open(spec.annotation, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        lines.append((number, json.loads(line)))
                    except ValueError as e:
                        raise ValueError(f"dataset {spec.name!r}: {spec.annotation} line {number} is not JSON ({e}); "
                                         "`internvit data check` lists every problem of a meta JSON") from None
    except OSError as e:
        raise ValueError(f"dataset {spec.name!r}: cannot read its annotation {spec.annotation} "
                         f"({e.strerror or e})") from None
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
                           num_image_token: int = 256, max_seq_length: int = 16384,
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
                    raise SampleError(f"{sample_id}: more {IMAGE_PLACEHOLDER} placeholders than images",
                                      "placeholder_mismatch")
                value = value.replace(IMAGE_PLACEHOLDER, image_tokens(images_left.pop(0), num_image_token), 1)
            pieces.append((f"<|im_start|>user\n{value}<|im_end|>\n", False))
        elif role == "gpt":
            pieces.append((f"<|im_start|>assistant\n{value}<|im_end|>\n", True))
        else:
            raise SampleError(f"{sample_id}: unknown role {role!r} (expected system, human, gpt)", "bad_format")
    if images_left:
        raise SampleError(f"{sample_id}: {len(num_patches_list)} images but fewer {IMAGE_PLACEHOLDER} placeholders",
                          "placeholder_mismatch")
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
        raise SampleError(f"{sample_id}: image tokens are truncated by max_seq_length={max_seq_length}", "too_long")
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
        min_num_frame, max_num_frame: a video sample takes a random count of frames in this range (InternVL: 8, 32).
        sampling_method: "rand" (a random frame per segment, InternVL's training) or "middle".
        num_frames: a fixed frame count instead (sets both min_num_frame and max_num_frame).
        seed: for the random draws (frames, JPEG qualities), with the sample's index and epoch.

    `dataset[i]` is sample i as in epoch 0; `dataset[(i, epoch)]` as in that epoch (what training asks for).
    """

    def __init__(self, specs: list[DatasetSpec], tokenizer, *, max_tiles: int = DEFAULT_MAX_TILES, num_image_token: int = 256,
                 max_seq_length: int = 16384, tile_size: int = 448, min_num_frame: int = 8, max_num_frame: int = 32,
                 sampling_method: str = "rand", num_frames: int | None = None, seed: int = 0) -> None:
        self.items = [(spec, n, s) for spec in specs for n, s in read_samples(spec)]
        if not self.items:
            raise ValueError("the meta JSON lists no samples")
        if num_frames is not None:
            min_num_frame = max_num_frame = num_frames
        if not 1 <= min_num_frame <= max_num_frame:
            raise ValueError(f"min_num_frame={min_num_frame}, max_num_frame={max_num_frame}: need "
                             "1 <= min_num_frame <= max_num_frame")
        if sampling_method not in ("rand", "middle"):
            raise ValueError(f"sampling_method={sampling_method!r}: expected 'rand' or 'middle'")
        self.tokenizer = tokenizer
        self.max_tiles, self.num_image_token, self.max_seq_length = max_tiles, num_image_token, max_seq_length
        self.tile_size, self.seed = tile_size, seed
        self.min_num_frame, self.max_num_frame, self.sampling_method = min_num_frame, max_num_frame, sampling_method
        # the tile budget of a sample, recorded in the chat checkpoint for chat()'s default
        self.max_dynamic_patch = max(spec.max_dynamic_patch or max_tiles for spec in specs)

    def sample_name(self, i: int) -> str:
        """Sample i as its dataset and line: "demo line 7" (how errors and skipped.jsonl name it)."""
        spec, line, _ = self.items[i]
        return f"{spec.name} line {line}"

    def __len__(self) -> int:
        return len(self.items)

    def seeds(self, i: int, epoch: int = 0) -> tuple[int, int]:
        """The seeds of sample i's draws in `epoch`: (frames, JPEG qualities), from (seed, i, epoch)."""
        frames, augment = np.random.SeedSequence([self.seed % 2**63, i, epoch]).generate_state(2)
        return int(frames), int(augment)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        spec, _, sample = self.items[i]
        sid = self.sample_name(i)
        frame_seed, augment_seed = self.seeds(i, epoch)
        rng = random.Random(augment_seed)
        images, video = media_count(sample)
        if images and video is not None:  # InternVL would silently use the images and drop the video
            raise SampleError(f"{sid}: has both \"image\" and \"video\"; a sample takes one kind of media",
                              "mixed_media")
        if any(not p for p in images) or video == "":  # InternVL would train "image": "" as a pure-text sample
            raise SampleError(f"{sid}: an empty image or video path", "empty_media_path")
        if not isinstance(sample.get("conversations"), list):
            raise SampleError(f"{sid}: no \"conversations\" list", "bad_format")
        conversations = [dict(t) for t in sample["conversations"]]
        first_human = next((t for t in conversations if t["from"] == "human"), None)
        tiles: list[torch.Tensor] = []
        num_patches: list[int] = []
        for path in images + ([video] if video is not None else []):
            if not os.path.exists(os.path.join(spec.root, path)):
                raise SampleError(f"{sid}: {os.path.join(spec.root, path)} does not exist", "missing_media")
        try:
            if video is not None:
                frames, _ = train_frames(os.path.join(spec.root, video), seed=frame_seed,
                                         min_num_frames=self.min_num_frame, max_num_frames=self.max_num_frame,
                                         sample=self.sampling_method,
                                         clip=tuple(sample["clip"]) if sample.get("clip") else None)
                prefix = "".join(f"Frame-{k + 1}: {IMAGE_PLACEHOLDER}\n" for k in range(len(frames)))
                if first_human is not None:
                    v = first_human["value"]
                    first_human["value"] = v.replace(VIDEO_PLACEHOLDER + "\n", prefix) if VIDEO_PLACEHOLDER in v \
                        else prefix + v
                for f in frames:  # one squashed tile per frame, no tiling (spec §4); InternVL's transform augments
                    if spec.data_augment:  # frames as it does images (video_get_item: build_transform(is_train))
                        f = jpeg_augment(f, rng)
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
            raise SampleError(f"{sid}: {e}", "unreadable_media") from None
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
