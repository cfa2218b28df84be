"""`internvit train` against InternVL 2.5's own recipe, one test per point where they used to differ (issue 12).

Each test writes the official behaviour out from InternVL's code (OpenGVLab/InternVL at 2410d1d, `internvl_chat/`;
file and lines cited at each transcription) and compares ours with it on a tokenizer and tiny LLM built here (the
byte-level BPE and 2-layer Qwen2 of `examples/train/make_tiny_llm.py`; nothing is downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import read_frames_gif

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

    from helpers import build_tiny_llm

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
    from internvit.model.llm import add_special_tokens
    from internvit.model.template import SPECIAL_TOKENS

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
    from internvit.model.llm import add_special_tokens

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
    from internvit.model.llm import add_special_tokens

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


# ---- 6: chat() keeps the BOS of an InternLM-style tokenizer --------------------------------------------------


def official_chat_inputs(tokenizer, question: str, num_patches_list: list[int], num_image_token: int,
                         system_message: str) -> dict:
    """What InternVL's `chat()` feeds its LLM: `internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py`
    lines 347-377 (the `<image>` prefix, the template, the image tokens, then `tokenizer(query)` with the tokenizer's
    own special tokens), with the `internvl2_5` template's MPT prompt of `internvl_chat/internvl/conversation.py`
    lines 238-247 and 393-402."""
    if num_patches_list and "<image>" not in question:
        question = "<image>\n" + question
    system_template, roles, sep = "<|im_start|>system\n{system_message}", ("<|im_start|>user\n",
                                                                          "<|im_start|>assistant\n"), "<|im_end|>\n"
    messages = [(roles[0], question), (roles[1], None)]
    ret = system_template.format(system_message=system_message) + sep
    for role, message in messages:
        ret += role + message + sep if message else role
    query = ret
    for num_patches in num_patches_list:
        image_tokens = "<img>" + "<IMG_CONTEXT>" * num_image_token * num_patches + "</img>"
        query = query.replace("<image>", image_tokens, 1)
    return tokenizer(query, return_tensors="pt")


def official_batch_chat_inputs(tokenizer, questions: list[str], num_patches_list: list[int], num_image_token: int,
                               system_message: str) -> dict:
    """`modeling_internvl_chat.py` lines 311-327 (`batch_chat`): the same queries, left padding, special tokens on."""
    queries = []
    for question, num_patches in zip(questions, num_patches_list):
        if "<image>" not in question:
            question = "<image>\n" + question
        query = (f"<|im_start|>system\n{system_message}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                 "<|im_start|>assistant\n")
        queries.append(query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * num_image_token * num_patches + "</img>",
                                     1))
    tokenizer.padding_side = "left"
    return tokenizer(queries, return_tensors="pt", padding=True)


def test_chat_keeps_the_bos_of_an_internlm_style_tokenizer(texts, monkeypatch):
    import internvit
    from internvit.model.chat import InternVLChatModel
    from internvit.model.llm import add_special_tokens
    from internvit.model.template import DEFAULT_SYSTEM
    from internvit.model.projector import ProjectorConfig
    from PIL import Image

    llm, tok = tiny_llm(texts)
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.add_bos_token = True  # InternLM2's tokenizer: BOS before every encoded text
    assert tok("hi").input_ids[0] == tok.bos_token_id
    ctx = add_special_tokens(tok, llm)
    vit = internvit.InternVisionModel(internvit.PRESETS["tiny"])
    model = InternVLChatModel(vit, llm, ProjectorConfig(vit_hidden_size=vit.config.hidden_size,
                                                        llm_hidden_size=llm.config.hidden_size),
                              img_context_token_id=ctx).eval()
    seen = []

    def spy(*, inputs_embeds, attention_mask, **kwargs):  # the LLM's generate: record what it is given
        seen.append((inputs_embeds, attention_mask))
        return torch.tensor([[tok.convert_tokens_to_ids("<|im_end|>")]] * inputs_embeds.shape[0])

    monkeypatch.setattr(llm, "generate", spy)
    embed = llm.get_input_embeddings()
    n_img = model.num_image_token
    image = Image.new("RGB", (56, 56), (200, 30, 30))  # one tile

    def check(embeds, mask, expected):
        ids = expected["input_ids"]
        assert embeds.shape[:2] == ids.shape and torch.equal(mask, expected["attention_mask"])
        text = ids != ctx  # the visual tokens replace <IMG_CONTEXT>; every other position is the token's embedding
        with torch.no_grad():
            torch.testing.assert_close(embeds[text], embed(ids)[text], rtol=0, atol=0)
        return ids

    model.chat(tok, None, "What is two plus two?")
    ids = check(*seen[-1], official_chat_inputs(tok, "What is two plus two?", [], n_img, DEFAULT_SYSTEM))
    assert ids[0, 0] == tok.bos_token_id  # before: the prompt started at <|im_start|>
    model.chat(tok, image, "What colour is it?")
    check(*seen[-1], official_chat_inputs(tok, "What colour is it?", [1], n_img, DEFAULT_SYSTEM))
    model.batch_chat(tok, [image, image], ["Colour?", "Is it a square image of one colour?"])
    ids = check(*seen[-1], official_batch_chat_inputs(tok, ["Colour?", "Is it a square image of one colour?"],
                                                      [1, 1], n_img, DEFAULT_SYSTEM))
    assert (ids == tok.bos_token_id).sum(1).tolist() == [1, 1]


# ---- 5: weight decay on every trainable tensor ---------------------------------------------------------------


def tiny_chat_model(texts):
    import internvit
    from internvit.model.chat import InternVLChatModel
    from internvit.model.llm import add_special_tokens
    from internvit.model.projector import ProjectorConfig

    llm, tok = tiny_llm(texts)
    ctx = add_special_tokens(tok, llm)
    vit = internvit.InternVisionModel(internvit.PRESETS["tiny"])
    return InternVLChatModel(vit, llm, ProjectorConfig(vit_hidden_size=vit.config.hidden_size,
                                                       llm_hidden_size=llm.config.hidden_size),
                             img_context_token_id=ctx), tok


def official_optimizer(model, *, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """The optimizer InternVL's stage scripts train with. They pass `--deepspeed zero_stage1_config.json`, whose
    `optimizer` block (`internvl_chat/zero_stage1_config.json` lines 23-34: AdamW, betas 0.9/0.999, eps 1e-8,
    weight_decay "auto" = --weight_decay) makes transformers hand DeepSpeed `DummyOptim(params=model_parameters)` with
    `model_parameters = list(filter(lambda p: p.requires_grad, model.parameters()))` (transformers
    `integrations/deepspeed.py`, `deepspeed_init` / `deepspeed_optim_sched`: lines 669 and 576-577 of 5.24, the
    same in 4.37.2). DeepSpeed builds AdamW (FusedAdam, adam_w_mode: decoupled decay, as torch's AdamW) over that
    one list: one group, every trainable tensor decays."""
    model_parameters = list(filter(lambda p: p.requires_grad, model.parameters()))
    return torch.optim.AdamW(model_parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def test_weight_decay_reaches_every_trainable_tensor_as_internvl_s(texts):
    import copy

    from internvit.train.loop import apply_stage, build_optimizer
    from internvit.train.stages import STAGES

    model, _ = tiny_chat_model(texts)
    cfg = STAGES["2"](lr=1e-2, weight_decay=0.05, grad_checkpointing=False)
    apply_stage(model, cfg)
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    one_d = {k for k, p in trainable.items() if p.ndim < 2}
    assert any(".ls1" in k for k in one_d) and any(k.endswith(".bias") for k in one_d)
    assert any("norm" in k for k in one_d)
    print(f"[recipe] stage 2, tiny model: all {len(trainable)} trainable tensors decay; weight_decay_1d=false "
          f"exempts {len(one_d)} (1-D: biases, norms, ls1/ls2)")
    init = {k: p.detach().clone() for k, p in trainable.items()}
    theirs_model, old_model = copy.deepcopy(model), copy.deepcopy(model)
    runs = {"ours": (model, build_optimizer(model, cfg)),
            "theirs": (theirs_model, official_optimizer(theirs_model, lr=cfg.lr, weight_decay=cfg.weight_decay)),
            "1d_off": (old_model, build_optimizer(old_model, cfg.replace(weight_decay_1d=False)))}
    g = torch.Generator().manual_seed(0)
    for step in range(3):  # step 0: zero gradients, so only the decay moves a weight; then random gradients
        grads = {k: torch.randn(p.shape, generator=g) if step else torch.zeros(p.shape) for k, p in trainable.items()}
        for m, opt in runs.values():
            for k, p in m.named_parameters():
                if p.requires_grad:
                    p.grad = grads[k].clone()
            opt.step()
        params = {name: dict(m.named_parameters()) for name, (m, _) in runs.items()}
        for k in trainable:
            assert torch.equal(params["ours"][k], params["theirs"][k]), (step, k)
            if step == 0:
                decayed = init[k] * (1 - cfg.lr * cfg.weight_decay)
                torch.testing.assert_close(params["theirs"][k], decayed, rtol=1e-6, atol=0)
                assert torch.equal(params["1d_off"][k], init[k] if k in one_d else params["theirs"][k]), k


# ---- 1: stage defaults ---------------------------------------------------------------------------------------

# The flags of InternVL 2.5's stage scripts (`internvl_chat/shell/internvl2.5/`), as they pass them:
STAGE_SCRIPTS = {
    # stage1/internvl2_5_1b_qwen2_5_0_5b_dynamic_res_stage1.sh lines 51-53, 67-69, 72, 81-84
    "1": {"drop_path_rate": 0.0, "min_num_frame": 8, "max_num_frame": 32, "learning_rate": 2e-4,
          "weight_decay": 0.01, "warmup_steps": 100, "max_seq_length": 16384, "use_packed_ds": True,
          "num_images_expected": 48, "max_packed_tokens": 16384, "max_buffer_size": 20},
    # stage1.5/internvl2_5_8b_internlm2_5_7b_dynamic_res_stage1_5.sh lines 50-52, 66-68, 71, 80-83
    "1.5": {"drop_path_rate": 0.1, "min_num_frame": 8, "max_num_frame": 32, "learning_rate": 1e-5,
            "weight_decay": 0.05, "warmup_steps": 100, "max_seq_length": 16384, "use_packed_ds": True,
            "num_images_expected": 48, "max_packed_tokens": 16384, "max_buffer_size": 20},
    # stage2/internvl2_5_1b_qwen2_5_0_5b_dynamic_res_stage2.sh lines 50-52, 66-68, 71, 80-83
    "2": {"drop_path_rate": 0.1, "min_num_frame": 8, "max_num_frame": 32, "learning_rate": 4e-5,
          "weight_decay": 0.01, "warmup_ratio": 0.03, "max_seq_length": 16384, "use_packed_ds": True,
          "num_images_expected": 48, "max_packed_tokens": 16384, "max_buffer_size": 20},
}
OURS = {"learning_rate": "lr", "use_packed_ds": "pack", "num_images_expected": "max_packed_tiles",
        "max_buffer_size": "max_buffers"}


@pytest.mark.parametrize("stage", ["1", "1.5", "2"])
def test_stage_defaults_are_the_stage_scripts(stage):
    from internvit.train.stages import STAGES

    cfg = STAGES[stage]()
    for flag, value in STAGE_SCRIPTS[stage].items():
        assert getattr(cfg, OURS.get(flag, flag)) == value, flag
    assert cfg.sampling_method == "rand" and cfg.weight_decay_1d and cfg.shrink_embeddings
    assert STAGES[stage](pack=False, max_seq_length=8192).max_seq_length == 8192  # the other choice, one --set away


def test_cli_defaults_pack_and_no_pack_turns_it_off():
    from internvit.cli import build_parser

    parser = build_parser()
    base = ["train", "--stage", "2", "--meta", "m.json", "--out", "o"]
    assert parser.parse_args(base).pack is None  # the stage's default (on)
    assert parser.parse_args(base + ["--pack"]).pack is True
    assert parser.parse_args(base + ["--no-pack"]).pack is False


# ---- 2: video frames in training ---------------------------------------------------------------------------


def test_video_samples_take_internvl_s_frames_per_epoch(texts, tmp_path):
    """The example GIF sample (12 frames): each epoch its frames are those InternVL's read_frames_gif draws with
    that epoch's seed; one tile and one `Frame-k: <image>` per frame; the same (index, epoch) gives the same
    sample again (a pack leaving its buffer, a resumed run); `data_augment` JPEG-degrades video frames too."""
    import random

    import numpy as np

    from internvit.model.llm import add_special_tokens
    from internvit.train.data import ConversationDataset, load_meta

    _, tok = tiny_llm(texts)
    add_special_tokens(tok)
    ds = ConversationDataset(load_meta(EXAMPLES / "train" / "meta.json"), tok, num_image_token=4, tile_size=56,
                             max_tiles=4, min_num_frame=2, max_num_frame=32)
    video = next(i for i, (_, _, s) in enumerate(ds.items) if "video" in s)
    end = tok.convert_tokens_to_ids("</img>")
    counts = set()
    for epoch in range(6):
        seed = ds.seeds(video, epoch)[0]
        random.seed(seed)
        np.random.seed(seed)
        expected = read_frames_gif(12, 32, min_num_frames=2)  # dataset.py 102-123, in tests/helpers.py
        out = ds[(video, epoch)]
        assert out["pixel_values"].shape[0] == len(expected) == int((out["input_ids"] == end).sum())
        text = tok.decode(out["input_ids"])
        assert text.count("Frame-") == len(expected) and f"Frame-{len(expected)}: <img>" in text
        again = ds[(video, epoch)]
        assert torch.equal(again["pixel_values"], out["pixel_values"])
        counts.add(len(expected))
    assert len(counts) > 1  # 2..32 frames drawn: fewer than 12 some epochs
    meta = json.loads((EXAMPLES / "train" / "meta.json").read_text())
    meta["demo"].update(root=str(EXAMPLES / "images"), annotation=str(EXAMPLES / "train" / "conversations.jsonl"),
                        data_augment=True)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    aug = ConversationDataset(load_meta(tmp_path / "meta.json"), tok, num_image_token=4, tile_size=56, max_tiles=4,
                              min_num_frame=2, max_num_frame=32)
    plain, jpeg = ds[(video, 0)]["pixel_values"], aug[(video, 0)]["pixel_values"]
    assert plain.shape == jpeg.shape and not torch.equal(plain, jpeg)
    assert torch.equal(jpeg, aug[(video, 0)]["pixel_values"])


# ---- the deliberate differences the README lists -------------------------------------------------------------


def official_reading(sample: dict):
    """What InternVL does with a sample's media and placeholders: `internvl_chat_pretrain.py` lines 689-698 (which
    get_item: images win over a video; `"image": ""` is pure text), 467-469 (`multi_modal_get_item`: `<image>\\n`
    prepended to the first turn when it has none) and `dataset.py` lines 723-742 (`preprocess_internvl2_5`: the
    system turn popped, then the human turns' placeholders expanded until the images run out, then
    `assert current_image_idx == num_image`; a failed sample makes `__getitem__` train a random other one).
    Returns (kind, system prompt, human turns after expansion) or (kind, "another sample")."""
    import copy

    data_item = copy.deepcopy(sample)
    if 'image' in data_item and len(data_item['image']) != 0:
        if type(data_item['image']) == list:
            kind, num_image = "multi_image", len(data_item['image'])
        else:
            kind, num_image = "image", 1
            if '<image>' not in data_item['conversations'][0]['value']:
                data_item['conversations'][0]['value'] = '<image>\n' + data_item['conversations'][0]['value']
    elif 'video' in data_item and data_item['video'] is not None and data_item['video'] != '':
        return "video", None
    else:
        return "pure_text", None
    conversations = data_item['conversations']
    system_prompt = None
    if conversations[0]['from'] == 'system':
        system_prompt = conversations[0]['value']
        conversations = conversations[1:]
    current_image_idx = 0
    for conversation in conversations:
        if conversation['from'] == 'human':
            image_cnt = conversation['value'].count('<image>')
            for i in range(image_cnt):
                if current_image_idx == num_image:
                    break
                conversation['value'] = conversation['value'].replace('<image>', '<img>IMG</img>', 1)
                current_image_idx += 1
    if current_image_idx != num_image:
        return kind, "another sample"
    return kind, system_prompt, [c['value'] for c in conversations if c['from'] == 'human']


def test_malformed_samples_are_rejected_with_a_reason(texts, tmp_path):
    from PIL import Image

    from internvit.model.llm import add_special_tokens
    from internvit.train.data import ConversationDataset, SampleError, load_meta

    Image.new("RGB", (56, 56), (200, 10, 10)).save(tmp_path / "red.jpg")
    answer = {"from": "gpt", "value": "Red."}
    cases = [  # (sample, what InternVL does with it, the reason ours names)
        ({"image": "red.jpg", "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat?"}, answer]},
         ("image", None, ["<img>IMG</img>\n<image>\nWhat?"]), "more <image> placeholders than images"),
        ({"image": ["red.jpg", "red.jpg"], "conversations": [{"from": "human", "value": "<image>\nWhat?"}, answer]},
         ("multi_image", "another sample"), "2 images but fewer <image> placeholders"),
        ({"image": "", "conversations": [{"from": "human", "value": "What?"}, answer]},
         ("pure_text", None), "an empty image or video path"),
        ({"image": "red.jpg", "video": "clip.gif", "conversations": [{"from": "human", "value": "What?"}, answer]},
         ("image", None, ["<img>IMG</img>\nWhat?"]), 'has both "image" and "video"'),
    ]
    system_first = {"image": "red.jpg", "conversations": [{"from": "system", "value": "Be brief."},
                                                          {"from": "human", "value": "<image>\nWhat?"}, answer]}
    lines = [c[0] for c in cases] + [system_first]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(s) + "\n" for s in lines))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": "d.jsonl"}}))
    _, tok = tiny_llm(texts)
    add_special_tokens(tok)
    ds = ConversationDataset(load_meta(tmp_path / "meta.json"), tok, num_image_token=4, tile_size=56)
    for i, (sample, theirs, reason) in enumerate(cases):
        assert official_reading(sample) == theirs  # InternVL trains it, or silently takes another sample
        with pytest.raises(SampleError, match=reason):
            ds[i]
    # a system turn first: InternVL puts a second <image> into the system prompt, as text; ours reads it as meant
    assert official_reading(system_first) == ("image", "<image>\nBe brief.", ["<img>IMG</img>\nWhat?"])
    text = tok.decode(ds[len(cases)]["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<img>") and "<image>" not in text


def hf_cosine_with_warmup(current_step, *, num_warmup_steps, num_training_steps, num_cycles=0.5):
    """transformers `optimization.py` `_get_cosine_schedule_with_warmup_lr_lambda` (lines 134-140 of 5.24; the same
    in 4.37.2), the schedule of InternVL's `--lr_scheduler_type cosine`."""
    import math

    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def test_warmup_starts_at_lr_over_w_then_equals_hf_s_cosine():
    from internvit.train.loop import lr_factor

    for warmup, total in ((100, 1000), (3, 30), (0, 10)):
        ours = [lr_factor(s, warmup, total) for s in range(total)]
        theirs = [hf_cosine_with_warmup(s, num_warmup_steps=warmup, num_training_steps=total) for s in range(total)]
        if warmup:
            assert theirs[0] == 0.0 and ours[0] == 1 / warmup  # HF's step 0 trains at lr 0
            assert ours[:warmup] == theirs[1:warmup + 1]  # one step ahead during the warmup
        assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=1e-12, abs=1e-15)  # then equal


