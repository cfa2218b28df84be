"""Checkpoint files: find them (local, Hub, cache), read them (memory-mapped), map their keys, fingerprint them.

References:
    - Official layout: `OpenGVLab/InternViT-300M-448px-V2_5` (config.json, model.safetensors,
      preprocessor_config.json; spec/internvit.md §1-3). InternVL 2.5 chat checkpoints carry the same keys under
      `vision_model.`, often sharded with `model.safetensors.index.json` (spec §2.1).
    - timm `vit_intern300m_patch14_448` and transformers `InternVLVisionModel` keys (spec/peers.md §1-2): the two
      tables below are the only renames in the project; official checkpoints need none.

Weights are read memory-mapped (safetensors, or `torch.load(mmap=True)` for pickles) in their stored dtype. This
module knows files and tensors, not modules: `model/` loads through it, and `weights.py` (which builds models)
sits above both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from internvit._fileio import atomic_write
from internvit.config import PRESETS, InternVisionConfig
from internvit.registry import PREPROCESSOR_CONFIG, REGISTRY

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHT_CANDIDATES = ("model.safetensors.index.json", WEIGHTS_NAME, "pytorch_model.bin.index.json", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or matched to the model; the message says which and why."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16") from None


# ---- where the files are ----------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint on local disk: its weight files and, when present, its config and preprocessing."""

    source: str
    weight_files: list[Path]
    config_path: Path | None = None
    preprocessor_path: Path | None = None
    weight_map: dict[str, str] = field(default_factory=dict)  # key -> shard file name, for sharded checkpoints

    @property
    def directory(self) -> Path:
        return self.weight_files[0].parent

    def fingerprint(self) -> str:
        """What identifies these weights and config, cheaply (see `files_fingerprint`); cached."""
        if not hasattr(self, "_fingerprint"):
            files = [*self.weight_files, *(p for p in (self.config_path,) if p is not None)]
            self._fingerprint = files_fingerprint(files)
        return self._fingerprint


FINGERPRINT_BLOCKS = 64  # sampled blocks per weight file
FINGERPRINT_BLOCK_BYTES = 4096


def files_fingerprint(files: Iterable[Path]) -> str:
    """A content fingerprint of weight files, fast enough to compute on every run (~1 ms for the 608 MB file).

    Hashes each file's size, its first 1 MiB (the whole safetensors header: names, dtypes, shapes, offsets) and
    64 blocks of 4 KiB spread evenly over the rest. Other weights of the same architecture (another seed, a
    fine-tune) differ in every sampled block; an edit that avoids all of them is not detected. File names and
    modification times are left out, so a copied or moved checkpoint keeps its fingerprint.
    """
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(size.to_bytes(8, "little"))
            h.update(f.read(1 << 20))
            if size > 1 << 20:
                step = (size - (1 << 20)) // FINGERPRINT_BLOCKS
                for i in range(FINGERPRINT_BLOCKS):
                    f.seek((1 << 20) + i * step)
                    h.update(f.read(FINGERPRINT_BLOCK_BYTES))
    return "sha256:" + h.hexdigest()[:32]


