"""`internvit train` against InternVL 2.5's own recipe, one test per point where they used to differ (issue 12).

Each test writes the official behaviour out from InternVL's code (OpenGVLab/InternVL at 2410d1d, `internvl_chat/`;
file and lines cited at each transcription) and compares ours with it on a tokenizer and tiny LLM built here (the
byte-level BPE and 2-layer Qwen2 of `internvit.train.tiny`; nothing is downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture(scope="module")
def texts():
    pytest.importorskip("transformers")
    return [t["value"] for line in open(EXAMPLES / "train" / "conversations.jsonl")
            for t in json.loads(line)["conversations"]] * 20


def tiny_llm(texts, *, tied: bool = True, extra_rows: int = 0, seed: int = 0):
    """(llm, tokenizer) without InternVL's tokens; `extra_rows` pads the vocabulary past the tokenizer, as Qwen2.5
    does (151,936 rows for 151,665 tokens)."""
    from transformers import Qwen2ForCausalLM

    from internvit.train.tiny import build_tiny_llm

    llm, tok = build_tiny_llm(None, texts, vocab_size=300, seed=seed)
    if not tied or extra_rows:
        config = llm.config
        config.tie_word_embeddings, config.vocab_size = tied, len(tok) + extra_rows
        torch.manual_seed(seed)
        llm = Qwen2ForCausalLM(config)
    return llm, tok


# ---- 3, 4: special tokens and the embedding resize -------------------------------------------------------------


def official_add_tokens(tokenizer, language_model) -> int:
    """InternVL `internvl_chat/internvl/train/internvl_chat_pretrain.py` lines 915-919 (token_list, add_tokens; the
    constants are `internvl/train/constants.py` lines 7-15) and lines 1010-1017 (resize, output rows = mean). InternVL
    pins transformers 4.37.2 (`internvl_chat/pyproject.toml` line 17), whose `resize_token_embeddings` always fills
    new rows with the model's `_init_weights`; transformers >= 4.46 does that with `mean_resizing=False`."""
    token_list = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
    num_new_tokens = tokenizer.add_tokens(token_list, special_tokens=True)
    img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if num_new_tokens > 0:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        output_embeddings = language_model.get_output_embeddings().weight.data
        output_embeddings_avg = output_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
        output_embeddings[-num_new_tokens:] = output_embeddings_avg
        language_model.config.vocab_size = len(tokenizer)
    return img_context_token_id


def test_special_tokens_take_internvl_s_ids(texts):
    from internvit.model.chat import SPECIAL_TOKENS, add_special_tokens

    _, ours = tiny_llm(texts)
    llm, theirs = tiny_llm(texts)
    n = len(ours)
    assert add_special_tokens(ours) == official_add_tokens(theirs, llm) == n + 2
    assert ours.get_vocab() == theirs.get_vocab()
    assert [ours.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")] == [n, n + 1, n + 2]
    assert ours.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(n, n + 9))
    text = "<ref>cat</ref><box>[[1, 2, 3, 4]]</box><img><IMG_CONTEXT></img>"
    assert ours(text, add_special_tokens=False).input_ids == theirs(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("tied, extra_rows", [(True, 0), (False, 0), (True, 16), (False, 16)],
                         ids=["tied", "untied", "tied+padded_vocab", "untied+padded_vocab"])
def test_embedding_resize_equals_internvl_s(texts, tied, extra_rows):
    """Resized to len(tokenizer) (a Qwen2.5-like padded vocabulary shrinks), the new output rows the mean of the old
    ones, the new input rows of an untied LLM transformers' fresh init: the same tensors as InternVL's code."""
    from internvit.model.chat import add_special_tokens

    ours_llm, ours_tok = tiny_llm(texts, tied=tied, extra_rows=extra_rows)
    theirs_llm, theirs_tok = tiny_llm(texts, tied=tied, extra_rows=extra_rows)
    n = len(ours_tok)
    torch.manual_seed(7)  # the fresh rows are drawn from the global generator, in both
    ours_id = add_special_tokens(ours_tok, ours_llm)
    torch.manual_seed(7)
    theirs_id = official_add_tokens(theirs_tok, theirs_llm)
    assert ours_id == theirs_id == n + 2
    assert ours_llm.config.vocab_size == len(ours_tok) == n + 9
    for a, b in ((ours_llm.get_input_embeddings(), theirs_llm.get_input_embeddings()),
                 (ours_llm.get_output_embeddings(), theirs_llm.get_output_embeddings())):
        assert a.weight.shape == b.weight.shape == (n + 9, ours_llm.config.hidden_size)
        assert torch.equal(a.weight, b.weight)
    out, inp = ours_llm.get_output_embeddings().weight, ours_llm.get_input_embeddings().weight
    torch.testing.assert_close(out[n:], out[:n].mean(0, keepdim=True).expand(9, -1), rtol=0, atol=0)
    if not tied:  # untied input rows are not the mean
        assert not torch.allclose(inp[n:], inp[:n].mean(0, keepdim=True).expand(9, -1), atol=1e-3)


def test_shrink_embeddings_false_keeps_a_padded_vocabulary(texts):
    """The option for users who keep Qwen2.5's padded rows: no shrink, the added tokens' output rows the mean."""
    from internvit.model.chat import add_special_tokens

    llm, tok = tiny_llm(texts, tied=False, extra_rows=16)
    n = len(tok)
    before_in = llm.get_input_embeddings().weight.detach().clone()
    before_out = llm.get_output_embeddings().weight.detach().clone()
    add_special_tokens(tok, llm, shrink_embeddings=False)
    out, inp = llm.get_output_embeddings().weight, llm.get_input_embeddings().weight
    assert out.shape[0] == inp.shape[0] == n + 16
    assert torch.equal(inp, before_in)
    assert torch.equal(out[:n], before_out[:n]) and torch.equal(out[n + 9:], before_out[n + 9:])
    torch.testing.assert_close(out[n:n + 9], before_out[:n].mean(0, keepdim=True).expand(9, -1), rtol=0, atol=0)
