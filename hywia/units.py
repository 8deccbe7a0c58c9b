"""Structural units of a LLaMA decoder layer, and the two operations every stage needs on them.

* attention unit = one KV group: KV head j, the G query heads that read it, and their slices of
  q/k/v (rows) and o_proj (columns). Removing whole groups keeps the GQA ratio G unchanged.
* MLP unit = one intermediate channel: a row of gate_proj and up_proj, a column of down_proj.

A unit's members are (module path, parameter, dimension); along that dimension the parameter is
laid out as n_units equal blocks, which is all that scoring (per-unit sums) and surgery (slicing)
need to know. `LayerShape` (units and what one owns) and `KeepCounts` (units kept) are the counts
every later stage speaks in, so they live here, in the earliest stage that has them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION, MLP = "attn", "mlp"
UNIT_KINDS = (ATTENTION, MLP)

# (module path inside a decoder layer, parameter name, dimension holding the units)
_MEMBERS = {
    ATTENTION: (
        ("self_attn.q_proj", "weight", 0), ("self_attn.q_proj", "bias", 0),
        ("self_attn.k_proj", "weight", 0), ("self_attn.k_proj", "bias", 0),
        ("self_attn.v_proj", "weight", 0), ("self_attn.v_proj", "bias", 0),
        ("self_attn.o_proj", "weight", 1),
    ),
    MLP: (
        ("mlp.gate_proj", "weight", 0), ("mlp.gate_proj", "bias", 0),
        ("mlp.up_proj", "weight", 0), ("mlp.up_proj", "bias", 0),
        ("mlp.down_proj", "weight", 1),
    ),
}


@dataclass(frozen=True)
class UnitMember:
    module: torch.nn.Linear
    param_name: str  # "weight" or "bias"
    dim: int

    @property
    def param(self) -> torch.nn.Parameter:
        return getattr(self.module, self.param_name)


def decoder_layers(model) -> list:
    return list(model.model.layers)


def unit_members(layer, kind: str) -> list[UnitMember]:
    """The parameters that make up `kind` units in `layer` (biases only where the model has them)."""
    members = []
    for path, param_name, dim in _MEMBERS[kind]:
        module = layer.get_submodule(path)
        if getattr(module, param_name, None) is not None:
            members.append(UnitMember(module, param_name, dim))
    return members


def unit_count(layer, kind: str) -> int:
    if kind == ATTENTION:
        attn = layer.self_attn
        return attn.k_proj.out_features // attn.head_dim
    return layer.mlp.down_proj.in_features


def per_unit_sum(values: torch.Tensor, dim: int, n_units: int) -> torch.Tensor:
    """Sum an element-wise tensor over each unit's block along `dim` → shape [n_units]."""
    blocks = values.movedim(dim, 0).reshape(n_units, -1)
    return blocks.sum(dim=1)


def unit_param_count(layer, kind: str) -> int:
    """Parameters one unit of `kind` owns in `layer` (what removing it saves)."""
    n_units = unit_count(layer, kind)
    return sum(m.param.numel() for m in unit_members(layer, kind)) // n_units


def count_parameters(model) -> int:
    """All parameters, tied embeddings counted once (`parameters()` yields a shared tensor once);
    the denominator of the pruning ratio. Works on the meta device too."""
    return sum(param.numel() for param in model.parameters())


@dataclass(frozen=True)
class LayerShape:
    """What pruning can take from one decoder layer: its units, and the parameters one unit owns."""

    kv_groups: int
    mlp_channels: int
    kv_group_params: int
    mlp_channel_params: int

    def count(self, kind: str) -> int:
        return self.kv_groups if kind == ATTENTION else self.mlp_channels

    def unit_params(self, kind: str) -> int:
        return self.kv_group_params if kind == ATTENTION else self.mlp_channel_params

    @property
    def prunable_params(self) -> int:
        return self.kv_groups * self.kv_group_params + self.mlp_channels * self.mlp_channel_params

    def removed_params(self, counts: KeepCounts) -> int:
        return ((self.kv_groups - counts.kv_groups) * self.kv_group_params
                + (self.mlp_channels - counts.mlp_channels) * self.mlp_channel_params)

    @property
    def whole(self) -> KeepCounts:
        return KeepCounts(self.kv_groups, self.mlp_channels)


@dataclass(frozen=True)
class KeepCounts:
    """How many units of each kind one layer keeps (hywia.budget decides them)."""

    kv_groups: int
    mlp_channels: int

    def of(self, kind: str) -> int:
        return self.kv_groups if kind == ATTENTION else self.mlp_channels


def layer_shapes(model) -> list[LayerShape]:
    return [LayerShape(unit_count(layer, ATTENTION), unit_count(layer, MLP),
                       unit_param_count(layer, ATTENTION), unit_param_count(layer, MLP))
            for layer in decoder_layers(model)]
