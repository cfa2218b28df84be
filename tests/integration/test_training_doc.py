"""docs/training.md as a new user meets it: the worked example's commands run as written after the documented
set-up (with this interpreter standing in for `.venv/bin/python`), and the trained model answers each sample's
question with the answer of the training data, with the default settings, from the CLI and from Python."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "training.md"


def section_blocks(heading: str, language: str) -> list[str]:
    """The fenced blocks of one language under a `## heading` of docs/training.md."""
    text = DOC.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def as_here(line: str) -> str:
    """A doc command with the set-up's .venv replaced by the interpreter running the tests."""
    python = shlex.quote(sys.executable)
    return line.replace(".venv/bin/python ", f"{python} ").replace(".venv/bin/internvit ",
                                                                   f"{python} -m internvit.cli ")


def run(line: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(as_here(line), shell=True, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    assert "You are using a model of type" not in proc.stderr
    return proc


def test_worked_example_then_chat_gives_the_trained_answers(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from internvit.cli import main

    setup = re.findall(r"```bash\n(.*?)```", DOC.read_text().split("\n## ")[0], re.S)
    assert any(".venv/bin/pip install" in b and '".[train]"' in b for b in setup)  # the set-up makes .venv
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (example,) = section_blocks("Worked example", "bash")
    lines = [line for line in example.splitlines() if line.strip()]
    assert all(line.startswith(".venv/bin/") for line in lines)  # what the set-up created
    for line in lines:
        proc = run(line, tmp_path)
        if " train " in line:  # --quiet: no progress bars (ours or transformers' loading bars)
            assert "%|" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr
            assert "vision/ (the ViT, bf16; --set save_dtype=fp32 keeps fp32)" in proc.stderr
    config = json.loads((tmp_path / "runs" / "stage2" / "final" / "config.json").read_text())
    assert (config["max_dynamic_patch"], config["min_num_frame"], config["max_num_frame"]) == (4, 8, 32)

    samples = [json.loads(line) for line in open(ROOT / "examples" / "train" / "conversations.jsonl")]
    answer_to = {t["value"].split("\n")[-1]: s["conversations"][i + 1]["value"]
                 for s in samples for i, t in enumerate(s["conversations"]) if t["from"] == "human" and i <= 1}
    # The chat lines run in this process (the same `main` the console script calls), which spares five
    # interpreter starts; the Python example below runs in a fresh one.
    (chats,) = section_blocks("Chat with the trained model", "bash")
    asked = set()
    monkeypatch.chdir(tmp_path)
    for line in chats.strip().splitlines():
        command, shown = line.rsplit("# ", 1)
        question = next(q for q in answer_to if f'"{q}"' in command)
        program, *argv = shlex.split(command)
        assert program == ".venv/bin/internvit"
        assert main(argv) == 0, command
        answer = capsys.readouterr().out.strip()
        assert answer == answer_to[question] == shown.strip(), (command, answer)
        asked.add(question)
    assert len(asked) == len(samples)  # every sample's (first) question

    (python,) = section_blocks("Chat with the trained model", "python")
    out = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "You are using a model of type" not in out.stderr
    assert out.stdout.splitlines() == ["An astronaut in a white suit.", "It turns from blue to red.",
                                       str(["A cat and a rocket.", "Coffee with milk foam."])]