def state_dict_fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """The same idea for tensors in memory (a model not loaded from files): names, shapes, dtypes, sampled values."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().reshape(-1)
        h.update(f"{name}:{tuple(sd[name].shape)}:{t.dtype}".encode())
        step = max(1, t.numel() // 256)
        h.update(t[::step][:256].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    prefixes: tuple[str, ...] | None = None,
) -> Checkpoint:
    """Find a checkpoint: `local-dir:PATH`, `hf-hub:ORG/REPO`, a registry name, a local path or a Hub repo id.

    Hub files go through huggingface_hub's cache, so `HF_HUB_OFFLINE=1` and `HF_HOME` work as everywhere else.
    Of a sharded checkpoint only the shards holding the wanted keys are needed: those of the vision tower, or
    those starting with `prefixes` (e.g. `("mlp1.",)` for the projector of a chat checkpoint).
    """
    name = os.fspath(name_or_path)
    if name.startswith("local-dir:"):
        return _resolve_local(Path(name[len("local-dir:"):]), name, prefixes)
    if name.startswith("hf-hub:"):
        return _resolve_hub(name[len("hf-hub:"):], revision, cache_dir, prefixes)
    entry = REGISTRY.get(name.lower())
    if entry is not None:
        if os.path.exists(name):
            raise CheckpointError(
                f"{name!r} is both a registered model and a local path; write 'hf-hub:{entry.repo_id}' "
                f"or 'local-dir:{name}'"
            )
        return _resolve_hub(entry.repo_id, revision or entry.revision, cache_dir, prefixes)
    if os.path.exists(name):
        return _resolve_local(Path(name), name, prefixes)
    if _REPO_ID.match(name):
        return _resolve_hub(name, revision, cache_dir, prefixes)
    raise CheckpointError(
        f"{name!r}: no such file or folder, and not a Hub repo id (ORG/NAME) or a registered name "
        f"({', '.join(sorted(REGISTRY))})"
    )


def _resolve_local(path: Path, source: str, prefixes: tuple[str, ...] | None = None) -> Checkpoint:
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path, source, prefixes)
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise CheckpointError(f"{path}: not a weight file (expected one of {', '.join(WEIGHT_SUFFIXES)})")
        folder = path.parent
        return Checkpoint(source, [path], _existing(folder / CONFIG_NAME), _existing(folder / PREPROCESSOR_NAME))
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    for name in WEIGHT_CANDIDATES:
        if (path / name).is_file():
            return _resolve_local(path / name, source, prefixes)
    found = sorted(p.name for p in path.iterdir())
    raise CheckpointError(f"{path}: no weights found (looked for {', '.join(WEIGHT_CANDIDATES)}; the folder has {found})")


def _from_index(index_path: Path, source: str, prefixes: tuple[str, ...] | None = None) -> Checkpoint:
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
    folder = index_path.parent
    names = list(dict.fromkeys(weight_map[k] for k in select_keys(weight_map, prefixes)))
    outside = [n for n in names if not _inside(n)]
    if outside:
        raise CheckpointError(f"{index_path}: shard paths must name files inside its folder, got {outside[:3]}")
    shards = [folder / f for f in names]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: shard(s) listed in the index are missing: {missing}")
    return Checkpoint(source, shards, _existing(folder / CONFIG_NAME), _existing(folder / PREPROCESSOR_NAME), weight_map)


def _inside(name: object) -> bool:
    """Whether a shard name from an index stays inside the index's folder: relative, and no `..` escape.

    Checked lexically: the Hub cache's shards are symlinks into its own blobs/ folder, which is fine.
    """
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return False
    norm = os.path.normpath(name)
    return norm not in (os.curdir, os.pardir) and not norm.startswith(os.pardir + os.sep)


VISION_PREFIXES = ("vision_model.", "vision_tower.", "model.vision_tower.")


def select_keys(keys: Iterable[str], prefixes: tuple[str, ...] | None = None) -> list[str]:
    """Keys under `prefixes`; by default the vision tower's (in a chat checkpoint the LLM is not needed)."""
    keys = list(keys)
    if prefixes is not None:
        return [k for k in keys if k.startswith(prefixes)]
    prefixed = [k for k in keys if k.startswith(VISION_PREFIXES)]
    return prefixed or keys


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


