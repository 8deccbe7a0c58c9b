"""Calibration batch + gradient statistics, cached on disk by what determines them.

The statistics depend on the source weights, the calibration source, samples, sequence length and
seed, and not on the ratio or the criterion. Caching them lets a benchmark compare seven criteria
at two ratios with one gradient pass per calibration setting, and lets a restart at another ratio
skip the most expensive stage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from pathlib import Path

import torch

from hywia.cache import code_digest, content_key
from hywia.calibration import calibration_batch, is_model_sampled
from hywia.scores import UnitStatistics, collect_statistics

log = logging.getLogger(__name__)


def statistics_key(source_digest: str, calibration: str, samples: int, seq_len: int, seed: int) -> str:
    return content_key({"source": source_digest, "calibration": calibration, "samples": samples,
                        "seq_len": seq_len, "seed": seed, "code": code_digest()})


def calibration_statistics(model, tokenizer, source_digest: str, calibration: str, samples: int, seq_len: int,
                           seed: int, cache_dir=None, progress: bool = True) -> tuple[torch.Tensor, UnitStatistics, bool]:
    """(calibration batch, statistics, whether they came from the cache). `cache_dir` None: no cache."""
    def computed() -> tuple[torch.Tensor, UnitStatistics]:
        batch = calibration_batch(calibration, tokenizer, model, samples, seq_len, seed)
        return batch, collect_statistics(model, batch, progress, model_sampled=is_model_sampled(calibration))

    if cache_dir is None:
        return *computed(), False
    key = statistics_key(source_digest, calibration, samples, seq_len, seed)
    path = Path(cache_dir) / "statistics" / f"{key}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            log.info("calibration statistics: cache hit at %s", path)
            return saved["batch"], UnitStatistics(**saved["stats"]), True
        except Exception as exc:  # a truncated or foreign file: recompute rather than fail
            log.warning("calibration statistics at %s unreadable (%s); recomputing", path, exc)
    batch, stats = computed()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    torch.save({"batch": batch, "stats": dataclasses.asdict(stats)}, staging)
    os.replace(staging, path)  # atomic: a reader sees the whole file or none
    return batch, stats, False
