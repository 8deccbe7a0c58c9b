"""vLLM's AsyncLLM in this process (its engine core runs in child processes vLLM spawns).

Engine arguments are vLLM's own defaults, as `vllm serve` uses them (compiled mode included: start
with --enforce-eager to trade decode speed for a faster start), plus what the command line passed
by vLLM's names. One exception, on a CPU only: without an explicit KV-cache size vLLM asks for
most of the machine's memory, so the cache gets a quarter of the free memory (at most 4 GiB) unless
--kv-cache-memory-bytes, --gpu-memory-utilization or VLLM_CPU_KVCACHE_SPACE says otherwise.
Measured facts this module relies on (DESIGN.md): the engine spawns workers, so whatever script
starts it needs a `__main__` guard; `generate()` with `RequestOutputKind.DELTA` yields only what is
new, and leaving its loop aborts the request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import psutil

from server.engines.base import (
    EXTENSIONS,
    Engine,
    EngineMemory,
    EngineSettings,
    GenerationDelta,
    SamplingOptions,
    TokenLogprob,
)

log = logging.getLogger(__name__)

# Without an explicit KV-cache size on a CPU machine: a quarter of the free memory, at most 4 GiB.
_CPU_KV_CACHE_SHARE = 0.25
_CPU_KV_CACHE_MAX = 4 << 30


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_arguments(directory: Path, settings: EngineSettings, model_id: str, on_gpu: bool) -> dict:
    """AsyncEngineArgs keywords: only what was decided here or given on the command line, so that
    everything else keeps vLLM's default."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    arguments = {"model": str(directory), "served_model_name": model_id, "tokenizer": str(directory),
                 "disable_log_stats": not settings.publish_engine_metrics, **settings.vllm_args}
    for name in ("max_model_len", "max_num_seqs", "kv_cache_memory_bytes"):
        if getattr(settings, name) is not None:
            arguments[name] = getattr(settings, name)
    sized = "kv_cache_memory_bytes" in arguments or "gpu_memory_utilization" in arguments
    if not on_gpu and not sized and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        arguments["kv_cache_memory_bytes"] = int(min(_CPU_KV_CACHE_MAX,
                                                     psutil.virtual_memory().available * _CPU_KV_CACHE_SHARE))
        log.info("vllm engine: no KV-cache size given; using %.2f GiB for the KV cache of %s",
                 arguments["kv_cache_memory_bytes"] / 2**30, model_id)
    if on_gpu and settings.engines_per_device > 1 and "kv_cache_memory_bytes" not in arguments:
        # Each engine would claim the whole share; the share given (or vLLM's default) is split.
        share = arguments.get("gpu_memory_utilization", AsyncEngineArgs.gpu_memory_utilization)
        arguments["gpu_memory_utilization"] = share / settings.engines_per_device
    return arguments


class VllmEngine(Engine):
    name = "vllm"
    supported_options = EXTENSIONS

    def __init__(self, engine, kv_cache_bytes: int | None):
        self._engine = engine
        self._kv_cache_bytes = kv_cache_bytes
        self.max_model_len = engine.model_config.max_model_len

    @classmethod
    def load(cls, directory: Path, settings: EngineSettings, model_id: str) -> VllmEngine:
        """Start the engine (blocking, tens of seconds, more when vLLM compiles: call it from a thread)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        arguments = engine_arguments(directory, settings, model_id, _on_gpu())
        log.info("vllm engine: starting %s from %s with %s", model_id, directory,
                 {k: v for k, v in arguments.items() if k not in ("model", "tokenizer", "served_model_name")})
        try:
            # The usage context picks vLLM's serving defaults (batch sizes), as `vllm serve` does.
            # No local name for the engine: something in vLLM's start-up keeps a frame under this one
            # alive, and with it this frame's locals, so a local would keep the engine past shutdown
            # (its __del__ then fails at interpreter exit).
            return cls(AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments),
                                                 usage_context=UsageContext.OPENAI_API_SERVER),
                       arguments.get("kv_cache_memory_bytes"))
        except Exception as exc:
            from hywia.errors import HywiaError

            raise HywiaError(
                f"vLLM could not start {model_id}: {type(exc).__name__}: {exc}",
                "if the KV cache is too small for the context, pass a larger --kv-cache-memory-bytes or a "
                "smaller --max-model-len; or use --engine torch",
            ) from exc

    async def generate(self, prompt_token_ids: list[int], options: SamplingOptions,
                       request_id: str) -> AsyncIterator[GenerationDelta]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=1, max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
            seed=options.seed, stop=list(options.stop) or None, ignore_eos=options.ignore_eos,
            min_tokens=options.min_tokens, presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty, repetition_penalty=options.repetition_penalty,
            logprobs=options.logprobs, prompt_logprobs=options.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA,
        )
        # Prompts are tokenised by the server (one tokenizer for every engine, exact usage counts);
        # the renderer turns token ids into the engine's input without re-tokenising.
        (engine_input,) = self._engine.renderer.render_cmpl([{"prompt_token_ids": prompt_token_ids}])
        first = True
        async for output in self._engine.generate(engine_input, params, request_id):
            choice = output.outputs[0]
            prompt_logprobs = None
            if first and options.prompt_logprobs is not None:
                prompt_logprobs = tuple(None if alternatives is None else _token_logprob(token, alternatives, options.prompt_logprobs)
                                        for token, alternatives in zip(prompt_token_ids, output.prompt_logprobs or ()))
            first = False
            logprobs = ()
            if options.logprobs is not None and choice.logprobs:
                logprobs = tuple(_token_logprob(token, alternatives, options.logprobs)
                                 for token, alternatives in zip(choice.token_ids, choice.logprobs))
            yield GenerationDelta(text=choice.text, new_tokens=len(choice.token_ids),
                                  finish_reason=choice.finish_reason, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs)

    def running_requests(self) -> int:
        return self._engine.get_num_unfinished_requests()

    def memory(self) -> EngineMemory:
        return EngineMemory(kv_cache=self._kv_cache_bytes)

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, _StoppedEngine()
        await asyncio.to_thread(engine.shutdown)
        # AsyncLLM.__del__ shuts down again; let it run now, while the interpreter is intact, rather
        # than at exit, where it fails with a traceback on half-torn-down modules.
        del engine
        gc.collect()


class _StoppedEngine:
    """Stands in for a shut-down AsyncLLM: nothing runs, and a late metrics scrape still works."""

    @staticmethod
    def get_num_unfinished_requests() -> int:
        return 0


def _token_logprob(token_id: int, alternatives: dict, top: int) -> TokenLogprob:
    """vLLM's {token id: Logprob} at one position → the chosen token and the TOP most likely."""
    chosen = alternatives[token_id]
    ranked = sorted(alternatives.values(), key=lambda entry: entry.rank or 0)[:top]
    return TokenLogprob(token_id=token_id, token=chosen.decoded_token or "", logprob=chosen.logprob,
                        top=tuple((entry.decoded_token or "", entry.logprob) for entry in ranked))
