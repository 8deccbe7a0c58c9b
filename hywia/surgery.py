"""Cutting: slice weights according to a plan, so the model computes exactly what the original
computes with the removed units zeroed. Also the zeroing itself (the reference for tests)."""

from __future__ import annotations

import torch

from hywia.plan import PruningPlan, pruned_config
from hywia.units import UNIT_KINDS, decoder_layers, unit_count, unit_members


def _block_indices(kept_units: list[int], block: int) -> torch.Tensor:
    """Element indices along a unit dimension for the kept units (each unit is `block` wide)."""
    units = torch.tensor(kept_units, dtype=torch.long)
    return (units[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


@torch.no_grad()
def slice_model(model, plan: PruningPlan):
    """Remove every unit the plan does not keep, in place; returns the model."""
    layers = decoder_layers(model)
    if len(layers) != len(plan.layers):
        raise ValueError(f"plan has {len(plan.layers)} layers, the model {len(layers)}")
    shaped = pruned_config(model.config.to_dict(), plan.keep_counts())
    for layer, layer_plan in zip(layers, plan.layers):
        for kind in UNIT_KINDS:
            n_units = unit_count(layer, kind)
            for member in unit_members(layer, kind):
                block = member.param.shape[member.dim] // n_units
                index = _block_indices(layer_plan.kept(kind), block).to(member.param.device)
                sliced = member.param.index_select(member.dim, index).clone()
                setattr(member.module, member.param_name, torch.nn.Parameter(sliced, requires_grad=False))
        _refresh_linear_shapes(layer)
    if plan.is_uniform:  # keep the in-memory config truthful (per-layer configs are written at export)
        for key in ("head_dim", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
            setattr(model.config, key, shaped[key])
    return model


@torch.no_grad()
def zero_removed_units(model, plan: PruningPlan):
    """The reference semantics of a plan: zero every weight of every removed unit, in place."""
    for layer, layer_plan in zip(decoder_layers(model), plan.layers):
        for kind in UNIT_KINDS:
            n_units = unit_count(layer, kind)
            removed = sorted(set(range(n_units)) - set(layer_plan.kept(kind)))
            if not removed:
                continue
            for member in unit_members(layer, kind):
                block = member.param.shape[member.dim] // n_units
                index = _block_indices(removed, block).to(member.param.device)
                member.param.index_fill_(member.dim, index, 0.0)
    return model


def _refresh_linear_shapes(layer) -> None:
    for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
        module.out_features, module.in_features = module.weight.shape
