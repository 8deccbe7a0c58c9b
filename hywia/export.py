"""Export: a pruned model becomes a normal Hugging Face checkpoint that stock loaders accept.

Uniform plans export the stock `LlamaForCausalLM`. Where transformers' `LlamaConfig` would refuse
the shape (it checks hidden_size % num_attention_heads even with an explicit head_dim), the config
says `"model_type": "mistral"` with `"architectures": ["LlamaForCausalLM"]` and no sliding window:
transformers then builds the identical Mistral module and vLLM builds its LlamaForCausalLM, both
from the same tensors (DESIGN.md). Per-layer plans export `HywiaLlamaForCausalLM` (hywia.arch).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from hywia.cache import atomic_directory
from hywia.errors import HywiaError
from hywia.plan import PruningPlan, is_per_layer, pruned_config

REPORT_NAME = "hywia_report.json"
# Keys of LlamaConfig that Mistral's config does not describe; a model that uses them cannot take
# the Mistral route and must keep hidden % heads == 0.
_LLAMA_ONLY_FEATURES = ("attention_bias", "mlp_bias")


def export_config(model, plan: PruningPlan) -> dict:
    """The config.json content for the sliced model (hywia.plan.pruned_config in the form loaders take)."""
    config = pruned_config(model.config.to_dict(), plan.keep_counts())
    if is_per_layer(config):
        from hywia.arch import per_layer_config

        return per_layer_config(config).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    if config["hidden_size"] % config["num_attention_heads"] != 0:
        if any(config.get(key) for key in _LLAMA_ONLY_FEATURES):
            raise HywiaError(
                f"the pruned model has {config['num_attention_heads']} heads, which do not divide hidden size "
                f"{config['hidden_size']}, and it uses biases that the loader-compatible export cannot carry",
                "choose a ratio or --align-heads that keeps a divisor of the hidden size",
            )
        config["model_type"] = "mistral"
        config["sliding_window"] = None
    return config


def check_output_dir(out_dir: Path) -> None:
    """Refuse before any heavy work to overwrite anything but a previous export (or an empty dir)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise HywiaError(f"--out {out_dir} exists and is not a directory", "choose a new output path")
    if any(out_dir.iterdir()) and not (out_dir / REPORT_NAME).is_file():
        raise HywiaError(
            f"--out {out_dir} exists and is not a previous hywia export; refusing to overwrite its files",
            "choose a new or empty output directory",
        )


def write_export(model, tokenizer, plan: PruningPlan, report: dict, out_dir: Path, dtype: str | None = None,
                 replace: bool = True) -> Path:
    """Write weights (safetensors, sharded when large), config, tokenizer, generation config and report,
    atomically: the directory appears complete, with a checksum manifest, or not at all."""
    import torch

    config = export_config(model, plan)
    if dtype is not None:
        model.to(getattr(torch, dtype))
        config["dtype"] = dtype
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    with atomic_directory(out_dir, replace=replace) as staging, _saved_as(model, config):
        model.save_pretrained(staging, safe_serialization=True, max_shard_size="2GB")
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(staging)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=1))
    return out_dir


@contextlib.contextmanager
def _saved_as(model, config: dict):
    """Let `save_pretrained` see the exported config instead of the model's own. transformers
    validates the config it saves, and the sliced model's in-memory LlamaConfig may describe a shape
    LlamaConfig refuses (e.g. 3 heads in hidden size 320: the Mistral route above)."""
    from transformers import AutoConfig

    own = model.config
    model.config = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    try:
        yield
    finally:
        model.config = own
