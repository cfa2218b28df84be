"""Build the worked example's tiny LLM (a random 2-layer Qwen2) and its tokenizer, trained on the example texts.

    python examples/train/make_tiny_llm.py runs/tiny-llm
"""

import json
import sys
from pathlib import Path

from internvit.train.tiny import build_tiny_llm

here = Path(__file__).parent
texts = [turn["value"] for line in open(here / "conversations.jsonl") for turn in json.loads(line)["conversations"]]
# Weights with std 0.2 (not 0.02): a random LLM that small only reacts to the visual tokens when its
# attention is not near zero, so stages 1 and 1.5, where it is frozen, have something to learn.
build_tiny_llm(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-llm", texts * 50, initializer_range=0.2)
print(f"wrote {sys.argv[1] if len(sys.argv) > 1 else 'runs/tiny-llm'}")
