"""Numerical faults are errors (issue 13): a NaN or infinite score stops the prune, naming the layer."""

from __future__ import annotations

import pytest
import torch

from hywia.budget import Budget, allocator
from hywia.errors import HywiaError
from hywia.fusion import FusionConfig, train_fusion
from hywia.importance import CRITERIA, ImportanceContext
from hywia.models import load_model
from hywia.options import PruneOptions
from hywia.pipeline import prune_model
from hywia.scores import UnitStatistics, collect_statistics
from hywia.units import ATTENTION, MLP, KeepCounts, count_parameters, layer_shapes
from tests.tiny import tiny_model


def _poison(model, layer: int, value: float) -> None:
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight[0, 3] = value


def test_gradient_statistics_with_a_nan_weight_name_the_damaged_layer():
    model = tiny_model(layers=3)
    _poison(model, 1, float("nan"))
    batch = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(HywiaError, match="weights of layer 1 hold NaN"):
        collect_statistics(model, batch, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_criterion_with_a_non_finite_score_stops_naming_layer_and_type(bad):
    def scores(faulty_layer):
        return [{ATTENTION: torch.rand(2), MLP: torch.rand(512)} for _ in range(3)]

    stats = UnitStatistics(fine=scores(1), coarse=scores(1), fine_first_order=scores(1), coarse_first_order=scores(1))
    stats.fine[2][MLP][7] = bad
    context = ImportanceContext(model=None, batch=None, keep=None)
    with pytest.raises(HywiaError, match=r"fine importance scores of layer 2, MLP channels: 1 of 512"):
        CRITERIA["fine"].score(stats, context)
    CRITERIA["coarse"].score(stats, context)  # the other granularity is finite: no error


def test_magnitude_of_an_infinite_weight_names_its_layer():
    model = tiny_model(layers=3)
    _poison(model, 2, float("inf"))
    context = ImportanceContext(model=model, batch=None, keep=None)
    with pytest.raises(HywiaError, match="layer 2, MLP channels"):
        CRITERIA["magnitude"].score(None, context)


def test_global_allocation_refuses_a_nan_instead_of_removing_that_unit_first():
    model = tiny_model(layers=3)
    shapes = layer_shapes(model)
    comparable = [{ATTENTION: torch.rand(2), MLP: torch.rand(512)} for _ in shapes]
    comparable[1][ATTENTION][0] = float("nan")
    budget = Budget(tuple(shapes), count_parameters(model))
    with pytest.raises(HywiaError, match=r"comparable \(global allocation\) scores of layer 1, attention"):
        allocator(budget, comparable)(0.2)


def test_fusion_stops_when_its_loss_is_not_finite():
    model = tiny_model(layers=2)
    _poison(model, 0, float("nan"))
    scores = [{ATTENTION: torch.rand(2), MLP: torch.rand(512)} for _ in range(2)]
    batch = torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(HywiaError, match="soft-masked calibration loss is nan at step 0"):
        train_fusion(model, scores, scores, [KeepCounts(1, 256)] * 2, batch, FusionConfig(steps=2), progress=False)


def test_the_pipeline_stops_before_pruning_a_damaged_checkpoint(tmp_path):
    from tests.tiny import save_tiny_model

    directory = save_tiny_model(tmp_path / "m", layers=3)
    loaded = load_model(str(directory))
    _poison(loaded.model, 2, float("inf"))
    text = tmp_path / "text.txt"
    text.write_text("The rain in Spain stays mainly in the plain. " * 200)
    options = PruneOptions(ratio=0.3, importance="fine", calibration=str(text), samples=4, seq_len=16)
    with pytest.raises(HywiaError, match="layer 2"):
        prune_model(loaded, options, progress=False)
