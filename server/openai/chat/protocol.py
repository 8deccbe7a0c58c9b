"""POST /v1/chat/completions: its request, response and stream-chunk shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_serializer, model_validator

from server.openai.protocol import (
    MAX_LOGPROBS,
    MAX_TOKENS_LIMIT,
    ChoiceBase,
    CompletionResponseBase,
    OpenAIRequest,
    SamplingRequest,
    Usage,
)


class TextPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequest):
    # "developer" is OpenAI's newer name for "system"; tool and function roles need tool support.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    # parallel_tool_calls is absent: some clients send true by default; only a real tool request matters.
    refused_fields = (*SamplingRequest.refused_fields, "tools", "tool_choice", "functions", "function_call",
                      "audio", "modalities", "prediction")

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    response_format: dict | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("when using top_logprobs, logprobs must be set to true")
        return self

    @field_validator("response_format")
    @classmethod
    def _only_text_format(cls, value):
        if value is not None and value.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is the newer name; it wins when both are sent.
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_per_token(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoiceBase(ChoiceBase):
    logprobs: ChatLogprobs | None = None  # with `logprobs: true`: one entry per generated token


class ChatChoice(ChatChoiceBase):
    message: AssistantMessage


class ChatCompletionResponse(CompletionResponseBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        # OpenAI's deltas carry only what changed: the role once, then content, then nothing.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(ChatChoiceBase):
    delta: DeltaMessage


class ChatCompletionChunk(CompletionResponseBase):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
