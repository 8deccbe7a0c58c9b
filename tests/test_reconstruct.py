"""Reconstruction after removal (issue 13, item 1): the ridge least-squares re-fit of o_proj and down_proj."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hywia.errors import HywiaError
from hywia.plan import LayerPlan, PruningPlan
from hywia.reconstruct import reconstruct
from hywia.surgery import slice_model, zero_removed_units
from hywia.units import ATTENTION, MLP, decoder_layers, unit_count
from tests.tiny import tiny_model

LAYERS = 3


def calibration(model, rows=16, length=32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=generator)


def random_plan(model, seed=0, attention_kept=None, mlp_fraction=0.6) -> PruningPlan:
    """Every layer loses units of both kinds (a different random choice per layer)."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for layer in decoder_layers(model):
        n_attention, n_mlp = unit_count(layer, ATTENTION), unit_count(layer, MLP)
        attention = attention_kept or max(1, n_attention // 2)
        layers.append(LayerPlan(
            kept_kv_groups=sorted(torch.randperm(n_attention, generator=generator)[:attention].tolist()),
            kept_mlp_channels=sorted(torch.randperm(n_mlp, generator=generator)[:int(n_mlp * mlp_fraction)].tolist())))
    return PruningPlan(layers=layers)


def whole_plan(model) -> PruningPlan:
    return PruningPlan(layers=[LayerPlan(list(range(unit_count(layer, ATTENTION))), list(range(unit_count(layer, MLP))))
                               for layer in decoder_layers(model)])


def input_of(model, module, batch) -> torch.Tensor:
    """MODULE's input [tokens, in_features] in a forward of MODEL on BATCH, as float64."""
    captured = []
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        model(input_ids=batch)
    handle.remove()
    return captured[0].reshape(-1, module.in_features).double()


def masked(model, plan):
    return zero_removed_units(copy.deepcopy(model), plan)


@pytest.fixture(params=[False, True], ids=["mha", "gqa"])
def model(request):
    return tiny_model(gqa=request.param, layers=LAYERS)


def test_nothing_removed_is_the_identity(model):
    before = copy.deepcopy(model.state_dict())
    report = reconstruct(model, whole_plan(model), calibration(model), ridge=0.0, progress=False)
    assert report.fits == []
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], atol=0, rtol=0, msg=name)


def test_one_kind_whole_leaves_that_kind_untouched(model):
    """Units of one kind all kept: that projection is not re-fitted, the other is."""
    plan = random_plan(model)
    for layer_plan, layer in zip(plan.layers, decoder_layers(model)):
        layer_plan.kept_kv_groups = list(range(unit_count(layer, ATTENTION)))
    o_proj_before = [layer.self_attn.o_proj.weight.clone() for layer in decoder_layers(model)]
    report = reconstruct(model, plan, calibration(model), progress=False)
    assert {fit.kind for fit in report.fits} == {MLP}
    for layer, weight in zip(decoder_layers(model), o_proj_before):
        torch.testing.assert_close(layer.self_attn.o_proj.weight, weight, atol=0, rtol=0)


