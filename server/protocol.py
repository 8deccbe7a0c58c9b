"""OpenAI API shapes this server accepts and returns (pydantic models, no serving logic).

Requests ignore fields they do not know (as OpenAI does for forward compatibility), but a field this
server knows and cannot honour (logprobs, tools, penalties, …) is rejected with a 400 that names it,
instead of being silently dropped: a caller who asked for it would otherwise get a wrong answer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

# vLLM's own server ran n=10000 samples for one request; n fans out into n generations, so cap it.
MAX_N = 8
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
# max_tokens beyond the context is capped to what fits; beyond this it is surely a mistake: refused.
MAX_TOKENS_LIMIT = 2**31 - 1

# Fields of the OpenAI API that this server cannot honour: accepted only at their neutral value.
_UNSUPPORTED_COMMON = ("logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "best_of")
_UNSUPPORTED_CHAT = ("top_logprobs", "tools", "tool_choice", "functions", "function_call", "audio",
                     "modalities", "prediction", "parallel_tool_calls")
_UNSUPPORTED_COMPLETION = ("echo", "suffix")


def _is_neutral(value: Any) -> bool:
    return value in (None, False, 0, "", "none", [], {})


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension, which benchmarks use to get fixed output lengths.
    ignore_eos: bool = False

    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    best_of: Any = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(stop == "" for stop in stops):
            raise ValueError("a stop sequence must not be empty")
        return value

    @field_validator(*_UNSUPPORTED_COMMON)
    @classmethod
    def _reject_unsupported(cls, value, info: ValidationInfo):
        if not _is_neutral(value):
            raise ValueError(f"'{info.field_name}' is not supported by this server; leave it unset")
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for "system"; tool and function roles need tool support.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    response_format: dict | None = None

    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    parallel_tool_calls: Any = None

    @field_validator(*_UNSUPPORTED_CHAT)
    @classmethod
    def _reject_unsupported_chat(cls, value, info: ValidationInfo):
        # parallel_tool_calls defaults to true in some clients; only a real tool request matters.
        if info.field_name == "parallel_tool_calls" or _is_neutral(value):
            return value
        raise ValueError(f"'{info.field_name}' is not supported by this server; leave it unset")

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


class CompletionRequest(_SamplingRequest):
    # A string, a list of strings, a list of token ids, or a list of token-id lists (OpenAI's forms).
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Any = None
    suffix: Any = None

    @field_validator(*_UNSUPPORTED_COMPLETION)
    @classmethod
    def _reject_unsupported_completion(cls, value, info: ValidationInfo):
        if not _is_neutral(value):
            raise ValueError(f"'{info.field_name}' is not supported by this server; leave it unset")
        return value

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be an empty list")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text or token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        # OpenAI's deltas carry only what changed: the role once, then content, then nothing.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """Both the whole response and each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hywia"
    root: str | None = None  # the checkpoint directory the model was loaded from
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
