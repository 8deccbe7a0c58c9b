"""The fusion as an attention over granularities (issue 13 item 2): keys from raw-score statistics,
training that moves them under rank normalisation, a start at exactly ½/½, and a held-out choice
between learned and fixed that is deterministic and needs a real margin."""

from __future__ import annotations

import pytest
import torch

from hywia.calibration import calibration_batch
from hywia.fusion import (
    AttentionFusion,
    FusionConfig,
    blend,
    fixed_alpha,
    held_out_verdict,
    per_sample_hard_masked_losses,
    soft_masked_loss,
    soft_masks,
    split_holdout,
    train_fusion,
)
from hywia.fusion_keys import KEY_FEATURES, key_features, raw_statistics
from hywia.models import load_model
from hywia.scores import collect_statistics, normalise_within_layers
from hywia.units import ATTENTION, MLP, UNIT_KINDS, KeepCounts
from tests.tiny import save_tiny_model

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 4
        + "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 4
        + "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 4) * 8
KEEP = [KeepCounts(1, 256)] * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer tiny model, a 16 × 32 calibration batch from a text, and its raw statistics."""
    directory = save_tiny_model(tmp_path_factory.mktemp("fusion") / "m", layers=3)
    text = tmp_path_factory.mktemp("text") / "calibration.txt"
    text.write_text(TEXT)
    loaded = load_model(str(directory))
    batch = calibration_batch(str(text), loaded.tokenizer, loaded.model, 16, 32, seed=0)
    return loaded.model, batch, collect_statistics(loaded.model, batch, progress=False)


def test_raw_statistics_see_what_rank_normalisation_hides():
    """Two score vectors that rank normalisation makes permutations of one grid still differ in every
    raw statistic of the key: scale, spread, concentration, kept mass, the other's mass removed."""
    generator = torch.Generator().manual_seed(0)
    fine = torch.rand(64, generator=generator) * 5 + 1  # large, even
    coarse = torch.rand(64, generator=generator) ** 4 * 0.01  # small, concentrated
    ranked = normalise_within_layers([{ATTENTION: fine, MLP: fine}, {ATTENTION: coarse, MLP: coarse}], "rank")
    assert torch.equal(ranked[0][MLP].sort().values, ranked[1][MLP].sort().values)
    fine_keys, coarse_keys = raw_statistics(fine, coarse, 32), raw_statistics(coarse, fine, 32)
    agreement = KEY_FEATURES.index("agreement")
    for index, name in enumerate(KEY_FEATURES):
        if index != agreement:  # rank agreement is the one statistic both share, by definition
            assert float(fine_keys[index]) != pytest.approx(float(coarse_keys[index]), abs=1e-3), name
    assert float(fine_keys[agreement]) == pytest.approx(float(coarse_keys[agreement]), abs=1e-6)


