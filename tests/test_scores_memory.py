"""Gradient statistics in bounded memory: chunks of layers, the model's own dtype, float32 sums."""

from __future__ import annotations

import pytest
import torch

from hywia.scores import SAMPLED_TOKEN_SPLITS, collect_statistics, layer_chunks
from hywia.units import UNIT_KINDS, unit_count, unit_members
from tests.tiny import tiny_model

SCORES = ("fine", "fine_first_order", "coarse", "coarse_first_order", "magnitude")


def _batch(samples=3, seq_len=24, seed=0):
    return torch.randint(0, 384, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def group_losses(model, ids, splits):
    """The sample's mean loss as SPLITS parts over target positions ≡ k (mod SPLITS), from log-softmax."""
    log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    token_loss = -log_probs.gather(1, ids[0, 1:, None])[:, 0]
    return [token_loss[k::splits].sum() / token_loss.numel() for k in range(splits)]


def reference_statistics(model, batch, model_sampled=False, splits=1):
    """HYWIA.md §2–3 written out: every per-sample gradient of every prunable weight at once (torch.autograd.grad).
    MODEL_SAMPLED: the second-order parts alone for `fine` and `coarse` (text the model sampled itself).
    SPLITS: each sample's loss in that many interleaved token groups; the squares are summed over the groups."""
    layers = list(model.model.layers)
    members = [(i, kind, m) for i, layer in enumerate(layers) for kind in UNIT_KINDS for m in unit_members(layer, kind)]
    params = [m.param for _, _, m in members]
    per_sample = []  # one entry per (sample, token group)
    for n in range(batch.shape[0]):
        ids = batch[n:n + 1]
        if splits == 1:
            per_sample.append(torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params))
        else:
            per_sample += [torch.autograd.grad(group_losses(model, ids, splits)[k], params) for k in range(splits)]
    samples = batch.shape[0]
    out = {name: [{kind: torch.zeros(unit_count(layer, kind), dtype=torch.float64) for kind in UNIT_KINDS}
                  for layer in layers] for name in ("fine", "fine_first_order")}
    d = [[{kind: torch.zeros(unit_count(layer, kind), dtype=torch.float64) for kind in UNIT_KINDS} for layer in layers]
         for _ in per_sample]
    for j, (i, kind, member) in enumerate(members):
        w = member.param.detach().double()
        grads = torch.stack([g[j].double() for g in per_sample])
        g, fisher = grads.sum(0) / samples, (grads ** 2).sum(0) / samples
        n_units = unit_count(layers[i], kind)

        def units(x, dim=member.dim, n_units=n_units):
            return x.movedim(dim, 0).reshape(n_units, -1).sum(1)

        first, second = (0.0 if model_sampled else w * g), 0.5 * w * w * fisher
        out["fine"][i][kind] += units((first - second).abs())
        out["fine_first_order"][i][kind] += units((w * g).abs())
        for n in range(len(per_sample)):
            d[n][i][kind] += units(w * grads[n])
    mean_d = [{k: sum(d[n][i][k] for n in range(len(d))) / samples for k in UNIT_KINDS} for i in range(len(layers))]
    mean_d2 = [{k: sum(d[n][i][k] ** 2 for n in range(len(d))) / samples for k in UNIT_KINDS} for i in range(len(layers))]
    kept_mean_d = [{k: 0.0 * v if model_sampled else v for k, v in layer.items()} for layer in mean_d]
    out["coarse"] = [{k: (kept_mean_d[i][k] - 0.5 * mean_d2[i][k]).abs() for k in UNIT_KINDS} for i in range(len(layers))]
    out["coarse_first_order"] = [{k: mean_d[i][k].abs() for k in UNIT_KINDS} for i in range(len(layers))]
    return out


@pytest.mark.parametrize("model_sampled", [False, True], ids=["text", "model-sampled"])
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_statistics_match_the_formulas(gqa, model_sampled):
    """Model-sampled text is scored in SAMPLED_TOKEN_SPLITS token groups by default, other text whole."""
    model = tiny_model(gqa=gqa, layers=3).double()
    batch = _batch()
    expected = reference_statistics(model, batch, model_sampled, SAMPLED_TOKEN_SPLITS if model_sampled else 1)
    stats = collect_statistics(model, batch, progress=False, budget_bytes=1,  # one layer per chunk
                               model_sampled=model_sampled)
    _assert_statistics_equal(stats, expected)


