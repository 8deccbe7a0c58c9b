"""The per-layer LLaMA architecture that non-uniform pruned exports use.

Importing this package registers `HywiaLlamaConfig` / `HywiaLlamaForCausalLM` with transformers'
Auto classes, so `AutoModelForCausalLM.from_pretrained(export_dir)` works with no
`trust_remote_code` and no code inside the checkpoint. vLLM gets the same architecture through the
`vllm.general_plugins` entry point (`hywia.arch.vllm_plugin:register`).
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, LlamaConfig

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
    register_config()
    AutoModelForCausalLM.register(HywiaLlamaConfig, HywiaLlamaForCausalLM, exist_ok=True)


def per_layer_config(base_config: LlamaConfig | dict, attention_heads: list[int], kv_heads: list[int],
                     intermediate_sizes: list[int]) -> HywiaLlamaConfig:
    """The config of BASE_CONFIG's model with layer i cut to attention_heads[i] query heads,
    kv_heads[i] KV heads and intermediate_sizes[i] MLP channels.

    Everything else (hidden size, head_dim, vocabulary, RoPE, token ids, dtype) is copied from the
    base. Uniform lists are valid too (the result then describes the same model as a LlamaConfig
    would). Raises ValueError for lists of the wrong length or impossible widths.
    """
    fields = dict(base_config if isinstance(base_config, dict) else base_config.to_dict())
    for key in _IDENTITY_KEYS:
        fields.pop(key, None)
    # head_dim must survive the change of head counts: derive it from the *base* widths if unset.
    if fields.get("head_dim") is None:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    lists = {name: [int(v) for v in values]
             for name, values in zip(PER_LAYER_FIELDS, (attention_heads, kv_heads, intermediate_sizes))}
    # Checked here too, so that callers get a plain ValueError rather than the strict-dataclass error.
    check_layer_widths(fields["num_hidden_layers"], **lists)
    config = HywiaLlamaConfig(**fields, **lists)
    config.architectures = [ARCHITECTURE]
    return config


register()

__all__ = [
    "ARCHITECTURE",
    "HywiaLlamaConfig",
    "HywiaLlamaForCausalLM",
    "HywiaLlamaModel",
    "LayerConfigView",
    "per_layer_config",
    "register",
]