def test_sliced_model_equals_the_reconstructed_masked_model(model):
    plan = random_plan(model)
    batch = calibration(model)
    reconstruct(model, plan, batch, progress=False)
    sliced = slice_model(copy.deepcopy(model), plan)
    probe = calibration(model, rows=3, length=20, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(sliced(input_ids=probe).logits, model(input_ids=probe).logits, atol=1e-5, rtol=0)
    # and reconstruction really changed the kept weights (it is not plain slicing)
    plain = slice_model(masked(tiny_model(gqa=model.config.num_key_value_heads == 2, layers=LAYERS), plan), plan)
    assert not torch.allclose(sliced.model.layers[0].mlp.down_proj.weight, plain.model.layers[0].mlp.down_proj.weight)


def reference_reconstruction(dense, plan, batch, ridge):
    """The definition, computed the slow way: for each layer in order, a full forward of the model
    (earlier layers reconstructed and masked) captures the projection's input X; the kept columns
    solve the stacked least-squares system [X_K; √λ I] W'ᵀ = [X Wᵀ; √λ W_Kᵀ] (float64 lstsq,
    i.e. min ||X_K W'ᵀ − X Wᵀ||² + λ||W' − W_K||² without the normal-equation algebra)."""
    model = copy.deepcopy(dense)
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        for kind, module in ((ATTENTION, layer.self_attn.o_proj), (MLP, layer.mlp.down_proj)):
            x = input_of(model, module, batch)
            block = module.in_features // unit_count(layer, kind)
            kept = [u * block + j for u in plan.layers[index].kept(kind) for j in range(block)]
            if len(kept) == module.in_features:
                continue
            weight = module.weight.detach().double()
            x_kept, w_kept = x[:, kept], weight[:, kept]
            lam = ridge * float((x_kept * x_kept).sum(0).mean())
            eye = torch.eye(len(kept), dtype=torch.float64)
            system = torch.cat([x_kept, math.sqrt(lam) * eye])
            target = torch.cat([x @ weight.T, math.sqrt(lam) * w_kept.T])
            fitted = torch.linalg.lstsq(system, target).solution.T
            new_weight = torch.zeros_like(weight)
            new_weight[:, kept] = fitted
            with torch.no_grad():
                module.weight.copy_(new_weight.float())
        only_this_layer = whole_plan(model)
        only_this_layer.layers[index] = plan.layers[index]
        zero_removed_units(model, only_this_layer)
    return model


@pytest.mark.parametrize("ridge", [1e-3, 0.05, 1.0])
def test_matches_the_slow_reference(model, ridge):
    """Cached hidden states between layers give the same fit as full forwards through the model,
    and the closed form equals a direct least-squares solve of the ridge problem."""
    plan, batch = random_plan(model), calibration(model)
    expected = reference_reconstruction(model, plan, batch, ridge)
    reconstruct(model, plan, batch, ridge=ridge, progress=False)
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.05, 10.0])
def test_the_per_layer_fit_never_gets_worse_than_slicing(model, ridge):
    """Guaranteed for every λ ≥ 0 (plain slicing is a feasible point with zero penalty), on the
    inputs each fit saw; and the recorded errors are the true ones."""
    plan, batch = random_plan(model), calibration(model)
    dense = copy.deepcopy(model)
    report = reconstruct(model, plan, batch, ridge=ridge, progress=False)
    assert len(report.fits) == 2 * LAYERS
    for fit in report.fits:
        assert 0 < fit.error_before
        assert fit.error_after <= fit.error_before * (1 + 1e-9), fit
        assert math.isfinite(fit.error_after) and fit.error_after >= 0
    if ridge == 0.0:  # 512 tokens, more than any kept width: the unregularised fit is strictly better
        assert all(fit.error_after < 0.9 * fit.error_before for fit in report.fits)
    # The last down_proj's recorded error, recomputed from its full input (the removed channels'
    # too, so with that layer's gate/up rows restored from the dense model) and the two weights.
    probe = copy.deepcopy(model)
    for name in ("gate_proj", "up_proj"):
        getattr(decoder_layers(probe)[-1].mlp, name).load_state_dict(
            getattr(decoder_layers(dense)[-1].mlp, name).state_dict())
    last = decoder_layers(probe)[-1].mlp.down_proj
    x = input_of(probe, last, batch)
    dense_out = x @ decoder_layers(dense)[-1].mlp.down_proj.weight.detach().double().T
    error = float(((x @ last.weight.detach().double().T - dense_out) ** 2).sum() / (dense_out ** 2).sum())
    assert error == pytest.approx(report.fits[-1].error_after, rel=1e-3, abs=1e-9)


def test_calibration_loss_falls_versus_plain_slicing(model):
    """Not guaranteed in general (each fit matches one layer's output, not the loss), so a fixed
    seeded case. A random model's only truth is itself: the loss is KL(dense ‖ pruned) of the
    next-token distributions on the calibration batch (its LM loss on random tokens is ~ln V for all)."""
    plan, batch = random_plan(model, seed=3), calibration(model, seed=3)
    with torch.no_grad():
        dense = model(input_ids=batch).logits.log_softmax(-1)

    def loss(pruned) -> float:
        with torch.no_grad():
            logprobs = pruned(input_ids=batch).logits.log_softmax(-1)
        return float((dense.exp() * (dense - logprobs)).sum(-1).mean())

    plain_loss = loss(masked(model, plan))
    reconstruct(model, plan, batch, progress=False)
    assert loss(model) < 0.5 * plain_loss


def test_too_few_tokens_and_no_ridge_is_regularised_not_nan(model):
    """4 tokens, hundreds of kept columns: H_KK is singular; the result is finite, never NaN."""
    plan = random_plan(model)
    report = reconstruct(model, plan, calibration(model, rows=1, length=4), ridge=0.0, progress=False)
    assert all(fit.damping > 0 for fit in report.fits)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(fit.error_after <= fit.error_before * (1 + 1e-6) for fit in report.fits)


def test_nan_activations_stop_with_the_layer_named(model):
    with torch.no_grad():
        decoder_layers(model)[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(HywiaError, match=r"layer 1 \(mlp\.down_proj\).*NaN or infinite"):
        reconstruct(model, random_plan(model), calibration(model), progress=False)


@pytest.mark.parametrize("ridge", [-0.1, float("nan"), float("inf")])
def test_bad_ridge_is_refused(model, ridge):
    with pytest.raises(HywiaError, match="ridge"):
        reconstruct(model, random_plan(model), calibration(model), ridge=ridge, progress=False)


def test_plan_for_another_model_is_refused(model):
    plan = random_plan(model)
    with pytest.raises(HywiaError, match="plan has 2 layers but the model has 3"):
        reconstruct(model, PruningPlan(plan.layers[:2]), calibration(model), progress=False)
    plan.layers[0].kept_mlp_channels.append(10_000)
    with pytest.raises(HywiaError, match="layer 0"):
        reconstruct(model, plan, calibration(model), progress=False)
