"""Reconstruction after removal: re-fit the kept input columns of `o_proj` and `down_proj`.

Removing units changes what each layer adds to the residual stream. Without new parameters, the
kept input columns of a layer's two output projections can be re-fitted so that, on the calibration
inputs, they reproduce what the dense projection would have produced from the same inputs (the
idea behind OBS, SparseGPT, ZipLM and SlimGPT). The export stays a stock checkpoint.

For one projection with dense weight W [out, in], inputs X [in, tokens] arriving along the pruned
(and already reconstructed) path, kept input columns K and removed ones R, the fit is the ridge
least-squares problem, shrinking toward the dense weights:

    min_W'  ||W' X_K − W X||²  +  λ ||W' − W_K||²

Setting the gradient to zero: W' (H_KK + λI) = W H[:, K] + λ W_K with H = X Xᵀ, i.e.

    W' = (W H[:, K] + λ W_K)(H_KK + λI)⁻¹ = W_K + W_R H_RK (H_KK + λI)⁻¹

(the second form, since W H[:, K] = W_K H_KK + W_R H_RK, is what is computed: it is exactly W when
nothing is removed). λ = ridge × mean(diag H_KK), so the ridge is scale-free. Plain slicing,
W' = W_K, is feasible with zero penalty, so for every λ ≥ 0 the fitted error on the calibration
inputs is at most plain slicing's: the per-layer fit can never get worse on the data it saw (it can
on perplexity, which is why the ridge is chosen by measurement).

Why these targets: W_dense · X on the pruned path's own inputs (not the dense model's layer output
on dense inputs) is what measured best (issue 13: the dense-path target made perplexity worse).

Order inside a layer: `o_proj` first; the `down_proj` inputs are captured afterwards, because they
depend on the refitted attention output. Hidden states are cached between layers (one pass through
each layer, as SparseGPT and FLAP do), not a full forward per layer.

Run it on the unsliced model, before `slice_model`: afterwards every removed unit is zeroed, so the
model computes exactly what the sliced model will.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from hywia.errors import HywiaError
from hywia.plan import LayerPlan, PruningPlan
from hywia.stopping import raise_if_stopped
from hywia.surgery import _block_indices, zero_removed_units
from hywia.units import ATTENTION, MLP, decoder_layers, unit_count

log = logging.getLogger(__name__)

# Relative ridge λ / mean(diag H_KK). Measured (benchmarks/results/reconstruction.md, SmolLM2, uniform
# hybrid plan at 0.2108, one seed): WikiText-2 perplexity 250 without, 170 at 0.01, 159 at 0.1.
DEFAULT_RIDGE = 0.1
# Extra damping (relative to the mean diagonal) tried, growing tenfold, when H_KK + λI is not
# numerically positive definite (e.g. fewer calibration tokens than kept columns and ridge 0).
_FIRST_DAMPING = 1e-10
_MAX_DAMPING_STEPS = 12

RECONSTRUCTIONS = ("none", "ls")  # --reconstruct: nothing, or the ridge least-squares re-fit below

_MODULE_NAMES = {ATTENTION: "self_attn.o_proj", MLP: "mlp.down_proj"}


@dataclass
class FitRecord:
    """One re-fitted projection. Errors are ||W' X_K − W X||² / ||W X||² on the calibration inputs."""

    layer: int
    kind: str  # ATTENTION or MLP
    module: str
    kept_columns: int
    columns: int
    error_before: float  # plain slicing (W' = W_K)
    error_after: float
    damping: float  # λ actually added to H_KK (absolute; ridge × mean diag, plus any extra regularisation)
    seconds: float


@dataclass
class ReconstructionReport:
    ridge: float
    tokens: int
    seconds: float = 0.0
    fits: list[FitRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"ridge": self.ridge, "tokens": self.tokens, "seconds": self.seconds,
                "fits": [asdict(fit) for fit in self.fits]}


class _Captured(Exception):
    """Raised by a forward pre-hook once it holds the input it was waiting for."""


