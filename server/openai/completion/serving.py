"""POST /v1/completions: text prompt(s) or token ids → choices, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response

from server.errors import invalid_request
from server.openai import serving as shared
from server.openai.completion.protocol import CompletionChoice, CompletionRequest, CompletionResponse


def completion_prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """A text prompt is tokenised as the tokenizer would for the model (BOS where it adds one);
    token ids are checked against the vocabulary and passed through."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt).input_ids
    else:
        vocabulary = len(tokenizer)
        bad = [token for token in prompt if not 0 <= token < vocabulary]
        if bad:
            raise invalid_request(f"Token ids {bad[:5]} are outside the vocabulary (0…{vocabulary - 1}).",
                                  param="prompt")
        ids = list(prompt)
    if not ids:
        raise invalid_request("The prompt is empty.", param="prompt")
    return ids


class CompletionServing(shared.OpenAIServing):
    async def create(self, http_request: Request, body: CompletionRequest) -> Response | CompletionResponse:
        prepared = await self.prepare(http_request, body, body.prompts, completion_prompt_ids, "prompt", "cmpl")
        if body.stream:
            return shared.sse_response(self._chunks(prepared, body.include_usage_in_stream))
        results = await shared.collect(http_request, prepared.generation)
        return CompletionResponse(
            **prepared.response_fields(), usage=prepared.generation.usage,
            choices=[CompletionChoice(index=index, text=text, finish_reason=finish)
                     for index, (text, finish) in results.items()])

    @staticmethod
    async def _chunks(prepared: shared.PreparedRequest, include_usage: bool) -> AsyncIterator[CompletionResponse]:
        fields = prepared.response_fields()
        async with aclosing(prepared.generation.stream()) as deltas:
            async for delta in deltas:
                yield CompletionResponse(**fields, choices=[CompletionChoice(
                    index=delta.index, text=delta.text, finish_reason=delta.finish_reason)])
        if include_usage:
            yield CompletionResponse(**fields, choices=[], usage=prepared.generation.usage)
