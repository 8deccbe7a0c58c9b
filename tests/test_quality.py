"""Quality measured at prune time (issue 13 item 5): held-out perplexity, dense vs pruned, in the report."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hywia.calibration import heldout_batch
from hywia.models import load_model
from hywia.options import PruneOptions
from hywia.pipeline import prune_model
from hywia.quality import HELDOUT_SAMPLES, per_sample_losses, perplexity
from tests.tiny import save_tiny_model

TEXT = " ".join(f"Line {i}: the {i % 11}th ship sailed past the {i % 13}th harbour at dawn." for i in range(400))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(TEXT)
    return str(path)


def test_report_states_dense_and_pruned_perplexity_on_the_heldout_slice(tmp_path, text_file):
    loaded = load_model(str(save_tiny_model(tmp_path / "m")))
    dense = copy.deepcopy(loaded.model)
    options = PruneOptions(ratio=0.3, importance="fixed", calibration=text_file, samples=8, seq_len=32)
    _, report = prune_model(loaded, options, progress=False)
    quality = report["quality"]
    heldout = heldout_batch(text_file, loaded.tokenizer, None, 8, 32, 0, HELDOUT_SAMPLES)
    assert quality["heldout_tokens"] == heldout.numel() == HELDOUT_SAMPLES * 32
    assert quality["dense_perplexity"] == pytest.approx(perplexity(dense, heldout), rel=1e-9)
    assert quality["pruned_perplexity"] == pytest.approx(perplexity(loaded.model, heldout), rel=1e-9)
    assert quality["perplexity_ratio"] == pytest.approx(quality["pruned_perplexity"] / quality["dense_perplexity"])
    assert quality["perplexity_ratio"] != pytest.approx(1.0, abs=1e-6)  # 30% of the model is gone


def test_nothing_removed_means_a_ratio_of_exactly_one(tmp_path, text_file):
    """A target the model already meets removes nothing: the same weights on the same tokens."""
    loaded = load_model(str(save_tiny_model(tmp_path / "m")))
    options = PruneOptions(importance="fixed", calibration=text_file, samples=8, seq_len=32, target_params="1B")
    _, report = prune_model(loaded, options, progress=False)
    assert report["params_after"] == report["params_before"]
    assert report["quality"]["perplexity_ratio"] == 1.0


def test_self_calibration_is_measured_on_heldout_prompts(tmp_path):
    loaded = load_model(str(save_tiny_model(tmp_path / "m")))
    options = PruneOptions(ratio=0.3, importance="magnitude", samples=4, seq_len=32)
    _, report = prune_model(loaded, options, progress=False)
    quality = report["quality"]
    assert quality["heldout_tokens"] == HELDOUT_SAMPLES * 32 and quality["heldout_source"].startswith("self")
    assert math.isfinite(quality["perplexity_ratio"]) and quality["perplexity_ratio"] > 0


def test_a_text_without_spare_windows_gives_no_quality_and_still_prunes(tmp_path):
    path = tmp_path / "short.txt"
    loaded = load_model(str(save_tiny_model(tmp_path / "m")))
    windows = len(loaded.tokenizer(TEXT[:3000], add_special_tokens=False).input_ids) // 32
    path.write_text(TEXT[:3000])
    options = PruneOptions(ratio=0.3, importance="fine", calibration=str(path), samples=windows, seq_len=32)
    _, report = prune_model(loaded, options, progress=False)
    assert report["quality"] is None and report["params_after"] < report["params_before"]


def test_perplexity_is_the_exponent_of_the_token_weighted_mean_loss(tmp_path, text_file):
    loaded = load_model(str(save_tiny_model(tmp_path / "m")))
    batch = heldout_batch(text_file, loaded.tokenizer, None, 0, 32, 0, 5)
    losses = per_sample_losses(loaded.model, batch, chunk=2)
    assert perplexity(loaded.model, batch) == pytest.approx(math.exp(float(losses.mean())), rel=1e-12)
    with torch.no_grad():
        loss = loaded.model(input_ids=batch, labels=batch).loss
    assert math.log(perplexity(loaded.model, batch)) == pytest.approx(float(loss), rel=1e-5)


def test_the_served_model_exports_the_reports_ratio_as_a_gauge():
    from server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.record_quality("smol-pruned21", {"quality": {"perplexity_ratio": 1.75}})
    metrics.record_quality("no-report", None)
    metrics.record_quality("no-quality", {"quality": None})
    text = metrics.render().decode()
    assert 'hywia_quality_perplexity_ratio{model_name="smol-pruned21"} 1.75' in text
    assert 'model_name="no-report"' not in text and 'model_name="no-quality"' not in text
