"""What chat and text completions share: request → Generation, running it, and SSE framing."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from server.engines.base import SamplingOptions
from server.errors import APIError, internal_error
from server.generation import Generation, plan_choices
from server.limits import AdmissionGate, Slot
from server.metrics import ServerMetrics
from server.prompts import completion_budget
from server.protocol import new_id, now
from server.registry import ModelRegistry, ServedModel

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499
# Dividing logits by a temperature this small overflows to inf (found by fuzzing: 1.4e-45); vLLM
# treats such temperatures as greedy, and so does this server, whatever the engine.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class ServingContext:
    """What every completion route needs besides the request."""

    registry: ModelRegistry
    metrics: ServerMetrics
    gate: AdmissionGate


@dataclass
class PreparedRequest:
    served: ServedModel
    generation: Generation
    response_id: str
    created: int


async def prepare(http_request: Request, body, context: ServingContext,
                  tokenize: Callable[[object], list[list[int]]], prompt_param: str,
                  id_prefix: str) -> PreparedRequest:
    """Resolve the model, take a slot, tokenise, check the context budget and plan the choices.

    Everything that can be refused is refused here, before a byte of the response is sent.
    """
    arrival = time.perf_counter()
    served = context.registry.get(body.model)
    http_request.state.model_id = served.model_id  # lets the error handler label the metric
    slot = context.gate.admit()
    try:
        return await _plan(body, context.metrics, served, slot, arrival, tokenize, prompt_param, id_prefix)
    except BaseException:
        slot.release()
        raise


async def _plan(body, metrics: ServerMetrics, served: ServedModel, slot: Slot, arrival: float,
                tokenize: Callable[[object], list[list[int]]], prompt_param: str, id_prefix: str) -> PreparedRequest:
    # Tokenising a long prompt takes long enough to stall other requests: keep it off the loop.
    prompts = await asyncio.to_thread(tokenize, served.tokenizer)
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0
    top_p = 1.0 if body.top_p is None else body.top_p
    options = [
        SamplingOptions(
            max_tokens=completion_budget(len(prompt), body.requested_max_tokens, served.engine.max_model_len,
                                         prompt_param),
            temperature=temperature, top_p=top_p, seed=body.seed, stop=body.stop_sequences,
            ignore_eos=body.ignore_eos)
        for prompt in prompts
    ]
    response_id = new_id(id_prefix)
    generation = Generation(served, prompts, plan_choices(prompts, options, body.n), metrics,
                            request_id=response_id, arrival=arrival, slot=slot)
    return PreparedRequest(served=served, generation=generation, response_id=response_id, created=now())


async def collect(http_request: Request, generation: Generation) -> dict[int, tuple[str, str | None]] | None:
    """Run a generation to its end: {choice index: (text, finish_reason)}.

    Returns None when the client disconnected first; the generation is then aborted, not left to
    run for nobody.
    """

    async def run() -> dict[int, tuple[str, str | None]]:
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        async with aclosing(generation.stream()) as deltas:
            async for delta in deltas:
                texts.setdefault(delta.index, []).append(delta.text)
                if delta.finish_reason is not None:
                    finish[delta.index] = delta.finish_reason
        return {index: ("".join(parts), finish.get(index)) for index, parts in sorted(texts.items())}

    work = asyncio.ensure_future(run())
    disconnected = asyncio.ensure_future(_wait_for_disconnect(http_request))
    await asyncio.wait({work, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        disconnected.cancel()
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return None


async def _wait_for_disconnect(http_request: Request) -> None:
    # The body has been read already, so the next ASGI message can only be the disconnect.
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def respond(http_request: Request, prepared: PreparedRequest, stream: bool,
                  chunks: Callable[[], AsyncIterator[BaseModel]],
                  whole: Callable[[dict[int, tuple[str, str | None]]], BaseModel]) -> Response | BaseModel:
    """An SSE stream of `chunks()`, or `whole(results)` once every choice has finished."""
    if stream:
        return sse_response(chunks())
    results = await collect(http_request, prepared.generation)
    # Nobody reads this response; the status is for the access log.
    return Response(status_code=CLIENT_CLOSED_REQUEST) if results is None else whole(results)


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
