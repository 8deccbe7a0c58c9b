"""POST /v1/chat/completions: messages → the model's chat template → choices, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response

from server.errors import invalid_request
from server.openai import serving as shared
from server.openai.chat.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
)


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Render MESSAGES with the checkpoint's chat template and tokenise the result.

    The server tokenises every prompt itself (engines receive token ids), so `usage.prompt_tokens`
    is exactly what the checkpoint's tokenizer says, whichever engine runs. The rendered text
    already holds the template's special tokens, so no BOS is added on top (vLLM's chat path does
    the same).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise invalid_request("This model has no chat template; use /v1/completions with a plain prompt.",
                              param="messages", code="no_chat_template")
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                    for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja2 TemplateError, or a template's own raise_exception()
        raise invalid_request(f"The model's chat template rejected these messages: {exc}",
                              param="messages") from exc
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_logprobs(entries) -> ChatLogprobs:
    """Token logprobs in the chat API's shape (each token with its UTF-8 bytes)."""
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=entry.token, logprob=entry.logprob, bytes=list(entry.token.encode()),
                         top_logprobs=[TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
                                       for token, logprob in entry.top])
        for entry in entries])


class ChatServing(shared.OpenAIServing):
    async def create(self, http_request: Request, body: ChatCompletionRequest) -> Response | ChatCompletionResponse:
        prepared = await self.prepare(http_request, body, [body.messages], chat_prompt_ids, "messages", "chatcmpl")
        if body.stream:
            return shared.sse_response(self._chunks(prepared, body))
        results = await shared.collect(http_request, prepared.generation)
        return ChatCompletionResponse(
            **prepared.response_fields(), usage=prepared.generation.usage,
            choices=[ChatChoice(index=index, message=AssistantMessage(content=result.text),
                                finish_reason=result.finish_reason,
                                logprobs=chat_logprobs(result.logprobs) if body.logprobs else None)
                     for index, result in results.items()])

    @staticmethod
    async def _chunks(prepared: shared.PreparedRequest, body: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        # As OpenAI does: the role first (once per choice), then content deltas, the last one with its
        # finish_reason; with include_usage, a final chunk with no choices carries the usage.
        fields = prepared.response_fields()
        yield ChatCompletionChunk(**fields, choices=[
            ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            for index in prepared.generation.choice_indexes])
        async with aclosing(prepared.generation.stream()) as deltas:
            async for delta in deltas:
                yield ChatCompletionChunk(**fields, choices=[ChatChunkChoice(
                    index=delta.index, delta=DeltaMessage(content=delta.text or None),
                    finish_reason=delta.finish_reason,
                    logprobs=chat_logprobs(delta.logprobs) if body.logprobs else None)])
        if body.include_usage_in_stream:
            yield ChatCompletionChunk(**fields, choices=[], usage=prepared.generation.usage)
