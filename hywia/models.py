"""Model intake: turn a source into a loaded LLaMA-family model, its tokenizer and chat template.

A source is one of
  * the built-in default name `smollm2-135m-instruct` (fetched and converted once, then cached),
  * a local Hugging Face directory with safetensors weights (pickle `.bin` only with allow_pickle),
  * a `.gguf` file (dequantised once into a cached safetensors directory),
  * a Hugging Face hub id (where the hub is reachable; offline it fails fast and says so).
Only LLaMA-family architectures are accepted, since pruning and export assume their layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from hywia.cache import atomic_directory, cache_root, move_aside, sha256_file, verify_manifest
from hywia.default_model import DEFAULT_MODEL_NAME, convert_gguf_to_hf, ensure_default_model
from hywia.errors import HywiaError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "HywiaLlamaForCausalLM")
_WEIGHT_SUFFIXES = (".safetensors",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HASH_PROGRESS_BYTES = 256 * 2**20  # smaller sources hash in well under a second: no bar


@dataclass
class ResolvedSource:
    """A source reduced to a local HF directory, plus what identifies its content."""

    source: str  # what the user asked for
    directory: Path
    digest: str  # content digest of config + weights: part of every cache key
    cache_hit: bool  # True when no download or conversion was needed


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel (LlamaForCausalLM or a compatible class)
    tokenizer: object
    resolved: ResolvedSource

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)


def resolve_source(source: str | None = None, cache_dir=None, allow_pickle: bool = False) -> ResolvedSource:
    """Turn SOURCE into a validated local HF directory without loading any weights."""
    source = source or DEFAULT_MODEL_NAME
    if source == DEFAULT_MODEL_NAME:
        directory, hit = ensure_default_model(cache_dir)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            directory, hit = path, True
        elif path.is_file() and path.suffix == ".gguf":
            directory, hit = _converted_gguf(path, cache_dir)
        elif path.exists():
            raise HywiaError(
                f"{source} is a file but not a .gguf file",
                "pass a Hugging Face model directory, a .gguf file, a hub id, or "
                f"'{DEFAULT_MODEL_NAME}'",
            )
        elif _looks_like_hub_id(source):
            directory, hit = _download_from_hub(source, allow_pickle)
        else:
            raise HywiaError(
                f"model source {source!r} is not an existing path, and not a hub id (owner/name)",
                f"check the path, or use the built-in default '{DEFAULT_MODEL_NAME}'",
            )
    validate_architecture(directory)
    _check_weight_format(directory, allow_pickle)
    return ResolvedSource(source=source, directory=directory, digest=content_digest(directory), cache_hit=hit)


def load_model(source: str | None = None, cache_dir=None, allow_pickle: bool = False, dtype: str = "float32",
               device: str = "cpu") -> LoadedModel:
    """Resolve SOURCE and load it as a causal LM with its tokenizer (chat template included)."""
    return load_resolved(resolve_source(source, cache_dir, allow_pickle), allow_pickle, dtype, device)


def load_resolved(resolved: ResolvedSource, allow_pickle: bool = False, dtype: str = "float32",
                  device: str = "cpu") -> LoadedModel:
    """Load a source `resolve_source` already checked and hashed (it is not hashed again)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hywia.devices import compute_dtype, placement, source_dtype

    if dtype == "auto":  # the checkpoint's own dtype, as far as the device computes in it
        dtype = compute_dtype(source_dtype(read_config(resolved.directory)), device)
    placed = placement(resolved.directory, device, dtype)  # a device too small is refused before any weight is read
    log.info("loading %s from %s (%s on %s)", resolved.source, resolved.directory, dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        resolved.directory, dtype=getattr(torch, dtype), use_safetensors=not allow_pickle or None, **placed
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(resolved.directory)
    return LoadedModel(model=model, tokenizer=tokenizer, resolved=resolved)


def read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise HywiaError(f"{directory} has no config.json, so it is not a Hugging Face model directory")
    return json.loads(config_path.read_text())


def validate_architecture(directory: Path) -> dict:
    """Accept LLaMA-family configs only; name the architecture we refuse."""
    config = read_config(directory)
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    if not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
        raise HywiaError(
            f"unsupported architecture {', '.join(map(str, architectures))} in {directory}: "
            "hywia prunes LLaMA-family models only (LlamaForCausalLM, Mistral without sliding window)",
            "pass a LLaMA/Vicuna/Mistral-shaped checkpoint",
        )
    if config.get("model_type") == "mistral" and config.get("sliding_window") not in (None, 0):
        raise HywiaError(
            f"{directory} is a Mistral model with sliding-window attention "
            f"(sliding_window={config['sliding_window']}), which the LLaMA layout does not describe",
            "use a checkpoint whose config has sliding_window null",
        )
    return config


def _check_weight_format(directory: Path, allow_pickle: bool) -> None:
    files = [p.name for p in directory.iterdir() if p.is_file()]
    if any(name.endswith(_WEIGHT_SUFFIXES) for name in files):
        return
    pickles = [name for name in files if name.endswith(_PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise HywiaError(
            f"{directory} has only pickle weights ({', '.join(sorted(pickles))}); loading a pickle can "
            "run arbitrary code hidden in the file, so hywia refuses it by default",
            "convert the checkpoint to safetensors, or pass --allow-pickle if you trust its origin",
        )
    if not pickles:
        raise HywiaError(f"{directory} has no weight files (*.safetensors)")


def content_digest(directory: Path) -> str:
    """SHA-256 over config.json and the weight files; a cache manifest's digests are trusted (our own
    directories, verified when reused), anything else is read once, with a progress bar over its bytes."""
    from tqdm.auto import tqdm

    manifest = directory / "hywia_manifest.json"
    known = json.loads(manifest.read_text())["sha256"] if manifest.is_file() else {}
    hashed = [p for p in sorted(directory.iterdir())
              if p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES + _PICKLE_SUFFIXES)]
    unknown = sum(p.stat().st_size for p in hashed if p.name not in known)
    digest = hashlib.sha256()
    with tqdm(total=unknown, desc=f"hashing {directory.name}", unit="B", unit_scale=True,
              disable=unknown < _HASH_PROGRESS_BYTES) as bar:
        for path in hashed:
            file_hash = known.get(path.name) or sha256_file(path, bar.update)
            digest.update(f"{path.name}:{file_hash}\n".encode())
    return digest.hexdigest()


def _converted_gguf(gguf_path: Path, cache_dir) -> tuple[Path, bool]:
    target = cache_root(cache_dir) / "models" / f"gguf-{sha256_file(gguf_path)[:16]}"
    if target.exists():
        problem = verify_manifest(target)
        if problem is None:
            return target, True
        move_aside(target, problem)
    log.info("converting %s into a safetensors directory at %s (once)", gguf_path, target)
    with atomic_directory(target) as staging:
        convert_gguf_to_hf(gguf_path, staging)
    return target, False


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _download_from_hub(repo_id: str, allow_pickle: bool) -> tuple[Path, bool]:
    hint = (f"download it on a connected machine and pass the local directory instead "
            f"(e.g. `hywia serve /path/to/{repo_id.split('/')[-1]}`), or use '{DEFAULT_MODEL_NAME}'")
    if not _hub_reachable():
        raise HywiaError(f"cannot fetch {repo_id!r}: the Hugging Face hub is not reachable (offline)", hint)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns)), False
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        raise HywiaError(f"cannot fetch {repo_id!r} from the hub: {exc}", hint) from exc
