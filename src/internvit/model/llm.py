"""The Hugging Face causal LM side of the ViT-MLP-LLM: special tokens and embedding sizes, building an LLM from a
chat checkpoint's `llm_config` (native or the checkpoint's own code), and transformers version differences.

References: InternVL `internvl_chat_pretrain.py` (tokens added, embeddings resized; spec §6.1); transformers'
`AutoModelForCausalLM.from_config`, `no_init_weights` and remote code (`auto_map`). transformers is imported where
used (`[train]` extra).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from internvit.checkpoint import CheckpointError
from internvit.model.template import IMG_CONTEXT_TOKEN, SPECIAL_TOKENS

def add_special_tokens(tokenizer, llm: nn.Module | None = None, *, shrink_embeddings: bool = True) -> int:
    """Add InternVL's tokens to a tokenizer that lacks them and size the LLM's embeddings as InternVL's training does
    (`internvl_chat_pretrain.py`, spec §6.1). Returns the id of `<IMG_CONTEXT>`.

    When tokens were added: the embeddings are resized to `len(tokenizer)` (new rows get transformers' fresh init,
    `_init_weights`, as in the transformers 4.37 InternVL pins), then the output rows of the added tokens are set to
    the mean of the output rows before them. The input rows of an untied LLM keep their init; a tied LLM shares the
    output rows. An LLM with more rows than the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens) is cut to
    `len(tokenizer)`, as InternVL's released configs say (vocab_size 151,674); `shrink_embeddings=False` keeps its
    rows (the added tokens then take over rows N.. of the padding) and only ever grows them.
    """
    added = tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    _sync_add_bos_token(tokenizer)
    if llm is not None and added:
        rows = llm.get_input_embeddings().weight.shape[0]
        target = len(tokenizer) if shrink_embeddings else max(rows, len(tokenizer))
        if target != rows:
            llm.resize_token_embeddings(target, mean_resizing=False)  # new rows: the model's _init_weights
        first = len(tokenizer) - added  # the added tokens' ids: first .. len(tokenizer)-1
        with torch.no_grad():
            out = llm.get_output_embeddings().weight  # [rows, C]
            out[first:len(tokenizer)] = out[:first].mean(0, keepdim=True)
    return tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)


def _sync_add_bos_token(tokenizer) -> None:
    """Make `tokenizer.add_bos_token` say whether encoding adds BOS (InternLM's tokenizers do).

    `preprocess_internvl2_5` (like InternVL's) reads that flag to put one BOS at the very start. transformers 5
    drops `add_bos_token` from tokenizer_config.json when a tokenizer.json exists (the BOS is then only in its
    post-processor), so a reloaded fast tokenizer reports False while it still adds BOS.
    """
    bos = tokenizer.bos_token_id
    if bos is None or getattr(tokenizer, "add_bos_token", False):
        return
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    if with_special[:1] == [bos] and tokenizer("a", add_special_tokens=False).input_ids[:1] != [bos]:
        tokenizer.add_bos_token = True  # on a tokenizers-backed tokenizer this rebuilds the same post-processor


def remote_class(cls: type) -> tuple[type, Path] | None:
    """The class that transformers loaded as remote code (`transformers_modules.*`) in `cls`'s MRO (FSDP wraps
    classes in subclasses) and its source file; None for a transformers class."""
    for c in cls.__mro__:
        if c.__module__.startswith("transformers_modules."):
            return c, Path(sys.modules[c.__module__].__file__)
    return None


def build_llm(llm_config: dict, ckpt, *, trust_remote_code: bool, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised LLM from a chat checkpoint's `llm_config`: a transformers architecture, or the
    checkpoint's own code when `auto_map` names it and the caller trusts it (transformers' rule: with the flag on,
    the remote code wins over a native class of the same model_type)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    llm_cfg = dict(llm_config)
    model_type = llm_cfg.pop("model_type")
    for key in ("attn_implementation", "_attn_implementation"):  # InternVL's configs ask for flash_attention_2:
        llm_cfg.pop(key, None)  # transformers then picks sdpa or eager, and flash-attn is not required
    auto_map = llm_cfg.get("auto_map") or {}
    remote = "AutoConfig" in auto_map and "AutoModelForCausalLM" in auto_map
    native = model_type in CONFIG_MAPPING
    if remote and (trust_remote_code or not native):
        refs = [auto_map["AutoConfig"], auto_map["AutoModelForCausalLM"]]  # "module.Class" or "repo--module.Class"
        modules = sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs})
        if not trust_remote_code:
            raise CheckpointError(
                f"{ckpt.source}: the LLM of this chat checkpoint ({model_type}, "
                f"{', '.join(llm_cfg.get('architectures') or [])}) is not a transformers architecture and runs "
                f"the checkpoint's own code ({', '.join(modules)}); if you trust it, pass trust_remote_code=True "
                "(CLI: --trust-remote-code)")
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        folder = ckpt.config_path.parent
        here = sorted({ref.rsplit(".", 1)[0] + ".py" for ref in refs if "--" not in ref})  # "repo--": code elsewhere
        if all((folder / m).is_file() for m in here):
            code_source = str(folder)
        elif os.path.exists(ckpt.source.removeprefix("local-dir:")):
            raise CheckpointError(f"{folder}: llm_config.auto_map needs {', '.join(here)} next to config.json")
        else:
            code_source = ckpt.source  # a Hub repo id: transformers fetches the .py files
        config = get_class_from_dynamic_module(auto_map["AutoConfig"], code_source)(**llm_cfg)
        config.name_or_path = code_source  # where AutoModelForCausalLM looks for the model's code
        with no_init_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=True, **dtype_kwarg(dtype))
    if not native:
        raise CheckpointError(f"{ckpt.source}: llm_config.model_type {model_type!r} is not a transformers "
                              "architecture, and llm_config has no auto_map naming code for it")
    with no_init_weights():
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **llm_cfg), **dtype_kwarg(dtype))


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """`from_config`'s dtype argument: `dtype` in transformers >= 5, `torch_dtype` before (without it, the config's
    own torch_dtype would win)."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def no_init_weights():
    """transformers' switch that skips the random init of weights the checkpoint overwrites anyway (20 s -> 1.5 s
    for a 1.5B LLM on this CPU); `from_pretrained` checks afterwards that every weight was loaded."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
