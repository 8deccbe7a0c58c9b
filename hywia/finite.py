"""Numerical faults are errors, not silent choices: a NaN or infinite unit score stops the prune.

A NaN compares false with everything, so a ranking would put it anywhere (the old global allocation
mapped it to 0, so those units went first). The checks sit where scores are made (the gradient
statistics), where a criterion hands them over (hywia.importance) and where global allocation ranks
them (hywia.budget), and name the layer and unit type, so the user knows where to look.
"""

from __future__ import annotations

import torch

from hywia.errors import HywiaError
from hywia.units import UNIT_KINDS

_KIND_NAMES = {"attn": "attention (KV groups)", "mlp": "MLP channels"}


def check_finite(values: torch.Tensor, what: str, layer: int, kind: str, layers=None) -> None:
    """Nothing when every value is finite, else a HywiaError naming WHAT, the layer and the unit type.
    LAYERS (the model's decoder layers, where the scores came from gradients): a non-finite weight
    anywhere makes the loss, and so every layer's gradients, NaN; the error then names the layer
    whose weights hold it, since that is where the fault is."""
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return
    problem = (f"{what} scores of layer {layer}, {_KIND_NAMES.get(kind, kind)}: {int(bad.sum())} of {values.numel()} "
               "are NaN or infinite")
    damaged = next((i for i, module in enumerate(layers or ())
                    if any(not bool(torch.isfinite(p).all()) for p in module.parameters())), None)
    if damaged is not None:
        raise HywiaError(f"{problem}: the weights of layer {damaged} hold NaN or infinite values",
                         f"the checkpoint is damaged at layer {damaged}: re-download or re-convert it")
    raise HywiaError(problem, "the calibration loss or its gradients overflowed there: compute in float32, "
                              "and check the checkpoint's weights for NaN/inf")


def require_finite(scores: list[dict[str, torch.Tensor]], what: str, layers=None) -> list[dict[str, torch.Tensor]]:
    """SCORES unchanged (per layer, per unit type), or a HywiaError naming the first non-finite one
    (and, given LAYERS, the layer whose weights are not finite)."""
    for layer, per_kind in enumerate(scores):
        for kind in UNIT_KINDS:
            check_finite(per_kind[kind], what, layer, kind, layers)
    return scores
