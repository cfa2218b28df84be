"""The README and docs say only what exists: their Python snippets run (against a tiny checkpoint written here) and
every flag of every CLI synopsis is one the command accepts."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from internvit.cli import build_parser

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
HUB_ID = "OpenGVLab/InternViT-300M-448px-V2_5"


def code_blocks(path: Path, language: str) -> list[str]:
    """The fenced blocks of one language ("" = no language) in a markdown file, in order."""
    blocks, current, lang = [], None, None
    for line in path.read_text().splitlines():
        if current is None and line.startswith("```"):
            current, lang = [], line[3:].strip()
        elif current is not None and line.strip() == "```":
            if lang == language:
                blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    from internvit.weights import init_checkpoint

    ckpt = init_checkpoint(tmp_path / "tiny", preset="tiny", dtype="fp32")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)  # snippets write features.parquet next to them
    blocks = [b for b in code_blocks(ROOT / "README.md", "python") if "openai" not in b]  # openai: needs a server
    assert blocks
    for block in blocks:  # as a user runs them: a fresh interpreter each
        proc = subprocess.run([sys.executable, "-c", block.replace(HUB_ID, str(ckpt))], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"README snippet failed:\n{block}\n{proc.stderr}"
    assert (tmp_path / "features.parquet").is_file()


def synopses() -> list[tuple[str, list[str], set[str]]]:
    """(file, command words, flags) of every `internvit ...` synopsis line (with its continuation lines)."""
    out = []
    for path in DOCS:
        for block in code_blocks(path, "") + code_blocks(path, "bash"):
            command: list[str] | None = None
            for line in block.splitlines():
                words = line.split()
                if words[:1] == ["internvit"] or (words and words[0].endswith("/internvit")):
                    command = [w for w in words[1:] if re.fullmatch(r"[a-z]+", w)][:2]
                    out.append((path.name, command, set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line))))
                elif command is not None and line.startswith(" ") and "[" in line:
                    out[-1][2].update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line))
                else:
                    command = None
    return out


def _parser_for(words: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return parser


def test_every_synopsis_flag_exists():
    found = synopses()
    assert len(found) >= 10
    for name, words, flags in found:
        parser = _parser_for(words)
        known = {s for a in parser._actions for s in a.option_strings}
        unknown = sorted(flags - known - {"--version", "--debug"})
        assert not unknown, f"{name}: `internvit {' '.join(words)}` has no {unknown}"


def test_docs_links_resolve():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to a missing {target}"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 180
    assert os.path.isdir(ROOT / "docs")


def test_readme_names_every_extra():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^([a-z][a-z0-9_-]*) = \[", section, flags=re.M)
    assert len(extras) >= 9
    table = {row.split("|")[1].strip().strip("`") for row in (ROOT / "README.md").read_text().splitlines()
             if row.startswith("| `")}
    assert set(extras) <= table, f"README's table of extras lacks {sorted(set(extras) - table)}"


def test_viz_and_search_need_no_extra(tiny_ckpt, tmp_path):
    # The README says the analysis extra (faiss, matplotlib) is for ann indexes, large dedups and the probe's picture
    # only: `viz` and an exact index with its search run with neither importable.
    blocked = "import sys; sys.modules['faiss'] = sys.modules['matplotlib'] = None; from internvit.cli import main; "
    image = ROOT / "examples" / "images" / "coffee.jpg"
    steps = [["extract", str(image), "--model", str(tiny_ckpt), "--out", str(tmp_path / "f.parquet"), "--quiet",
              "--workers", "0"],
             ["index", str(tmp_path / "f.parquet"), "--out", str(tmp_path / "idx")],
             ["search", str(tmp_path / "idx"), str(tmp_path / "f.parquet"), "-k", "1"],
             ["viz", "pca", str(image), "--model", str(tiny_ckpt), "--out", str(tmp_path / "pictures")],
             ["viz", "attention", str(image), "--model", str(tiny_ckpt), "--out", str(tmp_path / "pictures")]]
    code = blocked + f"sys.exit(max(main(a) for a in {steps!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "pictures").glob("*.png"))) == 2


def test_every_benchmark_answers_help():
    """The benchmarks are documented commands: each parses its arguments before importing anything heavy."""
    scripts = [p for p in sorted((ROOT / "benchmarks").glob("*.py")) if p.name != "common.py"]
    assert len(scripts) >= 8
    for script in scripts:
        proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), (script.name, proc.stderr[-500:])
