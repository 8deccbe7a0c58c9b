"""The one small interface every engine implements: token ids in, text deltas out.

Everything above an engine (chat templates, tokenisation, context checks, n choices, metrics,
the OpenAI protocol) is shared, so an engine only has to generate one sequence for one prompt,
stream what it produced, and stop when its consumer goes away.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

# Finish reasons, as OpenAI names them.
FINISH_STOP = "stop"  # an end-of-sequence token or a stop string
FINISH_LENGTH = "length"  # max_tokens (or the end of the context) was reached


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the text returned ends before the first stop string
    ignore_eos: bool = False  # generate max_tokens tokens even past an end-of-sequence token


@dataclass(frozen=True)
class GenerationDelta:
    """What one sequence produced since the previous delta."""

    text: str
    new_tokens: int  # generated tokens this delta accounts for (the EOS token counts, as in vLLM)
    finish_reason: str | None = None  # set on the last delta only


@dataclass
class EngineMemory:
    """Bytes an engine holds, for the metrics; None where the engine cannot tell."""

    accelerator_allocated: int | None = None
    accelerator_reserved: int | None = None
    kv_cache: int | None = None


@dataclass(frozen=True)
class EngineSettings:
    """What the command line says about engines; each engine reads the fields it understands."""

    max_model_len: int | None = None
    kv_cache_bytes: int | None = None
    tensor_parallel_size: int = 1
    max_batch_size: int = 16
    extra: dict = field(default_factory=dict)


class Engine(abc.ABC):
    """A loaded model that generates. Created by `start()`, used from one asyncio event loop."""

    name: str  # "vllm" | "torch"
    max_model_len: int

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[int], options: SamplingOptions,
                 request_id: str) -> AsyncIterator[GenerationDelta]:
        """Stream deltas until one has a finish_reason. Leaving the loop early aborts the request."""

    @abc.abstractmethod
    def running_requests(self) -> int:
        """Requests the engine still works on (aborted ones must leave this count promptly)."""

    def memory(self) -> EngineMemory:
        return EngineMemory()

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Release the model and any worker processes or threads."""
