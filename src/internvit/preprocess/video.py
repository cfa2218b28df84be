"""Video frames for InternViT: the model card's frame sampling (`get_index`), InternVL's training sampling
(`get_frame_indices`, `sample='rand'`), and decoding with PyAV.

References:
    - InternVL `load_video` / `get_index` (spec/internvit.md §4, [S9]): `num_segments` evenly spaced frames,
      optionally inside a [start, end] bound in seconds, using the stream's average fps. Each frame then becomes
      one 448x448 tile (`dynamic_tiles(max_tiles=1)`, a squash) and one `Frame-i: <image>` in the prompt. Used by
      extraction and `chat()` (`load_frames`).
    - InternVL training (`internvl_chat/internvl/train/dataset.py`: `get_frame_indices`, `read_frames_decord`,
      `read_frames_gif`, `read_frames_folder`; spec §4): a frame count drawn from `min_num_frames..max_num_frames`,
      the video cut into that many equal segments (no more than it has frames) and one random frame taken in each;
      a video file shorter than the count repeats its last frame (decord's `get_batch` of the padded indices), a
      GIF keeps each frame once, a folder of no more frames than the count gives all of them. A `clip` [start, end]
      in seconds samples inside it (`train_frames`).

Differs from InternVL: decoding uses PyAV (the `[video]` extra) instead of decord; frame i is the i-th frame in
decode order, as decord counts them. GIFs and folders of frames are read with Pillow and sampled the same way
(a GIF's fps comes from its frame durations; a folder has none, so a bound needs `fps=`). In training, a `clip`
also applies to a GIF (InternVL reads the whole GIF), a folder's frames are in name order (InternVL: by the number
in `*_N.jpg`, others in directory order), and only the chosen frames of a folder are opened.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .image import DEFAULT_MAX_PIXELS, ImageLoadError, is_image_name, open_image, special_file_kind, to_rgb

VIDEO_EXTENSIONS = frozenset(".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .flv .wmv .3gp".split())


class VideoLoadError(ImageLoadError):
    """A video (or GIF, or frame folder) could not be read; the message names the input and the cause."""


def frame_indices(num_frames: int, fps: float, *, num_segments: int = 8,
                  bound: tuple[float, float] | None = None, first_idx: int = 0) -> list[int]:
    """InternVL's `get_index`: the middle frame of each of `num_segments` equal segments.

    Example (spec §4): 300 frames at 30 fps, 8 segments -> [18, 55, 93, 130, 168, 205, 242, 280].

    Args:
        num_frames: frames in the video (`max_frame = num_frames - 1`).
        fps: the stream's average frame rate; only used with `bound`.
        num_segments: how many frames to take.
        bound: optional (start, end) in seconds.
        first_idx: the lowest frame index allowed.
    """
    if num_frames < 1:
        raise ValueError("the video has no frames")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    start, end = bound if bound is not None else (-100000, 100000)
    max_frame = num_frames - 1
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


def is_video_name(path: str | os.PathLike) -> bool:
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_EXTENSIONS


def load_frames(source: str | os.PathLike, *, num_segments: int = 8, bound: tuple[float, float] | None = None,
                fps: float | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                ) -> tuple[list[Image.Image], list[int]]:
    """Sample `num_segments` RGB frames from a video file, an animated GIF/WebP/APNG or a folder of frames.

    `max_pixels` bounds a frame's width * height, checked from the stream's header before anything is decoded.

    Returns:
        The frames and their indices in the source.

    Raises:
        VideoLoadError: the source is missing, empty, not a regular file, broken, too large, has no video stream
            or no frames.
    """
    path = Path(source)
    if path.is_dir() and bound is not None and fps is None:
        raise ValueError(f"{path}: a folder of frames has no frame rate; pass fps= together with bound=")
    return _read(path, lambda n, rate: frame_indices(n, rate or 1.0, num_segments=num_segments, bound=bound), fps,
                 max_pixels)


def sample_frame_indices(num_frames: int, vlen: int, *, rng: random.Random, np_rng: np.random.RandomState,
                         sample: str = "rand") -> list[int]:
    """InternVL's `get_frame_indices` for `sample='rand'` and `'middle'` (`train/dataset.py`): `min(num_frames,
    vlen)` equal segments of the `vlen` frames, one random frame in each (`rng.choice(range(start, end - 1))`, so a
    segment's last frame is never drawn), or, when a segment is too short for that, a sorted random subset
    (`np_rng.permutation`); padded to `num_frames` with the last index. `rng` and `np_rng` are drawn from as
    InternVL draws from `random` and `np.random`.
    """
    if vlen < 1:
        raise ValueError("the video has no frames")
    acc_samples = min(num_frames, vlen)
    intervals = np.linspace(start=0, stop=vlen, num=acc_samples + 1).astype(int)
    ranges = [(intervals[k], intervals[k + 1] - 1) for k in range(acc_samples)]
    if sample == "rand":
        try:
            indices = [rng.choice(range(a, b)) for a, b in ranges]
        except IndexError:  # a segment of one or two frames: range(a, b) is empty
            indices = sorted(np_rng.permutation(vlen)[:acc_samples])
    elif sample == "middle":
        indices = [(a + b) // 2 for a, b in ranges]
    else:
        raise ValueError(f"sample={sample!r}: expected 'rand' or 'middle'")
    indices = [int(i) for i in indices]
    return indices + [indices[-1]] * (num_frames - len(indices))


def train_frames(source: str | os.PathLike, *, seed: int, min_num_frames: int = 8, max_num_frames: int = 32,
                 sample: str = "rand", clip: tuple[float, float] | None = None, fps: float | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[list[Image.Image], list[int]]:
    """InternVL's training frames of a video file, GIF or folder of frames (`read_frames_decord` / `_gif` /
    `_folder` with `sample='rand'`): the count drawn from `min_num_frames..max_num_frames`, then
    `sample_frame_indices`. The same `seed` gives the same frames (the draws use `random.Random(seed)` and
    `np.random.RandomState(seed)` where InternVL uses the global `random` and `np.random`).

    Returns:
        The frames and their indices in the source (a video file may repeat its last frame; a GIF and a folder
        never give more frames than they have).
    """
    path = Path(source)
    rng, np_rng = random.Random(seed), np.random.RandomState(seed)
    kind = "folder" if path.is_dir() else "gif" if path.suffix.lower() in _ANIMATED else "video"

    def choose(vlen: int, rate: float | None) -> list[int]:
        start_index = 0
        if clip is not None:  # read_frames_decord: vlen = int(duration * fps), indices from int(start * fps)
            if rate is None:
                raise ValueError(f"{path}: a folder of frames has no frame rate; pass fps= together with a clip")
            start, end = clip
            vlen, start_index = int((end - start) * rate), int(start * rate)
            if vlen < 1:
                raise ValueError(f"{path}: clip {list(clip)} holds no frame at {rate:g} fps")
        count = int(np_rng.randint(min_num_frames, max_num_frames + 1))
        if kind == "folder" and vlen <= count:  # read_frames_folder: all frames
            indices = list(range(vlen))
        else:
            indices = sample_frame_indices(count, vlen, rng=rng, np_rng=np_rng, sample=sample)
        if kind == "gif":  # read_frames_gif keeps the GIF's frames whose index was drawn, each once
            indices = sorted(set(indices))
        return [i + start_index for i in indices]

    return _read(path, choose, fps, max_pixels)


_ANIMATED = (".gif", ".webp", ".png", ".apng")
Choose = Callable[[int, "float | None"], list[int]]  # (frames in the source, its fps or None) -> frame indices


def _read(path: Path, choose: Choose, fps: float | None,
          max_pixels: int | None) -> tuple[list[Image.Image], list[int]]:
    if path.is_dir():
        return _folder_frames(path, choose, fps, max_pixels)
    if not path.exists():
        raise VideoLoadError(f"{path}: no such file")
    st = path.stat()
    kind = special_file_kind(st.st_mode)
    if kind is not None:  # a FIFO would block the decoder forever
        raise VideoLoadError(f"{path}: {kind}, not a regular file (not read)")
    if st.st_size == 0:
        raise VideoLoadError(f"{path}: empty file (0 bytes)")
    if path.suffix.lower() in _ANIMATED:
        return _animated_frames(path, choose, fps, max_pixels)
    return _video_frames(path, choose, max_pixels)


def _check_frame_size(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise VideoLoadError(f"{path}: frames of {width}x{height} = {width * height} pixels exceed "
                             f"max_pixels={max_pixels}")


def _video_frames(path: Path, choose: Choose, max_pixels: int | None) -> tuple[list[Image.Image], list[int]]:
    try:
        import av
    except ImportError:
        raise VideoLoadError(f"{path}: reading videos needs PyAV: pip install 'internvit[video]'") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoLoadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            _check_frame_size(path, stream.codec_context.width, stream.codec_context.height, max_pixels)
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
            num_frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            if num_frames == 0:
                raise VideoLoadError(f"{path}: the video has no frames")
            wanted = choose(num_frames, fps)
            container.seek(0)
            frames: dict[int, Image.Image] = {}
            last = None
            want, stop = set(wanted), max(wanted)
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    frames[i] = frame.to_image()
                last = i, frame
                if i >= stop:
                    break
    except VideoLoadError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoLoadError(f"{path}: cannot decode video ({e})") from None
    if last is None:
        raise VideoLoadError(f"{path}: no frame could be decoded")
    # The container's frame count can be an estimate: indices past the real end take the last frame.
    tail = last[1].to_image()
    return [frames.get(i, tail) for i in wanted], wanted


def _animated_frames(path: Path, choose: Choose, fps, max_pixels) -> tuple[list[Image.Image], list[int]]:
    try:
        with Image.open(path) as im:
            _check_frame_size(path, *im.size, max_pixels)
            n = getattr(im, "n_frames", 1)
            if fps is None:
                durations = []
                for i in range(n):
                    im.seek(i)
                    durations.append(im.info.get("duration") or 100)
                fps = 1000.0 / (sum(durations) / len(durations))
            wanted = [min(i, n - 1) for i in choose(n, fps)]  # a clip past the end: the last frame
            frames = []
            for i in wanted:
                im.seek(i)
                frames.append(to_rgb(im).copy())
    except (OSError, ValueError, EOFError) as e:
        raise VideoLoadError(f"{path}: cannot read frames ({e})") from None
    return frames, wanted


def _folder_frames(path: Path, choose: Choose, fps, max_pixels) -> tuple[list[Image.Image], list[int]]:
    files = sorted(p for p in path.iterdir() if p.is_file() and is_image_name(p.name))
    if not files:
        raise VideoLoadError(f"{path}: a folder of frames with no image files")
    wanted = [min(i, len(files) - 1) for i in choose(len(files), fps)]
    return [open_image(files[i], exif_transpose=False, max_pixels=max_pixels) for i in wanted], wanted
