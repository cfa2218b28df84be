"""The ViT-MLP-LLM model and the three training stages on tiny models built here (no downloads).

The LLM is a 2-layer Qwen2 from transformers with a byte-level BPE tokenizer trained on the example texts; its
weights are initialised with std 0.2 so that, frozen, it still reacts to the visual tokens (with std 0.02 its
attention barely carries them and stages 1/1.5 could not move the loss).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import internvit
from internvit.model.chat import InternVLChatModel
from internvit.model.template import IGNORE_INDEX
from internvit.train.data import ConversationDataset, collate, load_meta, preprocess_internvl2_5
from internvit.train.loop import build_model, lr_factor, skipped_summary, train
from internvit.train.loss import len2weight, next_token_loss, token_weights
from internvit.train.stages import STAGES

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny LLM + tokenizer and a tiny InternViT on disk."""
    pytest.importorskip("transformers")
    from helpers import build_tiny_llm
    from internvit.weights import init_checkpoint

    root = tmp_path_factory.mktemp("parts")
    texts = [t["value"] for line in open(EXAMPLES / "train" / "conversations.jsonl")
             for t in json.loads(line)["conversations"]]
    build_tiny_llm(root / "llm", texts * 50, initializer_range=0.2)
    init_checkpoint(root / "vit", preset="tiny", seed=0, dtype="fp32")
    one = root / "one.jsonl"
    one.write_text(open(EXAMPLES / "train" / "conversations.jsonl").readline())
    (root / "one_meta.json").write_text(json.dumps(
        {"one": {"root": str(EXAMPLES / "images"), "annotation": str(one), "repeat_time": 4, "max_dynamic_patch": 4}}))
    return root


def fresh(parts):
    torch.manual_seed(0)  # mlp1's init
    return build_model(llm=str(parts / "llm"), vision=str(parts / "vit"))


def dataset(parts, model, tok, meta=None):
    return ConversationDataset(load_meta(meta or EXAMPLES / "train" / "meta.json"), tok,
                               num_image_token=model.num_image_token, tile_size=56, max_tiles=4)


class Counted(torch.utils.data.Dataset):
    """Counts loads; raises after `crash_after` of them (a run killed mid-step)."""

    def __init__(self, inner, crash_after=None):
        self.inner, self.calls, self.crash_after = inner, 0, crash_after

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt("killed")
        return self.inner[i]


def test_label_masks_cover_answers_and_im_end(parts):
    model, tok = fresh(parts)
    conv = [{"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nWhat do the two images show?"},
            {"from": "gpt", "value": "A cat and a rocket."},
            {"from": "human", "value": "Which is bigger?"},
            {"from": "gpt", "value": "The rocket."}]
    out = preprocess_internvl2_5(conv, tok, [3, 1], num_image_token=model.num_image_token)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    supervised = [i for i, l in enumerate(labels) if l != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in supervised)
    # The supervised spans are exactly the two answers followed by <|im_end|>.
    spans, cur = [], [supervised[0]]
    for i in supervised[1:]:
        if i == cur[-1] + 1:
            cur.append(i)
        else:
            spans.append(cur)
            cur = [i]
    spans.append(cur)
    assert [tok.decode([ids[i] for i in s]) for s in spans] == ["A cat and a rocket.<|im_end|>",
                                                                 "The rocket.<|im_end|>"]
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids.count(ctx) == (3 + 1) * model.num_image_token
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nImage-1: <img>")


def test_truncated_image_tokens_and_placeholder_mismatch_are_errors(parts):
    from internvit.train.data import SampleError

    _, tok = fresh(parts)
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    with pytest.raises(SampleError, match="truncated"):
        preprocess_internvl2_5(conv, tok, [2], num_image_token=64, max_seq_length=50, sample_id="s1")
    with pytest.raises(SampleError, match="placeholders"):
        preprocess_internvl2_5(conv, tok, [1, 1], num_image_token=4, sample_id="s2")


