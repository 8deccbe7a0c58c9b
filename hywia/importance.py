"""Importance criteria: small interchangeable functions behind one signature.

Each criterion maps (statistics, context) to one score per unit, per layer and type; the planner
never knows which one ran. Only `hybrid` trains anything (the fusion); the rest are closed forms.

A criterion is one function here plus its `Criterion` registration in `CRITERIA`, which also says
what the rest of the pipeline needs to know about it: whether it reads calibration statistics,
whether its scores depend on the keep counts, and how its scores are made comparable across layers
and unit kinds for `--allocation global` (hywia.budget ranks those without knowing the criterion):

* `fine`, `coarse`, `llm-pruner` are raw magnitudes of a Taylor estimate of the loss change when
  the unit goes, in loss units in every layer; `magnitude` is Σ|w| over the unit. A KV group owns
  ~170× the parameters of an MLP channel (SmolLM2), so the raw score is divided by the unit's
  parameter count: the knapsack orders by importance per parameter saved.
* `fixed` and `hybrid` blend fine and coarse after normalising each *within its layer*, which makes
  every layer's scores look alike: ranked globally they would only reproduce the uniform layout.
  They are allocated by the per-parameter fine score instead, the loss estimate whose units are the
  same in every layer; the blend then picks the units within each layer. Measured on SmolLM2 at
  0.2108 (Gutenberg 32 × 128, reconstruction, no recovery, WikiText-2 400 windows, seed 0): a ½/½
  blend of fine and coarse each rank-normalised over all layers allocated worse (hybrid 141.1,
  fixed 146.1) than fine's own scale (hybrid 117.0, fixed 124.7); coarse's own scale allocates badly
  (coarse 288.2 vs fine 117.1), so it has no say in how much each layer keeps.
* `random` scores are already indifferent to the unit, so they are used as they are.

`hybrid`'s own scores need the keep counts (the fusion's soft masks are set at them), so under global
allocation its counts come from the fine scores above and the fusion then trains at them: the
counts the learned blend would give in turn depend on the trained scores, so fixing them first keeps
training a single, well-defined run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hywia.finite import require_finite
from hywia.fusion import FusionConfig, blend, fixed_alpha, train_fusion
from hywia.scores import (
    LayerScores,
    UnitStatistics,
    magnitude_scores,
    normalise_within_layers,
)
from hywia.units import UNIT_KINDS, KeepCounts, LayerShape


@dataclass
class ImportanceContext:
    model: object
    batch: torch.Tensor | None  # calibration token ids [N, L]; None for criteria without statistics
    keep: list[KeepCounts] | None  # read only by criteria registered with needs_keep
    seed: int = 0
    normalize: str = "rank"
    fusion: FusionConfig = field(default_factory=FusionConfig)
    progress: bool = True


@dataclass
class Importance:
    scores: LayerScores
    alpha: list[dict[str, list[float]]] | None = None  # per layer, per type: [α_fine, α_coarse]
    details: dict = field(default_factory=dict)


def _alpha_lists(alpha) -> list[dict[str, list[float]]]:
    return [{k: [round(float(v), 6) for v in layer[k]] for k in UNIT_KINDS} for layer in alpha]


def fine(stats: UnitStatistics, ctx: ImportanceContext) -> Importance:
    return Importance(stats.fine)


def coarse(stats: UnitStatistics, ctx: ImportanceContext) -> Importance:
    return Importance(stats.coarse)


def llm_pruner(stats: UnitStatistics, ctx: ImportanceContext) -> Importance:
    """LLM-Pruner's element-wise first-order Taylor, summed over the group."""
    return Importance(stats.fine_first_order)


def magnitude(stats: UnitStatistics | None, ctx: ImportanceContext) -> Importance:
    return Importance(magnitude_scores(ctx.model))


def random_scores(stats: UnitStatistics | None, ctx: ImportanceContext) -> Importance:
    generator = torch.Generator().manual_seed(ctx.seed)
    template = magnitude_scores(ctx.model)
    return Importance([{k: torch.rand(layer[k].numel(), generator=generator) for k in UNIT_KINDS}
                       for layer in template])