HUB_PROBE_SECONDS = 5.0
_hub_probes: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hugging Face endpoint answers HTTP within `timeout` seconds (any status counts as an answer).

    False at once under `HF_HUB_OFFLINE=1`. Without this probe, huggingface_hub retries each file on a machine
    with no route to the Hub, for minutes and with pages of warnings, before its (clear) error. The answer is
    kept for a minute per endpoint.
    """
    import time

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = constants.ENDPOINT
    seen = _hub_probes.get(endpoint)
    if seen is not None and time.monotonic() - seen[0] < 60:
        return seen[1]
    answer: list[bool] = []

    def probe() -> None:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            answer.append(True)
        except urllib.error.HTTPError:  # an HTTP status is an answer
            answer.append(True)
        except Exception:  # noqa: BLE001 - refused, unresolvable, timed out: not reachable
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a DNS lookup ignores `timeout`: bound it here
    thread.start()
    thread.join(timeout)
    ok = bool(answer and answer[0])
    _hub_probes[endpoint] = (time.monotonic(), ok)
    return ok


def hub_kwargs(name_or_path: str | os.PathLike) -> dict:
    """Keyword arguments for transformers' `from_pretrained(name_or_path, ...)`: `local_files_only=True` when the
    name is not a local path and the Hub does not answer (`hub_reachable`), so that a machine without a route to
    the Hub fails in seconds instead of retrying for minutes."""
    if os.path.exists(os.path.expanduser(os.fspath(name_or_path))) or hub_reachable():
        return {}
    return {"local_files_only": True}


def offline_error(name: str, what: str, error: Exception) -> CheckpointError:
    """The error for a Hub id that is neither cached nor reachable, with what to do."""
    from huggingface_hub import constants

    why = ("HF_HUB_OFFLINE=1 forbids downloading" if constants.HF_HUB_OFFLINE else
           f"the Hub ({constants.ENDPOINT}) did not answer within {HUB_PROBE_SECONDS:.0f} s")
    return CheckpointError(f"{what} {name}: not in the Hugging Face cache, and {why} ({str(error).splitlines()[0]}). "
                           f"Download it where the Hub is reachable (`hf download {name} --local-dir DIR`) and pass "
                           "the local folder; set HF_HUB_OFFLINE=1 to skip the Hub at once.")


def _resolve_hub(repo_id: str, revision: str | None, cache_dir: str | None,
                 prefixes: tuple[str, ...] | None = None) -> Checkpoint:
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - a core dependency
        raise CheckpointError(f"{repo_id}: loading from the Hub needs huggingface_hub (pip install huggingface_hub)")

    online = hub_reachable()  # else only the local cache is read, at once

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                        local_files_only=not online))
        except hf_errors.LocalEntryNotFoundError as e:  # offline, or no network, and not in the cache
            failures.append(f"{filename}: {str(e).splitlines()[0]}")
            return None
        except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
            raise CheckpointError(f"{repo_id}: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
        except hf_errors.EntryNotFoundError:
            return None  # online, and the repo has no such file
        except OSError as e:  # the network failed in some other way
            failures.append(f"{filename}: {str(e).splitlines()[0]}")
            return None

    failures: list[str] = []
    config = fetch(CONFIG_NAME)
    preprocessor = fetch(PREPROCESSOR_NAME)
    for candidate in WEIGHT_CANDIDATES:
        path = fetch(candidate)
        if path is None:
            continue
        if candidate.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            for shard in dict.fromkeys(weight_map[k] for k in select_keys(weight_map, prefixes)):
                if not _inside(shard):
                    raise CheckpointError(f"{repo_id}: {candidate} names a shard outside its folder: {shard!r}")
                if fetch(shard) is None:
                    raise CheckpointError(f"{repo_id}: could not get shard {shard}: {failures[-1] if failures else ''}")
            ckpt = _from_index(path, repo_id, prefixes)
        else:
            ckpt = Checkpoint(repo_id, [path], None, None)
        ckpt.config_path, ckpt.preprocessor_path = config, preprocessor
        return ckpt
    where = f"cache {cache_dir or constants.HF_HUB_CACHE}"
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE=1 forbids downloading"
    elif not online:
        why = f"the Hub ({constants.ENDPOINT}) did not answer within {HUB_PROBE_SECONDS:.0f} s"
    else:
        why = "the Hub could not provide them"
    if online:
        why += " (" + ("; ".join(failures[:2]) or "the repo has none of " + ", ".join(WEIGHT_CANDIDATES)) + ")"
    raise CheckpointError(
        f"{repo_id}: weights not found in the Hugging Face {where}, and {why}. Download them where the "
        f"Hub is reachable (`hf download {repo_id} --local-dir DIR`) and pass --model DIR (a local folder), or "
        "copy a populated cache here; set HF_HUB_OFFLINE=1 to skip the Hub at once."
    )


# ---- reading state dicts and mapping keys -----------------------------------------------------------


def read_state_dict(ckpt: Checkpoint, *, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the vision tower (or those under `prefixes`), memory-mapped in their stored dtype, keys as stored."""
    wanted = set(select_keys(ckpt.weight_map, prefixes)) if ckpt.weight_map else None
    sd: dict[str, torch.Tensor] = {}
    for path in ckpt.weight_files:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes)")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = [k for k in f.keys() if wanted is None or k in wanted]
                    sd.update((k, f.get_tensor(k)) for k in select_keys(keys, prefixes))
            except SafetensorError as e:
                raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
        else:
            loaded = _torch_load(path)
            sd.update((k, loaded[k]) for k in select_keys(loaded, prefixes))
    return sd


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) pickles cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.__class__.__name__}: {e})") from None
    for wrapper in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# timm `vit_intern300m_patch14_448` -> official (spec/peers.md §1).
_TIMM_RENAMES = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"encoder.layers.\1.ls\2"),
    (r"blocks\.(\d+)\.(.+)", r"encoder.layers.\1.\2"),
]
# transformers `InternVLVisionModel` -> official (spec/peers.md §2); q/k/v are fused back into qkv afterwards.
_HF_RENAMES = [
    (r"embeddings\.cls_token", "embeddings.class_embedding"),
    (r"embeddings\.position_embeddings", "embeddings.position_embedding"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"encoder\.layer\.(\d+)\.lambda_([12])", r"encoder.layers.\1.ls\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(.+)", r"encoder.layers.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(.+)", r"encoder.layers.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.projection_layer\.(.+)", r"encoder.layers.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", r"encoder.layers.\1.attn.qkv.\3:\2"),
    (r"encoder\.layer\.(\d+)\.attention\.([qk])_norm\.(.+)", r"encoder.layers.\1.attn.\2_norm.\3"),
    (r"encoder\.layer\.(\d+)\.mlp\.(.+)", r"encoder.layers.\1.mlp.\2"),
]
# The key that identifies each layout, and the renames that bring it to the official one.
LAYOUTS = {
    "official": ("embeddings.patch_embedding.weight", []),
    "timm": ("patch_embed.proj.weight", _TIMM_RENAMES),
    "transformers": ("embeddings.patch_embeddings.projection.weight", _HF_RENAMES),
}