def test_square_averaging_weights_by_hand():
    labels = torch.full((2, 12), IGNORE_INDEX)
    labels[0, 2:6] = 1  # 4 supervised tokens -> weight 1/2
    labels[1, 1:10] = 2  # 9 supervised tokens -> weight 1/3
    w = token_weights(labels, "square")
    assert torch.allclose(w[0, 2:6], torch.full((4,), 0.5)) and torch.allclose(w[1, 1:10], torch.full((9,), 1 / 3))
    assert w[labels == IGNORE_INDEX].abs().sum() == 0
    assert len2weight(0, "square") == 0 and len2weight(4, "sample") == 0.25 and len2weight(4, "token") == 1
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 5)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="none").reshape(2, 11)
    # Shifted: sample 0 supervises targets 2..5 (3 of them visible after the shift: positions 1..4 predict 2..5).
    sup = labels[:, 1:] != IGNORE_INDEX
    wts = torch.where(sup, torch.tensor([[0.5], [1 / 3]]), torch.zeros(2, 11))
    expected = (ce * wts).sum() / wts.sum()
    assert torch.allclose(next_token_loss(logits, labels, reduction="square"), expected)


@pytest.mark.parametrize("stage", ["1", "1.5", "2"])
def test_stage_trains_exactly_its_parts_and_overfits(parts, stage, tmp_path):
    model, tok = fresh(parts)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = STAGES[stage](max_steps=25, lr=0.02, warmup_steps=2, save_every=1000, pack=False)
    rows = train(model, tok, dataset(parts, model, tok, parts / "one_meta.json"), cfg, tmp_path / "run",
                 progress=False)
    after = model.state_dict()
    changed = {part: any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part))
               for part in ("vision_model.", "mlp1.", "language_model.")}
    assert changed == {"vision_model.": stage != "1", "mlp1.": True, "language_model.": stage == "2"}
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    print(f"[train] stage {stage}: loss {first:.3f} -> {last:.3f}")
    assert last < first / 2


def test_unfreeze_vit_layers_trains_only_the_last_layers(parts, tmp_path):
    from internvit.train.loop import apply_stage

    model, _ = fresh(parts)
    apply_stage(model, STAGES["1"](unfreeze_vit_layers=-1))  # the tiny ViT has 2 layers: layer 1 learns
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert any(k.startswith("vision_model.encoder.layers.1.") for k in trainable)
    assert any(k.startswith("mlp1.") for k in trainable)
    assert not any(k.startswith(("vision_model.encoder.layers.0.", "vision_model.embeddings", "language_model."))
                   for k in trainable)


