"""Gradients from calibration → per-unit importance at two granularities (HYWIA.md §2–3).

Per weight k with batch gradient g_k and empirical-Fisher diagonal F_k:
    s_k = w_k·g_k − ½·w_k²·F_k                     (second-order Taylor of the loss change at w_k → 0)
    fine(u)   = Σ_{k∈u} |s_k|                        (element-wise, summed over the unit)
    coarse(u) = | mean_n d_n(u) − ½·mean_n d_n(u)² |,  d_n(u) = Σ_{k∈u} w_k·∂ℒ_n/∂w_k
                                                     (the unit as one block, first-order + Fisher form)
plus LLM-Pruner's element-wise first-order Σ|w_k·g_k| and the magnitude floor Σ|w_k|.
On text the model sampled itself (`self` calibration) the first-order parts average to zero in expectation and
are left out: fine(u) = Σ ½·w_k²·F_k, coarse(u) = ½·mean_n d_n(u)² (see `collect_statistics`); there each
sample's loss is also split into interleaved token groups, each backpropagated on its own, and F and d² are
summed over the groups: the same expectation, without the cross-token products that are pure noise on such text.

Memory: a hook on each prunable parameter folds every per-sample gradient into float32 sums (Σg, Σg²) and
per-unit block sums (tiny), then drops it; the layers are taken in chunks whose sums fit a budget
(`collect_statistics`), so the statistics never exceed about the weights' own bytes on a CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from hywia.finite import require_finite
from hywia.stopping import raise_if_stopped
from hywia.units import UNIT_KINDS, decoder_layers, per_unit_sum, unit_count, unit_members

log = logging.getLogger(__name__)

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


def magnitude_scores(model) -> LayerScores:
    """Σ|w| over each unit: the data-free floor."""
    return [
        {kind: _sum_over_members(layer, kind, lambda m: m.param.detach().float().abs()) for kind in UNIT_KINDS}
        for layer in decoder_layers(model)
    ]


# Token groups per model-sampled calibration sequence (see `collect_statistics`): chosen by WikiText-2
# perplexity at 0.2 on SmolLM2 (README, Results); each group costs one more backward of the sequence.
SAMPLED_TOKEN_SPLITS = 4


def collect_statistics(model, batch: torch.Tensor, progress: bool = True, budget_bytes: int | None = None,
                       model_sampled: bool = False, token_splits: int | None = None) -> UnitStatistics:
    """One forward/backward per calibration sample and chunk of layers; returns every gradient-based unit score.

    Memory stays a small multiple of the weights at any model size: the layers are taken in chunks whose
    statistics (Σg and Σg² in float32, 8 bytes per prunable weight) fit BUDGET_BYTES (default:
    hywia.devices.statistics_budget_bytes), only the chunk's weights require gradients, and each per-sample
    gradient is folded into those float32 sums as soon as backward has formed it and then dropped, so no batch
    gradient is ever held in `.grad`. Gradients are formed in the model's dtype (bf16/fp16 on a GPU); every sum
    is float32. A chunk's scores are computed and its sums freed before the next chunk starts. The scores do not
    depend on the chunking: each weight's per-sample gradient is the same backward computation either way.

    MODEL_SAMPLED: the batch was sampled from the model itself (`self` calibration). Then the expected
    gradient of the log-likelihood is zero (the score-function identity E_{y~p}[∇ log p(y)] = 0), so the
    first-order terms w·g and mean_n d_n are pure sampling noise, and at 32 samples that noise is larger than
    the second-order term it would be added to. The `fine` and `coarse` scores then keep only their
    second-order parts, ½·w²·F and ½·mean_n d_n²; the first-order rivals are still reported as measured.

    TOKEN_SPLITS (default SAMPLED_TOKEN_SPLITS on model-sampled text, else 1): each sample's mean loss is cut
    into that many groups of interleaved target positions, backpropagated one group at a time, and the squares
    (g², d²) are summed over the groups. On model-sampled text this estimates the same Fisher: a sequence's
    gradient is a sum of per-token terms a_t with E[a_t | tokens before t] = 0, so every cross product a_s·a_t
    (s ≠ t) has expectation zero, and (Σ_t a_t)² and Σ_groups (Σ_{t∈group} a_t)² share their mean while the
    latter drops most of the zero-mean cross products (the noise). On other text those products carry signal
    and the sequence is kept whole. Σg and every first-order score are unchanged by the split (sums are linear)."""
    if token_splits is None:
        token_splits = SAMPLED_TOKEN_SPLITS if model_sampled else 1
    if token_splits < 1:
        raise ValueError(f"token_splits must be at least 1, not {token_splits}")
    layers = decoder_layers(model)
    if budget_bytes is None:
        from hywia.devices import statistics_budget_bytes

        budget_bytes = statistics_budget_bytes(model)
    chunks = layer_chunks(layers, budget_bytes)
    log.info("gradients: %d layers in %d chunk(s) of statistics (budget %.2f GiB)", len(layers), len(chunks),
             budget_bytes / 2**30)
    previous_flags = {id(p): p.requires_grad for p in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    per_layer = {}
    try:
        with tqdm(total=batch.shape[0] * len(chunks), desc=f"gradients ({len(chunks)} chunk(s) of layers)",
                  unit="sample", disable=not progress) as bar:
            for chunk in chunks:
                per_layer.update(_chunk_statistics(model, layers, chunk, batch, bar, model_sampled, token_splits))
    finally:
        for param in model.parameters():
            param.grad = None
            param.requires_grad_(previous_flags[id(param)])
    stats = UnitStatistics(magnitude=magnitude_scores(model))
    for index in range(len(layers)):
        for name, scores in per_layer[index].items():
            getattr(stats, name).append(scores)
    for name in ("fine", "coarse", "fine_first_order", "coarse_first_order"):  # before any cache keeps them
        require_finite(getattr(stats, name), name.replace("_", "-"), layers)
    return stats


def layer_chunks(layers, budget_bytes: int) -> list[list[int]]:
    """Consecutive layers grouped so that each group's statistics fit BUDGET_BYTES (a layer larger than the
    budget is a group of its own: one layer is the least that can be scored)."""
    from hywia.devices import ACCUMULATOR_BYTES

    chunks, used = [[]], 0
    for index, layer in enumerate(layers):
        size = ACCUMULATOR_BYTES * sum(m.param.numel() for kind in UNIT_KINDS for m in unit_members(layer, kind))
        if chunks[-1] and used + size > budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(index)
        used += size
    return chunks


def _chunk_statistics(model, layers, chunk: list[int], batch: torch.Tensor, bar,
                      model_sampled: bool, token_splits: int) -> dict[int, dict]:
    """Every sample's gradients of the CHUNK's prunable weights → that chunk's scores, per layer index."""
    samples = batch.shape[0]
    grad_sum, grad_sq_sum = {}, {}  # per parameter, float32, the chunk's only element-wise memory
    block_now, block_sum, block_sq_sum = {}, {}, {}  # per (layer, kind): d(u) of this backward, Σ d, Σ d²

    def fold(member, key, n_units):
        def hook(param):  # runs once backward has formed this sample's gradient in param.grad
            grad = param.grad.float()
            param.grad = None
            grad_sum[id(param)].add_(grad)
            grad_sq_sum[id(param)].addcmul_(grad, grad)
            block_now[key].add_(per_unit_sum(grad.mul_(param.detach()), member.dim, n_units))

        return hook

    handles = []
    for index in chunk:
        for kind in UNIT_KINDS:
            key, n_units = (index, kind), unit_count(layers[index], kind)
            for member in unit_members(layers[index], kind):
                member.param.requires_grad_(True)
                grad_sum[id(member.param)] = torch.zeros_like(member.param, dtype=torch.float32)
                grad_sq_sum[id(member.param)] = torch.zeros_like(member.param, dtype=torch.float32)
                handles.append(member.param.register_post_accumulate_grad_hook(fold(member, key, n_units)))
            block_now[key] = torch.zeros(n_units, device=member.param.device)
            block_sum[key], block_sq_sum[key] = torch.zeros_like(block_now[key]), torch.zeros_like(block_now[key])
    try:
        for n in range(samples):
            raise_if_stopped("gradients")
            losses = split_losses(model, batch[n:n + 1].to(model.device), token_splits)
            for group, loss in enumerate(losses):
                loss.backward(retain_graph=group < len(losses) - 1)  # the forward is shared by the groups
                for key, now in block_now.items():
                    block_sum[key] += now
                    block_sq_sum[key] += now * now
                    now.zero_()
            bar.update()
    finally:
        for handle in handles:
            handle.remove()
        for index in chunk:
            for kind in UNIT_KINDS:
                for member in unit_members(layers[index], kind):
                    member.param.requires_grad_(False)

    scores = {}
    for index in chunk:
        layer, per_kind = layers[index], {name: {} for name in _GRADIENT_SCORES}
        for kind in UNIT_KINDS:
            def taylor_first(m):
                return m.param.detach().float() * (grad_sum[id(m.param)] / samples)

            def fisher_term(m):
                w = m.param.detach().float()
                return 0.5 * w * w * (grad_sq_sum[id(m.param)] / samples)

            def taylor_second(m):
                return taylor_first(m) - fisher_term(m)

            fine = fisher_term if model_sampled else (lambda m: taylor_second(m).abs())  # fisher_term is ≥ 0
            per_kind["fine"][kind] = _sum_over_members(layer, kind, fine)
            per_kind["fine_first_order"][kind] = _sum_over_members(layer, kind, lambda m: taylor_first(m).abs())
            mean_d = block_sum[(index, kind)].cpu() / samples
            mean_d2 = block_sq_sum[(index, kind)].cpu() / samples
            per_kind["coarse"][kind] = 0.5 * mean_d2 if model_sampled else (mean_d - 0.5 * mean_d2).abs()
            per_kind["coarse_first_order"][kind] = mean_d.abs()
        scores[index] = per_kind
    return scores


def split_losses(model, input_ids: torch.Tensor, splits: int) -> list[torch.Tensor]:
    """The sample's mean next-token loss (as `labels=input_ids` computes it) as SPLITS parts that sum to it,
    part k over the target positions ≡ k (mod SPLITS)."""
    if splits == 1:
        return [model(input_ids=input_ids, labels=input_ids).loss]
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    targets = input_ids[:, 1:].to(logits.device)  # a model spread over GPUs ends on another device
    token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    positions = torch.arange(token_loss.numel(), device=token_loss.device)
    return [token_loss[positions % splits == k].sum() / token_loss.numel() for k in range(splits)]


_GRADIENT_SCORES = ("fine", "fine_first_order", "coarse", "coarse_first_order")


def _sum_over_members(layer, kind, elementwise) -> torch.Tensor:
    n_units = unit_count(layer, kind)
    total = torch.zeros(n_units)
    for member in unit_members(layer, kind):
        total += per_unit_sum(elementwise(member), member.dim, n_units).cpu()
    return total
