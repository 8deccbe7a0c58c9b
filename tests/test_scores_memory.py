"""Gradient statistics in bounded memory: chunks of layers, the model's own dtype, float32 sums."""

from __future__ import annotations

import pytest
import torch

from hywia.scores import collect_statistics, layer_chunks
from hywia.units import UNIT_KINDS, unit_count, unit_members
from tests.tiny import tiny_model

SCORES = ("fine", "fine_first_order", "coarse", "coarse_first_order", "magnitude")


def _batch(samples=3, seq_len=24, seed=0):
    return torch.randint(0, 384, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def reference_statistics(model, batch, model_sampled=False):
    """HYWIA.md §2–3 written out: every per-sample gradient of every prunable weight at once (torch.autograd.grad).
    MODEL_SAMPLED: the second-order parts alone for `fine` and `coarse` (text the model sampled itself)."""
    layers = list(model.model.layers)
    members = [(i, kind, m) for i, layer in enumerate(layers) for kind in UNIT_KINDS for m in unit_members(layer, kind)]
    params = [m.param for _, _, m in members]
    per_sample = []
    for n in range(batch.shape[0]):
        ids = batch[n:n + 1]
        per_sample.append(torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params))
    out = {name: [{kind: torch.zeros(unit_count(layer, kind), dtype=torch.float64) for kind in UNIT_KINDS}
                  for layer in layers] for name in ("fine", "fine_first_order")}
    d = [[{kind: torch.zeros(unit_count(layer, kind), dtype=torch.float64) for kind in UNIT_KINDS} for layer in layers]
         for _ in per_sample]
    for j, (i, kind, member) in enumerate(members):
        w = member.param.detach().double()
        grads = torch.stack([g[j].double() for g in per_sample])
        g, fisher = grads.mean(0), (grads ** 2).mean(0)
        n_units = unit_count(layers[i], kind)

        def units(x):
            return x.movedim(member.dim, 0).reshape(n_units, -1).sum(1)

        first, second = (0.0 if model_sampled else w * g), 0.5 * w * w * fisher
        out["fine"][i][kind] += units((first - second).abs())
        out["fine_first_order"][i][kind] += units((w * g).abs())
        for n in range(len(per_sample)):
            d[n][i][kind] += units(w * grads[n])
    mean_d = [{k: sum(d[n][i][k] for n in range(len(d))) / len(d) for k in UNIT_KINDS} for i in range(len(layers))]
    mean_d2 = [{k: sum(d[n][i][k] ** 2 for n in range(len(d))) / len(d) for k in UNIT_KINDS} for i in range(len(layers))]
    kept_mean_d = [{k: 0.0 * v if model_sampled else v for k, v in layer.items()} for layer in mean_d]
    out["coarse"] = [{k: (kept_mean_d[i][k] - 0.5 * mean_d2[i][k]).abs() for k in UNIT_KINDS} for i in range(len(layers))]
    out["coarse_first_order"] = [{k: mean_d[i][k].abs() for k in UNIT_KINDS} for i in range(len(layers))]
    return out


@pytest.mark.parametrize("model_sampled", [False, True], ids=["text", "model-sampled"])
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_statistics_match_the_formulas(gqa, model_sampled):
    model = tiny_model(gqa=gqa, layers=3).double()
    batch = _batch()
    expected = reference_statistics(model, batch, model_sampled)
    stats = collect_statistics(model, batch, progress=False, budget_bytes=1,  # one layer per chunk
                               model_sampled=model_sampled)
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
