"""`--allocation global`: how many units every layer keeps, decided by ranking units across all layers.

The rule is a greedy knapsack: remove first the units whose estimated loss per removed parameter
is smallest, until `ratio` of the whole model's parameters are gone, never taking a layer below
`min_keep` of its units of either kind, and in steps that keep the counts aligned.

Ranking across layers needs scores that mean the same thing in every layer and for both unit
kinds, which the criteria's own scores do not all do:

* `fine`, `coarse`, `llm-pruner` are raw magnitudes of a Taylor estimate of the loss change when
  the unit goes, in loss units in every layer; `magnitude` is Σ|w| over the unit. A KV group owns
  ~170× the parameters of an MLP channel (SmolLM2), so the raw score is divided by the unit's
  parameter count: the knapsack orders by importance per parameter saved.
* `fixed` and `hybrid` blend fine and coarse after normalising each *within its layer* (rank in
  [0, 1] or divided by the layer's mean, hywia.importance). That makes every layer's scores look
  alike, so ranked globally they would only reproduce the uniform layout. Here the same
  normalisation (`--normalize`) is applied once over every unit of every layer instead, to the
  per-parameter fine and coarse scores, and the two are blended ½/½ (rank-averaging was the best
  fixed blend measured, HYWIA.md §4).
* `random` scores are already indifferent to the unit, so they are used as they are: every unit
  is then equally likely to go, whatever its kind.

This only sets the counts. Which units a layer keeps is still chosen by the criterion's own scores,
as in every layout. For `hybrid` the counts come from the fixed global blend above, then the fusion
is trained with those counts (its soft masks need the keep count of every layer before training;
the counts the learned blend would give in turn depend on the trained scores, so fixing them first
keeps training a single, well-defined run).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from hywia.errors import HywiaError
from hywia.fusion import normalise
from hywia.plan import KeepCounts, LayerShape
from hywia.units import ATTENTION, MLP, UNIT_KINDS

LayerScores = list[dict[str, torch.Tensor]]

# Criteria whose score sums over the unit's weights or estimates its whole loss change: divide by size.
PER_UNIT_TOTALS = ("fine", "coarse", "llm-pruner", "magnitude")
BLENDS = ("fixed", "hybrid")
_KIND_ORDER = {ATTENTION: 0, MLP: 1}


def comparable_scores(method: str, shapes: list[LayerShape], normalize: str, criterion_scores: LayerScores | None,
                      fine: LayerScores | None = None, coarse: LayerScores | None = None) -> LayerScores:
    """Scores of METHOD that can be ranked across layers and unit kinds (see the module doc).
    CRITERION_SCORES are the criterion's own; FINE and COARSE the raw granularities (blends only)."""
    if method in BLENDS:
        return blend_across_layers(per_parameter(fine, shapes), per_parameter(coarse, shapes), normalize)
    if method in PER_UNIT_TOTALS:
        return per_parameter(criterion_scores, shapes)
    if method == "random":
        return criterion_scores
    raise ValueError(f"no global ranking defined for the criterion {method!r}")


def describe(method: str, normalize: str) -> str:
    if method in BLENDS:
        return (f"per-parameter fine and coarse scores, each normalised ({normalize}) over all units of all layers, "
                "blended 1/2-1/2" + (" (the fusion then trains with these counts)" if method == "hybrid" else ""))
    if method in PER_UNIT_TOTALS:
        return f"raw {method} score divided by the unit's parameter count"
    return "the random scores as drawn"


def per_parameter(scores: LayerScores, shapes: list[LayerShape]) -> LayerScores:
    return [{k: layer[k].float() / shape.unit_params(k) for k in UNIT_KINDS} for layer, shape in zip(scores, shapes)]


def blend_across_layers(fine: LayerScores, coarse: LayerScores, normalize: str) -> LayerScores:
    fine_hat, coarse_hat = _normalise_across(fine, normalize), _normalise_across(coarse, normalize)
    return [{k: 0.5 * f[k] + 0.5 * c[k] for k in UNIT_KINDS} for f, c in zip(fine_hat, coarse_hat)]


