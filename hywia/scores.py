"""Gradients from calibration → per-unit importance at two granularities (HYWIA.md §2–3).

Per weight k with batch gradient g_k and empirical-Fisher diagonal F_k:
    s_k = w_k·g_k − ½·w_k²·F_k                     (second-order Taylor of the loss change at w_k → 0)
    fine(u)   = Σ_{k∈u} |s_k|                        (element-wise, summed over the unit)
    coarse(u) = | mean_n d_n(u) − ½·mean_n d_n(u)² |,  d_n(u) = Σ_{k∈u} w_k·∂ℒ_n/∂w_k
                                                     (the unit as one block, first-order + Fisher form)
plus LLM-Pruner's element-wise first-order Σ|w_k·g_k| and the magnitude floor Σ|w_k|.

Memory: the batch gradient accumulates in `.grad` as backward normally does; a hook on each prunable
parameter sees every per-sample gradient before it is added there, and folds it into one Fisher
accumulator (one extra fp32 copy) and into per-unit block sums (tiny).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from hywia.finite import require_finite
from hywia.units import UNIT_KINDS, decoder_layers, per_unit_sum, unit_count, unit_members

LayerScores = list[dict[str, torch.Tensor]]  # per layer: {"attn": [n_kv], "mlp": [n_channels]}


@dataclass
class UnitStatistics:
    fine: LayerScores = field(default_factory=list)
    coarse: LayerScores = field(default_factory=list)
    fine_first_order: LayerScores = field(default_factory=list)
    coarse_first_order: LayerScores = field(default_factory=list)
    magnitude: LayerScores = field(default_factory=list)


def normalise(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Put one score vector on a common scale: divide by its mean, or rank it in [0, 1]."""
    scores = scores.float()
    if how == "mean":
        return scores / scores.mean().clamp_min(1e-30)
    if how == "rank":
        ranks = torch.empty_like(scores)
        ranks[scores.argsort(stable=True)] = torch.arange(scores.numel(), dtype=torch.float32)
        return ranks / max(scores.numel() - 1, 1)
    raise ValueError(f"unknown normalisation {how!r} (mean or rank)")


def normalise_within_layers(scores: LayerScores, how: str) -> LayerScores:
    """`normalise` each (layer, kind) score vector on its own: every layer then looks alike."""
    return [{k: normalise(layer[k], how) for k in UNIT_KINDS} for layer in scores]


def normalise_across_layers(scores: LayerScores, how: str) -> LayerScores:
    """`normalise` over the concatenation of every layer's and kind's scores: comparable everywhere."""
    flat = normalise(torch.cat([layer[k] for layer in scores for k in UNIT_KINDS]), how)
    pieces = iter(flat.split([layer[k].numel() for layer in scores for k in UNIT_KINDS]))
    return [{k: next(pieces) for k in UNIT_KINDS} for _ in scores]


def magnitude_scores(model) -> LayerScores:
    """Σ|w| over each unit: the data-free floor."""
    return [
        {kind: _sum_over_members(layer, kind, lambda m: m.param.detach().abs()) for kind in UNIT_KINDS}
        for layer in decoder_layers(model)
    ]


def collect_statistics(model, batch: torch.Tensor, progress: bool = True) -> UnitStatistics:
    """One forward/backward per calibration sample; returns every gradient-based unit score."""
    layers = decoder_layers(model)
    samples = batch.shape[0]
    prunable = [m.param for layer in layers for kind in UNIT_KINDS for m in unit_members(layer, kind)]
    previous_flags = {id(p): p.requires_grad for p in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for param in prunable:
        param.requires_grad_(True)
        param.grad = None

    fisher = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in prunable}
    block_now = [{kind: torch.zeros(unit_count(layer, kind)) for kind in UNIT_KINDS} for layer in layers]
    block_sum = [{k: v.clone() for k, v in d.items()} for d in block_now]
    block_sq_sum = [{k: v.clone() for k, v in d.items()} for d in block_now]

    def make_hook(member, layer_index, kind):
        n_units = unit_count(layers[layer_index], kind)

        def hook(grad):
            grad32 = grad.detach().float()
            fisher[id(member.param)].addcmul_(grad32, grad32)
            directional = grad32 * member.param.detach().float()
            block_now[layer_index][kind] += per_unit_sum(directional, member.dim, n_units).cpu()
            return grad

        return hook

    handles = [
        m.param.register_hook(make_hook(m, i, kind))
        for i, layer in enumerate(layers) for kind in UNIT_KINDS for m in unit_members(layer, kind)
    ]
    try:
        for n in tqdm(range(samples), desc="gradients", unit="sample", disable=not progress):
            input_ids = batch[n:n + 1].to(model.device)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            for i in range(len(layers)):
                for kind in UNIT_KINDS:
                    block_sum[i][kind] += block_now[i][kind]
                    block_sq_sum[i][kind] += block_now[i][kind] ** 2
                    block_now[i][kind].zero_()
    finally:
        for handle in handles:
            handle.remove()

    stats = UnitStatistics(magnitude=magnitude_scores(model))
    for i, layer in enumerate(layers):
        fine, fine_first, coarse, coarse_first = {}, {}, {}, {}
        for kind in UNIT_KINDS:
            def taylor_first(m):
                return m.param.detach().float() * (m.param.grad.float() / samples)

            def taylor_second(m):
                w = m.param.detach().float()
                return taylor_first(m) - 0.5 * w * w * (fisher[id(m.param)] / samples)

            fine[kind] = _sum_over_members(layer, kind, lambda m: taylor_second(m).abs())
            fine_first[kind] = _sum_over_members(layer, kind, lambda m: taylor_first(m).abs())
            mean_d = block_sum[i][kind] / samples
            mean_d2 = block_sq_sum[i][kind] / samples
            coarse[kind] = (mean_d - 0.5 * mean_d2).abs()
            coarse_first[kind] = mean_d.abs()
        stats.fine.append(fine)
        stats.fine_first_order.append(fine_first)
        stats.coarse.append(coarse)
        stats.coarse_first_order.append(coarse_first)

    for param in model.parameters():
        param.grad = None
        param.requires_grad_(previous_flags[id(param)])
    for name in ("fine", "coarse", "fine_first_order", "coarse_first_order"):  # before any cache keeps them
        require_finite(getattr(stats, name), name.replace("_", "-"), layers)
    return stats


def _sum_over_members(layer, kind, elementwise) -> torch.Tensor:
    n_units = unit_count(layer, kind)
    total = torch.zeros(n_units)
    for member in unit_members(layer, kind):
        total += per_unit_sum(elementwise(member), member.dim, n_units).cpu()
    return total
