"""Zero-shot multiple choice by log-likelihood, scored the way lm-evaluation-harness scores it.

For each choice the model scores a continuation after a context: `acc` picks the choice with the
highest summed log-probability, `acc_norm` the highest after dividing by the choice's length in
characters. Tokenization follows the harness: trailing whitespace of the context moves to the
continuation, then `context + continuation` is encoded whole and split at the length of the
encoded context, so the continuation's tokens are the ones the model would really see.

Speed on a CPU comes from three things: the choices of a question packed into one row so their
shared context runs once (packing.py), rows sorted by length (little padding), and logits projected
only at the continuation's positions (scoring.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from hywia.errors import HywiaError
from hywia.evaluation.packing import Request, batch_tensors, pack_requests
from hywia.evaluation.scoring import TokenScorer, batch_slices
from hywia.evaluation.tasks import PARTIAL, ChoiceItem, TaskSpec


@dataclass
class ChoiceResult:
    acc: float
    acc_norm: float | None  # None where the harness does not report it (WinoGrande)
    acc_stderr: float
    acc_norm_stderr: float | None
    headline_metric: str
    items: int
    items_total: int
    chance: float  # mean over items of 1 / number of choices
    majority_rate: float  # accuracy of always answering the most frequent gold index
    prompt: str
    notes: str

    @property
    def headline(self) -> float:
        return getattr(self, self.headline_metric)

    def to_dict(self) -> dict:
        return {"kind": "multiple_choice", **asdict(self), "headline": self.headline}


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        # BPE tokenizers glue a space to the word after it: " Paris" is one token, "Paris" another.
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        # Nothing to condition on: the harness conditions on the end-of-text token instead.
        return Request((tokenizer.eos_token_id,), tuple(_encode(tokenizer, continuation)))
    whole = _encode(tokenizer, context + continuation)
    context_length = len(_encode(tokenizer, context))
    return Request(tuple(whole[:context_length]), tuple(whole[context_length:]))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def score_requests(scorer: TokenScorer, requests: list[Request], batch_size: int = 64,
                   description: str = "scoring", pad_id: int = 0, batch_tokens: int = 4096) -> list[float]:
    """Sum of log p(continuation tokens | context) for each request, in request order."""
    for request in requests:
        if not request.continuation_ids:
            raise HywiaError("a choice encodes to zero tokens, so it cannot be scored",
                             "check the task file: every choice needs some text")
        if len(request.continuation_ids) > scorer.max_length:
            raise HywiaError(f"a continuation of {len(request.continuation_ids)} tokens exceeds the model's "
                             f"{scorer.max_length} positions")
    # Longest rows first, so a batch holds similar lengths (little padding); ties broken by content so
    # that runs repeat exactly.
    rows = sorted(pack_requests(requests, scorer.max_length), key=lambda row: (-len(row.tokens), row.tokens))
    scores = [0.0] * len(requests)
    with tqdm(total=len(requests), desc=description, unit="req") as bar:
        for rows_slice in batch_slices([len(row.tokens) for row in rows], batch_size, batch_tokens):
            batch = rows[rows_slice]
            ids, positions, mask = batch_tensors(batch, pad_id, scorer.dtype)
            hidden = scorer.hidden_states(ids, mask, positions)
            batch_rows, readers, targets, scored = [], [], [], []
            for b, row in enumerate(batch):
                for index, reader_positions, continuation in row.scored:
                    batch_rows += [b] * len(reader_positions)
                    readers += reader_positions
                    targets += continuation
                    scored.append((index, len(continuation)))
            logprobs = scorer.target_logprobs(hidden[batch_rows, readers], torch.tensor(targets))
            for (index, _), piece in zip(scored, logprobs.split([length for _, length in scored])):
                scores[index] = float(piece.sum())
            bar.update(len(scored))
    return scores


def evaluate_choice_task(scorer: TokenScorer, tokenizer, spec: TaskSpec, items: list[ChoiceItem],
                         items_total: int, batch_size: int = 64, batch_tokens: int = 4096) -> ChoiceResult:
    if not items:
        raise HywiaError(f"task {spec.name} has no items to evaluate", "check --limit and the task file")
    requests, owner = [], []
    for item_index, item in enumerate(items):
        for context, continuation in zip(item.contexts, item.continuations):
            requests.append(encode_pair(tokenizer, context, continuation))
            owner.append(item_index)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_requests(scorer, requests, batch_size, description=spec.name, pad_id=pad_id,
                            batch_tokens=batch_tokens)

    per_item: list[list[float]] = [[] for _ in items]
    for item_index, score in zip(owner, scores):
        per_item[item_index].append(score)
    correct = np.array([_argmax(lls) == item.gold for lls, item in zip(per_item, items)], dtype=float)
    correct_norm = np.array([
        _argmax([ll / len(text) for ll, text in zip(lls, item.choice_texts)]) == item.gold
        for lls, item in zip(per_item, items)], dtype=float)
    report_norm = spec.kind != PARTIAL
    golds = [item.gold for item in items]
    return ChoiceResult(
        acc=float(correct.mean()),
        acc_norm=float(correct_norm.mean()) if report_norm else None,
        acc_stderr=_stderr(correct),
        acc_norm_stderr=_stderr(correct_norm) if report_norm else None,
        headline_metric=spec.headline_metric,
        items=len(items), items_total=items_total,
        chance=float(np.mean([1.0 / len(item.contexts) for item in items])),
        majority_rate=max(golds.count(g) for g in set(golds)) / len(golds),
        prompt=spec.prompt, notes=spec.notes,
    )


def _argmax(values: list[float]) -> int:
    """First index of the maximum (ties go to the earlier choice, as numpy.argmax does)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _stderr(outcomes: np.ndarray) -> float:
    """Standard error of the mean of 0/1 outcomes (sample standard deviation, as the harness reports)."""
    if len(outcomes) < 2:
        return float("nan")
    return float(np.std(outcomes, ddof=1) / math.sqrt(len(outcomes)))
