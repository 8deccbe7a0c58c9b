"""`HywiaLlamaForCausalLM` for transformers: LLaMA with per-layer widths.

Built only from transformers' own Llama blocks; each decoder layer gets a view of the config with
its own widths (see `HywiaLlamaConfig.layer_config`). Module and weight names are exactly those of
`LlamaForCausalLM`, so a state dict sliced per layer from a Llama checkpoint loads directly, and
the forward pass, generation and caching are LlamaModel's, unchanged.
"""

from __future__ import annotations

from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from hywia.arch.configuration_hywia_llama import HywiaLlamaConfig


class HywiaLlamaModel(LlamaModel):
    config_class = HywiaLlamaConfig  # an attribute, since `from __future__` turns annotations into strings

    def __init__(self, config: HywiaLlamaConfig):
        # LlamaModel.__init__ builds every layer from the whole-model widths; this mirrors it with
        # per-layer views instead (skipping it, not calling it, avoids allocating full-width layers).
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config.layer_config(i), i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class HywiaLlamaForCausalLM(LlamaForCausalLM):
    config_class = HywiaLlamaConfig

    def __init__(self, config: HywiaLlamaConfig):
        # Same as LlamaForCausalLM.__init__ with the per-layer body.
        LlamaPreTrainedModel.__init__(self, config)
        self.model = HywiaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
