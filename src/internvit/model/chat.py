"""InternVL 2.5's ViT-MLP-LLM: InternViT -> pixel unshuffle -> `mlp1` -> any Hugging Face causal LM.

References:
    - InternVL `InternVLChatModel` (spec/internvit.md §5, [S3]): `extract_feature`, the `<IMG_CONTEXT>` embedding
      replacement in order, `chat()` / `batch_chat()` (left padding), the chat checkpoint layout (`vision_model.`,
      `mlp1.`, `language_model.` keys; `vision_config`, `llm_config`, `downsample_ratio`, `ps_version`,
      `select_layer`, `template` in config.json).
    - `internvl_chat/internvl/conversation.py` template `internvl2_5` (spec §5.3) and the special tokens of
      `train/constants.py` [S7].

Differs from InternVL: no remote code of our own and no flash-attn (the LLM is whatever `AutoModelForCausalLM`
builds, with its own attention); the LLM is imported lazily (`[train]` extra: transformers). An LLM that brings its
own code (InternLM2.5 in InternVL2_5-8B: `llm_config.auto_map` -> `modeling_internlm2.py` next to config.json) runs
only with `trust_remote_code=True`, and `save_pretrained` copies that code into the chat checkpoint. `chat()`
defaults to the tile budget the checkpoint records (`max_dynamic_patch`, which training sets to its data's; InternVL's
`chat()` takes 12 unless told), shared by the images of a question as in training (InternVL's model card tiles each
image up to the budget), and reads a video's frames as training does with `sample='middle'` (`Frame-i:`, as the
training prompts; the model card uses `get_index` and `Frame{i}:`).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from internvit._fileio import atomic_write
from internvit.checkpoint import (CheckpointError, hub_kwargs, offline_error, parse_dtype, read_state_dict, resolve,
                                  save_pretrained)
from internvit.config import InternVisionConfig
from internvit.model.llm import build_llm, remote_class
from internvit.model.projector import ProjectorConfig, unshuffle_tokens
from internvit.model.template import DEFAULT_SYSTEM, IMG_CONTEXT_TOKEN, image_tokens, render_template
from internvit.model.vision import InternVisionModel
from internvit.preprocess.tiling import tile_budget, tile_image
from internvit.preprocess.video import train_frames
from internvit.registry import DEFAULT_MAX_TILES

MIN_NUM_FRAME, MAX_NUM_FRAME = 8, 32  # InternVL 2.5's training frame counts (a chat config without them has these)

class InternVLChatModel(nn.Module):
    """ViT + `mlp1` + LLM with InternVL's parameter names, so a chat checkpoint loads with strict keys.

    Args:
        vision_model: the encoder.
        language_model: a Hugging Face causal LM.
        projector: sizes and pixel-unshuffle settings (llm width, downsample ratio, ps_version, select_layer).
        img_context_token_id: the id of `<IMG_CONTEXT>` in the tokenizer.
        template: chat template name stored in the config.
        max_dynamic_patch: the tile budget of a sample the model was trained with (InternVL's config key), which
            `chat()` uses by default; training sets it to the budget of its data.
        min_num_frame, max_num_frame: the frame counts of its training videos; `chat()` takes `min_num_frame`.
    """

    def __init__(self, vision_model: InternVisionModel, language_model: nn.Module, projector: ProjectorConfig, *,
                 img_context_token_id: int, template: str = "internvl2_5", max_dynamic_patch: int = DEFAULT_MAX_TILES,
                 min_num_frame: int = MIN_NUM_FRAME, max_num_frame: int = MAX_NUM_FRAME) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.language_model = language_model
        self.projector_config = projector
        c = projector.merged_size
        self.mlp1 = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, projector.llm_hidden_size), nn.GELU(),
                                  nn.Linear(projector.llm_hidden_size, projector.llm_hidden_size))
        self.img_context_token_id = img_context_token_id
        self.template = template
        self.max_dynamic_patch, self.min_num_frame, self.max_num_frame = max_dynamic_patch, min_num_frame, max_num_frame
        grid = vision_model.config.grid_size
        self.num_image_token = int(grid * grid * projector.downsample_ratio**2)

    # ---- the vision side ----

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [T, 3, 448, 448] -> visual tokens [T, 256, llm_hidden] (InternVL's `extract_feature`)."""
        p = self.projector_config
        if p.select_layer == -1:
            hidden = self.vision_model(pixel_values).last_hidden_state
        else:
            hidden = self.vision_model(pixel_values, output_hidden_states=True).hidden_states[p.select_layer]
        return self.mlp1(unshuffle_tokens(hidden, p.downsample_ratio, version=p.ps_version))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_flags: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the `<IMG_CONTEXT>` positions replaced, in order, by the visual tokens."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is None or pixel_values.shape[0] == 0:
            return embeds
        vit = self.extract_feature(pixel_values.to(self.vision_model.dtype))
        keep_graph = None
        if image_flags is not None:  # pure-text samples carry a dummy tile whose features are dropped (spec §4)
            keep_graph = vit.sum() * 0.0  # ... but the ViT stays in the graph, so DDP sees every parameter used
            vit = vit[image_flags.view(-1).bool()]
        B, N, C = embeds.shape
        mask = (input_ids == self.img_context_token_id).reshape(-1)
        vit = vit.reshape(-1, C).to(embeds.dtype)
        if int(mask.sum()) != vit.shape[0]:
            raise ValueError(
                f"the prompt has {int(mask.sum())} {IMG_CONTEXT_TOKEN} tokens but the images give {vit.shape[0]} "
                "visual tokens: num_patches_list does not match pixel_values, or the text was truncated")
        flat = embeds.reshape(B * N, C).clone()
        flat[mask] = vit  # in order: tile by tile, token by token, as the prompt lists them
        if keep_graph is not None:
            flat = flat + keep_graph.to(flat.dtype)
        return flat.reshape(B, N, C)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                image_flags: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, N, vocab] (the loss is computed by `internvit.train.loss`)."""
        embeds = self.embed(input_ids, pixel_values, image_flags)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False)  # without a cache, restarting position ids mean packed samples
        return out.logits

    # ---- generation ----

    @torch.no_grad()
    def generate(self, tokenizer, pixel_values: torch.Tensor | None, prompts: list[str], **generate_kwargs) -> list[str]:
        """Batched generation from prompts that already contain their image tokens (left padding, as batch_chat).

        The prompts are encoded as InternVL's `chat()` / `batch_chat()` encode them, with the tokenizer's special
        tokens: an InternLM2 tokenizer puts its BOS first, as in training (`preprocess_internvl2_5`); Qwen2's adds
        nothing."""
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or "<|im_end|>"
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        device = self.language_model.get_input_embeddings().weight.device
        input_ids, attention_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        embeds = self.embed(input_ids, None if pixel_values is None else pixel_values.to(device))
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        generate_kwargs.setdefault("max_new_tokens", 64)
        generate_kwargs.setdefault("eos_token_id", eos)
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        out = self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
        return [t.split("<|im_end|>")[0].strip() for t in tokenizer.batch_decode(out, skip_special_tokens=False)]

    def chat(self, tokenizer, images, question: str, *, video=None, max_tiles: int | None = None,
             num_frames: int | None = None, system: str = DEFAULT_SYSTEM, **generate_kwargs) -> str:
        """Answer a question about zero or more images (paths or PIL images) or one video, as InternVL's `chat()`.

        The defaults are the settings the model was trained with: `max_tiles` its `max_dynamic_patch` (shared by
        the images of a question, as in training), `num_frames` its `min_num_frame` (a video file, an animated
        GIF or a folder of frames: each segment's middle frame, each frame one tile, as `Frame-i: <image>`)."""
        return self.batch_chat(tokenizer, [images], [question], videos=[video], max_tiles=max_tiles,
                               num_frames=num_frames, system=system, **generate_kwargs)[0]

    def batch_chat(self, tokenizer, images_per_sample, questions: list[str], *, videos=None,
                   max_tiles: int | None = None, num_frames: int | None = None, system: str = DEFAULT_SYSTEM,
                   **generate_kwargs) -> list[str]:
        """`chat()` for several questions at once (left-padded, one generate call)."""
        max_tiles = max_tiles or self.max_dynamic_patch
        num_frames = num_frames or self.min_num_frame
        size = self.vision_model.config.image_size
        prompts, pixels = [], []
        for images, video, question in zip(images_per_sample, videos or [None] * len(questions), questions):
            images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
            if images and video is not None:
                raise ValueError("a question takes images or a video, not both")
            if video is not None:  # training's frames (InternVL's read_frames_*), each segment's middle one
                frames, _ = train_frames(video, seed=0, min_num_frames=num_frames, max_num_frames=num_frames,
                                         sample="middle")
                tiled = [tile_image(f, max_tiles=1, tile_size=size) for f in frames]
                prefix = "".join(f"Frame-{i + 1}: <image>\n" for i in range(len(frames)))
                question = question.replace("<video>\n", prefix) if "<video>" in question else prefix + question
            else:
                budget = tile_budget(len(images), max_tiles) if images else max_tiles
                tiled = [tile_image(im, max_tiles=budget, tile_size=size) for im in images]
                if images and "<image>" not in question:
                    if len(images) == 1:
                        question = "<image>\n" + question
                    else:
                        question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(images))) + question
            for t in tiled:
                question = question.replace("<image>", image_tokens(t.pixel_values.shape[0], self.num_image_token), 1)
            prompts.append(render_template([("user", question), ("assistant", None)], system))
            pixels += [t.pixel_values for t in tiled]
        pixel_values = torch.cat(pixels) if pixels else None
        return self.generate(tokenizer, pixel_values, prompts, **generate_kwargs)

    # ---- checkpoints ----

    def _llm_code(self) -> tuple[dict[str, str], list[Path]]:
        """For an LLM run as remote code: its `auto_map` entries and the .py files the checkpoint must carry."""
        entries: dict[str, str] = {}
        files: list[Path] = []
        for key, cls in (("AutoConfig", type(self.language_model.config)),
                         ("AutoModelForCausalLM", type(self.language_model))):
            found = remote_class(cls)
            if found is None:
                continue
            from transformers.dynamic_module_utils import get_relative_import_files

            cls, src = found
            entries[key] = f"{src.stem}.{cls.__name__}"  # the code now sits next to config.json: no "repo--" prefix
            files += [src, *map(Path, get_relative_import_files(str(src)))]
        return entries, list(dict.fromkeys(files))

    def config_dict(self) -> dict:
        p = self.projector_config
        llm_config = self.language_model.config.to_dict()
        entries, _ = self._llm_code()
        if entries:
            llm_config["auto_map"] = {**(llm_config.get("auto_map") or {}), **entries}
        return {
            "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "vision_config": self.vision_model.config.to_dict(),
            "llm_config": llm_config,
            "downsample_ratio": p.downsample_ratio, "ps_version": p.ps_version, "select_layer": p.select_layer,
            "template": self.template, "force_image_size": self.vision_model.config.image_size,
            "img_context_token_id": self.img_context_token_id, "dynamic_image_size": True, "use_thumbnail": True,
            "min_dynamic_patch": 1, "max_dynamic_patch": self.max_dynamic_patch,
            "min_num_frame": self.min_num_frame, "max_num_frame": self.max_num_frame,
        }

    def save_pretrained(self, out_dir: str | os.PathLike, *, tokenizer=None, max_shard_bytes: int = 2 << 30,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the InternVL chat layout: config.json and model.safetensors (sharded past `max_shard_bytes`), and
        for a remote-code LLM its .py files, as InternVL2_5-8B ships `modeling_internlm2.py`.

        `state_dict`: the weights to write instead of `self.state_dict()` (under FSDP, the gathered full one)."""
        from safetensors.torch import save_file


        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        if "language_model.lm_head.weight" in sd and getattr(self.language_model.config, "tie_word_embeddings", False):
            sd.pop("language_model.lm_head.weight")  # tied to the input embeddings
        shards: list[dict] = [{}]
        size = 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        if len(shards) == 1:
            atomic_write(out / "model.safetensors", lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                atomic_write(out / name, lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
                weight_map.update((k, name) for k in shard)
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                     "weight_map": weight_map}
            atomic_write(out / "model.safetensors.index.json", lambda p: Path(p).write_text(json.dumps(index, indent=2)))
        for src in self._llm_code()[1]:  # before config.json, whose auto_map points at them
            atomic_write(out / src.name, lambda p, src=src: shutil.copyfile(src, p))
        atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(self.config_dict(), indent=2) + "\n"))
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, trust_remote_code: bool = False,
                        img_context_token_id: int | None = None) -> InternVLChatModel:
        """Load a chat checkpoint written by `save_pretrained`, or InternVL's own.

        Args:
            path: folder, weight file, Hub repo id (see `internvit.checkpoint.resolve`).
            dtype: cast the loaded model (fp32, bf16, fp16).
            trust_remote_code: allow an LLM that is not a transformers architecture to run the code that the
                checkpoint carries for it (`llm_config.auto_map`, e.g. InternLM2.5's `modeling_internlm2.py`).
            img_context_token_id: the id of `<IMG_CONTEXT>`; by default from config.json (ours) or from the
                tokenizer files next to it (InternVL's configs do not store it: its code asks the tokenizer).
        """

        ckpt = resolve(path, prefixes=("vision_model.", "mlp1.", "language_model."))
        cfg = json.loads(ckpt.config_path.read_text())
        target, default = parse_dtype(dtype), torch.get_default_dtype()
        if target is not None:  # built in the target dtype: no fp32 copy of an 8B LLM on the way
            torch.set_default_dtype(target)
        try:
            vision = InternVisionModel(InternVisionConfig.from_dict(cfg["vision_config"]))
            llm = build_llm(cfg["llm_config"], ckpt, trust_remote_code=trust_remote_code,
                             dtype=torch.get_default_dtype())
            if getattr(llm.config, "tie_word_embeddings", False):
                llm.tie_weights()  # skipped by no_init_weights: lm_head must share the embedding before loading
            model = cls(vision, llm, ProjectorConfig.from_chat_config(cfg),
                        img_context_token_id=img_context_token_id or cfg.get("img_context_token_id")
                        or _img_context_token_id(ckpt), template=cfg.get("template", "internvl2_5"),
                        max_dynamic_patch=cfg.get("max_dynamic_patch", DEFAULT_MAX_TILES),
                        min_num_frame=cfg.get("min_num_frame", MIN_NUM_FRAME),
                        max_num_frame=cfg.get("max_num_frame", MAX_NUM_FRAME))
        finally:
            torch.set_default_dtype(default)
        sd = read_state_dict(ckpt, prefixes=("vision_model.", "mlp1.", "language_model."))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = getattr(llm.config, "tie_word_embeddings", False)
        missing = [k for k in missing if not (tied and k == "language_model.lm_head.weight")]
        if missing or unexpected:

            raise CheckpointError(f"{path}: chat checkpoint mismatch; missing {missing[:10]}, unexpected {unexpected[:10]}")
        return model.eval()  # no .to(target): it would round the LLM's fp32 rotary inv_freq buffer to bf16

    @staticmethod
    def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False):
        """The tokenizer saved with a chat checkpoint (`RUN/final/` holds it), with InternVL's special tokens."""
        from transformers import AutoTokenizer

        offline = hub_kwargs(str(path))
        with quiet_transformers():  # it reads config.json, whose model_type internvl_chat it does not know
            try:
                return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **offline)
            except OSError as e:
                raise (offline_error(str(path), "the chat checkpoint", e) if offline else e) from None

    def export_vision(self, out_dir: str | os.PathLike, *, dtype="bf16",
                      state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the (trained) ViT alone in the official InternViT layout, loadable by `internvit.from_pretrained`;
        `state_dict` (keys without `vision_model.`) replaces the module's own, as in `save_pretrained`."""

        return save_pretrained(state_dict or self.vision_model.state_dict(), self.vision_model.config, out_dir,
                               dtype=dtype)


def _img_context_token_id(ckpt) -> int:
    """`<IMG_CONTEXT>`'s id from the tokenizer files beside config.json (tokenizer.json, tokenizer_config.json or
    added_tokens.json), without loading a tokenizer."""

    folder = ckpt.config_path.parent
    found: dict[str, int] = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if name == "tokenizer.json":
            found.update((t["content"], t["id"]) for t in data.get("added_tokens", []))
        elif name == "tokenizer_config.json":
            found.update((t["content"], int(i)) for i, t in (data.get("added_tokens_decoder") or {}).items())
        else:
            found.update(data)
        if IMG_CONTEXT_TOKEN in found:
            return found[IMG_CONTEXT_TOKEN]
    raise CheckpointError(f"{ckpt.source}: config.json has no img_context_token_id and no tokenizer file next to "
                          f"it names {IMG_CONTEXT_TOKEN}; pass img_context_token_id=")


@contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off for a while (loading our checkpoints, whose config.json
    names `internvl_chat`, makes it warn "You are using a model of type internvl_chat to instantiate ...")."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