@torch.no_grad()
def reconstruct(model, plan: PruningPlan, batch: torch.Tensor, *, ridge: float = DEFAULT_RIDGE,
                progress: bool = True) -> ReconstructionReport:
    """Re-fit `o_proj` and `down_proj` of every layer of the UNSLICED MODEL, in place, layer by layer,
    on the calibration BATCH (LongTensor [N, L]), then zero every unit PLAN removes.

    Afterwards `slice_model(model, plan)` gives the same model in its smaller shape. Layers whose
    units of a kind are all kept are left as they are. Raises HywiaError on a bad ridge or plan, and
    when activations turn NaN or infinite (naming the layer).
    """
    layers = decoder_layers(model)
    _check_arguments(layers, plan, batch, ridge)
    started = time.perf_counter()
    report = ReconstructionReport(ridge=ridge, tokens=batch.numel())
    hidden, layer_kwargs = _first_layer_inputs(model, batch)
    for index, (layer, layer_plan) in enumerate(tqdm(list(zip(layers, plan.layers)), desc="reconstruction",
                                                     unit="layer", disable=not progress)):
        raise_if_stopped("reconstruction")
        hidden = _reconstruct_layer(index, layer, layer_plan, hidden, layer_kwargs, ridge, report)
    zero_removed_units(model, plan)
    report.seconds = time.perf_counter() - started
    if report.fits:
        log.info("reconstruction: %d projections re-fitted on %d tokens in %.1f s (mean relative error %.4f → %.4f)",
                 len(report.fits), report.tokens, report.seconds,
                 sum(f.error_before for f in report.fits) / len(report.fits),
                 sum(f.error_after for f in report.fits) / len(report.fits))
    return report


def _check_arguments(layers: list, plan: PruningPlan, batch: torch.Tensor, ridge: float) -> None:
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise HywiaError(f"reconstruction ridge {ridge} is not a finite number ≥ 0",
                         f"use a relative ridge such as {DEFAULT_RIDGE} (0 is plain least squares)")
    if len(plan.layers) != len(layers):
        raise HywiaError(f"the plan has {len(plan.layers)} layers but the model has {len(layers)}",
                         "reconstruct with the plan made for this model")
    for index, (layer, layer_plan) in enumerate(zip(layers, plan.layers)):
        for kind in (ATTENTION, MLP):
            if layer_plan.kept(kind) and max(layer_plan.kept(kind)) >= unit_count(layer, kind):
                raise HywiaError(f"layer {index}: the plan keeps {kind} unit {max(layer_plan.kept(kind))}, "
                                 f"but the layer has {unit_count(layer, kind)}",
                                 "reconstruct the unsliced model with the plan made for it")
    if batch.dim() != 2 or batch.numel() == 0 or batch.dtype != torch.long:
        raise HywiaError(f"the calibration batch has shape {tuple(batch.shape)} and dtype {batch.dtype}",
                         "pass token ids as a LongTensor [samples, seq_len]")


