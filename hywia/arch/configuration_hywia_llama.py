"""Config of a LLaMA whose decoder layers have their own widths (`model_type` "hywia_llama").

A per-layer pruned model keeps different numbers of KV groups and MLP channels in different layers.
The stock `LlamaConfig` has one width for all layers, so this config adds three lists, one entry
per decoder layer; entry i is what the same-named `LlamaConfig` field means for layer i alone:

* `layer_num_attention_heads[i]`: query heads of layer i (rows of q_proj / columns of o_proj are
  this times `head_dim`),
* `layer_num_key_value_heads[i]`: KV heads of layer i (rows of k_proj and v_proj; the KV cache of
  layer i holds this many heads),
* `layer_intermediate_size[i]`: MLP channels of layer i (rows of gate_proj/up_proj, columns of
  down_proj).

Everything else (hidden size, `head_dim`, vocabulary, norms, RoPE) is shared by all layers. The
whole-model fields `num_attention_heads`, `num_key_value_heads` and `intermediate_size` are kept
equal to the widest layer, so code that only reads whole-model values (buffer sizing, vLLM's
start-up checks) sizes for the largest layer rather than for a layer that does not exist.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlamaConfig

# The per-layer list fields, each paired with the whole-model LlamaConfig field it refines.
PER_LAYER_FIELDS = {
    "layer_num_attention_heads": "num_attention_heads",
    "layer_num_key_value_heads": "num_key_value_heads",
    "layer_intermediate_size": "intermediate_size",
}


def check_layer_widths(n_layers: int, layer_num_attention_heads: list[int], layer_num_key_value_heads: list[int],
                       layer_intermediate_size: list[int]) -> None:
    """Raise ValueError unless the three lists describe N_LAYERS buildable layers."""
    lists = dict(zip(PER_LAYER_FIELDS, (layer_num_attention_heads, layer_num_key_value_heads,
                                        layer_intermediate_size)))
    for name, values in lists.items():
        if len(values) != n_layers:
            raise ValueError(f"{name} has {len(values)} entries for {n_layers} layers")
        if any(v < 1 for v in values):
            # vLLM cannot build an attention or MLP block of width 0; a plan keeps >= 1 unit.
            raise ValueError(f"{name} must be at least 1 in every layer, got {values}")
    for layer, (heads, kv_heads) in enumerate(zip(layer_num_attention_heads, layer_num_key_value_heads)):
        if heads % kv_heads:
            raise ValueError(f"layer {layer}: {heads} query heads is not a multiple of {kv_heads} KV heads")


@strict
class HywiaLlamaConfig(LlamaConfig):
    model_type = "hywia_llama"

    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None

    def __post_init__(self, **kwargs):
        explicit_head_dim = self.head_dim is not None
        for list_field, whole_field in PER_LAYER_FIELDS.items():
            values = getattr(self, list_field)
            if values is None:
                # No list given: a uniform model, every layer as wide as the whole-model field says
                # (num_key_value_heads may still be None here; it defaults to the query heads).
                whole = getattr(self, whole_field)
                if whole is None and whole_field == "num_key_value_heads":
                    whole = self.num_attention_heads
                values = [whole] * self.num_hidden_layers
            values = [int(v) for v in values]
            setattr(self, list_field, values)
            if values:
                setattr(self, whole_field, max(values))
        if not explicit_head_dim and len(set(self.layer_num_attention_heads)) > 1:
            # LlamaConfig would derive head_dim as hidden_size // num_attention_heads, which is
            # only right for the unpruned width; a per-layer model must state it.
            raise ValueError("a HywiaLlamaConfig with per-layer head counts needs an explicit head_dim")
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation. Replaces LlamaConfig's `hidden_size % num_attention_heads`
        check, which is meaningless with an explicit head_dim (and fails for pruned head counts such
        as 31 of 32), by the checks that matter for per-layer shapes."""
        check_layer_widths(self.num_hidden_layers, **{f: getattr(self, f) for f in PER_LAYER_FIELDS})

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the same widths (the stock LlamaConfig describes it)."""
        return all(len(set(getattr(self, f))) == 1 for f in PER_LAYER_FIELDS)

    def layer_config(self, layer_idx: int) -> LayerConfigView:
        return LayerConfigView(
            self,
            num_attention_heads=self.layer_num_attention_heads[layer_idx],
            num_key_value_heads=self.layer_num_key_value_heads[layer_idx],
            intermediate_size=self.layer_intermediate_size[layer_idx],
        )


def register_config() -> None:
    """Let AutoConfig read `"model_type": "hywia_llama"`. Safe to call any number of times."""
    AutoConfig.register(HywiaLlamaConfig.model_type, HywiaLlamaConfig, exist_ok=True)


class LayerConfigView:
    """The config one decoder layer sees: the whole-model config with that layer's widths.

    It is a live view, not a copy, because both transformers and vLLM keep the config object
    inside the layer and read settings from it at run time (e.g. transformers reads
    `config._attn_implementation` on every forward, and `set_attn_implementation` changes it on
    the whole-model config after the layers exist).
    """

    def __init__(self, base, **widths: int):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_widths", widths)

    def __getattr__(self, name: str):
        widths = object.__getattribute__(self, "_widths")
        if name in widths:
            return widths[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value) -> None:
        # A layer view is read-only: a write would silently change every layer or none.
        raise AttributeError(f"a per-layer config view is read-only (tried to set {name})")

    def __repr__(self) -> str:
        return f"LayerConfigView({object.__getattribute__(self, '_widths')})"
