"""InternVL 2.5's prompt: the `internvl2_5` template, the image placeholder tokens, the loss's ignore index.

References: `internvl_chat/internvl/conversation.py` template `internvl2_5` (spec/internvit.md §5.3) and the
special tokens of `internvl_chat/internvl/train/constants.py` [S7].
"""

from __future__ import annotations

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# InternVL's order (`internvl_chat_pretrain.py` `token_list`): on a tokenizer of N tokens, <img> = N, </img> = N+1,
# <IMG_CONTEXT> = N+2 (Qwen2.5: 151665, 151666, 151667)
SPECIAL_TOKENS = [IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
                  "</box>"]
DEFAULT_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
IGNORE_INDEX = -100


def render_template(turns: list[tuple[str, str | None]], system: str = DEFAULT_SYSTEM) -> str:
    """The `internvl2_5` (MPT-style) prompt: roles "user"/"assistant"; a None message opens the assistant turn."""
    out = f"<|im_start|>system\n{system}<|im_end|>\n"
    for role, message in turns:
        out += f"<|im_start|>{role}\n"
        if message is not None:
            out += f"{message}<|im_end|>\n"
    return out


def image_tokens(num_tiles: int, num_image_token: int = 256) -> str:
    """What replaces one `<image>`: `<img>` + `<IMG_CONTEXT>` x (256 per tile) + `</img>`."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_tiles) + IMG_END_TOKEN
