"""POST /v1/completions: text prompt(s) or token ids → choices, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response

from server.engines.base import TokenLogprob
from server.errors import invalid_request
from server.openai import serving as shared
from server.openai.completion.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)


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


class _Echo:
    """What `echo` and `logprobs` add before a choice's first generated text: the prompt's text and,
    with logprobs, one entry per prompt token (the first has none: nothing predicts it)."""

    def __init__(self, prepared: shared.PreparedRequest, body: CompletionRequest):
        self._prepared, self._body = prepared, body
        self._tokenizer = prepared.served.tokenizer

    def text(self, index: int) -> str:
        if not self._body.echo:
            return ""
        prompt = self._body.prompts[index // self._prepared.n]
        return prompt if isinstance(prompt, str) else self._tokenizer.decode(prompt)

    def logprobs(self, index: int, prompt_logprobs) -> list[TokenLogprob | None]:
        if not self._body.echo or self._body.logprobs is None:
            return []
        ids = self._prepared.prompt_of(index)
        entries = list(prompt_logprobs or [None] * len(ids))
        # The first prompt token has no logprob; it still appears, as OpenAI's and vLLM's echo show it.
        return [entry or TokenLogprob(token_id=token, token=self._tokenizer.decode([token]), logprob=None)
                for token, entry in zip(ids, entries)]


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: parallel lists; text_offset counts characters from OFFSET."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        text_offset=offsets, tokens=[entry.token for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[None if entry.logprob is None else dict(entry.top) for entry in entries])


def _generated(body: CompletionRequest, produced):
    """What the engine produced, or nothing of it (empty, same type) for echo with max_tokens 0."""
    return produced[:0] if body.echo_only else produced


class CompletionServing(shared.OpenAIServing):
    async def create(self, http_request: Request, body: CompletionRequest) -> Response | CompletionResponse:
        prepared = await self.prepare(http_request, body, body.prompts, completion_prompt_ids, "prompt", "cmpl")
        if body.stream:
            return shared.sse_response(self._chunks(prepared, body))
        results = await shared.collect(http_request, prepared.generation)
        echo = _Echo(prepared, body)
        return CompletionResponse(
            **prepared.response_fields(), usage=prepared.generation.usage,
            choices=[CompletionChoice(
                index=index, text=echo.text(index) + _generated(body, result.text),
                finish_reason=result.finish_reason,
                logprobs=None if body.logprobs is None else completion_logprobs(
                    echo.logprobs(index, result.prompt_logprobs) + _generated(body, result.logprobs)))
                for index, result in results.items()])

    @staticmethod
    async def _chunks(prepared: shared.PreparedRequest, body: CompletionRequest) -> AsyncIterator[CompletionResponse]:
        fields = prepared.response_fields()
        echo = _Echo(prepared, body)
        sent: dict[int, int] = {}  # characters of each choice sent so far (text_offset continues from there)
        async with aclosing(prepared.generation.stream()) as deltas:
            async for delta in deltas:
                first = delta.index not in sent
                text = (echo.text(delta.index) if first else "") + _generated(body, delta.text)
                entries = ((echo.logprobs(delta.index, delta.prompt_logprobs) if first else [])
                           + _generated(body, list(delta.logprobs)))
                logprobs = None if body.logprobs is None else completion_logprobs(entries, sent.get(delta.index, 0))
                sent[delta.index] = sent.get(delta.index, 0) + len(text)
                yield CompletionResponse(**fields, choices=[CompletionChoice(
                    index=delta.index, text=text, finish_reason=delta.finish_reason, logprobs=logprobs)])
        if body.include_usage_in_stream:
            yield CompletionResponse(**fields, choices=[], usage=prepared.generation.usage)