def _normalise_across(scores: LayerScores, how: str) -> LayerScores:
    """hywia.fusion.normalise over the concatenation of every layer's and kind's scores."""
    flat = normalise(torch.cat([layer[k] for layer in scores for k in UNIT_KINDS]), how)
    pieces = iter(flat.split([layer[k].numel() for layer in scores for k in UNIT_KINDS]))
    return [{k: next(pieces) for k in UNIT_KINDS} for _ in scores]


def minimum_kept(n_units: int, min_keep: float, align: int) -> int:
    """The fewest units of one kind a layer keeps: MIN_KEEP of them, rounded up to the alignment,
    and at least one aligned block."""
    return min(n_units, max(align, math.ceil(min_keep * n_units / align) * align))


@dataclass(frozen=True)
class RemovalStep:
    """Removing the next `units` lowest-scored units of one kind from one layer."""

    score: float  # mean comparable score of those units: importance per parameter of the step
    layer: int
    kind: str
    units: int
    params: int


class GlobalAllocation:
    """All removal steps, ordered once; `keep_counts(ratio)` walks them for any ratio (cheap, so
    memory_fit can try one ratio after another)."""

    def __init__(self, scores: LayerScores, shapes: list[LayerShape], total_params: int, protected=(),
                 min_keep: float = 0.1, align_heads: int = 1, align_mlp: int = 1):
        self.shapes, self.total_params, self.min_keep = shapes, total_params, min_keep
        protected = set(protected)
        self.steps = []
        for i, (layer_scores, shape) in enumerate(zip(scores, shapes)):
            if i not in protected:
                for kind, align in ((ATTENTION, align_heads), (MLP, align_mlp)):
                    self.steps += _layer_steps(i, kind, layer_scores[kind], shape, min_keep, align)
        # Within a layer and kind, step scores never decrease (each step takes the lowest units left),
        # and the sort is stable, so a layer's steps stay in order in the global sequence.
        self.steps.sort(key=lambda s: (s.score, s.layer, _KIND_ORDER[s.kind]))

    @property
    def most_removable(self) -> int:
        return sum(step.params for step in self.steps)

    def keep_counts(self, ratio: float) -> list[KeepCounts]:
        """Walk the steps in order, taking each that does not overshoot the target by more than half
        the smallest step; a step that would is skipped, with the rest of its layer and kind."""
        to_remove = ratio * self.total_params
        tolerance = min((s.params for s in self.steps), default=0) / 2
        if self.most_removable < to_remove - tolerance:
            most = self.most_removable / self.total_params
            raise HywiaError(
                f"--ratio {ratio} cannot be reached while every pruned layer keeps at least "
                f"{self.min_keep:g} of its KV groups and MLP channels: the most global allocation removes is {most:.3f}",
                f"use --ratio {math.floor(most * 100) / 100:.2f} or less, or a smaller --min-keep")
        removed, removed_units, closed = 0, defaultdict(int), set()
        for step in self.steps:
            if removed >= to_remove - tolerance:
                break
            key = (step.layer, step.kind)
            if key in closed:
                continue
            if removed + step.params > to_remove + tolerance:
                closed.add(key)
                continue
            removed += step.params
            removed_units[key] += step.units
        return [KeepCounts(shape.kv_groups - removed_units[(i, ATTENTION)],
                           shape.mlp_channels - removed_units[(i, MLP)]) for i, shape in enumerate(self.shapes)]


def _layer_steps(layer: int, kind: str, scores: torch.Tensor, shape: LayerShape, min_keep: float,
                 align: int) -> list[RemovalStep]:
    n_units = shape.count(kind)
    values = torch.nan_to_num(scores.float(), nan=0.0).tolist()
    # Lowest first; on ties the higher index goes first, as hywia.plan.top_units keeps the lower one.
    order = sorted(range(n_units), key=lambda u: (values[u], -u))
    floor = minimum_kept(n_units, min_keep, align)
    steps, removed = [], 0
    kept = n_units - (n_units % align or align)  # the first aligned count below the whole layer
    while kept >= floor:
        block = order[removed:n_units - kept]
        steps.append(RemovalStep(sum(values[u] for u in block) / len(block), layer, kind, len(block),
                                 len(block) * shape.unit_params(kind)))
        removed, kept = n_units - kept, kept - align
    return steps
