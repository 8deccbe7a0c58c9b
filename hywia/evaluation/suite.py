"""One evaluation run: a loaded model, a list of tasks, the data folder → a JSON-ready result.

Both `hywia eval` and `benchmarks/quality.py` call `evaluate`, so a benchmark table and a CLI run
of the same model on the same slice give the same numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from hywia.evaluation.perplexity import split_windows, tokenize_text, window_perplexity
from hywia.evaluation.results import average_accuracy
from hywia.evaluation.scoring import TokenScorer
from hywia.evaluation.tasks import PERPLEXITY, TASKS, count_items, load_choice_items, load_perplexity_text
from hywia.evaluation.zeroshot import evaluate_choice_task

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    tasks: list[str]
    data_dir: Path
    limits: dict[str, int | None] = field(default_factory=dict)  # missing task → whole task
    seq_len: int = 128
    batch_size: int = 64  # sequences per forward pass, at most
    batch_tokens: int = 4096  # tokens per forward pass (padding included), at most


def evaluate(model, tokenizer, options: EvalOptions) -> dict:
    """Run every task in order; returns {"tasks": {name: result dict}, "average_accuracy", "seconds"}."""
    scorer = TokenScorer(model)
    results, seconds = {}, {}
    for name in options.tasks:
        spec, limit = TASKS[name], options.limits.get(name)
        started = time.perf_counter()
        if spec.kind == PERPLEXITY:
            windows = split_windows(tokenize_text(tokenizer, load_perplexity_text(spec, options.data_dir)),
                                    options.seq_len)
            result = window_perplexity(scorer, windows, options.batch_size, limit, description=name,
                                       batch_tokens=options.batch_tokens)
            payload = {**result.to_dict(), "text": spec.notes}
        else:
            items = load_choice_items(spec, options.data_dir, limit)
            result = evaluate_choice_task(scorer, tokenizer, spec, items, count_items(spec, options.data_dir),
                                          options.batch_size, options.batch_tokens)
            payload = result.to_dict()
        seconds[name] = round(time.perf_counter() - started, 2)
        results[name] = payload
        log.info("%s done in %.1f s", name, seconds[name])
    return {"tasks": results, "average_accuracy": average_accuracy(results), "seconds": seconds}