def test_key_projection_gets_gradient_under_rank_normalisation(tiny):
    """The soft-masked calibration loss of the rank-normalised blend sends gradient into the key
    projection (the old keys, statistics of the normalised scores, gave it none)."""
    model, batch, stats = tiny
    features, _ = key_features(stats.fine, stats.coarse, KEEP)
    fine_hat, coarse_hat = normalise_within_layers(stats.fine, "rank"), normalise_within_layers(stats.coarse, "rank")
    fusion = AttentionFusion(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a query as after a first step (at q = 0 only the query gets gradient)
        fusion.query.weight.normal_(generator=torch.Generator().manual_seed(1))
    alpha = [{k: fusion.alpha(i / 2, k, features[i][k]) for k in UNIT_KINDS} for i in range(3)]
    for param in model.parameters():
        param.requires_grad_(False)
    from hywia.fusion import _calibration_loss, apply_unit_masks

    with apply_unit_masks(model, soft_masks(blend(fine_hat, coarse_hat, alpha), KEEP, 0.1)):
        _calibration_loss(model, batch[:4], 0.0).backward()
    assert fusion.key_weight.grad is not None
    for granularity in range(2):
        assert float(fusion.key_weight.grad[granularity].abs().sum()) > 1e-6


def test_alpha_differs_between_layers_at_the_same_depth_with_different_raw_statistics(tiny):
    _, _, stats = tiny
    features, raw = key_features(stats.fine, stats.coarse, KEEP)
    assert not torch.allclose(raw[0][MLP], raw[2][MLP])
    fusion = AttentionFusion(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fusion.query.weight.normal_(generator=torch.Generator().manual_seed(1))
    same_depth = 0.5
    with torch.no_grad():
        first, last = fusion.alpha(same_depth, MLP, features[0][MLP]), fusion.alpha(same_depth, MLP, features[2][MLP])
        torch.testing.assert_close(fusion.alpha(same_depth, MLP, features[0][MLP]), first, rtol=0, atol=0)
    assert float((first - last).abs().max()) > 1e-3


def test_features_are_standardised_over_pruned_layers_and_zero_where_nothing_goes(tiny):
    _, _, stats = tiny
    keep = [KeepCounts(2, 512), KeepCounts(1, 256), KeepCounts(1, 200)]  # layer 0 keeps everything
    features, _ = key_features(stats.fine, stats.coarse, keep)
    assert torch.equal(features[0][MLP], torch.zeros_like(features[0][MLP]))
    pruned = torch.stack([features[1][MLP], features[2][MLP]])
    torch.testing.assert_close(pruned.mean(dim=0), torch.zeros(2, len(KEY_FEATURES)), atol=1e-5, rtol=0)


def test_training_starts_exactly_at_the_fixed_blend(tiny):
    model, batch, stats = tiny
    result = train_fusion(model, stats.fine, stats.coarse, KEEP, batch, FusionConfig(steps=0), progress=False)
    for layer in result.learned_alpha:
        for kind in UNIT_KINDS:
            assert layer[kind].tolist() == [0.5, 0.5]


def test_training_moves_the_keys_and_lowers_the_soft_masked_loss(tiny):
    model, batch, stats = tiny
    config = FusionConfig(steps=30, batch_size=4, learning_rate=0.1)
    result = train_fusion(model, stats.fine, stats.coarse, KEEP, batch, config, seed=3, progress=False)
    untrained = AttentionFusion(generator=torch.Generator().manual_seed(3))
    assert float((result.fusion.key_weight - untrained.key_weight).detach().abs().max()) > 1e-3
    for layer in result.learned_alpha:
        for kind in UNIT_KINDS:
            assert bool((layer[kind] >= 0).all()) and float(layer[kind].sum()) == pytest.approx(1.0, abs=1e-6)
    fine_hat, coarse_hat = normalise_within_layers(stats.fine, "rank"), normalise_within_layers(stats.coarse, "rank")
    train = batch[: result.diagnostics["train_samples"]]
    learned = soft_masked_loss(model, fine_hat, coarse_hat, result.learned_alpha, KEEP, train, config.end_temperature)
    fixed = soft_masked_loss(model, fine_hat, coarse_hat, fixed_alpha(3), KEEP, train, config.end_temperature)
    assert learned < fixed


def test_the_same_inputs_give_the_same_choice_and_losses(tiny):
    model, batch, stats = tiny
    config = FusionConfig(steps=6, batch_size=2)
    torch.manual_seed(123)  # the global generator must not matter
    first = train_fusion(model, stats.fine, stats.coarse, KEEP, batch, config, seed=1, progress=False)
    torch.manual_seed(456)
    second = train_fusion(model, stats.fine, stats.coarse, KEEP, batch, config, seed=1, progress=False)
    for key in ("selected", "holdout_loss_learned", "holdout_loss_fixed", "train_losses"):
        assert first.diagnostics[key] == second.diagnostics[key]


def test_held_out_losses_are_those_of_the_hard_masked_blends(tiny):
    model, batch, stats = tiny
    result = train_fusion(model, stats.fine, stats.coarse, KEEP, batch, FusionConfig(steps=4), progress=False)
    _, holdout = split_holdout(batch, FusionConfig.holdout_fraction)
    assert result.diagnostics["holdout_samples"] == holdout.shape[0] == 8
    fine_hat, coarse_hat = normalise_within_layers(stats.fine, "rank"), normalise_within_layers(stats.coarse, "rank")
    fixed = {weight: float(per_sample_hard_masked_losses(
        model, blend(fine_hat, coarse_hat, fixed_alpha(3, weight)), KEEP, holdout).mean())
        for weight in FusionConfig.fixed_fine_weights}
    learned = per_sample_hard_masked_losses(model, blend(fine_hat, coarse_hat, result.learned_alpha), KEEP, holdout)
    assert result.diagnostics["holdout_loss_fixed_blends"] == pytest.approx(
        {f"{weight:g}": loss for weight, loss in fixed.items()}, rel=1e-9)
    assert result.diagnostics["fixed_fine_weight"] == min(fixed, key=fixed.get)
    assert result.diagnostics["holdout_loss_fixed"] == pytest.approx(min(fixed.values()), rel=1e-9)
    assert result.diagnostics["holdout_loss_learned"] == pytest.approx(float(learned.mean()), rel=1e-9)


def test_an_untrained_fusion_keeps_the_best_fixed_blend(tiny):
    """With no training the learned blend is ½/½, which can never beat the best fixed blend by a margin:
    the blend kept is the fixed one with the lowest held-out loss, fine only and coarse only included."""
    model, batch, stats = tiny
    candidates = (0.5, 1.0, 0.0)
    result = train_fusion(model, stats.fine, stats.coarse, KEEP, batch,
                          FusionConfig(steps=0, fixed_fine_weights=candidates), progress=False)
    losses = result.diagnostics["holdout_loss_fixed_blends"]
    assert sorted(losses) == ["0", "0.5", "1"] and len(set(losses.values())) == 3  # three different blends
    best = min(candidates, key=lambda weight: losses[f"{weight:g}"])
    assert result.selected == "fixed" and result.diagnostics["fixed_fine_weight"] == best
    for layer in result.alpha:
        for kind in UNIT_KINDS:
            assert layer[kind].tolist() == [best, 1 - best]
    fine_hat, coarse_hat = normalise_within_layers(stats.fine, "rank"), normalise_within_layers(stats.coarse, "rank")
    expected = blend(fine_hat, coarse_hat, fixed_alpha(3, best))
    for got, want in zip(result.scores, expected):
        for kind in UNIT_KINDS:
            torch.testing.assert_close(got[kind], want[kind])


def test_per_sample_losses_match_the_models_own_loss(tiny):
    model, batch, stats = tiny
    scores = blend(normalise_within_layers(stats.fine, "rank"), normalise_within_layers(stats.coarse, "rank"),
                   fixed_alpha(3))
    whole = [KeepCounts(2, 512)] * 3
    losses = per_sample_hard_masked_losses(model, scores, whole, batch[:3], chunk=2)
    for row, loss in zip(batch[:3], losses):
        with torch.no_grad():
            expected = model(input_ids=row[None], labels=row[None]).loss
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(("gains", "selected"), [
    ([0.05, 0.06, 0.04, 0.05, 0.05, 0.06], "learned"),  # large and consistent
    ([0.004, 0.005, 0.006, 0.005, 0.004, 0.006], "fixed"),  # consistent but below min_gain
    ([0.30, -0.20, 0.25, -0.15, 0.20, -0.25], "fixed"),  # mean 0.025 > min_gain, but within 2 SE
    ([-0.05, -0.04, -0.06, -0.05, -0.05, -0.04], "fixed"),  # learned worse
])
def test_the_learned_blend_must_win_by_a_margin(gains, selected):
    fixed = torch.full((len(gains),), 3.0, dtype=torch.float64)
    learned = fixed - torch.tensor(gains, dtype=torch.float64)
    verdict = held_out_verdict(learned, fixed, FusionConfig())
    assert verdict["selected"] == selected
    assert verdict["holdout_loss_fixed"] == pytest.approx(3.0)
    assert verdict["holdout_loss_learned"] == pytest.approx(3.0 - sum(gains) / len(gains))


def test_holdout_is_the_batch_tail_and_both_sides_keep_a_sample():
    batch = torch.arange(12).view(6, 2)
    train, holdout = split_holdout(batch, 0.5)
    assert train.tolist() == batch[:3].tolist() and holdout.tolist() == batch[3:].tolist()
    train, holdout = split_holdout(batch[:2], 0.9)
    assert train.shape[0] == 1 and holdout.shape[0] == 1
