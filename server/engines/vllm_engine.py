"""vLLM's AsyncLLM in this process (its engine core runs in child processes vLLM spawns).

Measured facts this module relies on (see DESIGN.md): the KV cache must get an explicit size on
CPU, or start-up demands 92% of RAM free; `enforce_eager` avoids a slow compile on CPU; the
engine spawns workers, so whatever script starts it needs a `__main__` guard; `generate()` with
`RequestOutputKind.DELTA` yields only what is new, and leaving its loop aborts the request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import psutil

from server.engines.base import Engine, EngineMemory, EngineSettings, GenerationDelta, SamplingOptions

log = logging.getLogger(__name__)

# Without --kv-cache-bytes on a CPU machine: a quarter of the free memory, at most 4 GiB.
_CPU_KV_CACHE_SHARE = 0.25
_CPU_KV_CACHE_MAX = 4 << 30


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, engine, kv_cache_bytes: int | None):
        self._engine = engine
        self._kv_cache_bytes = kv_cache_bytes
        self.max_model_len = engine.model_config.max_model_len

    @classmethod
    def load(cls, directory: Path, settings: EngineSettings, model_id: str,
             gpu_memory_share: float | None = None) -> VllmEngine:
        """Start the engine (blocking, tens of seconds: call it from a thread).

        gpu_memory_share: the fraction of GPU memory this engine may take; set when two engines
        (pruned and dense) share one GPU, since each would otherwise claim vLLM's default 90%.
        """
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        on_gpu = _on_gpu()
        kv_cache_bytes = settings.kv_cache_bytes
        if kv_cache_bytes is None and not on_gpu:
            kv_cache_bytes = int(min(_CPU_KV_CACHE_MAX, psutil.virtual_memory().available * _CPU_KV_CACHE_SHARE))
            log.info("vllm engine: no --kv-cache-bytes given; using %.2f GiB for the KV cache of %s",
                     kv_cache_bytes / 2**30, model_id)
        arguments = {
            "model": str(directory), "served_model_name": model_id, "tokenizer": str(directory),
            "tensor_parallel_size": settings.tensor_parallel_size, "max_model_len": settings.max_model_len,
            "kv_cache_memory_bytes": kv_cache_bytes, "enforce_eager": not on_gpu,
            "disable_log_stats": not settings.extra.get("publish_engine_metrics", True),
            "max_num_seqs": settings.extra.get("max_num_seqs"),
        }
        if gpu_memory_share is not None and on_gpu and kv_cache_bytes is None:
            arguments["gpu_memory_utilization"] = gpu_memory_share
        log.info("vllm engine: starting %s from %s", model_id, directory)
        try:
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments))
        except Exception as exc:
            from hywia.errors import HywiaError

            raise HywiaError(
                f"vLLM could not start {model_id}: {type(exc).__name__}: {exc}",
                "if the KV cache is too small for the context, pass a larger --kv-cache-bytes or a smaller "
                "--max-model-len; or use --engine torch",
            ) from exc
        return cls(engine, kv_cache_bytes)

    async def generate(self, prompt_token_ids: list[int], options: SamplingOptions,
                       request_id: str) -> AsyncIterator[GenerationDelta]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=1, max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
            seed=options.seed, stop=list(options.stop) or None, ignore_eos=options.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        # Prompts are tokenised by the server (one tokenizer for every engine, exact usage counts);
        # the renderer turns token ids into the engine's input without re-tokenising.
        (engine_input,) = self._engine.renderer.render_cmpl([{"prompt_token_ids": prompt_token_ids}])
        async for output in self._engine.generate(engine_input, params, request_id):
            choice = output.outputs[0]
            yield GenerationDelta(text=choice.text, new_tokens=len(choice.token_ids),
                                  finish_reason=choice.finish_reason)

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
