"""Pack the choices of one question into one row: the shared context once, each continuation after it.

A multiple-choice item asks for log p(continuation | context) for 2-4 continuations of the same
context. Run one by one, the context is computed once per choice; packed, once per item. Each
continuation becomes a segment that attends to the context and to itself only (a tree-shaped mask)
and takes the positions it would have had right after the context, so every score equals the one of
the unpacked sequence. On ARC this runs 2.6× fewer tokens, on OpenBookQA 2×, on PIQA 1.2×.

The first token of every continuation is predicted from the context's last position, so
continuations of one token need no segment at all (BoolQ's "no"/"yes" cost one context pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# A packed row stops growing here (memory of the T×T mask), and the context is repeated in a new row.
MAX_PACKED_TOKENS = 2048


@dataclass(frozen=True)
class Request:
    """log p(continuation_ids | context_ids) is wanted."""

    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]


@dataclass
class PackedRow:
    context_length: int
    tokens: list[int]
    positions: list[int]
    segments: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each continuation segment
    # per request: (request index, row indices whose outputs predict its tokens, the tokens)
    scored: list[tuple[int, list[int], tuple[int, ...]]] = field(default_factory=list)


def pack_requests(requests: list[Request], max_length: int) -> list[PackedRow]:
    """Rows in which every request's continuation is scored once; requests sharing a context share a row.

    A request longer than the model's max_length + 1 tokens loses context from the left, as the
    harness does, so its (shorter) context is its own.
    """
    by_context: dict[tuple[int, ...], list[int]] = {}
    for index, request in enumerate(requests):
        kept = (request.context_ids + request.continuation_ids)[-(max_length + 1):]
        by_context.setdefault(kept[:len(kept) - len(request.continuation_ids)], []).append(index)

    rows = []
    for context, members in by_context.items():
        row, segment_of = _new_row(context), {}
        for index in members:
            continuation = requests[index].continuation_ids
            body = continuation[:-1]  # tokens the model reads; the last one is only predicted
            if body and body not in segment_of:
                if len(row.tokens) + len(body) > MAX_PACKED_TOKENS and row.scored:
                    rows.append(row)
                    row, segment_of = _new_row(context), {}
                start = len(row.tokens)
                row.tokens += body
                row.positions += range(len(context), len(context) + len(body))
                row.segments.append((start, start + len(body)))
                segment_of[body] = start
            readers = [len(context) - 1] + ([*range(segment_of[body], segment_of[body] + len(body))] if body else [])
            row.scored.append((index, readers, continuation))
        rows.append(row)
    return rows


def _new_row(context: tuple[int, ...]) -> PackedRow:
    return PackedRow(context_length=len(context), tokens=list(context), positions=list(range(len(context))))


def batch_tensors(rows: list[PackedRow], pad_id: int, dtype: torch.dtype):
    """input ids, position ids and the additive [B, 1, T, T] tree mask of a batch of packed rows."""
    width = max(len(row.tokens) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for b, row in enumerate(rows):
        length, context = len(row.tokens), row.context_length
        ids[b, :length] = torch.tensor(row.tokens)
        positions[b, :length] = torch.tensor(row.positions)
        allowed[b, :context, :context] = causal[:context, :context]
        for start, end in row.segments:
            allowed[b, start:end, :context] = True
            allowed[b, start:end, start:end] = causal[:end - start, :end - start]
        allowed[b, length:, 0] = True  # padding queries attend somewhere, so no softmax row is empty (NaN)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, positions, mask[:, None]
