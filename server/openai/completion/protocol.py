"""POST /v1/completions: its request and response shapes (a stream chunk is a response too)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from server.openai.protocol import (
    MAX_LOGPROBS,
    MAX_TOKENS_LIMIT,
    ChoiceBase,
    CompletionResponseBase,
    SamplingRequest,
)


class CompletionRequest(SamplingRequest):
    refused_fields = (*SamplingRequest.refused_fields, "suffix")

    # A string, a list of strings, a list of token ids, or a list of token-id lists (OpenAI's forms).
    prompt: str | list[str] | list[int] | list[list[int]]
    # An integer, as in OpenAI's legacy API: the alternatives per token (0: the chosen token's only).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt comes back before the completion (with its logprobs, if asked)
    # 0 is allowed with echo (OpenAI's legacy scoring form, as vLLM allows it): the prompt and its
    # logprobs come back and nothing generated; the engine still runs one step, which usage counts.
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be an empty list")
        return value

    @model_validator(mode="after")
    def _zero_max_tokens_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing and returns nothing; it is allowed only with echo "
                             "(to score the prompt); ask for at least 1 token otherwise")
        return self

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the response holds the prompt only (its text and logprobs)."""
        return self.echo and self.max_tokens == 0

    @property
    def requested_max_tokens(self) -> int | None:
        return 1 if self.echo_only else self.max_tokens

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text or token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    @property
    def logprobs_per_token(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token (the first prompt token's is None)."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(ChoiceBase):
    text: str  # with echo, the prompt's text and then the completion's
    logprobs: CompletionLogprobs | None = None  # with `logprobs`: the prompt's tokens too when echoed


class CompletionResponse(CompletionResponseBase):
    """Both the whole response and each streamed chunk (OpenAI uses one shape for both)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
