"""The pruning report (`hywia_report.json`): what was asked, what was decided, what it cost.

Built from plain values the pipeline hands over; nothing here decides anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hywia import __version__
from hywia.cache import code_version
from hywia.importance import CRITERIA, Importance
from hywia.memory_fit import FitResult
from hywia.options import PruneOptions
from hywia.plan import PruningPlan
from hywia.units import ATTENTION, MLP


@dataclass(frozen=True)
class LayerSize:
    """One decoder layer's KV groups, MLP channels and parameters (before or after slicing)."""

    kv_groups: int
    mlp_channels: int
    params: int


def layer_sizes(model) -> list[LayerSize]:
    return [LayerSize(layer.self_attn.k_proj.out_features // layer.self_attn.head_dim,
                      layer.mlp.down_proj.in_features, sum(p.numel() for p in layer.parameters()))
            for layer in model.model.layers]


def build_report(*, source: str, source_digest: str, options: PruneOptions, ratio: float, params_before: int,
                 params_after: int, protected: list[int], fit: FitResult | None, plan: PruningPlan,
                 importance: Importance | None, before: list[LayerSize], after: list[LayerSize],
                 quality: dict | None = None,  # hywia.quality: held-out perplexity, dense vs pruned
                 stages: dict | None = None,  # reports of the repair stages run: reconstruction, recovery
                 seconds: float, timings: dict, memory: dict) -> dict:
    """MEMORY: hywia.devices.MemoryMeter.summary() (overall RSS/CUDA peaks and the per-stage table)."""
    layout = {"layout": options.layout, "uniform": plan.is_uniform, "allocation": options.allocation,
              "protected_layers": protected}
    if options.allocation == "global":
        ranking = CRITERIA[options.importance].ranking.format(name=options.importance, normalize=options.normalize)
        layout.update(min_keep=options.min_keep, ranking=ranking)
    return {
        "hywia_version": __version__,
        "code_version": code_version(),
        "source": source,
        "source_digest": source_digest,
        "options": dataclasses.asdict(options),
        "params_before": params_before,
        "params_after": params_after,
        "ratio_requested": ratio,
        "ratio_achieved": 1 - params_after / params_before,
        "layout": layout,
        "memory_fit": fit.to_dict() if fit is not None else None,
        "per_layer": [
            {"kv_groups_kept": len(p.kept(ATTENTION)), "kv_groups_before": b.kv_groups,
             "mlp_channels_kept": len(p.kept(MLP)), "mlp_channels_before": b.mlp_channels,
             "params_removed_fraction": 1 - a.params / b.params}
            for p, b, a in zip(plan.layers, before, after)
        ],
        "alpha": importance.alpha if importance else None,
        "importance_details": importance.details if importance else {},
        "quality": quality,
        "reconstruction": (stages or {}).get("reconstruction"),  # hywia.reconstruct's report, or None
        "recovery": (stages or {}).get("recovery"),  # hywia.recovery's report (loss curve, time), or None
        "plan": plan.to_dict(),
        "prune_seconds": seconds,
        "timings": timings,
        "peak_rss_bytes": memory["peak_rss_bytes"],
        "peak_cuda_bytes": memory["peak_cuda_bytes"],
        "memory": {"stages": memory["stages"]},
    }
