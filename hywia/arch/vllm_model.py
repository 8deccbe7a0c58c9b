"""`HywiaLlamaForCausalLM` for vLLM: vLLM's own Llama, each decoder layer built with its widths.

vLLM's `LlamaDecoderLayer` already accepts a `config` argument that overrides the model's
`hf_config`; we pass it the per-layer view of the `HywiaLlamaConfig`. Attention, the fused
QKV / gate-up projections, weight loading (q/k/v and gate/up stacking), RoPE and the KV cache
(one spec per attention layer, sized by that layer's KV heads) are vLLM's, unchanged.

Imported lazily by vLLM through the registry string in `vllm_plugin.register`, never at
`import hywia`, since importing vLLM model code is heavy and, on GPU builds, must not happen
before vLLM forks its workers.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index


class HywiaLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None,
                 attn_layer_type=LlamaAttention) -> None:
        config = config or vllm_config.model_config.hf_config
        # The prefix ("model.layers.7") is the only place vLLM tells a layer its index.
        layer_config = config.layer_config(extract_layer_index(prefix))
        super().__init__(vllm_config, prefix=prefix, config=layer_config, attn_layer_type=attn_layer_type)


class HywiaLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "",
                 layer_type: type = HywiaLlamaDecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
