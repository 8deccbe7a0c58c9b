"""The plan: which units every layer keeps. Plain data, serialisable, the hinge of the pipeline.

Everything before the plan decides (scores, fusion), everything after executes it (surgery,
export). `ratio` is the fraction of the whole model's parameters removed (LLM-Pruner's convention).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
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

    @classmethod
    def whole(cls, shapes: list[LayerShape]) -> PruningPlan:
        """The plan that keeps every unit (a target the unpruned model already meets)."""
        return cls(layers=[LayerPlan(list(range(s.kv_groups)), list(range(s.mlp_channels))) for s in shapes])


@dataclass(frozen=True)
class KeepCounts:
    """How many units of each kind every layer keeps (a uniform layout: one pair for all layers)."""

    kv_groups: int
    mlp_channels: int


def validate_ratio(ratio: float) -> None:
    if not (0.0 < ratio <= MAX_RATIO) or math.isnan(ratio):
        raise HywiaError(f"--ratio {ratio} is outside (0, {MAX_RATIO}]",
                         "give the fraction of the model's parameters to remove, e.g. --ratio 0.2")


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


def layer_shapes(model) -> list[LayerShape]:
    return [LayerShape(unit_count(layer, ATTENTION), unit_count(layer, MLP),
                       unit_param_count(layer, ATTENTION), unit_param_count(layer, MLP))
            for layer in decoder_layers(model)]


def even_keep_counts(shape: LayerShape, n_layers: int, to_remove: float, align_heads: int = 1,
                     align_mlp: int = 1) -> KeepCounts | None:
    """The keep counts that N_LAYERS layers of SHAPE all take so that together they lose about
    TO_REMOVE parameters; None when that would empty a layer.

    Attention and MLP lose about the same fraction (LLM-Pruner's recipe): the KV-group count nearest
    that fraction is taken (on ties the larger), and the MLP count absorbs its rounding, since MLP
    channels are fine-grained and KV groups coarse. Kept counts are multiples of the alignments.
    Pure arithmetic: the uniform layout, the protected-layers layout and memory_fit's config
    arithmetic all call this one rule, so the ratio memory_fit chooses is the ratio pruning applies.
    """
    if n_layers < 1:
        return None
    n_kv, n_mlp = shape.kv_groups, shape.mlp_channels
    attn_cost, mlp_cost = shape.kv_group_params, shape.mlp_channel_params
    layer_fraction = to_remove / (n_layers * shape.prunable_params)
    target_kv = n_kv * (1 - layer_fraction)
    for kv_keep in sorted(range(align_heads, n_kv + 1, align_heads), key=lambda k: (abs(k - target_kv), -k)):
        left = to_remove - n_layers * (n_kv - kv_keep) * attn_cost
        mlp_keep = n_mlp - round(left / (n_layers * mlp_cost))
        mlp_keep = int(round(mlp_keep / align_mlp) * align_mlp)
        if align_mlp <= mlp_keep <= n_mlp:
            return KeepCounts(kv_keep, mlp_keep)
    return None


def most_even_removal(shape: LayerShape, n_layers: int, align_heads: int = 1, align_mlp: int = 1) -> int:
    """Parameters removed when N_LAYERS layers of SHAPE keep only one aligned unit of each kind."""
    return n_layers * ((shape.kv_groups - align_heads) * shape.kv_group_params
                       + (shape.mlp_channels - align_mlp) * shape.mlp_channel_params)


def layer_keep_counts(shapes: list[LayerShape], total_params: int, ratio: float, protected: Iterable[int] = (),
                      align_heads: int = 1, align_mlp: int = 1) -> list[KeepCounts]:
    """Per-layer keep counts that remove RATIO of TOTAL_PARAMS: PROTECTED layers stay whole, the
    others share the removal evenly (`even_keep_counts`). With nothing protected this is the
    uniform layout. Raises HywiaError when the pruned layers differ in width or would be emptied."""
    protected = set(protected)
    pruned = [shape for i, shape in enumerate(shapes) if i not in protected]
    if not pruned:
        raise HywiaError("every layer is protected, so nothing can be pruned", "protect fewer layers")
    if len(set(pruned)) != 1:
        raise HywiaError("the model's layers differ in width, so an even share of the removal does not apply",
                         "use --layout per-layer --allocation global")
    shape = pruned[0]
    _check_alignment(shape.kv_groups, align_heads, "--align-heads", "KV groups")
    _check_alignment(shape.mlp_channels, align_mlp, "--align-mlp", "MLP channels")
    counts = even_keep_counts(shape, len(pruned), ratio * total_params, align_heads, align_mlp)
    if counts is None:
        max_ratio = most_even_removal(shape, len(pruned), align_heads, align_mlp) / total_params
        where = (f"{len(pruned)} unprotected layers" if protected else "a uniform layout")
        raise HywiaError(
            f"--ratio {ratio} would remove every unit of a layer: with at least {align_heads} KV group(s) and "
            f"{align_mlp} MLP channel(s) kept per layer the most {where} can remove is {max_ratio:.3f}",
            f"use --ratio {math.floor(max_ratio * 100) / 100:.2f} or less"
            + (", or protect fewer layers" if protected else ""),
        )
    return [shape.whole if i in protected else counts for i, shape in enumerate(shapes)]


def uniform_keep_counts(model, ratio: float, align_heads: int = 1, align_mlp: int = 1) -> KeepCounts:
    """Keep counts, the same in every layer, that remove as close to `ratio` of all parameters as
    the unit granularity and alignment allow."""
    validate_ratio(ratio)
    shapes = layer_shapes(model)
    if len(set(shapes)) != 1:
        raise HywiaError("the model's layers differ in width, so a uniform layout does not apply",
                         "use --layout per-layer")
    return layer_keep_counts(shapes, count_parameters(model), ratio, (), align_heads, align_mlp)[0]


def _check_alignment(n_units: int, align: int, flag: str, what: str) -> None:
    if align < 1 or align > n_units:
        raise HywiaError(f"{flag} {align} cannot be met: each layer has {n_units} {what}",
                         f"choose {flag} between 1 and {n_units}")


# ---- --protect-layers first:K,last:M --------------------------------------------------------------

_PROTECT_PART = re.compile(r"(first|last):(\d+)")


def parse_protected_layers(spec: str) -> tuple[int, int]:
    """'first:4,last:2' → (4, 2); either part may be left out. Raises HywiaError on anything else."""
    found: dict[str, int] = {}
    for part in spec.split(","):
        match = _PROTECT_PART.fullmatch(part.strip())
        if not match or match.group(1) in found:
            raise HywiaError(f"cannot read --protect-layers {spec!r}",
                             "write first:K,last:M (e.g. first:4,last:2, LLM-Pruner's recipe), or one of the two")
        found[match.group(1)] = int(match.group(2))
    if not any(found.values()):
        raise HywiaError(f"--protect-layers {spec!r} protects no layer", "protect at least one, e.g. first:4,last:2")
    return found.get("first", 0), found.get("last", 0)


def protected_layers(spec: str | None, n_layers: int) -> list[int]:
    """Indices of the layers SPEC protects in a model of N_LAYERS layers."""
    if not spec:
        return []
    first, last = parse_protected_layers(spec)
    if first + last >= n_layers:
        raise HywiaError(f"--protect-layers {spec} protects all {n_layers} layers of this model, leaving none to prune",
                         f"protect at most {n_layers - 1} layers in all")
    return sorted(set(range(first)) | set(range(n_layers - last, n_layers)))


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
