"""POST /v1/chat/completions: messages → the model's chat template → choices, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response

from server.prompts import chat_prompt_ids
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
)
from server.serving import PreparedRequest, ServingContext, prepare, respond


async def create_chat_completion(http_request: Request, body: ChatCompletionRequest,
                                 context: ServingContext) -> Response | ChatCompletionResponse:
    prepared = await prepare(
        http_request, body, context,
        tokenize=lambda tokenizer: [chat_prompt_ids(tokenizer, body.messages)],
        prompt_param="messages", id_prefix="chatcmpl")

    def whole(results) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=prepared.response_id, created=prepared.created, model=prepared.served.model_id,
            usage=prepared.generation.usage,
            choices=[ChatChoice(index=index, message=AssistantMessage(content=text), finish_reason=finish)
                     for index, (text, finish) in results.items()])

    return await respond(http_request, prepared, body.stream,
                         lambda: _chunks(prepared, body.include_usage_in_stream), whole)


async def _chunks(prepared: PreparedRequest, include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChatChunkChoice], usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=prepared.response_id, created=prepared.created,
                                   model=prepared.served.model_id, choices=choices, usage=usage)

    # As OpenAI does: the role first (once per choice), then content deltas, the last one with its
    # finish_reason; with include_usage, a final chunk with no choices carries the usage.
    yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
                 for index in prepared.generation.choice_indexes])
    async with aclosing(prepared.generation.stream()) as deltas:
        async for delta in deltas:
            yield chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(content=delta.text or None),
                                         finish_reason=delta.finish_reason)])
    if include_usage:
        yield chunk([], usage=prepared.generation.usage)
