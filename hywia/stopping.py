"""Stopping a prune part-way: `hywia serve` asks its pruning thread to end when it gets SIGTERM.

Every long loop of the pipeline (self-calibration, gradients, fusion, the recovery data and its
teacher, reconstruction, recovery) calls `raise_if_stopped(stage)` between its units of work, and
text generation also checks between tokens (`generate_unless_stopped`), so a stop is honoured within one
unit (a sample, a layer, a training step), not at the end of the prune. The stop request is a
context variable set by whoever runs the prune (`stop_requests`), not a parameter of every stage:
stages stay callable on their own (benchmarks, tests), where nothing ever asks them to stop.

Nothing a stopped prune computed is kept: the statistics cache and the export cache are written only
once their stage has finished (atomically), and recovery removes its unmerged adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from hywia.errors import HywiaError

_should_stop: ContextVar[Callable[[], bool] | None] = ContextVar("hywia_should_stop", default=None)


class PruningStopped(HywiaError):
    """The prune was asked to stop (e.g. SIGTERM during `hywia serve` start-up); nothing was written."""


@contextlib.contextmanager
def stop_requests(should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Within this block, `raise_if_stopped` raises once `should_stop()` returns True (None: never)."""
    token = _should_stop.set(should_stop)
    try:
        yield
    finally:
        _should_stop.reset(token)


def stop_requested() -> bool:
    should_stop = _should_stop.get()
    return should_stop is not None and bool(should_stop())


def raise_if_stopped(stage: str) -> None:
    """Raise PruningStopped, naming STAGE, if a stop was asked for."""
    if stop_requested():
        raise PruningStopped(f"pruning stopped during {stage}, as asked: nothing was written to the cache",
                             "start again to rebuild the export from the beginning")


def generate_unless_stopped(model, stage: str, *args, **kwargs):
    """`model.generate(*args, **kwargs)` that a stop request ends between tokens; then raises
    PruningStopped naming STAGE, because rows cut short by the stop must never be kept. Generating one
    batch can take minutes on a CPU, so checking only between batches would not be prompt."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopRequested(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), stop_requested(), dtype=torch.bool, device=input_ids.device)

    output = model.generate(*args, stopping_criteria=StoppingCriteriaList([_StopRequested()]), **kwargs)
    raise_if_stopped(stage)
    return output
