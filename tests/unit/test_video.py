"""Video frame sampling and decoding (internvit.preprocess.video).

Expectations come from spec/internvit.md §4 (the worked example of `get_index`, and a literal copy of InternVL's
`get_index` below), from InternVL's training sampling (`get_frame_indices` and the `read_frames_*` readers,
transcribed below from `internvl_chat/internvl/train/dataset.py`) and from media the tests write themselves: every
frame's content encodes its index (a grey level for videos, a distinct palette colour for GIFs and frame folders),
so the decoded frame can be identified.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import get_frame_indices, read_frames_gif

from internvit.preprocess.image import ImageLoadError
from internvit.preprocess.video import VideoLoadError, frame_indices, load_frames, sample_frame_indices, train_frames

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


# ---- InternVL's training sampling (issue 12), transcribed from OpenGVLab/InternVL 2410d1d ------------------------
# internvl_chat/internvl/train/dataset.py; the readers return the frames of these indices (the tests read the frame
# contents to check ours gives those frames). TCSLoader.__call__ (lines 228-244) passes num_frames=max_num_frame and
# min_num_frames=min_num_frame (8 and 32 in every InternVL 2.5 stage script).


def read_frames_decord(vlen, fps, num_frames, sample='rand', clip=None, min_num_frames=4):
    """dataset.py lines 126-155: the indices it passes to `video_reader.get_batch` (one frame each)."""
    if clip:
        start, end = clip
        duration = end - start
        vlen = int(duration * fps)
        start_index = int(start * fps)
    t_num_frames = np.random.randint(min_num_frames, num_frames + 1)
    frame_indices = get_frame_indices(t_num_frames, vlen, sample=sample, input_fps=fps)
    if clip:
        frame_indices = [f + start_index for f in frame_indices]
    return [int(f) for f in frame_indices]


def read_frames_folder(vlen, num_frames, sample='rand', min_num_frames=4):
    """dataset.py lines 169-196: the indices of the (sorted) frames it returns."""
    frames = list(range(vlen))
    t_num_frames = np.random.randint(min_num_frames, num_frames + 1)
    if vlen > t_num_frames:
        frame_indices = get_frame_indices(t_num_frames, vlen, sample=sample)
        frames = [frames[i] for i in frame_indices]
    return frames


def official(fn, seed, *args, **kwargs):
    """Run an InternVL reader with the global `random` and `np.random` seeded as ours seeds its own generators."""
    random.seed(seed)
    np.random.seed(seed)
    return [int(i) for i in fn(*args, **kwargs)]


def test_sample_frame_indices_draws_as_internvl_s_get_frame_indices():
    """Index for index and draw for draw (the generators end in the same state) over a sweep that reaches both
    branches of 'rand' (a random frame per segment; a sorted random subset when a segment is too short)."""
    cases = fallbacks = 0
    for vlen in list(range(1, 70)) + [299, 1000]:
        for num_frames in (1, 2, 3, 7, 8, 16, 32):
            for seed in range(3):
                for sample in ("rand", "middle"):
                    expected = official(get_frame_indices, seed, num_frames, vlen, sample=sample)
                    after = (random.random(), np.random.random())
                    rng, np_rng = random.Random(seed), np.random.RandomState(seed)
                    ours = sample_frame_indices(num_frames, vlen, rng=rng, np_rng=np_rng, sample=sample)
                    assert ours == expected, (vlen, num_frames, seed, sample)
                    assert (rng.random(), np_rng.random_sample()) == after, (vlen, num_frames, seed, sample)
                    assert len(ours) == num_frames and all(0 <= i < vlen for i in ours)
                    fallbacks += sample == "rand" and vlen < 2 * min(num_frames, vlen)
                    cases += 1
    assert cases > 1900 and fallbacks > 100


def test_train_frames_of_a_gif_are_internvl_s_and_never_repeat(tmp_path):
    """A 4-frame GIF gives its 4 frames once each (the model card's get_index, which training used before, gives
    [0,0,1,1,2,2,2,3]); a 10-frame GIF a random subset; always those InternVL's read_frames_gif returns for the same
    draws."""
    for n, (lo, hi) in ((4, (8, 32)), (10, (2, 9))):
        frames = [Image.new("RGB", (40, 30), c) for c in PALETTE[:n]]
        path = tmp_path / f"anim{n}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
        counts = set()
        for seed in range(12):
            out, indices = train_frames(path, seed=seed, min_num_frames=lo, max_num_frames=hi)
            assert indices == official(read_frames_gif, seed, n, hi, min_num_frames=lo), (n, seed)
            assert [colour_index(f) for f in out] == indices
            assert len(set(indices)) == len(indices) <= n
            counts.add(len(indices))
        if n == 4:
            assert counts == {4} and indices == [0, 1, 2, 3]
            assert load_frames(path, num_segments=8)[1] == [0, 0, 1, 1, 2, 2, 2, 3]
        else:
            assert len(counts) > 1  # the count is drawn


@pytest.mark.parametrize("n, clip", [(N_FRAMES, None), (N_FRAMES, (0.5, 1.5)), (5, None)],
                         ids=["60_frames", "clip", "5_frames"])
def test_train_frames_of_a_video_are_internvl_s(tmp_path, n, clip):
    """The frames read_frames_decord takes for the same draws (8..32 of them; a 5-frame video repeats its last
    frame up to the count, as decord's get_batch of the padded indices does), decoded by PyAV."""
    path = write_video(tmp_path / "clip.mp4", "mpeg4", n=n)
    for seed in range(4):
        out, indices = train_frames(path, seed=seed, min_num_frames=8, max_num_frames=32, clip=clip)
        assert indices == official(read_frames_decord, seed, n, FPS, 32, clip=clip, min_num_frames=8), seed
        assert 8 <= len(indices) <= 32
        assert [decoded_index(f) for f in out] == indices
        if clip:
            assert all(15 <= i < 45 for i in indices)


def test_train_frames_of_a_folder_are_internvl_s(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, c in enumerate(PALETTE):
        Image.new("RGB", (20, 16), c).save(folder / f"clip_{i:04d}.jpg", quality=100)  # *_N.jpg: InternVL's order
    seen = set()
    for seed in range(8):
        out, indices = train_frames(folder, seed=seed, min_num_frames=4, max_num_frames=16)
        assert indices == official(read_frames_folder, seed, len(PALETTE), 16, min_num_frames=4), seed
        assert [colour_index_near(f) for f in out] == indices
        seen.add(len(indices))
    assert len(PALETTE) in seen and min(seen) < len(PALETTE)  # all 12 frames when the count reaches 12


def colour_index_near(frame: Image.Image) -> int:
    """The palette colour a JPEG-compressed solid frame shows."""
    mean = np.asarray(frame, dtype=np.float64).reshape(-1, 3).mean(0)
    return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in PALETTE]))


def test_train_frames_are_reproducible_from_the_seed():
    gif = Path(__file__).parents[2] / "examples" / "train" / "clip.gif"
    runs = [train_frames(gif, seed=s, min_num_frames=2, max_num_frames=6)[1] for s in (5, 5, 6, 7, 8)]
    assert runs[0] == runs[1] and len({tuple(r) for r in runs[1:]}) > 1
