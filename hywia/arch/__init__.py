"""The per-layer LLaMA architecture that non-uniform pruned exports use.

Importing this package registers `HywiaLlamaConfig` / `HywiaLlamaForCausalLM` with transformers'
Auto classes, so `AutoModelForCausalLM.from_pretrained(export_dir)` works with no
`trust_remote_code` and no code inside the checkpoint. vLLM gets the same architecture through the
`vllm.general_plugins` entry point (`hywia.arch.vllm_plugin:register`).
"""

from __future__ import annotations

import sys

from hywia.arch.configuration_hywia_llama import (
    PER_LAYER_FIELDS,
    HywiaLlamaConfig,
    LayerConfigView,
    check_layer_widths,
    register_config,
)
from hywia.arch.modeling_hywia_llama import HywiaLlamaForCausalLM, HywiaLlamaModel

ARCHITECTURE = "HywiaLlamaForCausalLM"

# Keys of a source config that name the source's class rather than describe its shape.
_IDENTITY_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")


def register() -> None:
    """Register with the Auto classes. Safe to call any number of times (exist_ok)."""
    from transformers import AutoModelForCausalLM

    register_config()
    AutoModelForCausalLM.register(HywiaLlamaConfig, HywiaLlamaForCausalLM, exist_ok=True)


def _auto_models_loaded() -> bool:
    """False while transformers is still executing modeling_auto (it imports configuration_auto, whose
    hook brings us here): then hywia.registration registers the model once modeling_auto has loaded."""
    module = sys.modules.get("transformers.models.auto.modeling_auto")
    return module is None or "AutoModelForCausalLM" in vars(module)


def per_layer_config(config: dict) -> HywiaLlamaConfig:
    """The HywiaLlamaConfig of a config dict that carries the per-layer lists (hywia.plan.pruned_config
    writes them: entry i is layer i's query heads, KV heads, MLP channels).

    Everything else (hidden size, head_dim, vocabulary, RoPE, token ids, dtype) is kept; the keys that
    name the source's class are replaced. Raises ValueError for lists of the wrong length or
    impossible widths.
    """
    fields = {key: value for key, value in config.items() if key not in _IDENTITY_KEYS}
    # head_dim must survive the change of head counts: derive it from the *base* widths if unset.
    if fields.get("head_dim") is None:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    lists = {name: [int(v) for v in fields.pop(name)] for name in PER_LAYER_FIELDS}
    # Checked here too, so that callers get a plain ValueError rather than the strict-dataclass error.
    check_layer_widths(fields["num_hidden_layers"], **lists)
    per_layer = HywiaLlamaConfig(**fields, **lists)
    per_layer.architectures = [ARCHITECTURE]
    return per_layer


if _auto_models_loaded():
    register()
else:
    register_config()

__all__ = [
    "ARCHITECTURE",
    "HywiaLlamaConfig",
    "HywiaLlamaForCausalLM",
    "HywiaLlamaModel",
    "LayerConfigView",
    "per_layer_config",
    "register",
]
