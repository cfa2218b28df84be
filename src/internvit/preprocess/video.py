"""Video frames for InternViT: the model card's frame sampling (`get_index`) and decoding with PyAV.

References:
    - InternVL `load_video` / `get_index` (spec/internvit.md §4, [S9]): `num_segments` evenly spaced frames,
      optionally inside a [start, end] bound in seconds, using the stream's average fps. Each frame then becomes
      one 448x448 tile (`dynamic_tiles(max_tiles=1)`, a squash) and one `Frame-i: <image>` in the prompt.

Differs from InternVL: decoding uses PyAV (the `[video]` extra) instead of decord; frame i is the i-th frame in
decode order, as decord counts them. GIFs and folders of frames are read with Pillow and sampled the same way
(a GIF's fps comes from its frame durations; a folder has none, so a bound needs `fps=`).
"""

from __future__ import annotations

import os
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
    if path.is_dir():
        return _folder_frames(path, num_segments, bound, fps, max_pixels)
    if not path.exists():
        raise VideoLoadError(f"{path}: no such file")
    st = path.stat()
    kind = special_file_kind(st.st_mode)
    if kind is not None:  # a FIFO would block the decoder forever
        raise VideoLoadError(f"{path}: {kind}, not a regular file (not read)")
    if st.st_size == 0:
        raise VideoLoadError(f"{path}: empty file (0 bytes)")
    if path.suffix.lower() in (".gif", ".webp", ".png", ".apng"):
        return _animated_frames(path, num_segments, bound, fps, max_pixels)
    return _video_frames(path, num_segments, bound, max_pixels)


def _check_frame_size(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise VideoLoadError(f"{path}: frames of {width}x{height} = {width * height} pixels exceed "
                             f"max_pixels={max_pixels}")


def _video_frames(path: Path, num_segments: int, bound, max_pixels) -> tuple[list[Image.Image], list[int]]:
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
            wanted = frame_indices(num_frames, fps, num_segments=num_segments, bound=bound)
            container.seek(0)
            frames: dict[int, Image.Image] = {}
            last = None
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_image()
                last = i, frame
                if i >= wanted[-1]:
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


def _animated_frames(path: Path, num_segments, bound, fps, max_pixels) -> tuple[list[Image.Image], list[int]]:
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
            wanted = frame_indices(n, fps, num_segments=num_segments, bound=bound)
            frames = []
            for i in wanted:
                im.seek(i)
                frames.append(to_rgb(im).copy())
    except (OSError, ValueError, EOFError) as e:
        raise VideoLoadError(f"{path}: cannot read frames ({e})") from None
    return frames, wanted


def _folder_frames(path: Path, num_segments, bound, fps, max_pixels) -> tuple[list[Image.Image], list[int]]:
    files = sorted(p for p in path.iterdir() if p.is_file() and is_image_name(p.name))
    if not files:
        raise VideoLoadError(f"{path}: a folder of frames with no image files")
    if bound is not None and fps is None:
        raise ValueError(f"{path}: a folder of frames has no frame rate; pass fps= together with bound=")
    wanted = frame_indices(len(files), fps or 1.0, num_segments=num_segments, bound=bound)
    return [open_image(files[i], exif_transpose=False, max_pixels=max_pixels) for i in wanted], wanted
