"""An LLM that needs `trust_remote_code` (InternLM2.5 style) through build, training, save and reload.

InternVL2_5-8B's LLM is InternLM2.5, whose code is not in transformers: the checkpoint folder carries
`configuration_internlm2.py` / `modeling_internlm2.py` and `llm_config.auto_map` points at them. Nothing is
downloaded here: the fixture writes a tiny InternLM2-like model with its own code (a model_type transformers does
not know, InternLM2's module names `model.tok_embeddings`, `model.layers`, `model.norm`, `output`, InternLM2's
`attention.wqkv` / `feed_forward.w1,w2,w3` block names) and a BOS-adding tokenizer like InternLM2's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internvit.model.chat import InternVLChatModel
from internvit.train.data import (
    ConversationDataset,
    collate,
    load_meta,
    preprocess_internvl2_5,
)
from internvit.train.loop import build_model, train
from internvit.train.stages import STAGES

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).parents[2] / "examples"

CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyInternLM2Config(PretrainedConfig):
    model_type = "tiny_internlm2"

    def __init__(self, vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                 initializer_range=0.02, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 tie_word_embeddings=False, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.max_position_embeddings, self.rms_norm_eps, self.rope_theta = max_position_embeddings, rms_norm_eps, rope_theta
        self.initializer_range = initializer_range
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

MODELING_PY = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tinyinternlm import TinyInternLM2Config


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def rotary(x, position_ids, theta):  # x [B, H, N, D], position_ids [B, N]
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = position_ids[:, None, :, None].float() * inv
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    x1, x2 = x.float().chunk(2, -1)
    return (x.float() * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.theta = config.num_attention_heads, config.rope_theta
        self.wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, position_ids, mask):
        B, N, C = x.shape
        q, k, v = self.wqkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, position_ids, self.theta), rotary(k, position_ids, self.theta)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, N, C))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, position_ids, mask):
        x = x + self.attention(self.attention_norm(x), position_ids, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class TinyInternLM2PreTrainedModel(PreTrainedModel):
    config_class = TinyInternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)


class TinyInternLM2Model(TinyInternLM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, N, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(N, device=x.device).expand(B, N)
        mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:  # padding; each query still sees itself, so no row is empty
            mask = mask & attention_mask[:, None, None, :].bool() | torch.eye(N, dtype=torch.bool, device=x.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, position_ids, mask)
            else:
                x = layer(x, position_ids, mask)
        return self.norm(x)


class TinyInternLM2ForCausalLM(TinyInternLM2PreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = TinyInternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds)
        logits = self.output(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
'''


def write_remote_code_llm(folder: Path, texts: list[str], *, seed: int = 0) -> Path:
    """A local Hugging Face model folder whose architecture lives in the folder itself (`auto_map`)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from helpers import build_tiny_llm

    folder.mkdir(parents=True)
    (folder / "configuration_tinyinternlm.py").write_text(CONFIG_PY)
    (folder / "modeling_tinyinternlm.py").write_text(MODELING_PY)
    _, tokenizer = build_tiny_llm(None, texts)  # the byte-level BPE; its Qwen2 model is not used
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.add_bos_token = True  # InternLM2's tokenizer: BOS before every encoded text
    tokenizer.save_pretrained(folder)
    model_cls = "modeling_tinyinternlm.TinyInternLM2ForCausalLM"
    config = {"architectures": ["TinyInternLM2ForCausalLM"], "model_type": "tiny_internlm2",
              "auto_map": {"AutoConfig": "configuration_tinyinternlm.TinyInternLM2Config", "AutoModel": model_cls,
                           "AutoModelForCausalLM": model_cls},
              "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "initializer_range": 0.02, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": tokenizer.pad_token_id}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True),
                                             trust_remote_code=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The remote-code LLM folder, a tiny InternViT and a one-sample meta JSON on disk."""
    pytest.importorskip("transformers")
    from internvit.weights import init_checkpoint

    root = tmp_path_factory.mktemp("remote")
    lines = (EXAMPLES / "train" / "conversations.jsonl").read_text().splitlines()
    texts = [t["value"] for line in lines for t in json.loads(line)["conversations"]]
    write_remote_code_llm(root / "internlm", texts * 50)
    init_checkpoint(root / "vit", preset="tiny", seed=0, dtype="fp32")
    one = root / "one.jsonl"
    one.write_text(lines[0] + "\n")
    (root / "one_meta.json").write_text(json.dumps(
        {"one": {"root": str(EXAMPLES / "images"), "annotation": str(one), "repeat_time": 4, "max_dynamic_patch": 4}}))
    return root


def fresh(parts, llm: Path | None = None):
    torch.manual_seed(0)  # mlp1's init
    return build_model(llm=str(llm or parts / "internlm"), vision=str(parts / "vit"), trust_remote_code=True)


def dataset(parts, model, tok):
    return ConversationDataset(load_meta(parts / "one_meta.json"), tok, num_image_token=model.num_image_token,
                               tile_size=56, max_tiles=4)


def test_build_model_runs_the_llm_folder_code_and_grows_its_embeddings(parts):
    model, tok = fresh(parts)
    llm = model.language_model
    assert type(llm).__name__ == "TinyInternLM2ForCausalLM"
    assert type(llm).__module__.startswith("transformers_modules.")  # the folder's code, not a transformers class
    keys = model.state_dict().keys()
    assert {"language_model.model.tok_embeddings.weight", "language_model.model.norm.weight",
            "language_model.output.weight", "language_model.model.layers.1.attention.wqkv.weight"} <= keys
    old = json.loads((parts / "internlm" / "config.json").read_text())["vocab_size"]
    new = len(tok)
    assert new > old and llm.config.vocab_size == new
    assert model.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>") >= old
    # InternVL's resize (internvl_chat_pretrain.py lines 1010-1014): the new output rows are the mean of the old
    # ones; the new input rows of this untied LLM keep transformers' fresh init (its _init_weights)
    inp, out = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert inp.shape[0] == out.shape[0] == new
    torch.testing.assert_close(out[old:], out[:old].mean(0, keepdim=True).expand(new - old, -1))
    assert not torch.allclose(inp[old:], inp[:old].mean(0, keepdim=True).expand(new - old, -1), atol=1e-3)


def test_build_model_without_trust_remote_code_is_refused(parts):
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(llm=str(parts / "internlm"), vision=str(parts / "vit"))


def bos_count(tok) -> list[int]:
    conv = [{"from": "human", "value": "<image>\nWhat is in the cup?"}, {"from": "gpt", "value": "Coffee."},
            {"from": "human", "value": "Hot?"}, {"from": "gpt", "value": "Yes."}]
    ids = preprocess_internvl2_5(conv, tok, [1], num_image_token=4)["input_ids"].tolist()
    return [i for i, t in enumerate(ids) if t == tok.bos_token_id]


def test_preprocess_puts_one_bos_at_the_very_start(parts):
    _, tok = fresh(parts)
    assert tok("hi").input_ids[0] == tok.bos_token_id  # the tokenizer adds BOS, as InternLM2's does
    assert bos_count(tok) == [0]


def test_stage2_trains_saves_the_llm_code_and_reloads(parts, tmp_path):
    from internvit.weights import CheckpointError

    llm_dir = shutil.copytree(parts / "internlm", tmp_path / "llm")
    model, tok = fresh(parts, llm_dir)
    shutil.rmtree(llm_dir)  # the chat checkpoint must carry all the code it needs
    # grad checkpointing on (the default); unpacked: this LLM's attention ignores restarting position ids
    cfg = STAGES["2"](max_steps=12, lr=0.01, warmup_steps=2, save_every=1000, pack=False)
    rows = train(model, tok, dataset(parts, model, tok), cfg, tmp_path / "run", progress=False)
    assert model.language_model.model.gradient_checkpointing  # transformers switched the remote model's flag on
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    print(f"[remote code] stage 2: loss {first:.3f} -> {last:.3f}")
    assert last < first / 2

    final = tmp_path / "run" / "final"
    assert (final / "modeling_tinyinternlm.py").is_file() and (final / "configuration_tinyinternlm.py").is_file()
    llm_config = json.loads((final / "config.json").read_text())["llm_config"]
    assert llm_config["auto_map"]["AutoConfig"] == "configuration_tinyinternlm.TinyInternLM2Config"
    assert llm_config["auto_map"]["AutoModelForCausalLM"] == "modeling_tinyinternlm.TinyInternLM2ForCausalLM"
    assert llm_config["architectures"] == ["TinyInternLM2ForCausalLM"] and llm_config["vocab_size"] == len(tok)

    with pytest.raises(CheckpointError, match=r"trust_remote_code=True \(CLI: --trust-remote-code\)"):
        InternVLChatModel.from_pretrained(final)
    reloaded = InternVLChatModel.from_pretrained(final, trust_remote_code=True)
    assert type(reloaded.language_model).__name__ == "TinyInternLM2ForCausalLM"
    batch = collate([dataset(parts, model, tok)[0]], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        a = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["position_ids"])
        b = reloaded(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["position_ids"])
    assert torch.equal(a, b)

    with pytest.raises(CheckpointError, match="trust_remote_code"):
        build_model(init=str(final))
    again, tok2 = build_model(init=str(final), trust_remote_code=True)
    for k, v in again.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    assert len(tok2) == len(tok) and bos_count(tok2) == [0]  # also after the tokenizer's save and reload


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "internvit.cli", *args], check=False,
                          capture_output=True, text=True, timeout=300)


def test_cli_train_stage2_with_trust_remote_code(parts, tmp_path):
    common = ["train", "--stage", "2", "--meta", str(parts / "one_meta.json"), "--max-steps", "2", "--quiet",
              "--max-tiles", "4", "--no-pack"]
    proc = run_cli(*common, "--llm", str(parts / "internlm"), "--vision", str(parts / "vit"), "--out",
                   str(tmp_path / "run"), "--trust-remote-code")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 2: 2 steps" in proc.stderr
    assert (tmp_path / "run" / "final" / "modeling_tinyinternlm.py").is_file()
    proc = run_cli(*common, "--init", str(tmp_path / "run" / "final"), "--out", str(tmp_path / "again"))
    assert proc.returncode == 2 and "--trust-remote-code" in proc.stderr, proc.stderr[-3000:]
