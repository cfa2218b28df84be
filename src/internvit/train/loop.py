"""The training loop: one process, or many under `torchrun` (DDP; gloo on CPU, NCCL on GPU).

What a run folder holds: `train_config.json` (the resolved options), `log.jsonl` (step, loss, lr, tokens/s),
`last/` (a killed run resumes from here at the same step and data position), and at the end `final/` (the InternVL
chat checkpoint with its tokenizer) and `vision/` (the ViT alone, official InternViT layout). `last/` holds
`trainable.safetensors` (the trainable weights), `optimizer.pt` (the optimizer's tensors and settings, read back with
`torch.load(weights_only=True)`: a run folder from elsewhere cannot run code on resume) and `state.json` (step,
scheduler, each rank's data position and RNG state).

The data order is a seeded permutation per epoch, split across ranks (rank::world_size); each rank's position in
it (and its pending pack buffers) is saved with `last/`. Samples that cannot be used are skipped and listed in
`skipped.jsonl`, once per epoch: the sample as its dataset and line, the reason, the error, the epoch and step.

Rerunning into a run folder (`check_run`): a folder with `last/` resumes with the options it was trained with;
other options are refused unless asked for (`resume_changes`: applied from the resumed step, recorded in
`train_config.json` under `changes`), and another stage or model is refused before anything is written. A finished
run is left as it is. Ctrl-C and SIGTERM (a KeyboardInterrupt) save `last/` at the last finished step first
(one process; under torchrun `last/` keeps the last `save_every` step).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from internvit.checkpoint import hub_kwargs, offline_error
from internvit.model.chat import InternVLChatModel
from internvit.model.llm import add_special_tokens, dtype_kwarg
from internvit.model.projector import ProjectorConfig
from internvit.registry import DEFAULT_MODEL
from internvit.train.batches import MicroBatches, Packer
from internvit.train.lora import add_lora, merge_lora
from internvit.train.loss import next_token_loss
from internvit.train.stages import TrainConfig
from internvit.weights import from_checkpoint


def llm_blocks(llm: torch.nn.Module) -> list[torch.nn.Module]:
    """The LLM's decoder layers: the classes its `_no_split_modules` names (transformers' convention)."""
    names = set(getattr(llm, "_no_split_modules", None) or [])
    blocks = [m for m in llm.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(llm).__name__} names no decoder-layer class in _no_split_modules")
    return blocks


def apply_stage(model: InternVLChatModel, cfg: TrainConfig) -> None:
    """Trainable parts and drop-path of a stage; InternVL's freezing semantics (spec §6.1). A part with LoRA
    (`vit_lora_rank`, `llm_lora_rank`) keeps its base weights frozen and trains its adapters."""
    if cfg.vit_lora_rank:
        add_lora(list(model.vision_model.encoder.layers), cfg.vit_lora_rank, dropout=cfg.lora_dropout, seed=cfg.seed)
    if cfg.llm_lora_rank:
        add_lora(llm_blocks(model.language_model), cfg.llm_lora_rank, dropout=cfg.lora_dropout, seed=cfg.seed + 1)
    for module, trainable in ((model.vision_model, cfg.train_vision and not cfg.vit_lora_rank),
                              (model.mlp1, cfg.train_mlp),
                              (model.language_model, cfg.train_llm and not cfg.llm_lora_rank)):
        for name, p in module.named_parameters():
            p.requires_grad_(trainable or ".lora." in name)
    layers = model.vision_model.encoder.layers
    if cfg.unfreeze_vit_layers and not cfg.train_vision:
        for p in layers[cfg.unfreeze_vit_layers:].parameters():
            p.requires_grad_(True)
    L = len(layers)
    for i, layer in enumerate(layers):
        layer.drop_path = cfg.drop_path_rate * i / (L - 1) if L > 1 else 0.0
    model.train()
    if not cfg.train_llm and not cfg.llm_lora_rank:
        model.language_model.eval()  # freeze_llm also switches dropout off; a frozen ViT stays in train mode
    vision_learns = cfg.train_vision or bool(cfg.unfreeze_vit_layers) or bool(cfg.vit_lora_rank)
    model.vision_model.set_grad_checkpointing(cfg.grad_checkpointing and vision_learns)
    if cfg.grad_checkpointing:  # also for a frozen LLM: the backward to mlp1 and the ViT runs through it
        llm = model.language_model
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(llm, "gradient_checkpointing_enable"):
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not llm.training:
            _checkpoint_in_eval(llm)


def _checkpoint_in_eval(llm: torch.nn.Module) -> None:
    """transformers checkpoints a decoder layer only while the layer's own `training` flag is set, so a frozen LLM
    in eval mode would keep every activation for the backward pass (stages 1 and 1.5 at 16k tokens: tens of GB).
    Set that flag on the layer objects alone: their dropout and attention children stay in eval mode, so the
    numbers do not change, and the layers are recomputed in the backward pass instead of stored."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: no per-layer switch
        return
    for block in llm.modules():
        if isinstance(block, GradientCheckpointingLayer):
            block.training = True


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 0 (HF's `get_cosine_schedule_with_warmup`)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay as InternVL's: its stage scripts pass a DeepSpeed config
    with an `optimizer` block (`zero_stage1_config.json`), so transformers hands DeepSpeed every trainable tensor
    in one group and all of them decay, biases, norm weights and the ViT's `ls1`/`ls2` included.
    `weight_decay_1d=False` exempts the 1-D tensors instead (HF Trainer's own optimizer does so for biases and
    norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {cfg.stage}: nothing to train")
    if cfg.weight_decay_1d:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)


def check_packed_attention(llm: torch.nn.Module) -> None:
    """Packing needs an LLM whose attention keeps the samples of a row apart when position ids restart (spec §6.4);
    transformers' native models do, remote code often does not. Compare two short sequences packed and apart."""
    vocab = llm.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0)).to(next(llm.parameters()).device)
    pos = torch.cat([torch.arange(6), torch.arange(6)])[None].to(ids.device)
    was_training = llm.training
    llm.eval()
    try:
        with torch.no_grad():
            packed = llm(input_ids=ids, position_ids=pos, use_cache=False).logits[:, 6:].float()
            alone = llm(input_ids=ids[:, 6:], position_ids=pos[:, 6:], use_cache=False).logits.float()
    finally:
        llm.train(was_training)
    err = (packed - alone).abs().max().item()
    if err > 1e-3 * max(1.0, alone.abs().max().item()):
        raise ValueError(f"pack=True needs block-diagonal attention, but {type(llm).__name__} lets packed samples see "
                         f"each other (logits differ by {err:.3g}); train without packing (--no-pack, pack=False) "
                         "or use an LLM that transformers implements natively")


