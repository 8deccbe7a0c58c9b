"""What chat and text completions share; each endpoint's serving class calls these in turn:

  OpenAIServing.prepare()  resolve the model, take a generation slot, tokenise, check the context
                           budget, plan the choices → a Generation (every refusal happens here)
  sse_response()           an SSE stream of the endpoint's chunks, or
  collect()                every choice's whole text, for a non-streamed response
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.engines.base import SamplingOptions, TokenLogprob
from server.errors import (
    APIError,
    ClientDisconnected,
    context_length_exceeded,
    internal_error,
    invalid_request,
)
from server.limits import AdmissionGate, Slot
from server.metrics import ServerMetrics
from server.openai.generation import ChoiceDelta, Generation, plan_choices
from server.openai.protocol import SamplingRequest, new_id, now
from server.registry import ModelRegistry, ServedModel

log = logging.getLogger(__name__)

# Dividing logits by a temperature this small overflows to inf (found by fuzzing: 1.4e-45); vLLM
# treats such temperatures as greedy, and so does this server, whatever the engine.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class ServingContext:
    """What every completion endpoint needs besides the request."""

    registry: ModelRegistry
    metrics: ServerMetrics
    gate: AdmissionGate


@dataclass(frozen=True)
class Admission:
    """A request that named a served model and got a generation slot."""

    served: ServedModel
    slot: Slot
    arrival: float
    metrics: ServerMetrics


@dataclass
class PreparedRequest:
    served: ServedModel
    generation: Generation
    response_id: str
    created: int
    prompts: list[list[int]]  # token ids of each prompt
    n: int  # choices per prompt: choice i answers prompt i // n

    def prompt_of(self, choice_index: int) -> list[int]:
        return self.prompts[choice_index // self.n]

    def response_fields(self) -> dict:
        """id, created and model: what every response and chunk of this request carries."""
        return {"id": self.response_id, "created": self.created, "model": self.served.model_id}


class OpenAIServing:
    """What an endpoint's serving class starts from: the context, and turning a request into a
    Generation. The endpoint then streams it or collects it, and builds its own responses."""

    def __init__(self, context: ServingContext):
        self._context = context

    async def prepare(self, http_request: Request, body: SamplingRequest, prompt_inputs: list,
                      prompt_ids: Callable[[object, object], list[int]], prompt_param: str,
                      id_prefix: str) -> PreparedRequest:
        """PROMPT_INPUTS are what the request says (messages, a text, token ids); PROMPT_IDS(tokenizer,
        input) turns one of them into token ids with the served model's tokenizer."""
        with admit(http_request, body.model, self._context) as admission:
            tokenizer = admission.served.tokenizer
            # Tokenising a long prompt would stall other requests: keep it off the event loop.
            prompts = await asyncio.to_thread(lambda: [prompt_ids(tokenizer, one) for one in prompt_inputs])
            return prepare_generation(admission, body, prompts, prompt_param, id_prefix)


@contextmanager
def admit(http_request: Request, model: str, context: ServingContext) -> Iterator[Admission]:
    """Resolve MODEL and take a slot; the slot is released if preparing the request fails.

    Everything that can be refused is refused between here and prepare_generation(), before a byte
    of the response is sent.
    """
    arrival = time.perf_counter()
    served = context.registry.get(model)
    http_request.state.model_id = served.model_id  # lets the error handler label the metric
    slot = context.gate.admit()
    try:
        yield Admission(served=served, slot=slot, arrival=arrival, metrics=context.metrics)
    except BaseException:
        slot.release()
        raise