def fixed(stats: UnitStatistics, ctx: ImportanceContext) -> Importance:
    """α = ½ for both granularities in every layer (the untrained blend)."""
    alpha = fixed_alpha(len(stats.fine))
    scores = blend(normalise_within_layers(stats.fine, ctx.normalize),
                   normalise_within_layers(stats.coarse, ctx.normalize), alpha)
    return Importance(scores, _alpha_lists(alpha), {"normalize": ctx.normalize})


def hybrid(stats: UnitStatistics, ctx: ImportanceContext) -> Importance:
    """The learned attention blend of fine and coarse, trained end-to-end on calibration data."""
    result = train_fusion(ctx.model, stats.fine, stats.coarse, ctx.keep, ctx.batch, ctx.fusion, ctx.seed,
                          ctx.progress, normalize=ctx.normalize)
    details = dict(result.diagnostics, selected=result.selected, normalize=ctx.normalize,
                   learned_alpha=_alpha_lists(result.learned_alpha))
    return Importance(result.scores, _alpha_lists(result.alpha), details)


# ---- scores comparable across layers and unit kinds (for --allocation global) ----------------------

def per_parameter(scores: LayerScores, shapes: list[LayerShape]) -> LayerScores:
    return [{k: layer[k].float() / shape.unit_params(k) for k in UNIT_KINDS} for layer, shape in zip(scores, shapes)]


def own_per_parameter(stats, own: LayerScores, shapes: list[LayerShape], normalize: str) -> LayerScores:
    """A per-unit total (a loss estimate or Σ|w|) divided by the parameters the unit owns."""
    return per_parameter(own, shapes)


def own_as_drawn(stats, own: LayerScores, shapes: list[LayerShape], normalize: str) -> LayerScores:
    return own


def fine_per_parameter(stats: UnitStatistics, own, shapes: list[LayerShape], normalize: str) -> LayerScores:
    """A blend's allocation: the fine loss estimate per parameter (its own scores are per-layer ranks)."""
    return per_parameter(stats.fine, shapes)


_PER_PARAMETER = "raw {name} score divided by the unit's parameter count"
_BY_FINE = "raw fine score divided by the unit's parameter count (the blend then chooses within each layer)"


@dataclass(frozen=True)
class Criterion:
    """A criterion and what the pipeline must know about it."""

    score: Callable[[UnitStatistics | None, ImportanceContext], Importance]
    # (statistics, the criterion's own scores or None when needs_keep, shapes, normalisation) → scores
    # that rank units across layers and kinds; `ranking` says how, for the report ({name}, {normalize} filled in).
    comparable: Callable[[UnitStatistics | None, LayerScores | None, list[LayerShape], str], LayerScores]
    ranking: str
    needs_statistics: bool = True
    needs_keep: bool = False  # its scores depend on the keep counts, so they are computed after them

    def __post_init__(self) -> None:
        # Every criterion's scores pass one finiteness check, whoever wrote it: a NaN stops the prune.
        score = self.score

        def checked(stats: UnitStatistics | None, ctx: ImportanceContext) -> Importance:
            importance = score(stats, ctx)
            require_finite(importance.scores, f"{score.__name__.replace('_', '-')} importance")
            return importance

        object.__setattr__(self, "score", checked)


CRITERIA = {
    "hybrid": Criterion(hybrid, fine_per_parameter,
                        _BY_FINE + " (the fusion then trains with these counts)", needs_keep=True),
    "fine": Criterion(fine, own_per_parameter, _PER_PARAMETER),
    "coarse": Criterion(coarse, own_per_parameter, _PER_PARAMETER),
    "fixed": Criterion(fixed, fine_per_parameter, _BY_FINE),
    "llm-pruner": Criterion(llm_pruner, own_per_parameter, _PER_PARAMETER),
    "magnitude": Criterion(magnitude, own_per_parameter, _PER_PARAMETER, needs_statistics=False),
    "random": Criterion(random_scores, own_as_drawn, "the random scores as drawn", needs_statistics=False),
}