def shard_model(model: InternVLChatModel) -> None:
    """FSDP (torch's `fully_shard`): each LLM decoder layer, each ViT layer, then the rest, sharded over the ranks.

    For LLMs too big to replicate on every GPU; parameter names are unchanged, so checkpoints stay the same.
    """
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():  # FSDP, unlike DDP, does not start every rank from rank 0's weights: make it so
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    for m in llm_blocks(model.language_model) + list(model.vision_model.encoder.layers):
        fully_shard(m)
    fully_shard(model)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter, on the CPU; a collective under FSDP."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().contiguous()


def _save_last(run: Path, model, opt, sched, step: int, data_state: dict, *, rank: int, world: int,
               sharded: bool) -> None:
    """Write `last/` (trainable weights, optimizer, scheduler, step, every rank's data position and RNG). Called
    on every rank: gathering the ranks' states, and under FSDP (`sharded`) the weights and optimizer state, are
    collectives; rank 0 writes (under DDP the other ranks copy nothing)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    data_states = [data_state]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, data_states[0])
        data_states = gathered
    if rank != 0 and not sharded:
        return
    trainable = {k: _full(p) for k, p in model.named_parameters() if p.requires_grad}
    optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    tmp = run / ".last.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optim, tmp / "optimizer.pt")  # tensors, numbers, strings: loadable with weights_only=True
    (tmp / "state.json").write_text(json.dumps({"step": step, "scheduler": sched.state_dict(), "data": data_states}))
    old = run / ".last.old"
    if (run / "last").exists():
        os.replace(run / "last", old)
    os.replace(tmp, run / "last")  # the switch is one rename: a kill leaves either the old or the new state
    shutil.rmtree(old, ignore_errors=True)


def _load_last(last: Path) -> dict | None:
    """`last/`'s state for a resume (None when there is none): `state.json` plus the optimizer from `optimizer.pt`.

    The optimizer file is unpickled with `weights_only=True` (tensors and plain data only), so a run folder copied
    from elsewhere cannot run code here; a file that holds anything else is refused, naming it. A `last/` written
    before this layout (one `state.pt`) loads the same way."""
    if (last / "state.json").exists():
        files = (last / "optimizer.pt",)
    elif (last / "state.pt").exists():  # the earlier layout: everything in one torch file
        files = (last / "state.pt",)
    else:
        return None
    try:
        loaded = torch.load(files[0], map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "unsupported" in line.lower()), "")
        raise ValueError(f"{files[0]}: refusing to resume from it: it holds objects other than tensors and plain "
                         f"data, which could run code when loaded{f' ({why})' if why else ''}; resume only from run "
                         "folders this program wrote, or delete last/ to start over") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"{files[0]}: cannot read the resume state ({e})") from None
    if files[0].name == "state.pt":
        return loaded
    try:
        state = json.loads((last / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{last / 'state.json'}: cannot read the resume state ({e})") from None
    return dict(state, optimizer=loaded)


# Options that decide what is trained: they cannot change within a run (the optimizer holds their state).
FIXED_OPTIONS = ("stage", "train_vision", "train_mlp", "train_llm", "unfreeze_vit_layers", "vit_lora_rank",
                 "llm_lora_rank", "weight_decay_1d")
FREE_OPTIONS = ("data_threads", "log_every", "save_every")  # change nothing the run computes: taken as given


def _saved_step(last: Path) -> int | None:
    try:
        return int(json.loads((last / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None if not (last / "state.pt").exists() else -1  # the earlier layout: the step is in the torch file


def check_run(run_dir: str | os.PathLike, cfg: TrainConfig, *, source: dict | None = None,
              resume_changes: bool = False) -> dict:
    """What training `cfg` into `run_dir` would do, checked before anything is loaded or written.

    Returns {} for a new run (no `last/`), else {"step": N, "changes": {option: (in the run, now)}}. Raises
    ValueError (one line) for another stage or model (`source`: what the model was built from, as recorded in
    `train_config.json`), for a change of what is trained, and for other options unless `resume_changes`."""
    run = Path(run_dir)
    step = _saved_step(run / "last")
    if step is None:
        return {}
    cfg = cfg.replace(fsdp=cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1)  # as train() records it
    try:
        saved = json.loads((run / "train_config.json").read_text())
    except (OSError, ValueError):
        return {"step": step, "changes": {}}  # a run folder from before train_config.json
    if saved.get("stage") != cfg.stage:
        raise ValueError(f"{run} holds a stage {saved.get('stage')} run; train stage {cfg.stage} into a new --out "
                         f"(--init {run / 'final'} starts from its result)")
    if source is not None and saved.get("model") not in (None, source):
        was = ", ".join(f"{k} {v}" for k, v in saved["model"].items() if v)
        now = ", ".join(f"{k} {v}" for k, v in source.items() if v)
        raise ValueError(f"{run} holds a run of another model ({was}; now {now}); use a new --out")
    now = json.loads(cfg.to_json())
    changes = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k] and k not in FREE_OPTIONS}
    at = f"step {step}" if step >= 0 else "its last step"
    listed = "; ".join(f"{k}: {a} in {run}, {b} now" for k, (a, b) in changes.items())
    fixed = [k for k in changes if k in FIXED_OPTIONS]
    if fixed:
        raise ValueError(f"{run} cannot resume with another {', '.join(fixed)} ({listed}): they decide what is "
                         "trained; use a new --out")
    if changes and not resume_changes:
        raise ValueError(f"{run} was trained with other options ({listed}); rerun with its options to resume from "
                         f"{at}, add --resume-changes to apply these from {at} on, or use a new --out")
    return {"step": step, "changes": changes}


def skipped_summary(run_dir: str | os.PathLike) -> str | None:
    """One line on the samples a run skipped (from `skipped.jsonl`), or None when it skipped none."""
    path = Path(run_dir) / "skipped.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    if not rows:
        return None
    reasons = Counter(r.get("reason", "unusable") for r in {r.get("sample"): r for r in rows}.values())
    samples = len({r.get("sample") for r in rows})
    why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    return (f"skipped {samples} sample{'s' * (samples != 1)} ({why}), {len(rows)} time{'s' * (len(rows) != 1)} "
            f"over the epochs: see {path}")


def _keep_rows(path: Path, up_to: int) -> None:
    """Drop the rows of a JSONL log written after step `up_to` (a resumed run writes them again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= up_to]
    if len(kept) != len(rows):
        path.write_text("".join(line + "\n" for line in kept))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(model: InternVLChatModel, tokenizer, dataset, cfg: TrainConfig, run_dir: str | os.PathLike, *,
          progress: bool = True, source: dict | None = None, resume_changes: bool = False,
          log=_stderr) -> list[dict]:
    """Train `model` on `dataset` (a `ConversationDataset`) with `cfg`; returns the log rows of this call.

    Under `torchrun` (WORLD_SIZE > 1) the process group is initialised here; every rank sees its own shard of
    each global batch of `batch_size * world_size * grad_accum` samples. A run folder with `last/` resumes (see
    `check_run`; `source` names the model, `resume_changes` applies changed options); `log` gets the lines said
    to the user (resuming, saved on an interrupt, finished).
    """
    run = Path(run_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg = cfg.replace(fsdp=cfg.fsdp and world > 1)  # recorded as used: FSDP needs several processes
    resume = check_run(run, cfg, source=source, resume_changes=resume_changes)
    say = log if rank == 0 else (lambda message: None)
    if resume and resume["step"] >= cfg.max_steps and (run / "final" / "config.json").exists():
        say(f"{run} finished at step {resume['step']} (final/, vision/); nothing to do")
        return []
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)  # NCCL collectives, FSDP and all_gather_object use the current device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    torch.manual_seed(cfg.seed + rank)
    model.to(device)
    apply_stage(model, cfg)
    # what chat() takes by default: the tile budget and frame counts of the training data
    for key in ("max_dynamic_patch", "min_num_frame", "max_num_frame"):
        setattr(model, key, getattr(dataset, key, getattr(model, key)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(
        "<|im_end|>")
    packer = None
    if cfg.pack:
        if getattr(dataset, "max_seq_length", 0) > cfg.max_packed_tokens:
            raise ValueError(f"max_seq_length={dataset.max_seq_length} exceeds max_packed_tokens="
                             f"{cfg.max_packed_tokens}: a sample must fit in one pack")
        check_packed_attention(model.language_model)
        packer = Packer(max_tokens=cfg.max_packed_tokens, max_tiles=cfg.max_packed_tiles, max_buffers=cfg.max_buffers)
    state = _load_last(run / "last") if resume else None
    step = state["step"] if state is not None else 0
    restarted = not resume and (run / "log.jsonl").exists() and (run / "log.jsonl").stat().st_size > 0
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        for name in ("log.jsonl", "skipped.jsonl"):  # rows past the saved step come again
            _keep_rows(run / name, step)
        before = json.loads((run / "train_config.json").read_text()) if resume and (
            run / "train_config.json").exists() else {}
        record = json.loads(cfg.to_json())
        if source is not None or "model" in before:
            record["model"] = source or before["model"]
        changes = before.get("changes", [])
        if resume and resume["changes"]:
            changes.append({"step": step, "options": {k: {"from": a, "to": b}
                                                      for k, (a, b) in resume["changes"].items()}})
        if changes:
            record["changes"] = changes
        (run / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
    name = getattr(dataset, "sample_name", lambda i: f"sample {i}")
    listed = set()  # (sample, epoch): a line repeated by repeat_time is listed once per epoch
    if rank == 0 and (run / "skipped.jsonl").exists():  # read after the rows past the saved step are dropped
        rows = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines() if line.strip()]
        listed = {(r["sample"], r["epoch"]) for r in rows if "epoch" in r}

    def on_skip(key: tuple[int, int], error: ValueError) -> None:
        if (name(key[0]), key[1]) in listed:
            return
        listed.add((name(key[0]), key[1]))
        row = {"sample": name(key[0]), "reason": getattr(error, "reason", "unusable"), "error": str(error),
               "epoch": key[1], "step": step + 1}
        if world > 1:
            row["rank"] = rank
        with open(run / "skipped.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    batches = MicroBatches(dataset, batch_size=cfg.batch_size, pad_token_id=pad_id, reduction=cfg.loss_reduction,
                           packer=packer, seed=cfg.seed, rank=rank, world=world, on_skip=on_skip,
                           threads=cfg.data_threads)
    if state is not None:  # resume: the weights go in before any sharding
        from safetensors.torch import load_file

        if len(state["data"]) != world:
            raise ValueError(f"{run} was saved by {len(state['data'])} processes; resume it with as many")
        trained = load_file(str(run / "last" / "trainable.safetensors"))
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in trained:
                    p.copy_(trained[k])
    fsdp = cfg.fsdp
    if fsdp:
        shard_model(model)
    opt = build_optimizer(model, cfg)
    params = [p for group in opt.param_groups for p in group["params"]]
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, cfg.max_steps))
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]  # this run's
        set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        sched.load_state_dict(state["scheduler"])
        if resume["changes"]:  # from this step on: the new learning rate, schedule, decay and Adam settings
            sched.base_lrs = [cfg.lr] * len(opt.param_groups)
            for group, mine in zip(opt.param_groups, options):
                group.update(mine, lr=cfg.lr * lr_factor(step, warmup, cfg.max_steps))
            sched._last_lr = [g["lr"] for g in opt.param_groups]
        batches.load_state_dict(state["data"][rank])
        torch.set_rng_state(torch.as_tensor(state["data"][rank]["rng"], dtype=torch.uint8))
        say(f"resuming {run} from step {step}")
    elif restarted:
        say(f"{run}: nothing was saved before it stopped (no last/); starting from step 0")
    net = model
    if world > 1 and not fsdp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    use_bf16 = cfg.bf16 and (cuda or cfg.cpu_bf16)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc=f"stage {cfg.stage}", unit="step")
    rows: list[dict] = []
    out = open(run / "log.jsonl", "a") if rank == 0 else None

    def position() -> dict:  # the data position and RNG after the finished steps: what last/ saves
        return dict(batches.state_dict(), rng=torch.get_rng_state().tolist())  # JSON: plain lists

    saved_step, at, updating = step, position(), False
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            step_loss, tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(batches).items()}
                sync = micro == cfg.grad_accum - 1 or world == 1
                if fsdp:
                    model.set_requires_gradient_sync(sync)
                ctx = net.no_sync() if (world > 1 and not sync and not fsdp) else nullcontext()
                with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = net(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                 batch["position_ids"], batch["image_flags"])
                    loss = next_token_loss(logits, batch["labels"], weights=batch["loss_weight"])
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                tokens += batch["num_tokens"]
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            updating = True  # an interrupt in here leaves weights and position out of step: not saved
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            at = position()
            updating = False
            if world > 1:
                t = torch.tensor([step_loss, tokens], dtype=torch.float64, device=device)  # NCCL: not on CPU
                dist.all_reduce(t)
                step_loss, tokens = t[0].item() / world, int(t[1].item())
            row = {"step": step, "loss": step_loss, "lr": sched.get_last_lr()[0],
                   "tokens_per_s": tokens / (time.perf_counter() - t0), "seconds": time.perf_counter() - t0}
            rows.append(row)
            if out is not None and step % cfg.log_every == 0:
                out.write(json.dumps(row) + "\n")
                out.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{row['lr']:.2e}")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                _save_last(run, model, opt, sched, step, at, rank=rank, world=world, sharded=fsdp)
                saved_step = step
                if world > 1:
                    dist.barrier()
        full = None
        if fsdp:  # the whole model, gathered on rank 0 only (a collective)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            full = merge_lora(full if fsdp else model.state_dict())  # LoRA adapters folded in: plain checkpoints
            model.save_pretrained(run / "final", tokenizer=tokenizer, state_dict=full)
            model.export_vision(run / "vision", dtype=cfg.save_dtype,
                                state_dict={k.removeprefix("vision_model."): v
                                            for k, v in full.items() if k.startswith("vision_model.")})
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM turned into one: keep the finished steps
        if bar is not None:
            bar.close()
            bar = None
        if world == 1 and not updating and step > saved_step:
            _save_last(run, model, opt, sched, step, at, rank=rank, world=world, sharded=False)
            saved_step = step
        if saved_step:
            say(f"saved step {saved_step} to {run / 'last'}; rerun the same command to resume")
        raise
    finally:
        batches.close()
        if bar is not None:
            bar.close()
        if out is not None:
            out.close()
    return rows


