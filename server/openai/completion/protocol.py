"""POST /v1/completions: its request and response shapes (a stream chunk is a response too)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from server.openai.protocol import ChoiceBase, CompletionResponseBase, SamplingRequest


class CompletionRequest(SamplingRequest):
    refused_fields = (*SamplingRequest.refused_fields, "echo", "suffix")

    # A string, a list of strings, a list of token ids, or a list of token-id lists (OpenAI's forms).
    prompt: str | list[str] | list[int] | list[list[int]]

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


class CompletionChoice(ChoiceBase):
    text: str


class CompletionResponse(CompletionResponseBase):
    """Both the whole response and each streamed chunk (OpenAI uses one shape for both)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
