"""The plan: which units every layer keeps. Plain data, serialisable, the hinge of the pipeline.

Everything before the plan decides (scores, fusion), everything after executes it (surgery,
export). `ratio` is the fraction of the whole model's parameters removed (LLM-Pruner's convention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from hywia.errors import HywiaError
from hywia.units import ATTENTION, MLP, count_parameters, decoder_layers, unit_count, unit_param_count

MAX_RATIO = 0.9


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

    def to_dict(self) -> dict:
        return {"layers": [asdict(p) for p in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        return cls(layers=[LayerPlan(**p) for p in data["layers"]])


@dataclass(frozen=True)
class KeepCounts:
    """How many units of each kind every layer keeps (a uniform layout: one pair for all layers)."""

    kv_groups: int
    mlp_channels: int


def validate_ratio(ratio: float) -> None:
    if not (0.0 < ratio <= MAX_RATIO) or math.isnan(ratio):
        raise HywiaError(f"--ratio {ratio} is outside (0, {MAX_RATIO}]",
                         "give the fraction of the model's parameters to remove, e.g. --ratio 0.2")


def uniform_keep_counts(model, ratio: float, align_heads: int = 1, align_mlp: int = 1) -> KeepCounts:
    """Keep counts, the same in every layer, that remove as close to `ratio` of all parameters as
    the unit granularity and alignment allow. Attention and MLP lose about the same fraction
    (LLM-Pruner's recipe); the MLP count absorbs the rounding of the coarse attention units."""
    validate_ratio(ratio)
    layers = decoder_layers(model)
    first = layers[0]
    n_kv, n_mlp = unit_count(first, ATTENTION), unit_count(first, MLP)
    if any((unit_count(layer, ATTENTION), unit_count(layer, MLP)) != (n_kv, n_mlp) for layer in layers):
        raise HywiaError("the model's layers differ in width, so a uniform layout does not apply",
                         "use --layout per-layer")
    _check_alignment(n_kv, align_heads, "--align-heads", "KV groups")
    _check_alignment(n_mlp, align_mlp, "--align-mlp", "MLP channels")
    attn_cost, mlp_cost = unit_param_count(first, ATTENTION), unit_param_count(first, MLP)
    n_layers = len(layers)
    to_remove = ratio * count_parameters(model)
    prunable_per_layer = n_kv * attn_cost + n_mlp * mlp_cost
    layer_fraction = to_remove / (n_layers * prunable_per_layer)

    best = None
    target_kv = n_kv * (1 - layer_fraction)
    for kv_keep in sorted(range(align_heads, n_kv + 1, align_heads), key=lambda k: (abs(k - target_kv), -k)):
        left = to_remove - n_layers * (n_kv - kv_keep) * attn_cost
        mlp_keep = n_mlp - round(left / (n_layers * mlp_cost))
        mlp_keep = int(round(mlp_keep / align_mlp) * align_mlp)
        if align_mlp <= mlp_keep <= n_mlp:
            best = KeepCounts(kv_keep, mlp_keep)
            break
    if best is None:
        max_ratio = n_layers * ((n_kv - align_heads) * attn_cost + (n_mlp - align_mlp) * mlp_cost) / count_parameters(model)
        raise HywiaError(
            f"--ratio {ratio} would remove every unit of a layer: with at least {align_heads} KV group(s) and "
            f"{align_mlp} MLP channel(s) kept per layer the most a uniform layout removes is {max_ratio:.3f}",
            f"use --ratio {math.floor(max_ratio * 100) / 100:.2f} or less",
        )
    return best


def _check_alignment(n_units: int, align: int, flag: str, what: str) -> None:
    if align < 1 or align > n_units:
        raise HywiaError(f"{flag} {align} cannot be met: each layer has {n_units} {what}",
                         f"choose {flag} between 1 and {n_units}")


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