def test_lora_trains_adapters_only_and_saves_merged_checkpoints(parts, tmp_path):
    """vit_lora_rank / llm_lora_rank: the base weights stay as they were, the adapters and mlp1 learn, the loss
    falls; final/ (adapters merged) reloads to the logits of the trained model with its adapters."""
    model, tok = fresh(parts)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = STAGES["2"](max_steps=20, lr=0.02, warmup_steps=2, vit_lora_rank=4, llm_lora_rank=4, save_every=1000,
                      pack=False)
    rows = train(model, tok, dataset(parts, model, tok, parts / "one_meta.json"), cfg, tmp_path / "run",
                 progress=False)
    after = model.state_dict()
    adapters = [k for k in after if ".lora." in k]
    assert any(k.startswith("vision_model.") for k in adapters) and any(k.startswith("language_model.")
                                                                        for k in adapters)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("mlp1."))  # bases untouched
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mlp1."))
    print(f"[train] LoRA r=4 on ViT and LLM: loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
    assert rows[-1]["loss"] < rows[0]["loss"] / 2
    reloaded = InternVLChatModel.from_pretrained(tmp_path / "run" / "final")
    assert not any(".lora." in k for k in reloaded.state_dict())
    batch = collate([dataset(parts, model, tok)[0]], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        a = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["position_ids"])
        b = reloaded(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["position_ids"])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    vit = internvit.from_pretrained(tmp_path / "run" / "vision", dtype="fp32")  # merged, official keys
    assert set(vit.state_dict()) == set(reloaded.vision_model.state_dict())


def test_resume_continues_with_the_same_losses(parts, tmp_path):
    cfg = STAGES["2"](max_steps=4, lr=0.01, warmup_steps=1, save_every=2, batch_size=2, data_threads=0, pack=False)
    model, tok = fresh(parts)
    straight = train(model, tok, dataset(parts, model, tok), cfg.replace(data_threads=2), tmp_path / "a",
                     progress=False)  # loading ahead in threads changes nothing
    model, tok = fresh(parts)
    with pytest.raises(KeyboardInterrupt):  # the run dies while loading step 3's batch
        train(model, tok, Counted(dataset(parts, model, tok), 2 * cfg.batch_size), cfg, tmp_path / "b",
              progress=False)
    model, tok = fresh(parts)  # a new process would start from the files alone
    resumed = train(model, tok, dataset(parts, model, tok), cfg, tmp_path / "b", progress=False)
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


class _Planted:
    """A pickle that runs a command when loaded (what a hostile run folder could hold)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_a_pickle_that_would_run_code(parts, tmp_path):
    """last/ is read with weights_only=True: a planted optimizer.pt (or an old-layout state.pt) is refused with an
    error naming the file, and its command never runs. The non-tensor state is plain JSON."""
    import pickle

    cfg = STAGES["1"](max_steps=1, lr=0.01, save_every=1, pack=False, data_threads=0)
    model, tok = fresh(parts)
    train(model, tok, dataset(parts, model, tok, parts / "one_meta.json"), cfg, tmp_path / "run", progress=False)
    last = tmp_path / "run" / "last"
    assert sorted(p.name for p in last.iterdir()) == ["optimizer.pt", "state.json", "trainable.safetensors"]
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 1 and len(state["data"][0]["rng"]) == len(torch.get_rng_state())
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "state.pt"):
        if name == "state.pt":
            (last / "state.json").unlink()  # the earlier layout: one torch file
        with open(last / name, "wb") as f:
            pickle.dump({"optimizer": _Planted(marker)}, f, protocol=2)
        model, tok = fresh(parts)
        with pytest.raises(ValueError, match=rf"{name}: refusing to resume from it") as err:
            train(model, tok, dataset(parts, model, tok, parts / "one_meta.json"), cfg.replace(max_steps=2),
                  tmp_path / "run", progress=False, resume_changes=True)
        assert str(last / name) in str(err.value)
        assert not marker.exists()
    with open(marker.with_suffix(".check"), "wb") as f:  # the planted object does run when unpickled unsafely
        pickle.dump(_Planted(marker), f)
    with open(marker.with_suffix(".check"), "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_exported_vit_and_chat_checkpoint_round_trip(parts, tmp_path):
    model, tok = fresh(parts)
    train(model, tok, dataset(parts, model, tok), STAGES["1.5"](max_steps=1, lr=0.01, pack=False), tmp_path / "run",
          progress=False)
    vit = internvit.from_pretrained(tmp_path / "run" / "vision", dtype="fp32")
    for k, v in model.vision_model.state_dict().items():  # exported in bf16
        assert torch.allclose(vit.state_dict()[k], v.to(torch.bfloat16).float()), k
    reloaded = InternVLChatModel.from_pretrained(tmp_path / "run" / "final")
    batch = collate([dataset(parts, model, tok)[0]], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        a = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["position_ids"])
        b = reloaded(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["position_ids"])
    torch.testing.assert_close(a, b)
    assert (tmp_path / "run" / "final" / "tokenizer.json").exists()
    half = InternVLChatModel.from_pretrained(tmp_path / "run" / "final", dtype="bf16")  # built in bf16 directly
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.language_model.model.rotary_emb.inv_freq.dtype == torch.float32  # rotary angles stay exact
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["stage"] == "1.5"


DDP_SCRIPT = """
import faulthandler, json, os, sys, torch
faulthandler.enable()  # a native crash of a rank prints where it happened
from pathlib import Path
from internvit.train.data import ConversationDataset, load_meta
from internvit.train.loop import build_model, train
from internvit.train.stages import STAGES
parts, meta, out, bs, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
lora = 4 if mode == "fsdp+lora" else 0
torch.manual_seed(0)
model, tok = build_model(llm=str(parts / "llm"), vision=str(parts / "vit"))
ds = ConversationDataset(load_meta(meta), tok, num_image_token=model.num_image_token, tile_size=56, max_tiles=4)
crash_after = int(os.environ.get("CRASH_AFTER", "0"))  # loads per rank before a simulated kill


class Crashing(torch.utils.data.Dataset):
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.calls += 1
        if crash_after and self.calls > crash_after:
            os._exit(3)
        return self.inner[i]


ds = Crashing(ds)
rows = train(model, tok, ds, STAGES["2"](max_steps=3, lr=0.01, warmup_steps=1, batch_size=bs,
             drop_path_rate=0.0,  # stochastic depth draws differ between 1 and 2 processes
             grad_checkpointing=False, fsdp=mode != "ddp", vit_lora_rank=lora, llm_lora_rank=lora, lora_dropout=0.0,
             save_every=2, data_threads=0 if crash_after else 2, pack=False), out,
             progress=False)
if int(os.environ.get("RANK", "0")) == 0:
    print("ROWS=" + json.dumps(rows))
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp+lora"])
def test_two_gloo_processes_match_one_process(parts, tmp_path, mode):
    """DDP, and FSDP (every LLM and ViT layer sharded over the 2 ranks; also with LoRA adapters on both), give the
    losses of one process with the same global batch and resume after a kill; the gathered (and merged)
    checkpoints equal the 1-process model's."""
    script = tmp_path / "run_train.py"
    script.write_text(DDP_SCRIPT)
    meta = str(EXAMPLES / "train" / "meta.json")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")

    def rows(proc):
        assert proc.returncode == 0, proc.stderr[-8000:]
        line = next(l for l in proc.stdout.splitlines() if l.startswith("ROWS="))
        return json.loads(line[5:])

    def torchrun(out, **extra_env):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
             "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(parts), meta,
             str(out), "1", mode], capture_output=True, text=True, env=dict(env, **extra_env), timeout=600)

    one = rows(subprocess.run([sys.executable, str(script), str(parts), meta, str(tmp_path / "one"), "2", mode],
                              capture_output=True, text=True, env=env, timeout=600))
    two = rows(torchrun(tmp_path / "two"))
    print(f"[train] {mode} 1 process:", [round(r["loss"], 5) for r in one], "2 processes:",
          [round(r["loss"], 5) for r in two])
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # killed while loading step 3 (after the step-2 save), then resumed: step 3 as in the uninterrupted run
    assert torchrun(tmp_path / "killed", CRASH_AFTER="2").returncode != 0
    resumed = rows(torchrun(tmp_path / "killed"))
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(two[2]["loss"], rel=1e-5)
    a = InternVLChatModel.from_pretrained(tmp_path / "one" / "final").state_dict()
    b = InternVLChatModel.from_pretrained(tmp_path / "two" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    vit = internvit.from_pretrained(tmp_path / "two" / "vision", dtype="fp32")
    for k, v in vit.state_dict().items():
        assert torch.equal(v, b["vision_model." + k].to(torch.bfloat16).float()), k


def test_chat_and_batched_generation_agree(parts):
    """batch_chat pads on the left: each answer equals the one chat() gives for that sample alone (greedy)."""
    model, tok = fresh(parts)
    model.eval()
    photo = EXAMPLES / "images" / "coffee.jpg"
    kw = dict(max_tiles=4, max_new_tokens=6, do_sample=False)
    alone = [model.chat(tok, photo, "What is in the cup?", **kw), model.chat(tok, None, "What is two plus two?", **kw)]
    both = model.batch_chat(tok, [photo, None], ["What is in the cup?", "What is two plus two?"], **kw)
    assert both == alone
    assert all(isinstance(a, str) for a in alone)


# ---- packing (spec §6.4) ----

def packed_dataset(parts, model, tok, tmp_path, *, broken: bool = False):
    lines = open(EXAMPLES / "train" / "conversations.jsonl").read().splitlines()
    if broken:
        lines.append(json.dumps({"id": "gone", "image": "no_such_photo.jpg",
                                 "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                   {"from": "gpt", "value": "Nothing."}]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps(
        {"demo": {"root": str(EXAMPLES / "images"), "annotation": str(tmp_path / "data.jsonl"), "repeat_time": 2,
                  "max_dynamic_patch": 4}}))
    return ConversationDataset(load_meta(tmp_path / "meta.json"), tok, num_image_token=model.num_image_token,
                               tile_size=56, max_tiles=4, max_seq_length=512,
                               min_num_frame=2, max_num_frame=6)  # the video's 2..6 frames fit a pack of 8 tiles


def test_packed_row_equals_its_samples_alone(parts, tmp_path):
    """Block-diagonal attention: each sample's logits in a packed row equal its logits alone, and the packed
    loss (per-sample square weights) equals the padded batch's loss."""
    from internvit.train.batches import collate_packed

    model, tok = fresh(parts)
    model.eval()
    ds = packed_dataset(parts, model, tok, tmp_path)
    samples = [ds[i] for i in range(4)]  # pure text, one image, two images, ...
    packed = collate_packed([samples], tok.pad_token_id)
    padded = collate(samples, tok.pad_token_id)
    with torch.no_grad():
        p = model(packed["input_ids"], packed["pixel_values"], None, packed["position_ids"], packed["image_flags"])
        q = model(padded["input_ids"], padded["pixel_values"], padded["attention_mask"], padded["position_ids"],
                  padded["image_flags"])
    at = 0
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        torch.testing.assert_close(p[0, at:at + n], q[i, :n], atol=2e-4, rtol=1e-4)
        at += n
    lp = next_token_loss(p, packed["labels"], weights=packed["loss_weight"])
    lq = next_token_loss(q, padded["labels"], weights=padded["loss_weight"])
    assert lp.item() == pytest.approx(lq.item(), rel=1e-5)
    assert lq.item() == pytest.approx(next_token_loss(q, padded["labels"], reduction="square").item(), rel=1e-6)


def test_packing_refuses_an_llm_whose_attention_mixes_samples(parts):
    from internvit.train.loop import check_packed_attention

    model, _ = fresh(parts)
    check_packed_attention(model.language_model)  # Qwen2 in transformers: block-diagonal from position ids

    class FullMask(torch.nn.Module):  # passes a 2D mask, as remote code that builds its own masks would
        def __init__(self, llm):
            super().__init__()
            self.llm = llm

        def get_input_embeddings(self):
            return self.llm.get_input_embeddings()

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return self.llm(input_ids=input_ids, position_ids=position_ids,
                            attention_mask=torch.ones_like(input_ids), use_cache=False)

    with pytest.raises(ValueError, match="block-diagonal"):
        check_packed_attention(FullMask(model.language_model))


def test_packed_training_skips_bad_samples_and_resumes_exactly(parts, tmp_path):
    """Pending pack buffers and the stream position are saved: a killed packed run resumes with the same losses.
    A sample whose image is missing is skipped, listed in skipped.jsonl, and the run goes on."""
    cfg = STAGES["2"](max_steps=4, lr=0.01, warmup_steps=1, save_every=2, pack=True, max_packed_tokens=512,
                      max_packed_tiles=8, max_buffers=2, drop_path_rate=0.0, data_threads=0)  # crash counts loads
    model, tok = fresh(parts)
    first_two = Counted(packed_dataset(parts, model, tok, tmp_path, broken=True))
    train(model, tok, first_two, cfg.replace(max_steps=2), tmp_path / "two", progress=False)
    model, tok = fresh(parts)
    straight = train(model, tok, packed_dataset(parts, model, tok, tmp_path, broken=True),
                     cfg.replace(data_threads=2), tmp_path / "a", progress=False)
    assert straight[-1]["loss"] < straight[0]["loss"]
    skipped = [json.loads(l) for l in open(tmp_path / "a" / "skipped.jsonl")]
    assert skipped and all("no_such_photo.jpg" in s["error"] for s in skipped)
    # one name (dataset and line) and one reason; listed once per epoch although repeat_time=2 puts it there twice
    assert {(s["sample"], s["reason"]) for s in skipped} == {("demo line 6", "missing_media")}
    epochs = [s["epoch"] for s in skipped]
    assert len(epochs) == len(set(epochs))
    assert skipped_summary(tmp_path / "a").startswith(f"skipped 1 sample (missing_media 1), {len(skipped)} time")
    model, tok = fresh(parts)
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, Counted(packed_dataset(parts, model, tok, tmp_path, broken=True), first_two.calls), cfg,
              tmp_path / "b", progress=False)
    model, tok = fresh(parts)
    resumed = train(model, tok, packed_dataset(parts, model, tok, tmp_path, broken=True), cfg, tmp_path / "b",
                    progress=False)
    assert [r["step"] for r in resumed] == [3, 4]
    print("[train] packed:", [round(r["loss"], 5) for r in straight], "resumed:", [round(r["loss"], 5) for r in resumed])
    for a, b in zip(straight[2:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_loads_a_chat_checkpoint_in_internvl_s_own_config(parts, tmp_path):
    """InternVL's released config.json: no img_context_token_id (its code asks the tokenizer), flash-attention
    requested for the LLM, its own auto_map and extra keys. It loads without flash-attn and gives the same logits."""
    model, tok = fresh(parts)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg.pop("img_context_token_id")
    cfg["llm_config"].update(attn_implementation="flash_attention_2", _name_or_path="./pretrained/Qwen2.5",
                             torch_dtype="bfloat16", use_bfloat16=True)
    cfg.update(auto_map={"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                         "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
               use_backbone_lora=0, use_llm_lora=0, pad2square=False, torch_dtype="bfloat16")
    cfg["vision_config"].update(use_flash_attn=True, model_type="intern_vit_6b")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    loaded = InternVLChatModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert loaded.language_model.config._attn_implementation != "flash_attention_2"
    batch = collate([dataset(parts, model, tok)[1]], tok.pad_token_id)
    with torch.no_grad():
        a = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["position_ids"])
        b = loaded(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["position_ids"])
    torch.testing.assert_close(a, b)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "ckpt" / name).unlink()
    from internvit.weights import CheckpointError

    with pytest.raises(CheckpointError, match="img_context_token_id"):
        InternVLChatModel.from_pretrained(tmp_path / "ckpt")
    assert InternVLChatModel.from_pretrained(tmp_path / "ckpt", img_context_token_id=7).img_context_token_id == 7


def test_bad_annotations_are_named_with_dataset_file_and_line(parts, tmp_path):
    _, tok = fresh(parts)
    (tmp_path / "a.jsonl").write_text('{"conversations": [{"from": "human", "value": "Hi"}]}\n{oops\n')
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": ".", "annotation": "a.jsonl"},
                                                    "e": {"root": ".", "annotation": "gone.jsonl"}}))
    specs = load_meta(tmp_path / "meta.json")
    with pytest.raises(ValueError, match=r"dataset 'd': .*a\.jsonl line 2 is not JSON"):
        ConversationDataset(specs[:1], tok)
    with pytest.raises(ValueError, match=r"dataset 'e': cannot read its annotation .*gone\.jsonl"):
        ConversationDataset(specs[1:], tok)


