"""Video frame sampling and decoding (internvit.preprocess.video).

Expectations come from spec/internvit.md §4 (the worked example of `get_index`, and a literal copy of InternVL's
`get_index` below) and from media the tests write themselves: every frame's content encodes its index (a grey level
for videos, a distinct palette colour for GIFs and frame folders), so the decoded frame can be identified.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from internvit.preprocess.image import ImageLoadError
from internvit.preprocess.video import VideoLoadError, frame_indices, load_frames

pytestmark = pytest.mark.unit


# ---- InternVL's `get_index`, copied from the model card's `load_video` helpers (spec §4, [S9]) -----------------


def get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    frame_indices = np.array([
        int(start_idx + (seg_size / 2) + np.round(seg_size * idx))
        for idx in range(num_segments)
    ])
    return frame_indices


def reference_indices(num_frames: int, fps: float, num_segments: int, bound=None) -> list[int]:
    return get_index(bound, fps, num_frames - 1, first_idx=0, num_segments=num_segments).tolist()


# ---- frame_indices -------------------------------------------------------------------------------------


def test_spec_worked_example():
    assert frame_indices(300, 30.0, num_segments=8) == [18, 55, 93, 130, 168, 205, 242, 280]
    assert reference_indices(300, 30.0, 8) == [18, 55, 93, 130, 168, 205, 242, 280]


def test_with_a_bound():
    # frames 60..180 of a 10 s clip at 30 fps, 8 segments of 15 frames, the middle of each
    assert frame_indices(300, 30.0, num_segments=8, bound=(2.0, 6.0)) == [67, 82, 97, 112, 127, 142, 157, 172]
    # a bound past the end stops at the last frame
    assert frame_indices(300, 30.0, num_segments=4, bound=(5.0, 100.0)) == reference_indices(300, 30.0, 4, (5.0, 100.0))
    assert max(frame_indices(300, 30.0, num_segments=4, bound=(5.0, 100.0))) <= 299


@pytest.mark.parametrize(
    "num_frames, num_segments, expected",
    [(1, 8, [0] * 8), (2, 8, [0, 0, 0, 0, 0, 1, 1, 1]), (3, 8, [0, 0, 0, 1, 1, 1, 2, 2]),
     (8, 8, [0, 1, 2, 3, 4, 4, 5, 6]), (9, 8, [0, 1, 2, 3, 4, 5, 6, 7]), (300, 1, [149])],
)
def test_short_videos(num_frames, num_segments, expected):
    """Fewer frames than segments repeats frames (as InternVL does; np.round rounds 0.5 to even)."""
    assert reference_indices(num_frames, 30.0, num_segments) == expected
    assert frame_indices(num_frames, 30.0, num_segments=num_segments) == expected


def test_equals_internvl_get_index_over_a_sweep():
    cases = 0
    for num_frames in list(range(1, 70)) + [299, 300, 301, 1000, 12345]:
        for fps in (1.0, 23.976, 25.0, 29.97, 30.0, 60.0):
            for num_segments in (1, 2, 3, 7, 8, 16, 32):
                for bound in (None, (0.0, 1.0), (0.5, 2.25), (1.0, 1e4), (-3.0, 0.7)):
                    ours = frame_indices(num_frames, fps, num_segments=num_segments, bound=bound)
                    assert ours == reference_indices(num_frames, fps, num_segments, bound), \
                        (num_frames, fps, num_segments, bound)
                    if bound is None:
                        assert all(0 <= i < num_frames for i in ours) and ours == sorted(ours)
                    cases += 1
    assert cases > 10_000


def test_frame_indices_rejects_nonsense():
    with pytest.raises(ValueError):
        frame_indices(0, 30.0)
    with pytest.raises(ValueError):
        frame_indices(10, 30.0, num_segments=0)


# ---- decoding a test-written video --------------------------------------------------------------------

N_FRAMES, WIDTH, HEIGHT, FPS = 60, 64, 48, 30


def grey(i: int) -> int:
    """Frame i is solid grey at 8 + 4i: neighbouring frames are 4 levels apart, the codec error is about 1."""
    return 8 + 4 * i


def write_video(path: Path, codec: str, n: int = N_FRAMES) -> Path:
    av = pytest.importorskip("av")
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0"}  # default preset: B-frames, so decode order != packet order
        else:
            stream.bit_rate = 4_000_000
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((HEIGHT, WIDTH, 3), grey(i), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_index(frame: Image.Image) -> int:
    assert frame.mode == "RGB" and frame.size == (WIDTH, HEIGHT)
    level = np.asarray(frame, dtype=np.float64).mean()
    i = int(round((level - 8) / 4))
    assert abs(level - grey(i)) <= 1.5, f"frame content {level:.2f} is not a written frame"
    return i


VIDEO_KINDS = [("clip.mp4", "mpeg4"), ("clip.mkv", "mpeg4"), ("clip.mp4", "libx264")]  # mkv: no frame count stored


@pytest.mark.parametrize("name, codec", VIDEO_KINDS)
def test_load_frames_from_video(tmp_path, name, codec):
    path = write_video(tmp_path / name, codec)
    frames, indices = load_frames(path, num_segments=8)
    expected = reference_indices(N_FRAMES, FPS, 8)
    assert indices == expected == [3, 10, 18, 25, 33, 40, 47, 55]
    assert len(frames) == 8
    assert [decoded_index(f) for f in frames] == expected


@pytest.mark.parametrize("name, codec", VIDEO_KINDS[:2])
def test_load_frames_from_video_with_bound_and_many_segments(tmp_path, name, codec):
    path = write_video(tmp_path / name, codec)
    frames, indices = load_frames(str(path), num_segments=4, bound=(0.5, 1.5))  # frames 15..45 at 30 fps
    assert indices == reference_indices(N_FRAMES, FPS, 4, (0.5, 1.5)) == [18, 26, 33, 40]
    assert [decoded_index(f) for f in frames] == indices
    frames, indices = load_frames(path, num_segments=32)  # every other frame, roughly, up to the last ones
    assert indices == reference_indices(N_FRAMES, FPS, 32)
    assert [decoded_index(f) for f in frames] == indices


def test_load_frames_from_a_video_shorter_than_the_segments(tmp_path):
    path = write_video(tmp_path / "short.mp4", "mpeg4", n=3)
    frames, indices = load_frames(path, num_segments=8)
    assert indices == [0, 0, 0, 1, 1, 1, 2, 2]
    assert [decoded_index(f) for f in frames] == indices


# ---- GIFs and frame folders ---------------------------------------------------------------------------

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def colour_index(frame: Image.Image) -> int:
    assert frame.mode == "RGB"
    pixels = np.asarray(frame).reshape(-1, 3)
    assert (pixels == pixels[0]).all(), "a frame should be one solid colour"
    return PALETTE.index(tuple(int(v) for v in pixels[0]))


def test_load_frames_from_gif(tmp_path):
    frames = [Image.new("RGB", (40, 30), c) for c in PALETTE[:10]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)  # 20 fps
    with Image.open(path) as check:
        assert check.n_frames == 10
    out, indices = load_frames(path, num_segments=4)
    assert indices == reference_indices(10, 20.0, 4) == [1, 3, 5, 8]
    assert [colour_index(f) for f in out] == indices
    out, indices = load_frames(path, num_segments=4, bound=(0.1, 0.4))  # frames 2..8 at the GIF's 20 fps
    assert indices == reference_indices(10, 20.0, 4, (0.1, 0.4)) == [2, 4, 5, 6]
    assert [colour_index(f) for f in out] == indices


def test_load_frames_from_folder(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, c in enumerate(PALETTE):
        Image.new("RGB", (20, 16), c).save(folder / f"frame_{i:04d}.png")
    (folder / "notes.txt").write_text("not a frame")
    out, indices = load_frames(folder, num_segments=5)
    assert indices == reference_indices(12, 1.0, 5) == [1, 3, 5, 8, 10]
    assert [colour_index(f) for f in out] == indices
    out, indices = load_frames(folder, num_segments=3, bound=(0.2, 0.6), fps=10.0)  # frames 2..6
    assert indices == reference_indices(12, 10.0, 3, (0.2, 0.6))
    assert [colour_index(f) for f in out] == indices
    with pytest.raises(ValueError, match="fps"):
        load_frames(folder, num_segments=3, bound=(0.2, 0.6))


# ---- errors name the input ----------------------------------------------------------------------------


def _broken(tmp_path: Path) -> Path:
    path = tmp_path / "broken.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    return path


def _truncated(tmp_path: Path) -> Path:
    path = write_video(tmp_path / "cut.mp4", "mpeg4")
    path.write_bytes(path.read_bytes()[:200])
    return path


def _broken_gif(tmp_path: Path) -> Path:
    path = tmp_path / "broken.gif"
    path.write_bytes(b"GIF89a" + bytes(range(256)) * 4)
    return path


def _empty_folder(tmp_path: Path) -> Path:
    path = tmp_path / "no_frames"
    path.mkdir()
    (path / "readme.txt").write_text("nothing here")
    return path


@pytest.mark.parametrize("make", [_broken, _empty, _truncated, _broken_gif, _empty_folder,
                                  lambda tmp: tmp / "missing.mp4", lambda tmp: tmp / "missing_dir" / "x.gif"],
                         ids=["random_bytes", "empty", "truncated", "broken_gif", "empty_folder", "missing",
                              "missing_dir"])
def test_bad_inputs_raise_video_load_error_naming_the_file(tmp_path, make):
    pytest.importorskip("av")
    path = make(tmp_path)
    with pytest.raises(VideoLoadError) as err:
        load_frames(path, num_segments=4)
    assert os.fspath(path) in str(err.value)
    assert isinstance(err.value, ImageLoadError) and isinstance(err.value, ValueError)
