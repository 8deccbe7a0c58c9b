"""The one small interface every engine implements: token ids in, text deltas out.

Everything above an engine (chat templates, tokenisation, context checks, n choices, metrics,
the OpenAI protocol) is shared, so an engine only has to generate one sequence for one prompt,
stream what it produced, and stop when its consumer goes away.
"""

from __future__ import annotations

import abc
import dataclasses
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
    # vLLM's sampling extensions; an engine that cannot honour one that is set refuses the request
    # (see Engine.supported_options) rather than ignoring it.
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # per generated token: its logprob and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (completions with echo)

    def extensions_in_use(self) -> list[str]:
        """The extensions set away from their neutral value, by field name."""
        return [f.name for f in dataclasses.fields(self)
                if f.name in EXTENSIONS and getattr(self, f.name) != f.default]


EXTENSIONS = frozenset({"min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
                        "prompt_logprobs"})


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability, with the most likely alternatives at its position."""

    token_id: int
    token: str  # the token decoded on its own
    logprob: float | None  # None only for a prompt's first token, which nothing predicts
    top: tuple[tuple[str, float], ...] = ()  # (token, logprob) of the alternatives, most likely first


@dataclass(frozen=True)
class GenerationDelta:
    """What one sequence produced since the previous delta."""

    text: str
    new_tokens: int  # generated tokens this delta accounts for (the EOS token counts, as in vLLM)
    finish_reason: str | None = None  # set on the last delta only
    logprobs: tuple[TokenLogprob, ...] = ()  # of the new tokens, when SamplingOptions.logprobs is set
    # On the first delta, when SamplingOptions.prompt_logprobs is set: one entry per prompt token
    # (None for the first, which nothing predicts).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass
class EngineMemory:
    """Bytes an engine holds, for the metrics; None where the engine cannot tell."""

    accelerator_allocated: int | None = None
    accelerator_reserved: int | None = None
    kv_cache: int | None = None


@dataclass(frozen=True)
class EngineSettings:
    """What the command line says about engines; each engine reads the fields it understands.

    None means "the engine's own default" (vLLM's, for the vLLM engine), never a value of ours.
    """

    max_model_len: int | None = None
    max_num_seqs: int | None = None
    kv_cache_memory_bytes: int | None = None
    # Other vLLM engine arguments given on the command line, by vLLM's own names (enforce_eager, …).
    vllm_args: dict = field(default_factory=dict)
    # vLLM's stat logger owns the vllm:* series of the process; only one engine may publish them.
    publish_engine_metrics: bool = True
    # Engines that share each accelerator (pruned and dense with --serve-dense): they split its memory.
    engines_per_device: int = 1


class Engine(abc.ABC):
    """A loaded model that generates. Created by `start()`, used from one asyncio event loop."""

    name: str  # "vllm" | "torch"
    max_model_len: int
    supported_options: frozenset[str] = frozenset()  # which SamplingOptions EXTENSIONS it honours

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
