"""`internvit data check`: find the samples InternVL 2.5's data quality controls would drop (spec §6.6).

Per sample of every dataset in a meta JSON:
    - `bad_json` / `bad_format`: a line that is not JSON, or has no well-formed `conversations`;
    - `missing_media` / `unreadable_media`: an image or video that is absent or cannot be decoded;
    - `placeholder_mismatch`: the number of `<image>` placeholders differs from the number of images (a single
      image without a placeholder is fine: training prepends one), or `<image>` in a pure-text sample;
    - `mixed_media` (both `image` and `video`) and `empty_media_path` (`"image": ""`), which training rejects;
    - `too_long`: text plus image tokens (tiles x 256, from the image size and the dataset's tile budget; a video
      at its most frames, up to `max_num_frame`) over `max_seq_length` (needs a tokenizer);
    - `repetitive`: an answer whose repeated 10-grams make up more than 40% of its 10-grams (InternVL's n-gram
      check; words, or characters for text without spaces);
    - `no_answer` (no `gpt` turn: nothing is supervised), `empty_answer`, `duplicate_answer` (the same answer twice
      in one conversation), `duplicate_sample` (a line identical to an earlier one in the dataset).
Each problem is one `Issue` (file, line, sample id, reason, the media path looked for). A dataset whose `root` folder
or annotation file does not exist is reported once as such (`missing_root`, `missing_annotation`) instead of once
per sample. With `fix`, the kept lines are written per dataset with a new meta JSON, and `report.json` lists every
dropped line with its reasons and paths.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from internvit.preprocess import ImageLoadError, open_image
from internvit.preprocess.tiling import choose_grid, tile_budget
from internvit.preprocess.video import train_frames
from internvit.registry import DEFAULT_MAX_TILES
from internvit.train.data import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, DatasetSpec, load_meta, media_count


@dataclass(frozen=True)
class Issue:
    """One problem of one sample: where it is, what it is, and the media path that was looked for."""

    file: str
    line: int | None  # None: the dataset as a whole (a missing root or annotation file)
    id: object
    reason: str
    path: str | None = None


@dataclass
class DatasetReport:
    name: str
    samples: int = 0
    problems: Counter = field(default_factory=Counter)
    dropped: list[dict] = field(default_factory=list)  # {"line": n, "id": ..., "reasons": [...], "paths": [...]}
    issues: list[Issue] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.samples - len(self.dropped)


def repeated_ngram_fraction(text: str, n: int = 10) -> float:
    """Share of the n-grams of `text` that occur more than once (words; characters for text without spaces)."""
    units = text.split()
    if len(units) < 2 * n:
        units = list(text.replace(" ", ""))
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c for c in counts.values() if c > 1) / len(grams)


def _sample_problems(sample: dict, spec: DatasetSpec, *, tokenizer, max_seq_length: int, max_tiles: int,
                     num_image_token: int, repeat_threshold: float, max_num_frame: int = 32
                     ) -> list[tuple[str, str | None]]:
    """The sample's problems as (reason, media path or None), sorted."""
    conv = sample.get("conversations")
    if not isinstance(conv, list) or not conv or not all(isinstance(t, dict) and "from" in t and "value" in t
                                                         for t in conv):
        return [("bad_format", None)]
    problems: list = []
    images, video = media_count(sample)
    if images and video is not None:
        problems.append("mixed_media")
    if any(not p for p in images) or video == "":
        return sorted({(p, None) for p in problems + ["empty_media_path"]})
    human = "".join(t["value"] for t in conv if t["from"] == "human")
    n_placeholders = human.count(IMAGE_PLACEHOLDER)
    if video is not None:
        if n_placeholders or human.count(VIDEO_PLACEHOLDER) > 1:
            problems.append("placeholder_mismatch")
    elif images:
        if not (n_placeholders == len(images) or (len(images) == 1 and n_placeholders == 0)):
            problems.append("placeholder_mismatch")
    elif n_placeholders or VIDEO_PLACEHOLDER in human:
        problems.append("placeholder_mismatch")
    tiles = n_frames = 0
    budget = tile_budget(max(1, len(images)), spec.max_dynamic_patch or max_tiles)
    for rel in images + ([video] if video else []):
        path = os.path.join(spec.root, rel)
        if not os.path.isdir(spec.root):
            problems.append(("missing_root", None))  # said once for the dataset
            continue
        if not os.path.exists(path):
            problems.append(("missing_media", path))
            continue
        try:
            if rel == video:  # the most frames training can draw: max_num_frame, or all of a shorter GIF/folder
                frames, _ = train_frames(path, seed=0, min_num_frames=max_num_frame, max_num_frames=max_num_frame,
                                         sample="middle")
                n_frames = len(frames)
                tiles += n_frames
            else:
                w, h = open_image(path).size
                grid = choose_grid(w, h, max_tiles=budget)
                tiles += grid[0] * grid[1] + (grid != (1, 1))
        except (ImageLoadError, OSError, ValueError):
            problems.append(("unreadable_media", path))
    answers = [t["value"] for t in conv if t["from"] == "gpt"]
    if not answers:
        problems.append("no_answer")  # nothing to learn from: its loss weight would be 0
    if any(not a.strip() for a in answers):
        problems.append("empty_answer")
    if len(set(a.strip() for a in answers)) < len(answers):
        problems.append("duplicate_answer")
    if any(repeated_ngram_fraction(a) > repeat_threshold for a in answers):
        problems.append("repetitive")
    if tokenizer is not None:
        text = "".join(t["value"] for t in conv)
        n_tokens = len(tokenizer(text, add_special_tokens=False).input_ids) + 5 * len(conv) + 32
        n_tokens += tiles * num_image_token + 2 * (len(images) + n_frames)
        if n_tokens > max_seq_length:
            problems.append("too_long")
    return sorted({p if isinstance(p, tuple) else (p, None) for p in problems}, key=lambda p: (p[0], p[1] or ""))


