"""Start-up: resolve the source, prune or load the cached export, start the engines.

It runs as a background task after the HTTP port is open, so `/health` can say what is happening
(`loading`, `pruning`, `starting-engine`) while it does, and `ready` once every model is served.
Blocking work (hashing, pruning, loading weights) runs in threads so the event loop keeps
answering. Every phase is logged with its duration and exported as a metric.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hywia.errors import HywiaError
from server.engines import resolve_engine_kind, start_engine
from server.engines.base import EngineSettings
from server.registry import CheckpointSize, ServedModel, checkpoint_size
from server.state import Phase, ServerState

log = logging.getLogger(__name__)

# Loading a checkpoint needs its weights plus working room (tokenizer, activations, allocator slack).
_LOAD_HEADROOM = 1.2


# prepare_export's own phase names → what /health reports.
_EXPORT_PHASES = {"loading": Phase.LOADING, "pruning": Phase.PRUNING, "exporting": Phase.PRUNING}


@dataclass(frozen=True)
class ServeConfig:
    source: str | None  # None: the built-in default model
    prune: object | None  # hywia.pipeline.PruneOptions; None (or ratio 0) serves the source as it is
    engine: str = "auto"
    engine_settings: EngineSettings = field(default_factory=EngineSettings)
    serve_dense: bool = False
    served_model_name: str | None = None  # id of the served (pruned) model; derived from the source if None
    cache_dir: str | None = None
    allow_pickle: bool = False
    device: str = "auto"  # where pruning runs (hywia.devices.resolve_device)
    chat_template: str | None = None  # --chat-template's text: overrides the served tokenizers' own

    @property
    def prunes(self) -> bool:
        return self.prune is not None and getattr(self.prune, "ratio", 0) > 0


async def start_serving(config: ServeConfig, state: ServerState,
                        on_failure: Callable[[str], None] | None = None) -> None:
    """Bring every model up; leaves `state` READY, or FAILED with the reason (never raises)."""
    started = time.perf_counter()
    try:
        await _start(config, state)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.error = str(exc) if isinstance(exc, HywiaError) else f"{type(exc).__name__}: {exc}"
        state.phase = Phase.FAILED
        log.error("start-up failed: %s", state.error, exc_info=not isinstance(exc, HywiaError))
        if on_failure is not None:
            on_failure(state.error)
        return
    state.phase = Phase.READY
    log.info("ready in %.1f s: serving %s", time.perf_counter() - started,
             ", ".join(m.model_id for m in state.registry.all()))


async def stop_serving(state: ServerState) -> None:
    for served in state.registry.all():
        try:
            await served.engine.shutdown()
        except Exception:  # one engine failing to stop must not keep the others running
            log.exception("shutting down the engine of %s failed", served.model_id)


async def _start(config: ServeConfig, state: ServerState) -> None:
    from hywia.models import resolve_source

    with _phase(state, Phase.LOADING, "resolve source"):
        resolved = await asyncio.to_thread(resolve_source, config.source, config.cache_dir, config.allow_pickle)
    base_name = _base_name(resolved.source)
    source_size = await asyncio.to_thread(checkpoint_size, resolved.directory)

    served_directory, report, cache_hit = resolved.directory, None, None
    model_id = config.served_model_name or base_name
    if config.prunes:
        export = await _prune_or_load(config, state, resolved)
        served_directory, report, cache_hit = export.directory, export.report, export.cache_hit
        # With --target-memory/--target-params the pipeline chooses the ratio; the report says which.
        ratio = export.report.get("ratio_requested", config.prune.ratio)
        model_id = config.served_model_name or f"{base_name}-pruned{round(ratio * 100)}"
        metrics_counter = state.metrics.cache_hits if export.cache_hit else state.metrics.cache_misses
        metrics_counter.labels(model_id).inc()
        state.metrics.pruning_seconds.labels(model_id).set(0.0 if export.cache_hit else export.seconds)
        state.metrics.record_quality(model_id, export.report)
    elif config.serve_dense:
        log.warning("--serve-dense ignored: nothing is pruned (ratio 0), so the served model is the dense one")

    kind = resolve_engine_kind(config.engine)
    two_models = config.serve_dense and config.prunes
    settings = dataclasses.replace(config.engine_settings, engines_per_device=2 if two_models else 1)
    with _phase(state, Phase.STARTING_ENGINE, "start engines"):
        await _serve(state, kind, settings, model_id, served_directory, source_size, report, cache_hit,
                     config.chat_template)
        if two_models:
            if model_id == base_name:
                raise HywiaError(f"--served-model-name {model_id!r} is also the dense model's id",
                                 "choose another --served-model-name")
            _check_dense_fits(kind, source_size, settings)
            # vLLM's stat logger replaces every vllm:* series in the process registry when an engine
            # starts; the dense engine publishes none, so those series keep describing the pruned one.
            dense_settings = dataclasses.replace(settings, publish_engine_metrics=False)
            await _serve(state, kind, dense_settings, base_name, resolved.directory, source_size, None, None,
                         config.chat_template)


async def _prune_or_load(config: ServeConfig, state: ServerState, resolved):
    from hywia.pipeline import prepare_export

    def on_phase(name: str) -> None:  # called from the pruning thread; a plain assignment is safe
        state.phase = _EXPORT_PHASES.get(name, state.phase)
        log.info("export phase: %s", name)

    # /health says "loading" while the cache is looked up, and "pruning" only once pruning begins.
    with _phase(state, Phase.LOADING, "export (cache lookup, pruning if missing)"):
        export = await asyncio.to_thread(prepare_export, resolved, config.prune, config.cache_dir,
                                         config.allow_pickle, on_phase, device=config.device,
                                         should_stop=state.stopping.is_set)
    if export.cache_hit:
        log.info("pruned export: cache hit at %s (no pruning)", export.directory)
    else:
        log.info("pruned export: built in %.1f s at %s", export.seconds, export.directory)
        return_freed_memory()
    return export


def return_freed_memory() -> int:
    """Hand the memory pruning freed back to the operating system; returns the bytes returned.

    Pruning in this process frees the dense model, its statistics and the teacher's targets, but glibc
    keeps freed heap pages mapped, so the server would serve with them resident: measured on SmolLM2,
    2,033 MiB after pruning, 704 MiB after malloc_trim, and in benchmarks/results/latency.md the pruning
    server's process tree held ~1.4 GiB more than `vllm serve` on the same export. Not glibc: nothing to do.
    """
    gc.collect()
    before = psutil.Process().memory_info().rss
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return 0
    returned = max(0, before - psutil.Process().memory_info().rss)
    log.info("returned %.0f MiB of memory freed by pruning to the system", returned / 2**20)
    return returned


async def _serve(state: ServerState, kind: str, settings: EngineSettings, model_id: str, directory: Path,
                 unpruned: CheckpointSize, report: dict | None, cache_hit: bool | None,
                 chat_template: str | None = None) -> None:
    from transformers import AutoTokenizer

    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, directory)
    if chat_template is not None:  # as `vllm serve --chat-template`: the server renders chats with it
        tokenizer.chat_template = chat_template
    size = await asyncio.to_thread(checkpoint_size, directory)
    engine = await start_engine(kind, directory, settings, model_id)
    state.registry.add(ServedModel(model_id=model_id, directory=directory, engine=engine, tokenizer=tokenizer,
                                   created=int(time.time()), size=size, unpruned_size=unpruned, report=report,
                                   cache_hit=cache_hit))
    metrics = state.metrics
    for checkpoint, measured in (("served", size), ("unpruned", unpruned)):
        metrics.parameters.labels(model_id, checkpoint).set(measured.parameters)
        metrics.weight_bytes.labels(model_id, checkpoint).set(measured.weight_bytes)
    metrics.watch_engine(model_id, engine)
    log.info("%s engine serving %s (%d parameters, %.1f MiB of weights, context %d)", kind, model_id,
             size.parameters, size.weight_bytes / 2**20, engine.max_model_len)


def _check_dense_fits(kind: str, dense: CheckpointSize, settings: EngineSettings) -> None:
    """Refuse --serve-dense up front when host memory clearly cannot hold the dense model too.

    On a GPU, vLLM checks its own share of device memory and says so when the weights do not fit.
    """
    import torch

    if torch.cuda.is_available():
        return
    kv_cache = (settings.kv_cache_memory_bytes or 0) if kind == "vllm" else 0
    needed = dense.weight_bytes * _LOAD_HEADROOM + kv_cache
    available = psutil.virtual_memory().available
    if needed > available:
        raise HywiaError(
            f"--serve-dense: the dense model needs about {needed / 2**30:.1f} GiB but only "
            f"{available / 2**30:.1f} GiB of memory is free beside the pruned one",
            "drop --serve-dense (serve the dense model from a second server on another machine), or "
            "pass a smaller --kv-cache-memory-bytes",
        )


def _base_name(source: str) -> str:
    """A model id from what the user passed: the directory or file name, or the hub id's name."""
    return Path(source.rstrip("/")).stem if source.endswith(".gguf") else Path(source.rstrip("/")).name


@contextmanager
def _phase(state: ServerState, phase: Phase, step: str):
    """Report PHASE on /health while STEP runs; log and export how long STEP took."""
    state.phase = phase
    started = time.perf_counter()
    log.info("start-up: %s", step)
    yield
    seconds = time.perf_counter() - started
    state.metrics.startup_seconds.labels(step).set(seconds)
    log.info("start-up: %s took %.1f s", step, seconds)
