"""The statistics cache returns exactly what a fresh computation returns, and only for equal inputs."""

from __future__ import annotations

import torch

from hywia.models import load_model
from hywia.scores import collect_statistics
from hywia.statistics_cache import calibration_statistics


def test_cached_statistics_equal_fresh_ones(tiny_gqa_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a stitch in time saves nine, said the old tailor to the boy. " * 200)
    loaded = load_model(str(tiny_gqa_dir))
    args = (loaded.model, loaded.tokenizer, loaded.resolved.digest, str(corpus), 6, 32, 0)
    batch, stats, hit = calibration_statistics(*args, cache_dir=tmp_path, progress=False)
    assert not hit
    again_batch, again, hit = calibration_statistics(*args, cache_dir=tmp_path, progress=False)
    assert hit
    assert torch.equal(batch, again_batch)
    for field in ("fine", "coarse", "fine_first_order", "coarse_first_order", "magnitude"):
        for fresh_layer, cached_layer in zip(getattr(stats, field), getattr(again, field)):
            for kind in fresh_layer:
                assert torch.equal(fresh_layer[kind], cached_layer[kind])
    other_seed = (*args[:-1], 1)
    _, _, hit = calibration_statistics(*other_seed, cache_dir=tmp_path, progress=False)
    assert not hit


def test_unreadable_cache_file_is_recomputed(tiny_gqa_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the rain in spain stays mainly in the plain. " * 200)
    loaded = load_model(str(tiny_gqa_dir))
    args = (loaded.model, loaded.tokenizer, loaded.resolved.digest, str(corpus), 4, 32, 0)
    calibration_statistics(*args, cache_dir=tmp_path, progress=False)
    (cached,) = (tmp_path / "statistics").glob("*.pt")
    cached.write_bytes(b"truncated")
    _, _, hit = calibration_statistics(*args, cache_dir=tmp_path, progress=False)
    assert not hit and cached.stat().st_size > 100


def test_self_text_is_scored_without_first_order_terms_and_a_text_file_with_them(tiny_gqa_dir, tmp_path):
    """`self` text is the model's own sample, so its mean gradient is noise and only the Fisher parts count:
    the cached `self` statistics equal `collect_statistics(..., model_sampled=True)` on the same batch, and a
    text file's equal the full second-order Taylor scores."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog near the river bank. " * 200)
    loaded = load_model(str(tiny_gqa_dir))
    for source, model_sampled in (("self", True), (str(corpus), False)):
        batch, stats, _ = calibration_statistics(loaded.model, loaded.tokenizer, loaded.resolved.digest, source,
                                                 4, 24, 0, cache_dir=tmp_path, progress=False)
        want = collect_statistics(loaded.model, batch, progress=False, model_sampled=model_sampled)
        other = collect_statistics(loaded.model, batch, progress=False, model_sampled=not model_sampled)
        for field in ("fine", "coarse"):
            for got_layer, want_layer, other_layer in zip(getattr(stats, field), getattr(want, field),
                                                          getattr(other, field)):
                for kind in got_layer:
                    assert torch.equal(got_layer[kind], want_layer[kind])
                    assert not torch.allclose(got_layer[kind], other_layer[kind])