def to_official(sd: dict[str, torch.Tensor], *, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Strip the prefix (`vision_model.`, `model.vision_tower.`, ...) and rename timm/transformers keys.

    Returns the official state dict and the name of the layout that was found.
    """
    for layout, (anchor, renames) in LAYOUTS.items():
        hits = [k for k in sd if k == anchor or k.endswith("." + anchor)]
        if hits:
            prefix = min(hits, key=len)[: -len(anchor)]
            break
    else:
        sample = sorted(sd)[:5]
        raise CheckpointError(
            f"{source}: not an InternViT checkpoint in any known layout (official, InternVL chat, timm, "
            f"transformers); first keys: {sample}"
        )
    out: dict[str, torch.Tensor] = {}
    unfused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        if not key.startswith(prefix):
            continue  # e.g. mlp1. and language_model. in a chat checkpoint
        key = key[len(prefix):]
        for pattern, repl in renames:
            key, n = re.subn(f"^{pattern}$", repl, key)
            if n:
                break
        if ":" in key:
            name, part = key.split(":")
            unfused.setdefault(name, {})[part] = tensor
        else:
            out[key] = tensor
    for name, parts in unfused.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: {name} needs q, k and v projections, found only {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # rows [q | k | v] (spec §2.1)
    return out, layout


def infer_config(sd: dict[str, torch.Tensor]) -> InternVisionConfig:
    """An architecture from the tensor shapes alone, for checkpoints without a config.json (timm state dicts)."""
    hidden, _, patch, _ = sd["embeddings.patch_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    presets = [c for c in PRESETS.values() if (c.hidden_size, c.num_hidden_layers) == (hidden, layers)]
    if not presets:
        raise CheckpointError(
            f"no config.json, and {hidden} wide x {layers} layers matches no preset: pass config= "
            "(the number of attention heads cannot be read from the weights)"
        )
    grid = int(round((sd["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    return presets[0].replace(
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        patch_size=patch,
        image_size=grid * patch,
        qkv_bias="encoder.layers.0.attn.qkv.bias" in sd,
        qk_normalization="encoder.layers.0.attn.q_norm.weight" in sd,
        norm_type="layer_norm" if "encoder.layers.0.norm1.bias" in sd else "rms_norm",
    )


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, source: str) -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys (strict loading, spec §8)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mis_shaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                  for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or mis_shaped):
        return

    def show(title: str, items: list[str]) -> str:
        more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:10]) + more if items else ""

    raise CheckpointError(
        f"{source}: the checkpoint does not match the model config"
        + show("missing", missing) + show("unexpected", unexpected) + show("mis-shaped", mis_shaped)
    )


def _remove_stale_weights(folder: Path) -> None:
    """Remove weight files that `resolve` would prefer to (or load beside) a new model.safetensors.

    A shard index left from an earlier checkpoint wins over model.safetensors when the folder is loaded, so
    writing over a folder must take it (and the shards it lists) away.
    """
    for name in WEIGHT_CANDIDATES:
        path = folder / name
        if name == WEIGHTS_NAME or not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = set(json.loads(path.read_text()).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                shards = set()
            for shard in shards:
                if _inside(shard) and (folder / shard).is_file():
                    (folder / shard).unlink()
        path.unlink()


def check_target(out_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse to write a checkpoint into a non-empty folder unless `overwrite` (and never into a file)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: the folder exists and is not empty; pass --overwrite (overwrite=True) "
                              "to replace the checkpoint in it, or choose another folder")


def save_pretrained(
    state_dict: dict[str, torch.Tensor],
    config: InternVisionConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    preprocessor: dict | None = None,
) -> Path:
    """Write an official-layout checkpoint: config.json, model.safetensors, preprocessor_config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_weights(out)
    target = parse_dtype(dtype)
    sd = {k: (v.to(target) if target else v).detach().contiguous().cpu() for k, v in state_dict.items()}
    stored = sd["embeddings.patch_embedding.weight"].dtype
    cfg = config.to_dict()
    cfg["torch_dtype"] = str(stored).removeprefix("torch.")
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(sd, p, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
    pre = preprocessor if preprocessor is not None else PREPROCESSOR_CONFIG
    atomic_write(out / PREPROCESSOR_NAME, lambda p: Path(p).write_text(json.dumps(pre, indent=2) + "\n"))
    return out