def check_meta(meta: str | os.PathLike, *, tokenizer=None, max_seq_length: int = 16384, max_tiles: int = DEFAULT_MAX_TILES,
               num_image_token: int = 256, repeat_threshold: float = 0.4, max_num_frame: int = 32,
               fix: str | os.PathLike | None = None) -> list[DatasetReport]:
    """Check every dataset of a meta JSON; with `fix`, write the filtered datasets, a meta JSON and a report."""
    reports = []
    kept_lines: dict[str, list[str]] = {}
    specs = load_meta(meta)
    for spec in specs:
        report = DatasetReport(spec.name)
        seen: set[str] = set()
        kept_lines[spec.name] = []
        if not os.path.isfile(spec.annotation):
            report.issues.append(Issue(spec.annotation, None, None, "missing_annotation"))
            report.problems["missing_annotation"] += 1
            reports.append(report)
            continue
        if not os.path.isdir(spec.root):
            report.issues.append(Issue(spec.annotation, None, None, "missing_root", spec.root))
        with open(spec.annotation, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                report.samples += 1
                try:
                    sample = json.loads(line)
                    problems = [] if isinstance(sample, dict) else [("bad_format", None)]
                except ValueError:
                    sample, problems = {}, [("bad_json", None)]
                if not problems:
                    problems = _sample_problems(sample, spec, tokenizer=tokenizer, max_seq_length=max_seq_length,
                                                max_tiles=max_tiles, num_image_token=num_image_token,
                                                repeat_threshold=repeat_threshold, max_num_frame=max_num_frame)
                key = json.dumps(sample, sort_keys=True)
                if key in seen and ("bad_json", None) not in problems:
                    problems.append(("duplicate_sample", None))
                seen.add(key)
                if problems:
                    reasons = sorted({r for r, _ in problems})
                    report.problems.update(reasons)
                    report.dropped.append({"line": n, "id": sample.get("id"), "reasons": reasons,
                                           "paths": [p for _, p in problems if p]})
                    report.issues += [Issue(spec.annotation, n, sample.get("id"), r, p) for r, p in problems
                                      if r != "missing_root"]
                else:
                    kept_lines[spec.name].append(line.rstrip("\n"))
        reports.append(report)
    if fix is not None:
        out = Path(fix)
        out.mkdir(parents=True, exist_ok=True)
        new_meta = {}
        for spec in specs:
            (out / f"{spec.name}.jsonl").write_text("".join(l + "\n" for l in kept_lines[spec.name]))
            new_meta[spec.name] = {"root": spec.root, "annotation": f"{spec.name}.jsonl",
                                   "data_augment": spec.data_augment, "repeat_time": spec.repeat_time,
                                   "length": len(kept_lines[spec.name])}
            if spec.max_dynamic_patch is not None:
                new_meta[spec.name]["max_dynamic_patch"] = spec.max_dynamic_patch
        (out / "meta.json").write_text(json.dumps(new_meta, indent=2) + "\n")
        (out / "report.json").write_text(json.dumps(
            {r.name: {"samples": r.samples, "kept": r.kept, "problems": dict(r.problems), "dropped": r.dropped}
             for r in reports}, indent=2) + "\n")
    return reports
