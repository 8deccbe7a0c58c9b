"""The fusion's keys: what each granularity's RAW scores say about one (layer, unit type) (HYWIA.md §4).

The blend itself mixes normalised scores, but the keys must not be computed from them: under rank
normalisation both vectors are permutations of one grid, so every permutation-invariant statistic
is equal for fine and coarse, the key projection gets no gradient, and α can only follow depth.
The raw scores differ in everything that matters: how large they are, how unevenly they spread,
how much of a granularity's mass its own keep set holds, and how far it agrees with the other one.

Per granularity g (other granularity o, keep count k of that layer and type):
    log_scale      log mean(g)                          (layers compare after centring, below)
    log_spread     log(std(g) / mean(g))                (coefficient of variation: scale-free)
    concentration  1 − H(g / Σg) / log n                (0: mass spread evenly, 1: on one unit)
    kept_mass      Σ g over g's own top k / Σ g         (what g's choice keeps, in g's eyes)
    other_removed  Σ o over the units g removes / Σ o   (what g's choice costs, in the other's eyes)
    agreement      Spearman rank correlation of g and o (same for both: the per-granularity key
                                                        projections let it move α nonetheless)
Each feature is then standardised per (unit type, granularity) over the layers that lose units of that
type, so that a layer's key says how it differs from the other layers; layers that lose nothing of a
type get zero features there (their α changes nothing).
"""

from __future__ import annotations

import math

import torch

from hywia.scores import LayerScores, normalise
from hywia.units import UNIT_KINDS, KeepCounts

KEY_FEATURES = ("log_scale", "log_spread", "concentration", "kept_mass", "other_removed", "agreement")
_TINY = 1e-30  # raw scores are non-negative loss estimates; this keeps their logs finite at exact zeros
_FLAT = 1e-6  # a feature whose spread over the layers is below this carries no information


def raw_statistics(own: torch.Tensor, other: torch.Tensor, keep: int) -> torch.Tensor:
    """The KEY_FEATURES of one granularity's raw scores OWN (the other's: OTHER) when KEEP units stay."""
    own, other = own.double().clamp_min(0), other.double().clamp_min(0)
    n = own.numel()
    mean = own.mean()
    log_scale = (mean + _TINY).log()
    if n < 2:
        zero = own.new_zeros(())
        return torch.stack([log_scale, zero, zero, own.new_ones(()), zero, own.new_ones(())]).float()
    log_spread = (own.std() / (mean + _TINY) + _TINY).log().clamp(-10.0, 10.0)
    p = (own + _TINY) / (own + _TINY).sum()
    concentration = 1 - (-(p * p.log()).sum() / math.log(n))
    kept = own.argsort(descending=True, stable=True)[:keep]
    removed = torch.ones(n, dtype=torch.bool)
    removed[kept] = False
    kept_mass = own[kept].sum() / (own.sum() + _TINY)
    other_removed = other[removed].sum() / (other.sum() + _TINY)
    return torch.stack([log_scale, log_spread, concentration, kept_mass, other_removed,
                        spearman(own, other)]).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = normalise(a, "rank").double(), normalise(b, "rank").double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12)


def key_features(fine: LayerScores, coarse: LayerScores,
                 keep: list[KeepCounts]) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """(standardised features, raw features): per layer and unit type a [2, len(KEY_FEATURES)] tensor,
    row 0 fine, row 1 coarse. FINE and COARSE are the raw (unnormalised) scores."""
    raw = [{kind: torch.stack([raw_statistics(fine[i][kind], coarse[i][kind], keep[i].of(kind)),
                               raw_statistics(coarse[i][kind], fine[i][kind], keep[i].of(kind))])
            for kind in UNIT_KINDS} for i in range(len(fine))]
    standard = [{kind: torch.zeros_like(layer[kind]) for kind in UNIT_KINDS} for layer in raw]
    for kind in UNIT_KINDS:
        pruned = [i for i in range(len(raw)) if keep[i].of(kind) < fine[i][kind].numel()]
        if not pruned:
            continue
        values = torch.stack([raw[i][kind] for i in pruned])  # [layers, 2, features]
        centre = values.mean(dim=0)
        spread = values.std(dim=0, unbiased=False)
        scale = torch.where(spread > _FLAT, spread, torch.full_like(spread, math.inf))
        for i in pruned:
            standard[i][kind] = (raw[i][kind] - centre) / scale
    return standard, raw