def prepare_generation(admission: Admission, body: SamplingRequest, prompts: list[list[int]],
                       prompt_param: str, id_prefix: str) -> PreparedRequest:
    """Check each prompt against the context, derive its sampling options and plan the n choices."""
    served = admission.served
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0
    top_p = 1.0 if body.top_p is None else body.top_p
    budgets = [completion_budget(len(prompt), body.requested_max_tokens, served.engine.max_model_len, prompt_param)
               for prompt in prompts]
    options = [
        SamplingOptions(
            max_tokens=budget, temperature=temperature, top_p=top_p, seed=body.seed, stop=body.stop_sequences,
            ignore_eos=body.ignore_eos, min_tokens=min(body.min_tokens, budget),  # capped with max_tokens
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0, logprobs=body.logprobs_per_token,
            prompt_logprobs=body.prompt_logprobs)
        for budget in budgets
    ]
    _check_engine_supports(served, options[0])
    response_id = new_id(id_prefix)
    generation = Generation(served, prompts, plan_choices(prompts, options, body.n), admission.metrics,
                            request_id=response_id, arrival=admission.arrival, slot=admission.slot)
    return PreparedRequest(served=served, generation=generation, response_id=response_id, created=now(),
                           prompts=prompts, n=body.n)


# SamplingOptions field → the request field a client sets for it.
_REQUEST_FIELD = {"prompt_logprobs": "echo", "logprobs": "logprobs"}


def _check_engine_supports(served: ServedModel, options: SamplingOptions) -> None:
    """Refuse, with a 400 that names the field, what this model's engine cannot honour."""
    missing = [name for name in options.extensions_in_use() if name not in served.engine.supported_options]
    if missing:
        field = _REQUEST_FIELD.get(missing[0], missing[0])
        raise invalid_request(f"'{field}' is not supported by the {served.engine.name} engine that serves "
                              f"{served.model_id}; serve it with --engine vllm, or leave '{field}' unset",
                              param=field, code="unsupported_by_engine")


def completion_budget(prompt_tokens: int, requested: int | None, max_model_len: int, param: str) -> int:
    """How many tokens may be generated: what was asked for, capped to what fits in the context.

    A prompt that leaves no room is an error; a max_tokens that does not fit is capped (the
    choice then ends with finish_reason "length"), as the reliability issue asks.
    """
    if prompt_tokens >= max_model_len:
        raise context_length_exceeded(prompt_tokens, max_model_len, param)
    room = max_model_len - prompt_tokens
    return room if requested is None else min(requested, room)


@dataclass
class ChoiceResult:
    """One choice of a non-streamed response, once it has finished."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.prompt_logprobs = delta.prompt_logprobs or self.prompt_logprobs


async def collect(http_request: Request, generation: Generation) -> dict[int, ChoiceResult]:
    """Run a generation to its end: {choice index: its result}, by index.

    Raises ClientDisconnected when the client disconnected first; the generation is then aborted,
    not left to run for nobody.
    """

    async def run() -> dict[int, ChoiceResult]:
        results: dict[int, ChoiceResult] = {}
        async with aclosing(generation.stream()) as deltas:
            async for delta in deltas:
                results.setdefault(delta.index, ChoiceResult()).add(delta)
        return dict(sorted(results.items()))

    work = asyncio.ensure_future(run())
    disconnected = asyncio.ensure_future(_wait_for_disconnect(http_request))
    await asyncio.wait({work, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        disconnected.cancel()
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise ClientDisconnected()


async def _wait_for_disconnect(http_request: Request) -> None:
    # The body has been read already, so the next ASGI message can only be the disconnect.
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


def sse_response(events: AsyncIterator[BaseModel]) -> StreamingResponse:
    """Frame pydantic events as server-sent events, ending with OpenAI's `data: [DONE]`.

    A failure after the stream started cannot change the status (already 200): it is sent as an
    OpenAI error event, which the official client raises as an APIError.
    """

    async def frames() -> AsyncIterator[str]:
        try:
            async with aclosing(events) as stream:
                async for event in stream:
                    yield f"data: {event.model_dump_json()}\n\n"
        except APIError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
        except Exception:
            log.exception("generation failed mid-stream")
            yield f"data: {json.dumps(internal_error().body())}\n\n"
        yield "data: [DONE]\n\n"

    # X-Accel-Buffering: proxies (nginx) would otherwise buffer the stream and defeat it.
    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
