"""Build the worked example's tiny LLM (a random 2-layer Qwen2) and its tokenizer, trained on the example texts.

    python examples/train/make_tiny_llm.py runs/tiny-llm

Nothing is downloaded: the tokenizer is trained on the given texts with the `tokenizers` library and the model is
randomly initialised from a `Qwen2Config` (transformers' native Qwen2, the LLM family of InternVL2.5-1B). The
tests build their tiny LLMs with `build_tiny_llm` too (tests/helpers.py loads this file).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def build_tiny_llm(out_dir: str | os.PathLike | None, texts: list[str], *, hidden_size: int = 64,
                   num_layers: int = 2, num_heads: int = 4, vocab_size: int = 400, initializer_range: float = 0.02,
                   seed: int = 0):
    """Returns (model, tokenizer); saves both to `out_dir` when given (loadable with AutoModelForCausalLM /
    AutoTokenizer.from_pretrained)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=special[1:])
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, initializer_range=initializer_range,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def main() -> None:
    here = Path(__file__).parent
    texts = [turn["value"] for line in open(here / "conversations.jsonl")
             for turn in json.loads(line)["conversations"]]
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-llm"
    # Weights with std 0.2 (not 0.02): a random LLM that small only reacts to the visual tokens when its
    # attention is not near zero, so stages 1 and 1.5, where it is frozen, have something to learn.
    build_tiny_llm(out, texts * 50, initializer_range=0.2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