def _first_layer_inputs(model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states entering the first decoder layer and the keyword arguments the model passes
    its layers (attention mask, rotary position embeddings, …), caught by running the model up to
    there: whatever this transformers version passes is passed on unchanged."""
    caught = {}

    def catch(_module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    device = next(model.parameters()).device
    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(input_ids=batch.to(device), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return caught["hidden"], caught["kwargs"]


def _input_of(module: torch.nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The input MODULE receives while RUN executes; RUN stops there (the rest is not computed)."""
    caught = {}

    def catch(_module, args):
        caught["input"] = args[0]
        raise _Captured

    handle = module.register_forward_pre_hook(catch)
    try:
        run()
    except _Captured:
        pass
    finally:
        handle.remove()
    return caught["input"]


def _reconstruct_layer(index: int, layer, layer_plan: LayerPlan, hidden: torch.Tensor, layer_kwargs: dict,
                       ridge: float, report: ReconstructionReport) -> torch.Tensor:
    """Fit this layer's o_proj, then its down_proj, and return the layer's output on HIDDEN as the
    pruned, reconstructed layer computes it (the LlamaDecoderLayer residual structure)."""
    attention_in = layer.input_layernorm(hidden)
    o_proj = layer.self_attn.o_proj
    context = _input_of(o_proj, lambda: layer.self_attn(hidden_states=attention_in, **layer_kwargs))
    _fit_projection(index, layer, ATTENTION, layer_plan.kept(ATTENTION), context, ridge, report)
    # Removed columns of o_proj are zero now, so this is the pruned attention's output.
    hidden = hidden + o_proj(context)
    mlp_in = layer.post_attention_layernorm(hidden)
    down_proj = layer.mlp.down_proj
    intermediate = _input_of(down_proj, lambda: layer.mlp(mlp_in))
    _fit_projection(index, layer, MLP, layer_plan.kept(MLP), intermediate, ridge, report)
    return hidden + down_proj(intermediate)


def _fit_projection(index: int, layer, kind: str, kept_units: list[int], inputs: torch.Tensor, ridge: float,
                    report: ReconstructionReport) -> None:
    """Re-fit the kept input columns of KIND's output projection on INPUTS (its full input, every
    unit included) and zero its removed columns; records the fit in REPORT."""
    started = time.perf_counter()
    name = _MODULE_NAMES[kind]
    module = layer.get_submodule(name)
    flat = inputs.reshape(-1, inputs.shape[-1])
    if not torch.isfinite(flat).all():
        raise HywiaError(f"reconstruction: the calibration activations entering layer {index} ({name}) "
                         "contain NaN or infinite values",
                         "check the model's weights and dtype (float16 can overflow: prune in float32 or bfloat16), "
                         "or prune without --reconstruct")
    # Each unit owns an equal block of input columns (G heads × head_dim, or one MLP channel).
    block = module.in_features // unit_count(layer, kind)
    kept = _block_indices(kept_units, block).to(module.weight.device)
    if kept.numel() == module.in_features:
        return  # nothing removed: the dense projection is already the fit
    removed = _complement(kept, module.in_features)
    x = flat.double()
    gram = x.T @ x  # H = Σ_tokens x xᵀ, accumulated in float64
    weight = module.weight.double()
    w_kept, w_removed = weight[:, kept], weight[:, removed]
    h_kk, h_kr, h_rr = gram[kept][:, kept], gram[kept][:, removed], gram[removed][:, removed]
    damping, factor = _regularised_cholesky(h_kk, ridge, index, name)
    # Δ = W_R H_RK (H_KK + λI)⁻¹, solved as (H_KK + λI) Δᵀ = H_KR W_Rᵀ.
    delta = torch.cholesky_solve(h_kr @ w_removed.T, factor).T
    if not torch.isfinite(delta).all():
        raise HywiaError(f"reconstruction of layer {index} ({name}) produced NaN or infinite weights",
                         "raise the reconstruction ridge, or prune without --reconstruct")
    new_weight = torch.zeros_like(weight)
    new_weight[:, kept] = w_kept + delta
    # Errors from H alone: with D = W'_full − W (Δ on K, −W_R on R), ||D X||² = tr(D H Dᵀ).
    target = _quadratic(weight, gram)
    before = _quadratic(w_removed, h_rr)
    after = _quadratic(delta, h_kk) - 2 * float(((delta @ h_kr) * w_removed).sum()) + before
    module.weight.copy_(new_weight.to(module.weight.dtype))
    report.fits.append(FitRecord(
        layer=index, kind=kind, module=name, kept_columns=kept.numel(), columns=module.in_features,
        error_before=before / target if target > 0 else 0.0,
        error_after=max(after, 0.0) / target if target > 0 else 0.0,
        damping=damping, seconds=time.perf_counter() - started))


def _regularised_cholesky(h_kk: torch.Tensor, ridge: float, index: int, name: str) -> tuple[float, torch.Tensor]:
    """λ = ridge × mean(diag H_KK), and the Cholesky factor of H_KK + λI. A singular H_KK (too few
    tokens, dead inputs, ridge 0) gets growing extra damping until the factorisation succeeds."""
    scale = float(h_kk.diagonal().mean())
    if scale <= 0:  # every kept input is zero on the calibration batch: any damping gives W' = W_K
        scale = 1.0
    damping = ridge * scale
    eye = torch.eye(h_kk.shape[0], dtype=h_kk.dtype, device=h_kk.device)
    extra = _FIRST_DAMPING * scale
    for _ in range(_MAX_DAMPING_STEPS):
        factor, info = torch.linalg.cholesky_ex(h_kk + damping * eye)
        if int(info) == 0:
            return damping, factor
        damping += extra
        extra *= 10
    raise HywiaError(f"reconstruction of layer {index} ({name}): the input covariance cannot be regularised",
                     "raise the reconstruction ridge, or prune without --reconstruct")


def _quadratic(weight: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(W H Wᵀ) = ||W X||²."""
    return float(((weight @ gram) * weight).sum())


def _complement(kept: torch.Tensor, width: int) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().squeeze(1)
