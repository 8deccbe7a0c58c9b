"""Keep counts: how many KV groups and MLP channels every layer keeps at a pruning ratio.

`ratio` is the fraction of the whole model's parameters removed (LLM-Pruner's convention). One
function, `allocator(budget, comparable)`, chooses how the removal is shared, and `keep_counts` asks
it for one ratio:
* even (the uniform layout, or with `protected` layers kept whole): attention and MLP lose about
  the same fraction in every unprotected layer (`even_keep_counts`);
* global (given `comparable` scores, one per unit, comparable across layers and unit kinds): a
  greedy knapsack removes first the units whose estimated loss per removed parameter is smallest,
  until the ratio is reached, never taking a layer below `min_keep` of its units of either kind,
  in steps that keep the counts aligned (`GlobalAllocation`).
No criterion is named here: each criterion makes its own comparable scores (hywia.importance).
Everything is arithmetic on `LayerShape`s, so hywia.memory_fit can ask for any ratio without weights.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from hywia.errors import HywiaError
from hywia.finite import check_finite
from hywia.scores import LayerScores
from hywia.units import ATTENTION, MLP, KeepCounts, LayerShape, count_parameters, layer_shapes

MAX_RATIO = 0.9
_KIND_ORDER = {ATTENTION: 0, MLP: 1}

Allocator = Callable[[float], list[KeepCounts]]


@dataclass(frozen=True)
class Budget:
    """What any allocation needs besides the ratio: the layers, and what they must keep."""

    shapes: tuple[LayerShape, ...]
    total_params: int  # the whole model's, embeddings included: the ratio's denominator
    protected: tuple[int, ...] = ()  # layers kept whole
    align_heads: int = 1  # kept KV groups per layer are a multiple of this
    align_mlp: int = 1
    min_keep: float = 0.1  # global allocation: the fraction of each layer's units of each kind kept

    @property
    def whole(self) -> list[KeepCounts]:
        return [shape.whole for shape in self.shapes]


def allocator(budget: Budget, comparable: LayerScores | None = None) -> Allocator:
    """ratio → keep counts per layer; ratio 0 keeps everything. Even shares without COMPARABLE scores,
    global allocation with them. Raises HywiaError (from the call) past the largest ratio it can make."""
    if comparable is None:
        def share(ratio: float) -> list[KeepCounts]:
            return even_share(budget, ratio)
    else:
        share = GlobalAllocation(comparable, budget).keep_counts
    return lambda ratio: budget.whole if ratio == 0 else share(ratio)


def keep_counts(budget: Budget, ratio: float, comparable: LayerScores | None = None) -> list[KeepCounts]:
    return allocator(budget, comparable)(ratio)


def validate_ratio(ratio: float) -> None:
    if not (0.0 < ratio <= MAX_RATIO) or math.isnan(ratio):
        raise HywiaError(f"--ratio {ratio} is outside (0, {MAX_RATIO}]",
                         "give the fraction of the model's parameters to remove, e.g. --ratio 0.2")


# ---- even shares -----------------------------------------------------------------------------------

def even_keep_counts(shape: LayerShape, n_layers: int, to_remove: float, align_heads: int = 1,
                     align_mlp: int = 1) -> KeepCounts | None:
    """The keep counts that N_LAYERS layers of SHAPE all take so that together they lose about
    TO_REMOVE parameters; None when that would empty a layer.

    Attention and MLP lose about the same fraction (LLM-Pruner's recipe): the KV-group count nearest
    that fraction is taken (on ties the larger), and the MLP count absorbs its rounding, since MLP
    channels are fine-grained and KV groups coarse. Kept counts are multiples of the alignments.
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


def even_share(budget: Budget, ratio: float) -> list[KeepCounts]:
    """Per-layer keep counts that remove RATIO of the total: protected layers stay whole, the others
    share the removal evenly (`even_keep_counts`). With nothing protected this is the uniform
    layout. Raises HywiaError when the pruned layers differ in width or would be emptied."""
    protected = set(budget.protected)
    align_heads, align_mlp = budget.align_heads, budget.align_mlp
    pruned = [shape for i, shape in enumerate(budget.shapes) if i not in protected]
    if not pruned:
        raise HywiaError("every layer is protected, so nothing can be pruned", "protect fewer layers")
    if len(set(pruned)) != 1:
        raise HywiaError("the model's layers differ in width, so an even share of the removal does not apply",
                         "use --layout per-layer --allocation global")
    shape = pruned[0]
    _check_alignment(shape.kv_groups, align_heads, "--align-heads", "KV groups")
    _check_alignment(shape.mlp_channels, align_mlp, "--align-mlp", "MLP channels")
    counts = even_keep_counts(shape, len(pruned), ratio * budget.total_params, align_heads, align_mlp)
    if counts is None:
        max_ratio = most_even_removal(shape, len(pruned), align_heads, align_mlp) / budget.total_params
        where = (f"{len(pruned)} unprotected layers" if protected else "a uniform layout")
        raise HywiaError(
            f"--ratio {ratio} would remove every unit of a layer: with at least {align_heads} KV group(s) and "
            f"{align_mlp} MLP channel(s) kept per layer the most {where} can remove is {max_ratio:.3f}",
            f"use --ratio {math.floor(max_ratio * 100) / 100:.2f} or less"
            + (", or protect fewer layers" if protected else ""),
        )
    return [shape.whole if i in protected else counts for i, shape in enumerate(budget.shapes)]


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


# ---- global allocation ----------------------------------------------------------------------------

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

    def __init__(self, scores: LayerScores, budget: Budget):
        self.budget = budget
        protected = set(budget.protected)
        self.steps = []
        for i, (layer_scores, shape) in enumerate(zip(scores, budget.shapes)):
            if i not in protected:
                for kind, align in ((ATTENTION, budget.align_heads), (MLP, budget.align_mlp)):
                    self.steps += _layer_steps(i, kind, layer_scores[kind], shape, budget.min_keep, align)
        # Within a layer and kind, step scores never decrease (each step takes the lowest units left),
        # and the sort is stable, so a layer's steps stay in order in the global sequence.
        self.steps.sort(key=lambda s: (s.score, s.layer, _KIND_ORDER[s.kind]))

    @property
    def most_removable(self) -> int:
        return sum(step.params for step in self.steps)

    def keep_counts(self, ratio: float) -> list[KeepCounts]:
        """Walk the steps in order, taking each that does not overshoot the target by more than half
        the smallest step; a step that would is skipped, with the rest of its layer and kind."""
        to_remove = ratio * self.budget.total_params
        tolerance = min((s.params for s in self.steps), default=0) / 2
        if self.most_removable < to_remove - tolerance:
            most = self.most_removable / self.budget.total_params
            raise HywiaError(
                f"--ratio {ratio} cannot be reached while every pruned layer keeps at least "
                f"{self.budget.min_keep:g} of its KV groups and MLP channels: the most global allocation "
                f"removes is {most:.3f}",
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
                           shape.mlp_channels - removed_units[(i, MLP)]) for i, shape in enumerate(self.budget.shapes)]


def _layer_steps(layer: int, kind: str, scores: torch.Tensor, shape: LayerShape, min_keep: float,
                 align: int) -> list[RemovalStep]:
    n_units = shape.count(kind)
    check_finite(scores, "comparable (global allocation)", layer, kind)  # a NaN would sort anywhere
    values = scores.float().tolist()
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


def uniform_budget(shapes: Iterable[LayerShape], total_params: int, align_heads: int = 1,
                   align_mlp: int = 1) -> Budget:
    """The budget of the uniform layout: nothing protected, every layer shares alike."""
    return Budget(tuple(shapes), total_params, (), align_heads, align_mlp)


def uniform_keep_counts(model, ratio: float, align_heads: int = 1, align_mlp: int = 1) -> KeepCounts:
    """Keep counts, the same in every layer, that remove as close to `ratio` of all parameters as
    the unit granularity and alignment allow."""
    validate_ratio(ratio)
    shapes = layer_shapes(model)
    if len(set(shapes)) != 1:
        raise HywiaError("the model's layers differ in width, so a uniform layout does not apply",
                         "use --layout per-layer")
    return even_share(uniform_budget(shapes, count_parameters(model), align_heads, align_mlp), ratio)[0]
