"""`internvit data check` on a dataset with one sample of every kind of problem, and the --fix output."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from internvit.train.quality import check_meta, repeated_ngram_fraction

pytestmark = pytest.mark.integration


def test_repeated_ngram_fraction():
    assert repeated_ngram_fraction("the cat sat on the mat and looked at the dog " * 1) == 0.0
    looped = " ".join(["I think that this is the answer to the question"] * 5)
    assert repeated_ngram_fraction(looped) > 0.4
    assert repeated_ngram_fraction("哈" * 60) > 0.4  # no spaces: characters


def test_data_check_finds_each_problem_and_fixes(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    Image.new("RGB", (640, 480), (200, 10, 10)).save(root / "red.jpg")
    (root / "broken.jpg").write_text("not a jpeg")
    Image.new("RGB", (64, 48), (10, 200, 10)).save(root / "green.gif", save_all=True,
                                                    append_images=[Image.new("RGB", (64, 48), (10, 10, 200))])
    good = {"id": "good", "image": "red.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]}
    rows = [
        good,
        {"id": "text", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "missing", "image": "nope.jpg", "conversations": good["conversations"]},
        {"id": "unreadable", "image": "broken.jpg", "conversations": good["conversations"]},
        {"id": "mismatch", "image": ["red.jpg", "red.jpg"], "conversations": good["conversations"]},
        {"id": "empty", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "  "}]},
        {"id": "dup", "conversations": [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "Yes."},
                                        {"from": "human", "value": "B?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "loop", "conversations": [{"from": "human", "value": "Why?"}, {"from": "gpt", "value":
                                         " ".join(["because the sky is blue and the sea is blue too"] * 6)}]},
        {"id": "noconv"},
        {"id": "unanswered", "conversations": [{"from": "human", "value": "Anyone?"}]},
        {"id": "both", "image": "red.jpg", "video": "green.gif", "conversations": [
            {"from": "human", "value": "<video>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "nopath", "image": "", "conversations": good["conversations"]},
        good,  # a duplicate line
    ]
    ann = tmp_path / "data.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"demo": {"root": "media", "annotation": "data.jsonl", "max_dynamic_patch": 6}}))

    (report,) = check_meta(meta)
    reasons = {d["id"]: d["reasons"] for d in report.dropped}
    assert reasons == {"missing": ["missing_media"], "unreadable": ["unreadable_media"],
                       "mismatch": ["placeholder_mismatch"], "empty": ["empty_answer"], "dup": ["duplicate_answer"],
                       "loop": ["repetitive"], "noconv": ["bad_format"], "unanswered": ["no_answer"],
                       "good": ["duplicate_sample"], "both": ["mixed_media"], "nopath": ["empty_media_path"],
                       None: ["bad_json"]}
    assert report.samples == 14 and report.kept == 2

    out = tmp_path / "fixed"
    proc = subprocess.run([sys.executable, "-m", "internvit.cli", "data", "check", str(meta), "--fix", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "demo: 14 samples, 2 kept" in proc.stdout
    listed = proc.stdout.splitlines()[1:]  # one line per problem: file:line (id), reason, the path looked for
    assert f"  {ann}:3 (id missing): missing_media {root / 'nope.jpg'}" in listed
    assert f"  {ann}:4 (id unreadable): unreadable_media {root / 'broken.jpg'}" in listed
    assert f"  {ann}:14: bad_json" in listed and len(listed) == 12
    kept = [json.loads(l)["id"] for l in (out / "demo.jsonl").read_text().splitlines()]
    assert kept == ["good", "text"]
    new_meta = json.loads((out / "meta.json").read_text())
    assert new_meta["demo"]["annotation"] == "demo.jsonl" and new_meta["demo"]["length"] == 2
    assert json.loads((out / "report.json").read_text())["demo"]["problems"]["missing_media"] == 1
    (again,) = check_meta(out / "meta.json")
    assert again.kept == again.samples == 2 and not again.problems


def test_data_check_length_budget_with_a_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from helpers import build_tiny_llm

    _, tok = build_tiny_llm(None, ["What colour is it? It is red."] * 20)
    Image.new("RGB", (1792, 1344), (0, 0, 200)).save(tmp_path / "big.jpg")  # 4x3 grid + thumbnail = 13 tiles
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "big.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Blue."}]}) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": ".", "annotation": "d.jsonl"}}))
    (short,) = check_meta(tmp_path / "meta.json", tokenizer=tok, max_seq_length=2048)
    assert short.problems == {"too_long": 1}  # 13 tiles x 256 tokens
    (ok,) = check_meta(tmp_path / "meta.json", tokenizer=tok, max_seq_length=8192)
    assert not ok.problems


def test_data_check_lists_the_first_20_and_names_a_missing_root_or_annotation_once(tmp_path, monkeypatch, capsys):
    from internvit.cli import main

    def check(meta: dict | str) -> tuple[int, list[str]]:
        (tmp_path / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
        rc = main(["data", "check", "meta.json"])
        return rc, capsys.readouterr().out.splitlines()

    monkeypatch.chdir(tmp_path)
    (tmp_path / "media").mkdir()
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": f"gone{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": f"Thing {i}."}]}) + "\n"
                                              for i in range(25)))
    rc, lines = check({"d": {"root": "media", "annotation": "d.jsonl"}})
    assert rc == 1 and lines[0] == "d: 25 samples, 0 kept; missing_media 25"
    assert lines[1] == f"  d.jsonl:1: missing_media {os.path.join('media', 'gone0.jpg')}"
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "  … and 5 more (--fix OUT writes them all)"
    rc, lines = check({"d": {"root": "no_such_folder", "annotation": "d.jsonl"}})
    assert rc == 1 and lines[1:] == ["  d: root no_such_folder does not exist (the media paths of d.jsonl are "
                                     "relative to it)"]
    rc, lines = check({"d": {"root": "media", "annotation": "nothing.jsonl"}})
    assert rc == 1 and lines[1:] == ["  d: annotation file nothing.jsonl does not exist"]
    rc, lines = check("{not json")
    assert rc == 2 and lines == [] and len(capsys.readouterr().err.strip().splitlines()) <= 1


def test_help_texts_name_the_docs_and_print_percent_signs(capsys):
    from internvit.cli import main

    for argv in (["data", "check", "--help"], ["train", "--help"], ["chat", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = capsys.readouterr().out
    assert "40%)" in out and "%%" not in out and "spec §" not in out
    assert 'docs/training.md, "Run folders and resuming"' in " ".join(out.split())


def test_no_help_text_prints_a_doubled_percent_sign(capsys):
    """argparse %-formats `help=` but not `description=`: a `%%` there reaches the user as is."""
    from internvit.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if a.choices and "extract" in a.choices)
    for name, parser in sub.choices.items():
        nested = [a for a in parser._actions if isinstance(a.choices, dict)]
        for argv in [[name, "--help"]] + [[name, child, "--help"] for a in nested for child in a.choices]:
            with pytest.raises(SystemExit):
                main(argv)
            assert "%%" not in capsys.readouterr().out, argv