def test_exif_orientation_is_applied_where_internvl_ignores_it(texts, tmp_path):
    """A photo stored 96x56 with EXIF orientation 6 (rotate 90°) is trained upright, 56x96: its tiles are those of
    the transposed image; InternVL's `load_image` (`internvl_chat_pretrain.py` line 448:
    `Image.open(image_path).convert('RGB')`) keeps the stored pixels and their grid."""
    from PIL import Image, ImageOps

    from internvit.model.llm import add_special_tokens
    from internvit.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_tensor_normalized
    from internvit.preprocess.tiling import dynamic_tiles
    from internvit.train.data import ConversationDataset, load_meta

    stored = Image.new("RGB", (96, 56))
    stored.paste((250, 0, 0), (0, 0, 48, 56))
    stored.paste((0, 0, 250), (48, 0, 96, 56))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "phone.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red and blue."}]}) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": "d.jsonl"}}))
    _, tok = tiny_llm(texts)
    add_special_tokens(tok)
    ours = ConversationDataset(load_meta(tmp_path / "meta.json"), tok, num_image_token=4, tile_size=56,
                               max_tiles=4)[0]["pixel_values"]
    theirs_image = Image.open(tmp_path / "phone.jpg").convert("RGB")  # InternVL's load_image

    def tiles(image):
        return torch.stack([to_tensor_normalized(t, IMAGENET_MEAN, IMAGENET_STD)
                            for t in dynamic_tiles(image, max_tiles=4, tile_size=56)[0]])

    assert theirs_image.size == (96, 56)
    upright = tiles(ImageOps.exif_transpose(theirs_image))
    assert torch.equal(ours, upright)
    assert tiles(theirs_image).shape != upright.shape or not torch.equal(tiles(theirs_image), upright)
