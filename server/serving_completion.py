"""POST /v1/completions: text prompt(s) or token ids → choices, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response

from server.prompts import completion_prompt_ids
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from server.serving import PreparedRequest, ServingContext, prepare, respond


async def create_completion(http_request: Request, body: CompletionRequest,
                            context: ServingContext) -> Response | CompletionResponse:
    prepared = await prepare(
        http_request, body, context,
        tokenize=lambda tokenizer: [completion_prompt_ids(tokenizer, prompt) for prompt in body.prompts],
        prompt_param="prompt", id_prefix="cmpl")

    def whole(results) -> CompletionResponse:
        return CompletionResponse(
            id=prepared.response_id, created=prepared.created, model=prepared.served.model_id,
            usage=prepared.generation.usage,
            choices=[CompletionChoice(index=index, text=text, finish_reason=finish)
                     for index, (text, finish) in results.items()])

    return await respond(http_request, prepared, body.stream,
                         lambda: _chunks(prepared, body.include_usage_in_stream), whole)


async def _chunks(prepared: PreparedRequest, include_usage: bool) -> AsyncIterator[CompletionResponse]:
    def chunk(choices: list[CompletionChoice], usage=None) -> CompletionResponse:
        return CompletionResponse(id=prepared.response_id, created=prepared.created,
                                  model=prepared.served.model_id, choices=choices, usage=usage)

    async with aclosing(prepared.generation.stream()) as deltas:
        async for delta in deltas:
            yield chunk([CompletionChoice(index=delta.index, text=delta.text, finish_reason=delta.finish_reason)])
    if include_usage:
        yield chunk([], usage=prepared.generation.usage)
