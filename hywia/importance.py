"""Importance criteria: small interchangeable functions behind one signature.

Each criterion maps (statistics, context) to one score per unit, per layer and type; the planner
never knows which one ran. Only `hybrid` trains anything (the fusion); the rest are closed forms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hywia.fusion import FusionConfig, blend, fixed_alpha, normalise, train_fusion
from hywia.plan import KeepCounts
from hywia.scores import LayerScores, UnitStatistics, magnitude_scores
from hywia.units import UNIT_KINDS

METHODS = ("hybrid", "fine", "coarse", "fixed", "llm-pruner", "magnitude", "random")
GRADIENT_FREE = ("magnitude", "random")


@dataclass
class ImportanceContext:
    model: object
    batch: torch.Tensor  # calibration token ids [N, L]
    keep: list[KeepCounts]
    seed: int = 0
    normalize: str = "rank"
    fusion: FusionConfig = field(default_factory=FusionConfig)
    progress: bool = True


@dataclass
class Importance:
    scores: LayerScores
    alpha: list[dict[str, list[float]]] | None = None  # per layer, per type: [α_fine, α_coarse]
    details: dict = field(default_factory=dict)


def _normalised(scores: LayerScores, how: str) -> LayerScores:
    return [{k: normalise(layer[k], how) for k in UNIT_KINDS} for layer in scores]


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
    scores = blend(_normalised(stats.fine, ctx.normalize), _normalised(stats.coarse, ctx.normalize), alpha)
    return Importance(scores, _alpha_lists(alpha), {"normalize": ctx.normalize})


def hybrid(stats: UnitStatistics, ctx: ImportanceContext) -> Importance:
    """The learned attention blend of fine and coarse, trained end-to-end on calibration data."""
    result = train_fusion(ctx.model, _normalised(stats.fine, ctx.normalize), _normalised(stats.coarse, ctx.normalize),
                          ctx.keep, ctx.batch, ctx.fusion, ctx.seed, ctx.progress)
    details = dict(result.diagnostics, selected=result.selected, normalize=ctx.normalize,
                   learned_alpha=_alpha_lists(result.learned_alpha))
    return Importance(result.scores, _alpha_lists(result.alpha), details)


CRITERIA = {
    "hybrid": hybrid, "fine": fine, "coarse": coarse, "fixed": fixed,
    "llm-pruner": llm_pruner, "magnitude": magnitude, "random": random_scores,
}
