"""InternViT-300M training step (forward + backward, the ViT's share of stage 1.5 / 2): internvit against timm.

One run measures, in one process, with the two implementations interleaved round by round (the VM drifts):
    - seconds per step and tiles/s for a batch of 448 tiles, the same random weights in both (timm through its
      own key layout), fp32 and bf16 autocast (the recipe's precision), with and without gradient checkpointing;
    - the gradient of the first patch-embedding weight against timm's (relative max difference), so that a fast
      step is also the right step;
    - the peak RSS of one process per (implementation, checkpointing) at the same batch, fp32.
Writes benchmarks/results/train_<cpu>_<date>.{json,md}.

    python benchmarks/bench_train.py                 # batch 1, 3 rounds (about 8 minutes on 2 cores)
    python benchmarks/bench_train.py --batch 2 --rounds 1

Needs the `bench` extra (timm). One 448 tile is 723.6 GFLOP forward; a training step without checkpointing is
about 3x that (forward, and backward for inputs and weights), 4x with checkpointing (the forward runs twice).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    GFLOP_PER_TILE, RESULTS, machine, reset_peak_rss, rss_mb, timed, to_timm, write_results)


def build(impl: str, state_dict, checkpointing: bool):
    """A module in train mode and its forward returning all tokens [B, 1025, 1024]."""
    import internvit

    if impl == "internvit":  # drop-path off, as timm's default: both deterministic, gradients comparable
        model = internvit.InternVisionModel(dataclasses.replace(internvit.PRESETS["300m"], drop_path_rate=0.0))
        model.load_state_dict(state_dict)
        model.set_grad_checkpointing(checkpointing)
        return model.train(), lambda x: model(x).last_hidden_state
    import timm

    model = timm.create_model("vit_intern300m_patch14_448", pretrained=False)
    model.load_state_dict(to_timm(state_dict))
    model.set_grad_checkpointing(checkpointing)
    return model.train(), model.forward_features


def step(torch, model, forward, x, bf16: bool) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = forward(x).float().pow(2).mean()
    loss.backward()


def worker(batch: int, rounds: int, threads: int) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    import internvit

    ref = internvit.InternVisionModel(internvit.PRESETS["300m"])
    ref.init_weights(torch.Generator().manual_seed(0))
    sd = ref.state_dict()
    del ref
    x = torch.randn(batch, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    rows = []
    for bf16 in (False, True):
        for checkpointing in (False, True):
            models = {impl: build(impl, sd, checkpointing) for impl in ("internvit", "timm")}
            grads = {}
            for impl, (model, forward) in models.items():  # warm-up, and the gradient to compare
                step(torch, model, forward, x, bf16)
                w = model.embeddings.patch_embedding.weight if impl == "internvit" else model.patch_embed.proj.weight
                grads[impl] = w.grad.detach().clone()
            times = {impl: [] for impl in models}
            for _ in range(rounds):
                for impl, (model, forward) in models.items():
                    times[impl].append(timed(lambda: step(torch, model, forward, x, bf16)))
            diff = ((grads["internvit"] - grads["timm"]).abs().max() / grads["timm"].abs().max()).item()
            for impl in models:
                best = min(times[impl])
                rows.append({"impl": impl, "dtype": "bf16 autocast" if bf16 else "fp32", "batch": batch,
                             "checkpointing": checkpointing, "seconds": times[impl], "best_s": best,
                             "tiles_per_s": batch / best,
                             "train_gflops": (4 if checkpointing else 3) * GFLOP_PER_TILE * batch / best,
                             "patch_grad_rel_diff_vs_timm": diff})
            del models
    return rows


def memory_worker(impl: str, batch: int, checkpointing: bool, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import internvit

    with torch.device("meta"):
        ref = internvit.InternVisionModel(internvit.PRESETS["300m"])
    sd = {k: torch.zeros(v.shape) for k, v in ref.state_dict().items()}
    model, forward = build(impl, sd, checkpointing)
    del sd
    x = torch.randn(batch, 3, 448, 448)
    before = rss_mb()
    reset_peak_rss()
    step(torch, model, forward, x, False)
    return {"impl": impl, "checkpointing": checkpointing, "batch": batch, "rss_before_mb": before,
            "peak_rss_mb": rss_mb("VmHWM")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["speed", "memory"])
    ap.add_argument("--impl")
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()
    if args.worker == "speed":
        print(json.dumps(worker(args.batch, args.rounds, args.threads)))
        return
    if args.worker == "memory":
        print(json.dumps(memory_worker(args.impl, args.batch, args.checkpointing, args.threads)))
        return

    def run(*extra) -> list | dict:
        out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--rounds", str(args.rounds),
                              "--threads", str(args.threads), *extra], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    speed = run("--worker", "speed")
    memory = [run("--worker", "memory", "--impl", impl, *(["--checkpointing"] if ckpt else []))
              for impl in ("internvit", "timm") for ckpt in (False, True)]
    m = machine()
    meta = {"date": dt.date.today().isoformat(), "machine": m, "threads": args.threads, "batch": args.batch,
            "rounds": args.rounds}
    lines = [f"# InternViT-300M training step: internvit vs timm ({meta['date']})", "",
             f"{m['cpu']} (family {m['cpu_family']}), {args.threads} threads, torch {m['versions']['torch']}, "
             f"timm {m['versions'].get('timm')}; batch "
             f"{args.batch} tiles of 448, forward + backward of the whole ViT, loss = mean(tokens^2); best of "
             f"{args.rounds} interleaved rounds.", "",
             "| precision | grad checkpointing | internvit s/step | timm s/step | internvit / timm speed | "
             "internvit train GFLOP/s | patch-embedding grad, rel. max diff vs timm |", "|---|---|---|---|---|---|---|"]
    by = {(r["impl"], r["dtype"], r["checkpointing"]): r for r in speed}
    for dtype in ("fp32", "bf16 autocast"):
        for ckpt in (False, True):
            a, b = by[("internvit", dtype, ckpt)], by[("timm", dtype, ckpt)]
            lines.append(f"| {dtype} | {'on' if ckpt else 'off'} | {a['best_s']:.2f} | {b['best_s']:.2f} | "
                         f"{b['best_s'] / a['best_s']:.2f}x | {a['train_gflops']:.0f} | "
                         f"{a['patch_grad_rel_diff_vs_timm']:.1e} |")
    lines += ["", "| implementation | grad checkpointing | RSS before the step, MB | peak RSS, MB |",
              "|---|---|---|---|"]
    for r in memory:
        lines.append(f"| {r['impl']} | {'on' if r['checkpointing'] else 'off'} | {r['rss_before_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    md = "\n".join(lines) + "\n"
    write_results(RESULTS, "train", dict(meta, speed=speed, memory=memory), md)
    print(md)


if __name__ == "__main__":
    main()
