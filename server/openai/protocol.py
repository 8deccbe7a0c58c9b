"""OpenAI API shapes that every endpoint shares (pydantic models, no serving logic).

Requests ignore fields they do not know (as OpenAI does for forward compatibility), but a field this
server knows and cannot honour (logprobs, tools, penalties, …) is rejected with a 400 that names it,
instead of being silently dropped: a caller who asked for it would otherwise get a wrong answer.
Each endpoint's own request and response shapes live in its package (`chat/`, `completion/`).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

log = logging.getLogger(__name__)

# vLLM's own server ran n=10000 samples for one request; n fans out into n generations, so cap it.
MAX_N = 8
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
# max_tokens beyond the context is capped to what fits; beyond this it is surely a mistake: refused.
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_LOGPROBS = 20  # vLLM's default max_logprobs: alternatives per token



def _is_neutral(value: Any) -> bool:
    return value in (None, False, 0, "", "none", [], {})


class OpenAIRequest(BaseModel):
    # Unknown fields are ignored and logged at debug level, as vLLM's server does.
    model_config = ConfigDict(extra="ignore")
    # Fields of the OpenAI API that this server cannot honour: accepted only at their neutral value.
    refused_fields: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="wrap")
    @classmethod
    def _refuse_what_cannot_be_honoured(cls, data, handler):
        asked = [name for name in cls.refused_fields if isinstance(data, dict) and not _is_neutral(data.get(name))]
        if asked:  # one error per field, located at the field, so the 400 names it as `param`
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                type=PydanticCustomError("unsupported", "'{name}' is not supported by this server; leave it unset",
                                         {"name": name}), loc=(name,), input=data[name]) for name in asked])
        if isinstance(data, dict) and (ignored := data.keys() - cls.model_fields.keys() - set(cls.refused_fields)):
            log.debug("fields present in the request but ignored: %s", sorted(ignored))
        return handler(data)


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class SamplingRequest(OpenAIRequest):
    """Fields shared by chat and text completions."""

    refused_fields = ("logit_bias", "best_of")

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
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's extensions: benchmarks use ignore_eos (and min_tokens) to get fixed output lengths.
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_LIMIT)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(stop == "" for stop in stops):
            raise ValueError("a stop sequence must not be empty")
        return value

    @model_validator(mode="after")
    def _min_tokens_within_max_tokens(self):
        if self.requested_max_tokens is not None and self.min_tokens > self.requested_max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.requested_max_tokens})")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_per_token(self) -> int | None:
        """Alternatives wanted per generated token (0: the chosen token's only); None: no logprobs."""
        return None

    @property
    def prompt_logprobs(self) -> int | None:
        return None

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChoiceBase(BaseModel):
    index: int
    finish_reason: str | None = None


class CompletionResponseBase(BaseModel):
    """The fields every completion response and stream chunk has besides `object` and `choices`."""

    id: str
    created: int
    model: str
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
