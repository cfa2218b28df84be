"""Packing (spec §6.4): our `Packer` against a transcription of InternVL's buffer rule, and the stream order."""

from __future__ import annotations

import random

import pytest

from internvit.train.batches import Packer, index_stream


def internvl_packs(samples, max_tokens, max_tiles, max_buffers):
    """InternVL's `PackedDataset.__iter__` / `find_buffer` / `update_buffer_list` (allow_overflow off, no sample
    longer than the budget), written out over (index, tokens, tiles) to check ours against."""
    buffer_list, out = [], []
    for idx, tokens, tiles in samples:
        found = None
        for i, b in enumerate(buffer_list):
            if b[2] + tiles <= max_tiles and b[1] + tokens <= max_tokens:
                found = i
                break
        buf = buffer_list.pop(found) if found is not None else ([], 0, 0)
        buf = (buf[0] + [idx], buf[1] + tokens, buf[2] + tiles)
        max_len = []
        if buf[1] >= max_tokens:
            max_len.append(buf)
        else:
            find_idx = len(buffer_list)
            for i in range(len(buffer_list)):
                if buffer_list[i][2] < buf[2]:
                    find_idx = i
                    break
            buffer_list.insert(find_idx, buf)
        out += [b[0] for b in max_len]
        while buffer_list and buffer_list[0][2] == max_tiles:
            out.append(buffer_list.pop(0)[0])
        while len(buffer_list) > max_buffers:
            out.append(buffer_list.pop(0)[0])
    return out, [b[0] for b in buffer_list]


def test_packs_by_hand():
    p = Packer(max_tokens=100, max_tiles=4, max_buffers=2)
    assert p.add(0, 30, 2) == []
    assert p.add(1, 30, 2) == [[0, 1]]  # exactly 4 tiles: leaves
    assert p.add(2, 80, 1) == []
    assert p.add(3, 30, 1) == []  # 110 tokens would not fit with sample 2: a second buffer
    assert p.add(4, 20, 1) == [[2, 4]]  # joins the first buffer that fits, which hits 100 tokens exactly
    assert p.add(5, 90, 3) == []  # 120 tokens with sample 3: a new buffer, placed first (more tiles)
    assert p.add(6, 60, 3) == [[3, 6]]  # too many tiles beside 5; fills sample 3's buffer to 4 tiles
    assert p.add(7, 95, 2) == []
    assert p.add(8, 95, 1) == [[5]]  # a third buffer: more than 2 pending, the fullest (most tiles) leaves
    assert [b["indices"] for b in p.buffers] == [[7], [8]]
    with pytest.raises(ValueError, match="do not fit"):
        p.add(9, 101, 1)


@pytest.mark.parametrize("seed", range(5))
def test_packer_equals_internvl_rule(seed):
    rng = random.Random(seed)
    samples = [(i, rng.randint(50, 2000), rng.choice([1, 1, 2, 3, 5, 7, 13])) for i in range(2000)]
    ours, p = [], Packer(max_tokens=4096, max_tiles=16, max_buffers=5)
    for s in samples:
        ours += p.add(*s)
    theirs, pending = internvl_packs(samples, 4096, 16, 5)
    assert ours == theirs and [b["indices"] for b in p.buffers] == pending
    assert sorted(i for pack in ours + pending for i in pack) == list(range(2000))  # nothing lost or repeated


def test_packer_state_round_trip():
    a, b = Packer(max_tokens=500, max_tiles=8, max_buffers=3), Packer(max_tokens=500, max_tiles=8, max_buffers=3)
    rng = random.Random(0)
    samples = [(i, rng.randint(10, 300), rng.randint(1, 4)) for i in range(200)]
    for s in samples[:100]:
        a.add(*s)
    b.load_state_dict(a.state_dict())
    assert [a.add(*s) for s in samples[100:]] == [b.add(*s) for s in samples[100:]]


def test_index_stream_splits_global_batches_and_resumes():
    one = index_stream(11, seed=3, multiple=2)
    ranks = [index_stream(11, seed=3, rank=r, world=2) for r in range(2)]
    global_one = [next(one) for _ in range(20)]  # 5 batches of 2 per epoch, 2 epochs
    global_two = [next(ranks[k % 2]) for k in range(20)]
    assert global_one == global_two
    assert len(set(global_one[:10])) == 10  # an epoch repeats no sample
    resumed = index_stream(11, seed=3, multiple=2, start=7)
    assert [next(resumed) for _ in range(13)] == global_one[7:]