def test_frozen_llm_is_checkpointed_without_changing_the_numbers(parts):
    """Stage 1: the frozen LLM stays in eval mode (InternVL's freeze_llm), yet its layers are recomputed in the
    backward pass instead of keeping their activations; loss and mlp1 gradients are the same either way."""
    from internvit.train.loop import apply_stage

    results = {}
    for checkpointing in (False, True):
        model, tok = fresh(parts)
        apply_stage(model, STAGES["1"](grad_checkpointing=checkpointing))
        attn = model.language_model.model.layers[0].self_attn
        assert not attn.training  # dropout and attention of the frozen LLM: eval
        calls = []
        attn.register_forward_hook(lambda *_: calls.append(1))
        batch = collate([dataset(parts, model, tok)[1]], tok.pad_token_id)
        logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["position_ids"])
        loss = next_token_loss(logits, batch["labels"], weights=batch["loss_weight"])
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        results[checkpointing] = (loss.item(), model.mlp1[1].weight.grad.clone())
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1])


# ---- run folders: interrupts, resume, changed options (docs/training.md, "Run folders and resuming") ----

def test_interrupt_saves_the_finished_steps_and_the_rerun_resumes_them(parts, tmp_path):
    """Ctrl-C between save_every steps: last/ gets the last finished step, the rerun says where it resumes and
    continues with the losses of an uninterrupted run; log.jsonl holds each step once, also after a kill that left
    rows past the saved step."""
    cfg = STAGES["2"](max_steps=5, lr=0.01, warmup_steps=1, save_every=100, data_threads=0, pack=False)
    one = parts / "one_meta.json"
    model, tok = fresh(parts)
    straight = train(model, tok, dataset(parts, model, tok, one), cfg, tmp_path / "a", progress=False)
    said = []
    model, tok = fresh(parts)
    with pytest.raises(KeyboardInterrupt):  # while loading step 4's batch
        train(model, tok, Counted(dataset(parts, model, tok, one), 3), cfg, tmp_path / "b", progress=False,
              log=said.append)
    assert said == [f"saved step 3 to {tmp_path / 'b' / 'last'}; rerun the same command to resume"]
    assert json.loads((tmp_path / "b" / "last" / "state.json").read_text())["step"] == 3
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a kill -9 after step 4 was logged but not saved
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    said.clear()
    model, tok = fresh(parts)
    resumed = train(model, tok, dataset(parts, model, tok, one), cfg, tmp_path / "b", progress=False,
                    log=said.append)
    assert said == [f"resuming {tmp_path / 'b'} from step 3"]
    assert [r["step"] for r in resumed] == [4, 5]
    for a, b in zip(straight[3:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    logged = [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")]
    assert logged == [1, 2, 3, 4, 5]
    said.clear()  # a finished run is left as it is
    final = (tmp_path / "b" / "final" / "model.safetensors").stat().st_mtime_ns
    assert train(model, tok, dataset(parts, model, tok, one), cfg, tmp_path / "b", progress=False,
                 log=said.append) == []
    assert said == [f"{tmp_path / 'b'} finished at step 5 (final/, vision/); nothing to do"]
    assert (tmp_path / "b" / "final" / "model.safetensors").stat().st_mtime_ns == final


def test_changed_options_are_refused_or_applied_from_the_resumed_step(parts, tmp_path):
    from safetensors import safe_open

    from internvit.train.loop import check_run

    cfg = STAGES["2"](max_steps=2, lr=0.01, warmup_steps=1, save_every=100, data_threads=0, pack=False,
                      save_dtype="fp32")
    model, tok = fresh(parts)
    train(model, tok, dataset(parts, model, tok), cfg, tmp_path / "run", progress=False)
    with safe_open(str(tmp_path / "run" / "vision" / "model.safetensors"), "pt") as f:  # save_dtype=fp32
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    recorded = (tmp_path / "run" / "train_config.json").read_text()
    more = cfg.replace(max_steps=4, lr=0.005, data_threads=2)  # data_threads changes no number: not a difference
    with pytest.raises(ValueError, match=r"\(lr: 0.01 in .*run, 0.005 now; max_steps: 2 in .*run, 4 now\); .*"
                                         r"--resume-changes"):
        check_run(tmp_path / "run", more)
    with pytest.raises(ValueError, match=r"holds a stage 2 run; train stage 1 into a new --out"):
        check_run(tmp_path / "run", STAGES["1"](max_steps=2))
    with pytest.raises(ValueError, match=r"cannot resume with another llm_lora_rank"):
        check_run(tmp_path / "run", cfg.replace(llm_lora_rank=4), resume_changes=True)
    assert (tmp_path / "run" / "train_config.json").read_text() == recorded
    model, tok = fresh(parts)
    rows = train(model, tok, dataset(parts, model, tok), more, tmp_path / "run", progress=False, resume_changes=True)
    assert [r["step"] for r in rows] == [3, 4]
    for r in rows:  # the new learning rate on the new schedule, from step 2 on
        assert r["lr"] == pytest.approx(0.005 * lr_factor(r["step"], 1, 4))
    written = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (written["lr"], written["max_steps"], written["data_threads"]) == (0.005, 4, 2)
    assert written["changes"] == [{"step": 2, "options": {"max_steps": {"from": 2, "to": 4},
                                                          "lr": {"from": 0.01, "to": 0.005}}}]


def test_cli_sigterm_saves_last_and_a_rerun_with_other_options_or_stage_is_refused(parts, tmp_path):
    """`internvit train` stopped by SIGTERM saves the finished steps and says how to resume; rerunning with another
    --lr or another --stage is refused in one line (exit 2) and writes nothing."""
    import signal
    import time

    run = tmp_path / "run"
    base = [sys.executable, "-m", "internvit.cli", "train", "--meta", str(parts / "one_meta.json"), "--llm",
            str(parts / "llm"), "--vision", str(parts / "vit"), "--out", str(run), "--max-steps", "1000", "--lr",
            "0.01", "--no-pack", "--quiet"]
    proc = subprocess.Popen(base + ["--stage", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((run / "log.jsonl").exists()
                                               and len((run / "log.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    step = json.loads((run / "last" / "state.json").read_text())["step"]
    assert step >= 2 and f"internvit train: saved step {step} to {run / 'last'}; rerun the same command to resume" \
        in err.splitlines()
    assert [json.loads(line)["step"] for line in open(run / "log.jsonl")] == list(range(1, step + 1))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for extra, expected in ((["--stage", "1", "--lr", "5e-3"], f"lr: 0.01 in {run}, 0.005 now"),
                            (["--stage", "2"], f"{run} holds a stage 1 run; train stage 2 into a new --out")):
        done = subprocess.run(base[:-4] + ["--no-pack"] + extra, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert expected in done.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_chat_defaults_to_the_tile_budget_and_frames_the_checkpoint_was_trained_with(parts, tmp_path, monkeypatch):
    """config.json records max_dynamic_patch (InternVL's key) and the training frame counts; chat() takes them.
    Tiles counted by hand with InternVL's dynamic_preprocess for 56-px tiles: the 512x512 astronaut with 4 tiles
    is 2x2 + thumbnail (with 12: 3x3 + thumbnail); chelsea (451x300) and rocket (640x427) share 4 as 2 each:
    2x1 + thumbnail and 1x1. The 12-frame GIF gives min_num_frame frames."""
    model, tok = fresh(parts)
    model.max_dynamic_patch, model.min_num_frame, model.max_num_frame = 4, 8, 16
    model.save_pretrained(tmp_path / "chat", tokenizer=tok)
    config = json.loads((tmp_path / "chat" / "config.json").read_text())
    assert (config["max_dynamic_patch"], config["min_num_frame"], config["max_num_frame"]) == (4, 8, 16)
    chat = internvit.InternVLChatModel.from_pretrained(tmp_path / "chat")
    tok = chat.load_tokenizer(tmp_path / "chat")
    seen = []
    monkeypatch.setattr(chat, "generate", lambda tokenizer, pixels, prompts, **kw: seen.append((pixels, prompts))
                        or [""] * len(prompts))
    images = EXAMPLES / "images"
    chat.chat(tok, images / "astronaut.jpg", "Who?")
    chat.chat(tok, images / "astronaut.jpg", "Who?", max_tiles=12)
    chat.chat(tok, [images / "chelsea.jpg", images / "rocket.jpg"], "What?")
    chat.chat(tok, None, "How?", video=EXAMPLES / "train" / "clip.gif")
    assert [len(pixels) for pixels, _ in seen] == [5, 10, 4, 8]
    video_prompt = seen[-1][1][0]
    assert "Frame-8: <img>" in video_prompt and "Frame-9" not in video_prompt
