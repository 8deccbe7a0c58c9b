"""One API request's choices on one served model: a merged delta stream, usage, and metrics.

A request has one or more prompts (completions accept a list) and `n` choices per prompt; each
choice is one engine generation. Choice `j` of prompt `i` has index `i * n + j`, as in OpenAI's
API, and, when the request has a seed, seed `seed + j`, so choices differ yet are reproducible.
Metrics are recorded once per request when its stream ends, however it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from server.engines.base import GenerationDelta, SamplingOptions, TokenLogprob
from server.limits import Slot
from server.metrics import ServerMetrics
from server.openai.protocol import Usage
from server.registry import ServedModel

STATUS_OK = "200"
STATUS_CLIENT_GONE = "499"  # nginx's code for "the client closed the connection"
STATUS_FAILED = "500"


@dataclass(frozen=True)
class ChoicePlan:
    index: int
    prompt_ids: list[int]
    options: SamplingOptions


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    text: str
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


def plan_choices(prompts: list[list[int]], options: list[SamplingOptions], n: int) -> list[ChoicePlan]:
    plans = []
    for prompt_index, (prompt_ids, prompt_options) in enumerate(zip(prompts, options)):
        for j in range(n):
            seed = None if prompt_options.seed is None else prompt_options.seed + j
            plans.append(ChoicePlan(index=prompt_index * n + j, prompt_ids=prompt_ids,
                                    options=dataclasses.replace(prompt_options, seed=seed)))
    return plans


class Generation:
    def __init__(self, served: ServedModel, prompts: list[list[int]], plans: list[ChoicePlan],
                 metrics: ServerMetrics, request_id: str, arrival: float, slot: Slot | None = None):
        self._served = served
        self._slot = slot
        self._prompt_tokens = sum(len(p) for p in prompts)
        self._plans = plans
        self._metrics = metrics
        self._request_id = request_id
        self._arrival = arrival
        self._tokens_by_choice = {plan.index: 0 for plan in plans}
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None

    @property
    def choice_indexes(self) -> list[int]:
        return [plan.index for plan in self._plans]

    @property
    def usage(self) -> Usage:
        completion = sum(self._tokens_by_choice.values())
        return Usage(prompt_tokens=self._prompt_tokens, completion_tokens=completion,
                     total_tokens=self._prompt_tokens + completion)

    async def stream(self) -> AsyncIterator[ChoiceDelta]:
        """Deltas of all choices as they come; ends after every choice has finished."""
        model_id = self._served.model_id
        self._metrics.in_flight.labels(model_id).inc()
        status = STATUS_FAILED
        try:
            async for plan, delta in self._deltas():
                self._count(plan, delta)
                if delta.text or delta.finish_reason is not None or delta.logprobs or delta.prompt_logprobs:
                    yield ChoiceDelta(index=plan.index, text=delta.text, finish_reason=delta.finish_reason,
                                      logprobs=delta.logprobs, prompt_logprobs=delta.prompt_logprobs)
            status = STATUS_OK
        except (asyncio.CancelledError, GeneratorExit):
            status = STATUS_CLIENT_GONE
            raise
        finally:
            self._metrics.in_flight.labels(model_id).dec()
            if self._slot is not None:
                self._slot.release()
            self._record(status)

    def _deltas(self) -> AsyncIterator[tuple[ChoicePlan, GenerationDelta]]:
        if len(self._plans) == 1:
            return self._single(self._plans[0])
        return self._merged()

    async def _single(self, plan: ChoicePlan):
        engine = self._served.engine
        async with aclosing(engine.generate(plan.prompt_ids, plan.options, self._request_id)) as deltas:
            async for delta in deltas:
                yield plan, delta

    async def _merged(self):
        """Run every choice as its own task; cancelling the consumer cancels (aborts) them all."""
        inbox: asyncio.Queue = asyncio.Queue()

        async def pump(plan: ChoicePlan) -> None:
            request_id = f"{self._request_id}-{plan.index}"
            try:
                async with aclosing(self._served.engine.generate(plan.prompt_ids, plan.options,
                                                                 request_id)) as deltas:
                    async for delta in deltas:
                        inbox.put_nowait((plan, delta))
            except Exception as exc:  # noqa: BLE001  (handed to the consumer, which raises it)
                inbox.put_nowait((plan, exc))

        tasks = [asyncio.create_task(pump(plan)) for plan in self._plans]
        unfinished = len(tasks)
        try:
            while unfinished:
                plan, item = await inbox.get()
                if isinstance(item, Exception):
                    raise item
                yield plan, item
                if item.finish_reason is not None:
                    unfinished -= 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _count(self, plan: ChoicePlan, delta: GenerationDelta) -> None:
        if delta.new_tokens:
            now = time.perf_counter()
            if self._first_token_at is None:
                self._first_token_at = now
            self._last_token_at = now
            self._tokens_by_choice[plan.index] += delta.new_tokens

    def _record(self, status: str) -> None:
        metrics, model_id = self._metrics, self._served.model_id
        metrics.requests.labels(model_id, status).inc()
        metrics.prompt_tokens.labels(model_id).inc(self._prompt_tokens)
        metrics.generation_tokens.labels(model_id).inc(sum(self._tokens_by_choice.values()))
        if status != STATUS_OK or self._first_token_at is None:
            return  # latencies of aborted or failed requests would describe the failure, not the server
        metrics.request_latency.labels(model_id).observe(self._last_token_at - self._arrival)
        metrics.time_to_first_token.labels(model_id).observe(self._first_token_at - self._arrival)
        # Tokens after the first, per choice: choices decode in parallel, so the longest one counts.
        decoded_after_first = max(self._tokens_by_choice.values()) - 1
        if decoded_after_first > 0:
            metrics.time_per_output_token.labels(model_id).observe(
                (self._last_token_at - self._first_token_at) / decoded_after_first)
