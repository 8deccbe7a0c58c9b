"""The plan: which units every layer keeps. Plain data, serialisable, the hinge of the pipeline.

Everything before the plan decides (scores, importance, budget), everything after executes it
(surgery, export). `pruned_config` is the one place that says what a model's config becomes when its
layers keep given counts: memory_fit, surgery and export (and so the per-layer architecture) all use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from hywia.units import ATTENTION, MLP, KeepCounts, LayerShape

# HywiaLlama's per-layer lists (hywia.arch), one entry per decoder layer.
PER_LAYER_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


@dataclass
class LayerPlan:
    kept_kv_groups: list[int]
    kept_mlp_channels: list[int]

    def kept(self, kind: str) -> list[int]:
        return self.kept_kv_groups if kind == ATTENTION else self.kept_mlp_channels


@dataclass
class PruningPlan:
    layers: list[LayerPlan]

    @property
    def is_uniform(self) -> bool:
        shapes = {(len(p.kept_kv_groups), len(p.kept_mlp_channels)) for p in self.layers}
        return len(shapes) == 1

    def keep_counts(self) -> list[KeepCounts]:
        return [KeepCounts(len(p.kept_kv_groups), len(p.kept_mlp_channels)) for p in self.layers]

    def to_dict(self) -> dict:
        return {"layers": [asdict(p) for p in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        return cls(layers=[LayerPlan(**p) for p in data["layers"]])

    @classmethod
    def whole(cls, shapes: list[LayerShape]) -> PruningPlan:
        """The plan that keeps every unit (a target the unpruned model already meets)."""
        return cls(layers=[LayerPlan(list(range(s.kv_groups)), list(range(s.mlp_channels))) for s in shapes])


def top_units(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the `keep` highest scores, in ascending index order (ties go to the lower index,
    so the same scores always give the same plan)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


def build_plan(scores: list[dict[str, torch.Tensor]], keep: list[KeepCounts]) -> PruningPlan:
    """Per layer, keep the top-scoring units of each kind."""
    return PruningPlan(layers=[
        LayerPlan(kept_kv_groups=top_units(layer_scores[ATTENTION], counts.kv_groups),
                  kept_mlp_channels=top_units(layer_scores[MLP], counts.mlp_channels))
        for layer_scores, counts in zip(scores, keep)
    ])


# ---- the config after pruning ---------------------------------------------------------------------

def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def layer_widths(config: dict) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP channels) of every layer: HywiaLlama's per-layer lists where the
    config has them, else the whole-model values repeated."""
    n_layers = config["num_hidden_layers"]
    heads = config.get("layer_num_attention_heads") or [config["num_attention_heads"]] * n_layers
    kv_default = config.get("num_key_value_heads") or config["num_attention_heads"]
    kv_heads = config.get("layer_num_key_value_heads") or [kv_default] * n_layers
    channels = config.get("layer_intermediate_size") or [config["intermediate_size"]] * n_layers
    return list(zip(heads, kv_heads, channels))


def pruned_config(config: dict, keep: list[KeepCounts]) -> dict:
    """CONFIG (a config.json dict, uniform or per-layer) with layer i cut to keep[i]: the stock
    whole-model fields when every layer keeps the same, else HywiaLlama's per-layer lists with the
    whole-model fields at the widest layer. A KV group keeps its query heads, so the GQA ratio stays.
    head_dim is stated, since the pruned head count no longer implies it."""
    widths = layer_widths(config)
    group_sizes = [heads // kv_heads for heads, kv_heads, _ in widths]
    heads = [counts.kv_groups * group for counts, group in zip(keep, group_sizes)]
    kv_heads = [counts.kv_groups for counts in keep]
    channels = [counts.mlp_channels for counts in keep]
    shaped = {key: value for key, value in config.items() if key not in PER_LAYER_KEYS}
    shaped["head_dim"] = head_dim(config)
    if len(set(zip(heads, kv_heads, channels))) == 1:
        return {**shaped, "num_attention_heads": heads[0], "num_key_value_heads": kv_heads[0],
                "intermediate_size": channels[0]}
    return {**shaped, "num_attention_heads": max(heads), "num_key_value_heads": max(kv_heads),
            "intermediate_size": max(channels), **dict(zip(PER_LAYER_KEYS, (heads, kv_heads, channels)))}


def is_per_layer(config: dict) -> bool:
    return any(key in config for key in PER_LAYER_KEYS)