@pytest.mark.parametrize("splits", [1, 2, 23], ids=["whole", "two-groups", "per-token"])
def test_token_groups_sum_squares_over_groups_and_leave_first_order_scores_alone(splits):
    model = tiny_model(gqa=True, layers=2).double()
    batch = _batch()  # 24 tokens: 23 targets, so 23 groups are one token each
    stats = collect_statistics(model, batch, progress=False, model_sampled=True, token_splits=splits)
    _assert_statistics_equal(stats, reference_statistics(model, batch, True, splits))
    whole = collect_statistics(model, batch, progress=False, model_sampled=True, token_splits=1)
    for name in ("fine_first_order", "coarse_first_order"):  # built from Σg alone, which the split cannot change
        for a, b in zip(getattr(whole, name), getattr(stats, name)):
            for kind in UNIT_KINDS:
                # float32 sums added in another order: equal to float32 rounding of the largest score
                torch.testing.assert_close(a[kind], b[kind], rtol=1e-4, atol=1e-6 * float(a[kind].abs().max()))
    if splits > 1:  # the second-order scores do change: the cross-group products are gone
        assert not torch.allclose(whole.fine[0]["mlp"], stats.fine[0]["mlp"], rtol=1e-3)


def test_token_splits_below_one_are_refused():
    with pytest.raises(ValueError, match="token_splits must be at least 1"):
        collect_statistics(tiny_model(layers=1), _batch(), progress=False, token_splits=0)


def _assert_statistics_equal(stats, expected):
    for name, reference in expected.items():
        for got_layer, want_layer in zip(getattr(stats, name), reference):
            for kind in UNIT_KINDS:
                # float32 sums against float64: agreement to float32 rounding of the largest score
                scale = float(want_layer[kind].abs().max())
                torch.testing.assert_close(got_layer[kind].double(), want_layer[kind], rtol=1e-4, atol=1e-6 * scale)


def test_chunking_does_not_change_any_score():
    model = tiny_model(gqa=True, layers=4)
    batch = _batch()
    assert [len(c) for c in layer_chunks(model.model.layers, 10**12)] == [4]
    assert [len(c) for c in layer_chunks(model.model.layers, 1)] == [1, 1, 1, 1]
    whole = collect_statistics(model, batch, progress=False, budget_bytes=10**12)
    layer_bytes = 8 * sum(m.param.numel() for kind in UNIT_KINDS for m in unit_members(model.model.layers[0], kind))
    assert [len(c) for c in layer_chunks(model.model.layers, 2 * layer_bytes)] == [2, 2]
    for budget in (1, 2 * layer_bytes):
        chunked = collect_statistics(model, batch, progress=False, budget_bytes=budget)
        for name in SCORES:
            for a, b in zip(getattr(whole, name), getattr(chunked, name)):
                for kind in UNIT_KINDS:
                    assert torch.equal(a[kind], b[kind]), (name, budget)
    # Nothing is left behind: no gradients held, flags restored.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_bfloat16_gradients_with_float32_sums_rank_units_like_float32():
    """A bf16 model's statistics come out float32 and agree with the fp32 model's to bf16's precision."""
    model = tiny_model(gqa=True, layers=2)
    batch = _batch(samples=4, seq_len=32)
    full = collect_statistics(model, batch, progress=False)
    half = collect_statistics(model.to(torch.bfloat16), batch, progress=False)
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in model.parameters())
    for name in SCORES:
        for a, b in zip(getattr(full, name), getattr(half, name)):
            for kind in UNIT_KINDS:
                assert b[kind].dtype == torch.float32
                # rank agreement: bf16 keeps ~3 significant digits, enough to order units nearly alike
                ranks = lambda x: x.argsort().argsort().double()
                correlation = torch.corrcoef(torch.stack([ranks(a[kind]), ranks(b[kind])]))[0, 1]
                assert correlation > 0.9, (name, kind, float(correlation))
