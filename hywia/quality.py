"""What pruning cost, measured at prune time: perplexity on held-out calibration text, dense vs pruned.

The held-out slice (`HELDOUT_SAMPLES` × the calibration sequence length) comes from the calibration
source but shares no token with the calibration batch that scored the units and trained the fusion
(hywia.calibration.heldout_batch), so a pruned model cannot look good by having been fitted to it.
The dense model is measured before surgery and the pruned one after, on the same token ids; the
report's `quality` (and so /v1/hywia/report and the `hywia_quality_perplexity_ratio` gauge) carries both.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from hywia.calibration import heldout_batch

log = logging.getLogger(__name__)

HELDOUT_SAMPLES = 8  # × the calibration seq_len (128 by default): a few seconds on SmolLM2 on 2 cores


@torch.no_grad()
def per_sample_losses(model, batch: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """Mean next-token NLL of each row of BATCH (tokens 2..L predicted), in float64, CHUNK rows per
    forward pass so that the logits' memory stays bounded."""
    losses = []
    for part in batch.split(max(chunk, 1)):
        part = part.to(model.device)
        logits = model(input_ids=part).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1),
                                                reduction="none")
        losses.append(nll.view(part.shape[0], -1).double().mean(dim=1).cpu())
    return torch.cat(losses)


def perplexity(model, batch: torch.Tensor) -> float:
    """exp(token-weighted mean NLL): every row has the same length, so the mean of the rows' means."""
    return math.exp(float(per_sample_losses(model, batch).mean()))


class QualityProbe:
    """Draws the held-out slice and measures the dense model (`before_pruning`); `after_pruning`
    measures the same slice on the pruned model and returns the report's `quality` entry."""

    def __init__(self, batch: torch.Tensor | None, dense_perplexity: float | None, source: str, seconds: float):
        self.batch, self.dense_perplexity, self.source, self.seconds = batch, dense_perplexity, source, seconds

    @classmethod
    def before_pruning(cls, model, tokenizer, calibration: str, samples: int, seq_len: int,
                       seed: int) -> QualityProbe:
        started = time.perf_counter()
        batch = heldout_batch(calibration, tokenizer, model, samples, seq_len, seed, HELDOUT_SAMPLES)
        if batch is None:
            log.warning("quality: the calibration text has no window beyond the %d used for scoring, so the "
                        "report carries no held-out perplexity", samples)
            return cls(None, None, calibration, time.perf_counter() - started)
        return cls(batch, perplexity(model, batch), calibration, time.perf_counter() - started)

    def after_pruning(self, model) -> dict | None:
        if self.batch is None:
            return None
        started = time.perf_counter()
        pruned = perplexity(model, self.batch)
        quality = {"heldout_tokens": int(self.batch.numel()), "heldout_sequences": int(self.batch.shape[0]),
                   "heldout_source": "self (held-out prompts)" if self.source == "self" else
                   "calibration text, windows not used for scoring",
                   "dense_perplexity": self.dense_perplexity, "pruned_perplexity": pruned,
                   "perplexity_ratio": pruned / self.dense_perplexity,
                   "seconds": round(self.seconds + time.perf_counter() - started, 3)}
        log.info("quality: held-out perplexity %.2f dense → %.2f pruned (×%.3f, %d tokens)",
                 self.dense_perplexity, pruned, quality["perplexity_ratio"], quality["heldout_tokens"])
        return quality