def build_model(*, llm: str | None = None, vision: str | None = None, init: str | None = None,
                trust_remote_code: bool = False, shrink_embeddings: bool = True):
    """(model, tokenizer): from an InternVL chat checkpoint (`init`), or from a Hugging Face causal LM plus an
    InternViT checkpoint (a fresh `mlp1`; the tokenizer gains InternVL's special tokens and the LLM's embeddings
    are sized to it as InternVL does, see `add_special_tokens`; `shrink_embeddings=False` keeps extra rows).
    `trust_remote_code` lets an LLM that transformers does not ship (InternLM2.5) run its own code, from `llm` or
    from `init`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if init is not None:
        model = InternVLChatModel.from_pretrained(init, trust_remote_code=trust_remote_code)
        tokenizer = InternVLChatModel.load_tokenizer(init, trust_remote_code=trust_remote_code)
        # the tokenizer is the authority on <IMG_CONTEXT> (InternVL's code asks it too); a tokenizer without
        # InternVL's tokens gains them here, and the LLM's embeddings grow with it
        model.img_context_token_id = add_special_tokens(tokenizer, model.language_model,
                                                        shrink_embeddings=shrink_embeddings)
        return model, tokenizer
    if llm is None:
        raise ValueError("pass --llm (a Hugging Face causal LM) or --init (an InternVL chat checkpoint)")
    if llm.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(llm)):
        raise ValueError(f"--llm {llm}: no such folder (a local LLM is a folder with config.json and weights)")
    offline = hub_kwargs(llm)  # a Hub id without a route to the Hub: the cache only, at once
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm, trust_remote_code=trust_remote_code, **offline)
        language_model = AutoModelForCausalLM.from_pretrained(llm, trust_remote_code=trust_remote_code, **offline,
                                                              **dtype_kwarg(torch.float32))  # fp32 master weights
    except OSError as e:
        raise (offline_error(llm, "--llm", e) if offline else e) from None
    ctx = add_special_tokens(tokenizer, language_model, shrink_embeddings=shrink_embeddings)
    vit = from_checkpoint(vision or DEFAULT_MODEL, dtype="fp32")
    projector = ProjectorConfig(vit_hidden_size=vit.config.hidden_size,
                                llm_hidden_size=language_model.config.hidden_size)
    return InternVLChatModel(vit, language_model, projector, img_context_token_id=ctx), tokenizer
