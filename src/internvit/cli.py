"""The `internvit` command: argparse subcommands that call the public API and nothing else.

Exit status: 0 success; 1 `extract` finished but some inputs failed (their rows hold the errors); 2 the command
could not run (bad arguments, a checkpoint that cannot be loaded, an output in use or written with other
settings, no inputs, no such device), said in one line; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), with
the finished rows saved. `--debug` shows the traceback of an error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from internvit import __version__
from internvit.registry import DEFAULT_MAX_TILES, DEFAULT_MODEL, REGISTRY

SHOWN_ERRORS = 10  # failed inputs listed at the end of `extract`
SHOWN_PROBLEMS = 20  # problems listed by `data check`


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that finished rows are saved on the way out (as on Ctrl-C)."""


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 12,18,-1, got {text!r}") from None


def _at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum, refused in argparse's words otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text if value is not None else repr(text)}")
        return value

    return parse


_positive = _at_least(1, "a positive integer")
_non_negative = _at_least(0, "0 or a positive integer")


def _tile_budget(text: str) -> int:
    from internvit.preprocess.tiling import MAX_TILES

    value = _positive(text)
    if value > MAX_TILES:
        raise argparse.ArgumentTypeError(f"at most {MAX_TILES} tiles (InternVL 2.5 uses 12), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvit", description="InternViT-300M-448px-V2_5 without remote code.")
    parser.add_argument("--version", action="version", version=f"internvit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "extract",
        help="extract features of images into a Parquet file",
        description="Extract CLS and mean-pooled features of images into one Parquet file (one row per input). "
        "Rerunning with the same --out resumes: finished inputs are skipped.",
    )
    p.add_argument("sources", nargs="+", help="image files, folders (recursive), globs, or .txt files listing paths")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hub repo id, local folder or file, or one of: {', '.join(REGISTRY)} (default: %(default)s)")
    p.add_argument("--revision", help="Hub branch, tag or commit of --model")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="compute dtype (default: bf16; for an export folder its own precision)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=_positive, default=8,
                   help="tiles per forward, filled with the tiles of many inputs (default: 8)")
    p.add_argument("--workers", type=_non_negative,
                   help="image-loading processes, 0 = none (default: the cores available, less one)")
    p.add_argument("--decode", choices=["exact", "fast", "device"], default="exact",
                   help="exact: every pixel decoded (default); fast: JPEGs at least twice the size they are resized "
                   "to are decoded at 1/2, 1/4 or 1/8 scale, or on CUDA by nvJPEG on the GPU (faster; CLS cosine to "
                   "exact in docs/performance.md); device: JPEGs decoded and resized on the model's device "
                   "(torchvision)")
    p.add_argument("--tf32", action="store_true",
                   help="on CUDA, let fp32 convolutions and matmuls use TF32 (faster, about 1e-3 off the CPU's fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder (torch backend; the first batches pay the compilation)")
    p.add_argument("--tiles", choices=["none", "dynamic"], default="none",
                   help="none: the model card's CLIP preprocessing, one 448 tile (default); dynamic: InternVL 2.5 "
                   "tiles (1..--max-tiles by aspect ratio) plus a thumbnail")
    p.add_argument("--max-tiles", type=_tile_budget, default=DEFAULT_MAX_TILES,
                   help="tile budget per image with --tiles dynamic, at most 128 (default: %(default)s)")
    p.add_argument("--frames", type=_positive, default=8, help="frames sampled per video (default: 8)")
    p.add_argument("--layers", type=_layers, default=(),
                   help="also pool these layers (0 = embeddings, 24 = last, -1 = last): columns cls_lI, mean_lI")
    p.add_argument("--patch-tokens", action="store_true",
                   help="also store the last layer's patch-token map (stitched from the tiles with --tiles dynamic)")
    p.add_argument("--visual-tokens", action="store_true",
                   help="also store InternVL's visual tokens: pixel-unshuffled, 256 per tile, width 4x hidden")
    p.add_argument("--projector", help="InternVL chat checkpoint whose mlp1 projects the visual tokens (implies --visual-tokens)")
    p.add_argument("--no-exif", action="store_true", help="ignore EXIF orientation")
    p.add_argument("--max-pixels", type=_positive, help="refuse images with more pixels (default: 100,000,000)")
    p.add_argument("--retry-errors", action="store_true", help="recompute inputs whose earlier row is an error")
    p.add_argument("--flush-seconds", type=float, default=10.0,
                   help="make finished rows durable at least this often; a kill loses at most this much (default: 10)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this machine, --out is one Parquet file (default); ray: Ray Data, --out is a folder of "
                   "Parquet shards, SOURCES may also be URIs (s3://...) and .parquet tables of paths or image bytes")
    p.add_argument("--address", help="with --engine ray: the Ray cluster (HEAD:6379, ray://HEAD:10001, auto); "
                   "default: a local Ray instance on loopback, stopped at the end")
    p.add_argument("--num-actors", type=_positive,
                   help="with --engine ray: encoder actors, one model each (default: one per GPU group, else one per node)")
    p.add_argument("--gpus-per-actor", type=float, default=0,
                   help="with --engine ray: GPUs per actor; 0 = CPU actors (default), 0.5 = two actors per GPU")
    p.add_argument("--backend", choices=["torch", "openvino", "onnxruntime", "auto"],
                   help="what runs the encoder: torch (the reference; the default for checkpoints), openvino or "
                   "onnxruntime (a checkpoint is exported once into the cache; an `internvit export` folder, whose "
                   "own runtime is its default, loads directly), auto (the fastest installed here; says which)")

    p = sub.add_parser(
        "export", help="export the encoder as ONNX or OpenVINO IR (fp32, bf16, int8), validated against torch",
        description="Export MODEL to OUT_DIR as an ONNX graph or an OpenVINO IR with config.json, "
        "preprocessor_config.json and a manifest (internvit_export.json). The exported model is run on real tiles "
        "and compared with the fp32 torch model; one outside its tolerance (fp32: max abs 1e-4; bf16: token "
        "cosine 0.999; int8: CLS cosine 0.99) is not written. int8 (NNCF post-training quantization) is "
        "calibrated on --calibration images and writes fidelity_report.json.")
    p.add_argument("model", metavar="MODEL", help="checkpoint: Hub repo id, local folder or file, or a registered name")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--format", required=True, choices=["onnx", "openvino"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"],
                   help="fp32 (default); bf16 and int8 need --format openvino")
    p.add_argument("--batch", default="dynamic", help="'dynamic' (default: a symbolic batch axis) or a fixed size")
    p.add_argument("--calibration", nargs="+", action="extend", metavar="SOURCES",
                   help="images (files, folders, globs, list files) to calibrate int8 on; every fourth is held out "
                   "for the fidelity report (also the validation tiles of fp32/bf16 when given)")
    p.add_argument("--calibration-size", type=_positive, default=32, help="calibration tiles for int8 (default: 32)")
    p.add_argument("--layers", type=_layers, default=(),
                   help="also output these hidden_states (0 = embeddings) for --layers / select_layer downstream")
    p.add_argument("--force", action="store_true", help="write an int8 model below the fidelity threshold")
    p.add_argument("--overwrite", action="store_true", help="replace an export in a non-empty OUT_DIR")
    p.add_argument("--revision", help="Hub branch, tag or commit of MODEL")

    p = sub.add_parser("train", help="InternVL 2.5 training: stage 1 (MLP warmup), 1.5 (ViT incremental), 2 (full)",
                       description="Train ViT + mlp1 + LLM on a meta JSON of conversation datasets. Each stage sets "
                       "what is trainable, the learning rate, warmup, weight decay and drop-path (docs/training.md, "
                       "\"Stages\"); every option can be overridden with --set KEY=VALUE. Rerunning the same "
                       "command resumes from RUN/last/ (saved every save_every steps and on Ctrl-C); "
                       "docs/training.md, \"Run folders and resuming\".")
    p.add_argument("--stage", required=True, choices=["1", "1.5", "2"])
    p.add_argument("--meta", required=True, help="meta JSON: {name: {root, annotation, ...}}")
    p.add_argument("--llm", help="Hugging Face causal LM (id or folder) to build the model around")
    p.add_argument("--vision", help=f"InternViT checkpoint (default: {DEFAULT_MODEL})")
    p.add_argument("--init", help="an InternVL chat checkpoint to start from instead of --llm/--vision")
    p.add_argument("--out", required=True, help="run folder (config, log, last/ for resuming, final/, vision/)")
    p.add_argument("--max-steps", type=_positive)
    p.add_argument("--batch-size", type=_positive, help="samples per process and micro-step")
    p.add_argument("--grad-accum", type=_positive)
    p.add_argument("--lr", type=float)
    p.add_argument("--max-tiles", type=_positive)
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="pack samples into rows of up to max_packed_tokens tokens and max_packed_tiles tiles, as "
                   "InternVL 2.5's stage scripts do (the default; docs/training.md, \"Scale\"); --batch-size then "
                   "counts packs. "
                   "--no-pack: one padded sample per row")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard the LLM and ViT layers over the processes (FSDP) instead of DDP")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the LLM's own code (e.g. InternLM2.5)")
    p.add_argument("--resume-changes", action="store_true",
                   help="resume RUN with options that differ from its train_config.json, applied from the resumed step")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("chat", help="ask a trained chat checkpoint about images or a video",
                       description="Answer QUESTION about the images (or one video: a video file, an animated GIF or "
                       "a folder of frames) with a chat checkpoint such as RUN/final, its tokenizer included, with "
                       "the tile budget and frame count it was trained with unless --max-tiles / --frames say "
                       "otherwise.")
    p.add_argument("checkpoint", metavar="CHAT_CKPT")
    p.add_argument("media", nargs="*", metavar="IMAGE|VIDEO",
                   help="images, or one video (a video file, an animated GIF, a folder of frames)")
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--max-tiles", type=_tile_budget, help="tiles of a question's images together (default: trained)")
    p.add_argument("--frames", type=_positive, help="frames of a video (default: trained)")
    p.add_argument("--system", help="system prompt (default: InternVL 2.5's)")
    p.add_argument("--max-new-tokens", type=_positive, default=256)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the LLM's own code (e.g. InternLM2.5)")

    p = sub.add_parser("data", help="training data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="report (and with --fix drop) samples that fail the data quality checks",
                            description="Check every dataset of a meta JSON: missing or unreadable media, "
                            "placeholder/image mismatches, samples over the length budget (with --tokenizer), "
                            "repetitive answers (10-gram repetition > 40%), empty and duplicate answers and "
                            "duplicate samples, one line each (the first 20; --fix OUT writes them all). Exit status "
                            "0: no problems; 1: problems found (listed); 2: the meta JSON cannot be read.")
    p.add_argument("meta")
    p.add_argument("--fix", metavar="OUT", help="write the kept samples, a new meta.json and report.json to OUT")
    p.add_argument("--tokenizer", help="tokenizer (id or folder) for the length check")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer's own code (InternLM2.5)")
    p.add_argument("--max-seq-length", type=_positive, default=16384)
    p.add_argument("--max-tiles", type=_tile_budget, default=DEFAULT_MAX_TILES)

    p = sub.add_parser("serve", help="serve embeddings over HTTP (OpenAI-compatible /v1/embeddings, /v1/features)",
                       description="An HTTP service on FastAPI + uvicorn (pip install 'internvit[serve]'): "
                       "POST /v1/embeddings (OpenAI-compatible), POST /v1/features, GET /health, /ready, /metrics. "
                       "Concurrent requests share the encoder's forwards; a full queue answers 503 at once.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub repo id, local folder or file (default: %(default)s)")
    p.add_argument("--revision", help="Hub branch, tag or commit of --model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    p.add_argument("--port", type=_non_negative, default=8000, help="port (default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="compute dtype (default: bf16; for an export folder its own precision)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=["torch", "openvino", "onnxruntime", "auto"],
                   help="as `internvit extract --backend` (default: torch, or an export folder's own runtime)")
    p.add_argument("--tiles", choices=["none", "dynamic"], default="none",
                   help="preprocessing, as `internvit extract --tiles` (default: none)")
    p.add_argument("--max-tiles", type=_tile_budget, default=DEFAULT_MAX_TILES, help="tile budget with --tiles dynamic (default: 12)")
    p.add_argument("--max-batch-tiles", type=_positive, default=16,
                   help="most tiles per forward, across requests (default: 16)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a forward waits for more requests' tiles after the first (default: 10)")
    p.add_argument("--max-queue", type=_positive, default=64,
                   help="requests in the server at once; more get 503 with Retry-After (default: 64)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body; larger get 413 (default: 64)")
    p.add_argument("--max-pixels", type=_positive, help="refuse larger images with 400 (default: 100,000,000)")
    p.add_argument("--max-request-tiles", type=_positive, default=1024,
                   help="most tiles in one request; more get 413 (default: 1024)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/ endpoints")
    p.add_argument("--decode-threads", type=_positive, default=2, help="threads decoding and tiling images (default: 2)")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds a connection may stay idle, new or between requests (default: 5)")
    p.add_argument("--timeout-read", type=float, default=30.0,
                   help="seconds a request may take to arrive, headers and body, from its first byte (default: 30)")
    p.add_argument("--max-connections", type=_positive, default=512,
                   help="open connections; more are closed at once (default: 512)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: one process (default); ray: a Ray Serve deployment, one model per replica")
    p.add_argument("--replicas", type=_positive, default=1, help="with --engine ray: replicas (default: 1)")
    p.add_argument("--address", help="with --engine ray: the Ray cluster; default a local instance on loopback")

    p = sub.add_parser("errors", help="list the failed inputs of an extract output, with their reasons",
                       description="Print `path<TAB>reason` for every error row of an output written by "
                       "`internvit extract` (a Parquet file, or a folder of shards from --engine ray), then "
                       "how many rows it holds and how many failed (on stderr).")
    p.add_argument("out", help="the --out of the extract run")

    p = sub.add_parser("doctor", help="this machine (CPU, ISA flags), the libraries, and the CPU choices measured "
                       "here with the figures they were made on")
    p.add_argument("--model", help="also measure (or read) the choices for this checkpoint: attention path, chunk, "
                   "backend='auto'")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="the precision to measure --model in")
    p = sub.add_parser("init", help="write a randomly initialised checkpoint in the official layout")
    p.add_argument("out_dir")
    p.add_argument("--preset", default="300m", choices=["300m", "6b", "tiny"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in a non-empty OUT_DIR")

    p = sub.add_parser("convert", help="rewrite a chat, sharded, timm or transformers checkpoint in the official layout")
    p.add_argument("source", help="Hub repo id, local folder or weight file")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: keep the stored dtype")
    p.add_argument("--revision")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in a non-empty OUT_DIR")
    _add_analysis_commands(sub)
    for p in sub.choices.values():  # also after the command: `internvit extract ... --debug`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        saved = "; finished rows are saved, rerun to resume" if args.command == "extract" else ""
        print(f"internvit {args.command}: {what}{saved}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # noqa: BLE001 - every failure is one line (and exit 2); --debug shows where
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"internvit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame) -> None:
    raise Terminated


def _one_line(e: BaseException) -> str:
    """The error as one line; library errors already read as sentences, anything else is named by its type."""
    from internvit.extract.store import OutputLockedError, OutputMismatchError
    from internvit.checkpoint import CheckpointError

    text = " ".join(str(e).split()) or e.__class__.__name__
    if isinstance(e, (CheckpointError, OutputMismatchError, OutputLockedError, ValueError, OSError, ImportError)):
        return text
    return f"{e.__class__.__name__}: {text} (rerun with --debug for the traceback)"


def _run(args: argparse.Namespace) -> int:
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "extract":
        from internvit.extract.core import ExtractOptions

        options = ExtractOptions(  # built once, for either engine
            model=args.model, revision=args.revision, dtype=args.dtype, device=args.device,
            batch_size=args.batch_size, decode=args.decode, allow_tf32=args.tf32, compile=args.compile,
            tiles=args.tiles, max_tiles=args.max_tiles, frames=args.frames,
            layers=args.layers, patch_tokens=args.patch_tokens, visual_tokens=args.visual_tokens,
            projector=args.projector, exif_transpose=not args.no_exif, max_pixels=args.max_pixels,
            retry_errors=args.retry_errors, progress=not args.quiet, backend=args.backend)
        if args.engine == "ray":  # --workers and --flush-seconds are the local engine's
            from internvit.extract.ray import RayRunError, extract_features_ray

            try:
                s = extract_features_ray(args.sources, args.out, options, address=args.address,
                                         num_actors=args.num_actors, gpus_per_actor=args.gpus_per_actor)
            except RayRunError as e:
                print(f"internvit extract: error: {e}", file=sys.stderr)
                return 2
            busy = s.model_seconds / max(s.seconds - s.load_seconds, 1e-9)
            print(
                f"{s.out}/: {s.inputs} inputs, {s.processed} processed, {s.skipped} already done, {s.failed} failed; "
                f"{s.seconds:.1f} s ({s.load_seconds:.1f} s starting Ray, {s.num_actors} actor(s), {s.tiles} tiles, "
                f"each encoder busy {100 * busy:.0f}% of the rest)",
                file=sys.stderr,
            )
            _show_failures(s.out, s.failed)
            return 0 if s.ok else 1
        from internvit.extract import extract_features

        s = extract_features(args.sources, args.out, options, num_workers=args.workers,
                             flush_seconds=args.flush_seconds)
        busy = s.model_seconds / max(s.seconds - s.load_seconds, 1e-9)
        chosen = " (chosen by --backend auto)" if args.backend == "auto" else ""
        print(
            f"{s.out}: {s.inputs} inputs, {s.processed} processed, {s.skipped} already done, "
            f"{s.failed} failed; {s.seconds:.1f} s ({s.load_seconds:.1f} s loading the model, {s.tiles} tiles, "
            f"encoder busy {100 * busy:.0f}% of the rest); backend {s.backend}{chosen}, {s.precision}",
            file=sys.stderr,
        )
        _show_failures(s.out, s.failed)
        return 0 if s.ok else 1
    if args.command == "serve":
        return _serve(args)
    if args.command == "export":
        from internvit.export import export

        def log(line: str) -> None:
            print(f"internvit export: {line}", file=sys.stderr)

        r = export(args.model, args.out_dir, format=args.format, precision=args.precision, batch=args.batch,
                   calibration=args.calibration, calibration_size=args.calibration_size, layers=args.layers,
                   force=args.force, overwrite=args.overwrite, revision=args.revision, log=log)
        v = r.manifest["validation"]
        print(f"wrote {args.format} ({args.precision}) to {r.path} in {r.seconds:.0f} s: {v['verdict']}",
              file=sys.stderr)
        return 0
    if args.command == "errors":
        from internvit.extract.store import read_errors

        rows, errors = read_errors(args.out)
        for path, error in errors:
            print(f"{path}\t{' '.join(error.split())}")
        print(f"{args.out}: {rows} rows read, {len(errors) or 'none'} failed", file=sys.stderr)
        return 0
    if args.command in ("probe", "index", "search", "dedup", "viz"):
        return _analysis(args)
    if args.command == "train":
        return _train(args)
    if args.command == "chat":
        return _chat(args)
    if args.command == "data":
        return _data_check(args)
    if args.command == "init":
        from internvit.weights import init_checkpoint

        out = init_checkpoint(args.out_dir, preset=args.preset, seed=args.seed, dtype=args.dtype,
                              overwrite=args.overwrite)
        print(f"wrote a random {args.preset} checkpoint ({args.dtype}) to {out}", file=sys.stderr)
        return 0
    if args.command == "convert":
        from internvit.weights import convert

        out = convert(args.source, args.out_dir, dtype=args.dtype, revision=args.revision, overwrite=args.overwrite)
        print(f"wrote the official layout to {out}", file=sys.stderr)
        return 0
    raise AssertionError(args.command)


def _doctor(args: argparse.Namespace) -> int:
    from internvit import autotune
    from internvit.backends import auto_backend, from_pretrained

    if args.model:
        model = from_pretrained(args.model, dtype=args.dtype)  # torch: attention path and chunk
        chosen, why = auto_backend("cpu", args.dtype, args.model)
        del model
        print(f"backend='auto' for {args.model} in {args.dtype}: {chosen} ({why})")
    print(autotune.describe())
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from internvit.serve import ServeOptions, serve, serve_ray
    except ImportError as e:
        raise ValueError(f"serving needs the serve extra: pip install 'internvit[serve]' ({e})") from None
    options = ServeOptions(model=args.model, revision=args.revision, dtype=args.dtype, device=args.device,
                           tiles=args.tiles, max_tiles=args.max_tiles, max_batch_tiles=args.max_batch_tiles,
                           max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_body_mb=args.max_body_mb,
                           max_pixels=args.max_pixels, max_request_tiles=args.max_request_tiles,
                           api_key=args.api_key, decode_threads=args.decode_threads, backend=args.backend,
                           timeout_keep_alive=args.timeout_keep_alive, timeout_read=args.timeout_read,
                           max_connections=args.max_connections)
    if args.engine == "ray":
        serve_ray(options, host=args.host, port=args.port, replicas=args.replicas, address=args.address)
    else:
        serve(options, host=args.host, port=args.port)
    return 0


def _show_failures(out, failed: int) -> None:
    """Up to SHOWN_ERRORS failed inputs with their reasons, and how to list them all."""
    if not failed:
        return
    from internvit.extract.store import read_errors

    errors = read_errors(out)[1]
    print(f"failed inputs ({len(errors)}):", file=sys.stderr)
    for _, error in errors[:SHOWN_ERRORS]:
        print(f"  {' '.join(error.split())}", file=sys.stderr)
    if len(errors) > SHOWN_ERRORS:
        print(f"  ... and {len(errors) - SHOWN_ERRORS} more: internvit errors {out}", file=sys.stderr)


def _data_check(args: argparse.Namespace) -> int:
    from internvit.train.quality import check_meta

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code)
    reports = check_meta(args.meta, tokenizer=tokenizer, max_seq_length=args.max_seq_length,
                         max_tiles=args.max_tiles, fix=args.fix)
    for r in reports:
        found = ", ".join(f"{k} {v}" for k, v in sorted(r.problems.items())) or "no problems"
        print(f"{r.name}: {r.samples} samples, {r.kept} kept; {found}")
    issues = [(r.name, i) for r in reports for i in r.issues]
    for name, i in issues[:SHOWN_PROBLEMS]:
        if i.reason == "missing_annotation":
            print(f"  {name}: annotation file {_shown(i.file)} does not exist")
        elif i.reason == "missing_root":
            print(f"  {name}: root {_shown(i.path)} does not exist (the media paths of {_shown(i.file)} are "
                  "relative to it)")
        else:
            sample = f" (id {i.id})" if i.id is not None else ""
            print(f"  {_shown(i.file)}:{i.line}{sample}: {i.reason}" + (f" {_shown(i.path)}" if i.path else ""))
    if len(issues) > SHOWN_PROBLEMS:
        where = f"all in {args.fix}/report.json" if args.fix else "--fix OUT writes them all"
        print(f"  … and {len(issues) - SHOWN_PROBLEMS} more ({where})")
    if args.fix:
        print(f"wrote the kept samples, meta.json and report.json to {args.fix}", file=sys.stderr)
    return 1 if any(r.problems for r in reports) else 0


def _shown(path: str) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _train(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    import torch

    from internvit.model.chat import quiet_transformers
    from internvit.train.data import ConversationDataset, load_meta
    from internvit.train.loop import build_model, check_run, skipped_summary, train
    from internvit.train.stages import STAGES, TrainConfig

    overrides = {k: v for k, v in {"max_steps": args.max_steps, "batch_size": args.batch_size,
                                   "grad_accum": args.grad_accum, "lr": args.lr, "max_tiles": args.max_tiles,
                                   "pack": args.pack, "fsdp": args.fsdp}.items()
                 if v is not None}
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in types:
            raise ValueError(f"--set {item}: unknown option {key!r}; options: {', '.join(sorted(types))}")
        overrides[key] = json.loads(value) if value[:1] in "[{tf0123456789-." and value not in ("", "-") else value
    cfg = STAGES[args.stage](**overrides)
    source = {"llm": args.llm, "vision": args.vision, "init": args.init}
    check_run(args.out, cfg, source=source, resume_changes=args.resume_changes)  # before anything is loaded
    torch.manual_seed(cfg.seed)  # a fresh mlp1 is random: the same seed, the same run
    with quiet_transformers() if args.quiet else contextlib.nullcontext():
        model, tokenizer = build_model(llm=args.llm, vision=args.vision, init=args.init,
                                       trust_remote_code=args.trust_remote_code,
                                       shrink_embeddings=cfg.shrink_embeddings)
    max_seq_length = min(cfg.max_seq_length, cfg.max_packed_tokens) if cfg.pack else cfg.max_seq_length
    dataset = ConversationDataset(load_meta(args.meta), tokenizer, max_tiles=cfg.max_tiles,
                                  num_image_token=model.num_image_token, max_seq_length=max_seq_length,
                                  tile_size=model.vision_model.config.image_size, seed=cfg.seed,
                                  min_num_frame=cfg.min_num_frame, max_num_frame=cfg.max_num_frame,
                                  sampling_method=cfg.sampling_method)
    rows = train(model, tokenizer, dataset, cfg, args.out, progress=not args.quiet, source=source,
                 resume_changes=args.resume_changes, log=lambda line: print(f"internvit train: {line}",
                                                                            file=sys.stderr))
    if rows:
        print(f"stage {cfg.stage}: {len(rows)} steps ({rows[0]['step']}-{rows[-1]['step']} of {cfg.max_steps}), loss "
              f"{rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}; run folder {args.out}: final/ (the chat "
              f"checkpoint, fp32), vision/ (the ViT, {cfg.save_dtype}; --set save_dtype=fp32 keeps fp32)",
              file=sys.stderr)
        skipped = skipped_summary(args.out)
        if skipped:
            print(f"internvit train: {skipped}", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from internvit.model.chat import InternVLChatModel, quiet_transformers
    from internvit.preprocess.video import is_video_name

    media = list(args.media)
    video = None
    if len(media) == 1 and (is_video_name(media[0]) or os.path.isdir(media[0]) or _animated(media[0])):
        video, media = media[0], []
    elif any(is_video_name(m) or os.path.isdir(m) for m in media):
        raise ValueError("a question takes images or one video, not both or several videos")
    with quiet_transformers():
        model = InternVLChatModel.from_pretrained(args.checkpoint, trust_remote_code=args.trust_remote_code)
        tokenizer = InternVLChatModel.load_tokenizer(args.checkpoint, trust_remote_code=args.trust_remote_code)
        kwargs = {"system": args.system} if args.system else {}
        answer = model.chat(tokenizer, media or None, args.question, video=video, max_tiles=args.max_tiles,
                            num_frames=args.frames, max_new_tokens=args.max_new_tokens, **kwargs)
    print(answer)
    return 0


def _animated(path: str) -> bool:
    """An animated GIF, WebP or PNG: a video for `chat` (InternVL's training reads GIFs as videos)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) > 1
    except OSError:
        return False


def _add_analysis_commands(sub) -> None:
    """probe, index, search, dedup and viz: what users do with extracted features (`_analysis` runs them)."""
    p = sub.add_parser("probe", help="k-NN or linear probe of labelled features: top-1/top-5, per class, confusion",
                       description="Probe how well the features separate labelled classes. knn: DINOv2's weighted "
                       "k-NN (cosine, k = 10, 20, 100, 200, T = 0.07); linear: logistic regression on standardised "
                       "features, C chosen on a held-out 10% of TRAIN. Writes report.json and confusion.png.")
    p.add_argument("method", choices=["knn", "linear"])
    p.add_argument("--train", required=True, help="feature Parquet file of the training images")
    p.add_argument("--eval", required=True, help="feature Parquet file of the evaluation images")
    p.add_argument("--labels", default="folder",
                   help="folder: each image's parent folder is its class (ImageFolder layout, default); "
                   "else the name of a column holding the label")
    p.add_argument("--feature", default="cls", help="cls (default), mean, cls+mean, or any feature column(s)")
    p.add_argument("--out", help="report folder: report.json and confusion.png")

    p = sub.add_parser("index", help="build a search index over feature files",
                       description="Index the features of one or more feature files (same model and settings) "
                       "for `internvit search`. --kind auto (default): exact up to 1,000,000 vectors, ann beyond.")
    p.add_argument("features", nargs="+", metavar="FEATURES.parquet")
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--feature", default="cls", help="cls (default), mean, cls+mean, ...")
    p.add_argument("--kind", choices=["auto", "exact", "ann"], default="auto",
                   help="exact: blocked brute force; ann: faiss IVF-Flat; auto: by size (default)")

    p = sub.add_parser("search", help="find the nearest indexed images of query images or feature rows",
                       description="Query an index with images (encoded with the index's own model and settings) "
                       "or .parquet feature files (each row a query; refused if from another model).")
    p.add_argument("index_dir", metavar="INDEX_DIR")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="images, folders, globs, or .parquet feature files")
    p.add_argument("-k", type=_positive, default=10, help="results per query (default: 10)")
    p.add_argument("--out", help="results Parquet file (query, rank, path, score); default: a table on stdout")
    p.add_argument("--device", help="for encoding query images (default: cuda if available, else cpu)")

    p = sub.add_parser("dedup", help="near-duplicate pairs of a feature file",
                       description="Pairs of items whose features have cosine similarity >= --threshold, highest "
                       "first: every pair up to 200,000 items, the nearest neighbours from an ANN index beyond.")
    p.add_argument("features", metavar="FEATURES.parquet")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default: 0.95)")
    p.add_argument("--out", required=True, help="pairs Parquet file (path_a, path_b, score)")
    p.add_argument("--feature", default="cls", help="cls (default), mean, cls+mean, ...")

    p = sub.add_parser("viz", help="pictures of the features: PCA maps, CLS attention")
    viz_sub = p.add_subparsers(dest="viz_command", required=True)
    for name, text in (("pca", "the stitched patch-token map's first 3 principal components as RGB, beside the "
                        "image (one PNG per image)"),
                       ("attention", "the CLS attention of one layer, one map per head on the stitched grid "
                        "(one PNG per image)")):
        p = viz_sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders, globs or list files")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint (default: %(default)s)")
        p.add_argument("--layer", type=int,
                       help="hidden_states index: 0 = embeddings, -1 = last (default)" if name == "pca" else
                       "attention layer 1..L, -1 = last (default)")
        p.add_argument("--tiles", choices=["none", "dynamic"], default="none",
                       help="none: the single centre-cropped tile (default); dynamic: InternVL tiles, stitched")
        p.add_argument("--max-tiles", type=_positive, default=12)
        p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
        p.add_argument("--device")
        if name == "pca":
            p.add_argument("--mask-threshold", type=float,
                           help="also draw a foreground mask: first component (scaled to 0..1) above this")


def _analysis(args: argparse.Namespace) -> int:
    try:
        return _analysis_run(args)
    except ImportError as e:  # a missing optional dependency: one line, no traceback
        print(f"internvit {args.command}: error: {e}", file=sys.stderr)
        return 2


def _analysis_run(args: argparse.Namespace) -> int:
    if args.command == "probe":
        from internvit.probe import probe

        r = probe(args.method, args.train, args.eval, labels=args.labels, feature=args.feature, out=args.out)
        for name, res in r.results.items():
            print(f"{name}: top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%")
        if r.method == "linear":
            print(f"C = {r.details['C']:g} (chosen on {r.details['held_out_rows']} held-out TRAIN rows)")
        print(f"{len(r.classes)} classes; train {r.train['rows']} rows ({r.train['skipped']} error rows skipped), "
              f"eval {r.eval['rows']} rows ({r.eval['skipped']} skipped); {r.seconds:.1f} s"
              + (f"; report in {args.out}" if args.out else ""), file=sys.stderr)
        return 0
    if args.command == "index":
        from internvit.index import build_index

        info = build_index(args.features, args.out, feature=args.feature, kind=args.kind)
        print(f"{info.out}: {info.kind} index of {info.count} vectors of {info.dim} ({args.feature}), "
              f"{info.skipped} error rows skipped; {info.seconds:.1f} s", file=sys.stderr)
        return 0
    if args.command == "search":
        from internvit.index import search

        table = search(args.index_dir, args.queries, k=args.k, device=args.device)
        if args.out:
            import pyarrow.parquet as pq

            pq.write_table(table, args.out)
            print(f"wrote {table.num_rows} results to {args.out}", file=sys.stderr)
        else:
            for q, rank, path, score in zip(*(table.column(c).to_pylist() for c in ("query", "rank", "path", "score"))):
                print(f"{q}\t{rank}\t{score:.4f}\t{path}")
        return 0
    if args.command == "dedup":
        import pyarrow.parquet as pq

        from internvit.index import dedup

        pairs = dedup(args.features, threshold=args.threshold, feature=args.feature)
        pq.write_table(pairs, args.out)
        print(f"wrote {pairs.num_rows} pairs with similarity >= {args.threshold} to {args.out}", file=sys.stderr)
        return 0
    if args.command == "viz":
        from internvit.viz import viz

        written = viz(args.viz_command, args.images, args.out, model=args.model, layer=args.layer, tiles=args.tiles,
                      max_tiles=args.max_tiles, mask_threshold=getattr(args, "mask_threshold", None),
                      dtype=args.dtype, device=args.device)
        print(f"wrote {len(written)} picture(s) to {args.out}", file=sys.stderr)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
