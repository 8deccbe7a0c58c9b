"""Adaptive fusion of the two granularities: an attention over them, trained end-to-end (HYWIA.md §4).

Per layer l and unit type t, each granularity g ∈ {fine, coarse} is a token whose key is a learned
projection of statistics of its RAW scores (hywia.fusion_keys); a query embeds (l/L, t);
α_{l,t} = softmax(q·K/(√d·τ)) blends the NORMALISED scores:
    I(u) = α_fine·Î_fine(u) + α_coarse·Î_coarse(u).
Training (model weights frozen) soft-masks every unit with σ((I(u) − θ_{l,t}) / T), θ the keep
threshold at the target ratio, and lowers the calibration loss of the whole soft-masked model.
T anneals so the soft masks approach the hard top-k masks used afterwards. The query starts at
zero, so training starts exactly at the fixed ½/½ blend.

Selection: the calibration batch is split once, by position (the last `holdout_fraction` of it), into
training and held-out samples. The learned blend and each fixed blend of `fixed_fine_weights` (½/½, fine
only, coarse only), hard-masked, are scored per held-out sample. The learned blend must beat the BEST
fixed one (HYWIA.md §4): it is kept only when its mean gain over that blend exceeds both `min_gain` and
`z` paired standard errors. Otherwise the best fixed blend, the simpler model, stays (and the log says
so): a choice that tiny numerical differences between two runs could flip is no choice. Why not only
½/½: under global allocation fine alone beat the ½/½ blend on every seed (methods400: 118.1 vs 127.6),
so a learned blend that merely beat ½/½ could still be worse than the fine scores it started from.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hywia.errors import HywiaError
from hywia.fusion_keys import KEY_FEATURES, key_features
from hywia.quality import per_sample_losses
from hywia.scores import LayerScores, normalise_within_layers
from hywia.stopping import raise_if_stopped
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
    holdout_fraction: float = 0.5  # the last half of the calibration batch judges learned vs fixed
    min_gain: float = 0.01  # nats per token the learned blend must win by on held-out text (~1% perplexity)
    z: float = 2.0  # ... and by this many paired standard errors of that gain
    holdout_batch: int = 4  # held-out samples per forward pass (bounds the logits' memory)
    # α_fine of the fixed blends the learned one must beat; ½ first, so a tie keeps the ½/½ blend
    fixed_fine_weights: tuple[float, ...] = (0.5, 1.0, 0.0)


class AttentionFusion(nn.Module):
    """α_{l,t} = softmax(q(l/L, t) · K_g / (√d·τ)) over the granularities g, K_g = W_g·f_g + b_g.

    Each granularity has its own key projection W_g: with one shared projection a statistic equal
    for both (their rank agreement) would add the same to both logits and could never move α."""

    def __init__(self, n_features: int = len(KEY_FEATURES), key_dim: int = 16, tau: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        shape = (len(GRANULARITIES), n_features, key_dim)
        self.key_weight = nn.Parameter(torch.randn(shape, generator=generator) / math.sqrt(n_features))
        self.key_bias = nn.Parameter(torch.randn(len(GRANULARITIES), key_dim, generator=generator) * 0.1)
        self.query = nn.Linear(4, key_dim)
        nn.init.zeros_(self.query.weight)  # q = 0 ⇒ α = ½/½ at step 0: training starts at the fixed blend
        nn.init.zeros_(self.query.bias)
        self.scale = math.sqrt(key_dim) * tau

    def alpha(self, depth: float, kind: str, features: torch.Tensor) -> torch.Tensor:
        """FEATURES: [granularities, n_features] (hywia.fusion_keys.key_features) → α [granularities]."""
        position = torch.tensor([depth, depth * depth, float(kind == ATTENTION), float(kind == MLP)])
        keys = torch.einsum("gf,gfd->gd", features, self.key_weight) + self.key_bias
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
    selected: str  # "learned" or "fixed" (the best fixed blend: diagnostics["fixed_fine_weight"])
    diagnostics: dict
    fusion: AttentionFusion  # the trained module (its keys and query), for inspection


def train_fusion(model, fine: LayerScores, coarse: LayerScores, keep: list[KeepCounts], batch: torch.Tensor,
                 config: FusionConfig = FusionConfig(), seed: int = 0, progress: bool = True,
                 normalize: str = "rank") -> FusionResult:
    """Learn α end-to-end on the soft-masked model; keep it only if it beats the best fixed blend on held-out text.
    FINE and COARSE are the raw scores: the keys read them, the blend mixes them normalised (NORMALIZE)."""
    n_layers = len(fine)
    train, holdout = split_holdout(batch, config.holdout_fraction)
    fine_hat, coarse_hat = normalise_within_layers(fine, normalize), normalise_within_layers(coarse, normalize)
    features, raw_features = key_features(fine, coarse, keep)
    fusion = AttentionFusion(key_dim=config.key_dim, tau=config.tau,
                             generator=torch.Generator().manual_seed(seed))
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
            raise_if_stopped("fusion")
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
            if not torch.isfinite(loss):
                raise HywiaError(f"fusion training: the soft-masked calibration loss is {loss.item()} at step {step}",
                                 "check the model in float32 (--dtype float32), or use --importance fixed")
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
        learned_scores = blend(fine_hat, coarse_hat, learned)
        learned_losses = per_sample_hard_masked_losses(model, learned_scores, keep, holdout, config.holdout_batch)
        fixed_losses = {weight: per_sample_hard_masked_losses(
            model, blend(fine_hat, coarse_hat, fixed_alpha(n_layers, weight)), keep, holdout, config.holdout_batch)
            for weight in config.fixed_fine_weights}
    best_weight = min(config.fixed_fine_weights, key=lambda weight: float(fixed_losses[weight].double().mean()))
    verdict = held_out_verdict(learned_losses, fixed_losses[best_weight], config)
    verdict["fixed_fine_weight"] = best_weight
    verdict["holdout_loss_fixed_blends"] = {f"{weight:g}": float(losses.double().mean())
                                            for weight, losses in fixed_losses.items()}
    log.log(logging.INFO if verdict["selected"] == "learned" else logging.WARNING,
            "fusion: held-out loss learned %.4f vs the best fixed blend (α_fine %g) %.4f (gain %.4f ± %.4f, "
            "needed > %.4f): keeping the %s blend", verdict["holdout_loss_learned"], best_weight,
            verdict["holdout_loss_fixed"], verdict["holdout_gain"], verdict["holdout_gain_se"],
            verdict["selection_margin"], verdict["selected"])
    diagnostics = {**verdict, "train_losses": losses, "train_samples": int(train.shape[0]),
                   "holdout_samples": int(holdout.shape[0]), "config": asdict(config),
                   "key_features": KEY_FEATURES,
                   "raw_key_features": [{k: [[round(float(v), 5) for v in row] for row in layer[k]] for k in UNIT_KINDS}
                                        for layer in raw_features]}
    chosen = verdict["selected"] == "learned"
    fixed = fixed_alpha(n_layers, best_weight)
    return FusionResult(scores=learned_scores if chosen else blend(fine_hat, coarse_hat, fixed),
                        alpha=learned if chosen else fixed,
                        learned_alpha=learned, selected=verdict["selected"], diagnostics=diagnostics, fusion=fusion)


def split_holdout(batch: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) samples: the held-out ones are the batch's last FRACTION, so the same
    calibration batch always splits the same way; each side keeps at least one sample."""
    if batch.shape[0] < 2:
        raise HywiaError(f"the fusion needs at least 2 calibration samples, got {batch.shape[0]}",
                         "raise --samples")
    n_holdout = min(max(1, round(batch.shape[0] * fraction)), batch.shape[0] - 1)
    return batch[:-n_holdout], batch[-n_holdout:]


def held_out_verdict(learned: torch.Tensor, fixed: torch.Tensor, config: FusionConfig) -> dict:
    """Per-sample held-out losses of the learned and the (best) fixed blend → which one to keep, and the evidence."""
    gain = (fixed - learned).double()
    mean_gain = float(gain.mean())
    se = float(gain.std() / math.sqrt(gain.numel())) if gain.numel() > 1 else math.inf
    margin = max(config.min_gain, config.z * se)
    return {"selected": "learned" if mean_gain > margin else "fixed",
            "holdout_loss_learned": float(learned.double().mean()), "holdout_loss_fixed": float(fixed.double().mean()),
            "holdout_gain": mean_gain, "holdout_gain_se": se, "selection_margin": margin}


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


def per_sample_hard_masked_losses(model, scores: LayerScores, keep: list[KeepCounts], batch: torch.Tensor,
                                  chunk: int = 4) -> torch.Tensor:
    """Mean next-token loss of each sample of BATCH under the hard top-k masks of SCORES."""
    masks = [{k: hard_mask(scores[i][k], keep[i].of(k)) for k in UNIT_KINDS} for i in range(len(scores))]
    with apply_unit_masks(model, masks):
        return per_sample_losses(model, batch, chunk)


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
