"""Adaptive fusion of the two granularities: an attention blend trained end-to-end (HYWIA.md §4).

Per layer l and unit type t, each granularity g ∈ {fine, coarse} offers a key built from statistics
of its normalised scores; a query embeds (l/L, t); α_{l,t} = softmax(q·K/(√d·τ)) blends them:
    I(u) = α_fine·Î_fine(u) + α_coarse·Î_coarse(u).
Training (model weights frozen) soft-masks every unit with σ((I(u) − θ_{l,t}) / T), θ the keep
threshold at the target ratio, and lowers the calibration loss of the whole soft-masked model.
T anneals so the soft masks approach the hard top-k masks used afterwards. The query starts at
zero, so training starts exactly at the fixed ½/½ blend; a held-out split then checks that the
learned blend beats that fixed blend, and falls back to it (saying so) when it does not.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hywia.scores import LayerScores, normalise
from hywia.units import ATTENTION, MLP, UNIT_KINDS, KeepCounts, decoder_layers

log = logging.getLogger(__name__)
GRANULARITIES = ("fine", "coarse")


@dataclass(frozen=True)
class FusionConfig:
    steps: int = 30
    learning_rate: float = 0.05
    key_dim: int = 16
    tau: float = 1.0
    start_temperature: float = 0.5  # in units of the fused scores' standard deviation
    end_temperature: float = 0.02
    batch_size: int = 2
    kl_weight: float = 0.0  # optionally also match the dense model's next-token distribution
    holdout_fraction: float = 0.25


def granularity_features(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Statistics of one granularity's normalised scores in a (layer, type): the key's input."""
    positive = own.clamp_min(0) + 1e-12
    p = positive / positive.sum()
    entropy = -(p * p.log()).sum() / math.log(max(own.numel(), 2))
    top_half_mass = p.sort(descending=True).values[: max(own.numel() // 2, 1)].sum()
    variation = own.std() / own.mean().abs().clamp_min(1e-12) if own.numel() > 1 else own.new_zeros(())
    agreement = _spearman(own, other)
    return torch.stack([entropy, top_half_mass, variation.clamp(max=10.0), agreement])


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.numel() < 2:
        return a.new_ones(())
    ra, rb = normalise(a, "rank"), normalise(b, "rank")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12)


class AttentionFusion(nn.Module):
    """α_{l,t} = softmax(q(l/L, t) · K_g / (√d·τ)) over the granularities g."""

    def __init__(self, n_features: int = 4, key_dim: int = 16, tau: float = 1.0):
        super().__init__()
        self.key = nn.Linear(n_features, key_dim)
        self.granularity_embedding = nn.Parameter(torch.randn(len(GRANULARITIES), key_dim) * 0.1)
        self.query = nn.Linear(4, key_dim)
        nn.init.zeros_(self.query.weight)  # q = 0 ⇒ α = ½/½ at step 0: training starts at the fixed blend
        nn.init.zeros_(self.query.bias)
        self.scale = math.sqrt(key_dim) * tau

    def alpha(self, depth: float, kind: str, features: torch.Tensor) -> torch.Tensor:
        position = torch.tensor([depth, depth * depth, float(kind == ATTENTION), float(kind == MLP)])
        keys = self.key(features) + self.granularity_embedding  # [2, d]
        return torch.softmax(keys @ self.query(position) / self.scale, dim=0)


def blend(fine: LayerScores, coarse: LayerScores, alpha: list[dict[str, torch.Tensor]]) -> LayerScores:
    return [{k: alpha[i][k][0] * fine[i][k] + alpha[i][k][1] * coarse[i][k] for k in UNIT_KINDS}
            for i in range(len(fine))]


def fixed_alpha(n_layers: int, fine_weight: float = 0.5) -> list[dict[str, torch.Tensor]]:
    pair = torch.tensor([fine_weight, 1 - fine_weight])
    return [{kind: pair.clone() for kind in UNIT_KINDS} for _ in range(n_layers)]


@dataclass
class FusionResult:
    scores: LayerScores
    alpha: list[dict[str, torch.Tensor]]  # per layer, per type: [α_fine, α_coarse]
    learned_alpha: list[dict[str, torch.Tensor]]
    selected: str  # "learned" or "fixed"
    diagnostics: dict


def train_fusion(model, fine_hat: LayerScores, coarse_hat: LayerScores, keep: list[KeepCounts],
                 batch: torch.Tensor, config: FusionConfig = FusionConfig(), seed: int = 0,
                 progress: bool = True) -> FusionResult:
    """Learn α end-to-end on the soft-masked model; validate against the fixed blend on held-out text."""
    torch.manual_seed(seed)
    n_layers = len(fine_hat)
    n_holdout = max(1, int(round(batch.shape[0] * config.holdout_fraction)))
    train, holdout = batch[:-n_holdout], batch[-n_holdout:]
    features = [{k: torch.stack([granularity_features(fine_hat[i][k], coarse_hat[i][k]),
                                 granularity_features(coarse_hat[i][k], fine_hat[i][k])])
                 for k in UNIT_KINDS} for i in range(n_layers)]
    fusion = AttentionFusion(key_dim=config.key_dim, tau=config.tau)
    optimiser = torch.optim.Adam(fusion.parameters(), lr=config.learning_rate)

    def current_alpha():
        return [{k: fusion.alpha(i / max(n_layers - 1, 1), k, features[i][k]) for k in UNIT_KINDS}
                for i in range(n_layers)]

    frozen = {id(p): p.requires_grad for p in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    losses = []
    try:
        steps = tqdm(range(config.steps), desc="fusion", unit="step", disable=not progress)
        for step in steps:
            temperature = config.start_temperature * (config.end_temperature / config.start_temperature) ** (
                step / max(config.steps - 1, 1))
            masks = soft_masks(blend(fine_hat, coarse_hat, current_alpha()), keep, temperature)
            start = (step * config.batch_size) % train.shape[0]
            inputs = train[start:start + config.batch_size].to(model.device)
            dense_logits = None
            if config.kl_weight > 0:
                with torch.no_grad():
                    dense_logits = model(input_ids=inputs).logits
            with apply_unit_masks(model, masks):
                loss = _calibration_loss(model, inputs, config.kl_weight, dense_logits)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            steps.set_postfix(loss=f"{loss.item():.3f}", T=f"{temperature:.3f}")
    finally:
        for param in model.parameters():
            param.requires_grad_(frozen[id(param)])

    with torch.no_grad():
        learned = [{k: a.detach() for k, a in layer.items()} for layer in current_alpha()]
        fixed = fixed_alpha(n_layers)
        learned_scores = blend(fine_hat, coarse_hat, learned)
        fixed_scores = blend(fine_hat, coarse_hat, fixed)
        learned_loss = hard_masked_loss(model, learned_scores, keep, holdout)
        fixed_loss = hard_masked_loss(model, fixed_scores, keep, holdout)
    selected = "learned" if learned_loss <= fixed_loss else "fixed"
    if selected == "fixed":
        log.warning("fusion: the learned blend (held-out loss %.4f) did not beat the fixed ½/½ blend (%.4f); "
                    "using the fixed blend", learned_loss, fixed_loss)
    else:
        log.info("fusion: learned blend held-out loss %.4f vs fixed ½/½ %.4f", learned_loss, fixed_loss)
    diagnostics = {"train_losses": losses, "holdout_loss_learned": learned_loss, "holdout_loss_fixed": fixed_loss,
                   "train_samples": int(train.shape[0]), "holdout_samples": int(holdout.shape[0]),
                   "config": config.__dict__}
    return FusionResult(
        scores=learned_scores if selected == "learned" else fixed_scores,
        alpha=learned if selected == "learned" else fixed,
        learned_alpha=learned, selected=selected, diagnostics=diagnostics,
    )


def soft_mask(scores: torch.Tensor, keep: int, temperature: float) -> torch.Tensor:
    """σ((I − θ)/T) with θ halfway between the last kept and the first removed score."""
    if keep >= scores.numel():
        return torch.ones_like(scores)
    ordered = scores.sort(descending=True).values
    threshold = 0.5 * (ordered[keep - 1] + ordered[keep])
    spread = scores.detach().std().clamp_min(1e-8)
    return torch.sigmoid((scores - threshold) / (temperature * spread))


def soft_masks(scores: LayerScores, keep: list[KeepCounts], temperature: float) -> list[dict[str, torch.Tensor]]:
    return [{k: soft_mask(scores[i][k], keep[i].of(k), temperature) for k in UNIT_KINDS}
            for i in range(len(scores))]


@torch.no_grad()
def soft_masked_loss(model, fine_hat: LayerScores, coarse_hat: LayerScores, alpha, keep: list[KeepCounts],
                     batch: torch.Tensor, temperature: float) -> float:
    """Calibration loss of the model soft-masked by the blend `alpha` (the quantity training lowers)."""
    with apply_unit_masks(model, soft_masks(blend(fine_hat, coarse_hat, alpha), keep, temperature)):
        return float(_calibration_loss(model, batch.to(model.device), 0.0))


def hard_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros_like(scores)
    mask[scores.argsort(descending=True, stable=True)[:keep]] = 1.0
    return mask


@torch.no_grad()
def hard_masked_loss(model, scores: LayerScores, keep: list[KeepCounts], batch: torch.Tensor) -> float:
    masks = [{k: hard_mask(scores[i][k], keep[i].of(k)) for k in UNIT_KINDS} for i in range(len(scores))]
    with apply_unit_masks(model, masks):
        return float(_calibration_loss(model, batch.to(model.device), 0.0))


def _calibration_loss(model, input_ids: torch.Tensor, kl_weight: float,
                      dense_logits: torch.Tensor | None = None) -> torch.Tensor:
    output = model(input_ids=input_ids, labels=input_ids)
    if kl_weight <= 0 or dense_logits is None:
        return output.loss
    kl = torch.nn.functional.kl_div(output.logits.log_softmax(-1), dense_logits.log_softmax(-1),
                                    log_target=True, reduction="batchmean")
    return output.loss + kl_weight * kl


@contextlib.contextmanager
def apply_unit_masks(model, masks: list[dict[str, torch.Tensor]] | None):
    """Scale each unit's output by its mask: KV-group heads before o_proj, channels before down_proj.
    A mask of 0 is exactly the model with that unit removed. `None` applies no mask."""
    handles = []
    if masks is not None:
        for layer, layer_masks in zip(decoder_layers(model), masks):
            group_width = layer.self_attn.o_proj.in_features // layer_masks[ATTENTION].numel()
            attn_scale = layer_masks[ATTENTION].repeat_interleave(group_width)
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(_scale_input(attn_scale)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(_scale_input(layer_masks[MLP])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _scale_input(scale: torch.Tensor):
    def hook(module, args):
        return (args[0] * scale.to(args[0].dtype).to(args[0].device),) + tuple(args[1:])

    return hook
