"""Prometheus metrics: the `hywia_*` series, labelled `model_name` (the served model id) as vLLM's are.

The request histograms and token counters are measured at this server's API, for every served model
and engine; vLLM's `vllm:*` series describe one vLLM engine (the pruned model's with --serve-dense)
and are absent on the torch engine. The server's own memory is prometheus_client's
`process_resident_memory_bytes`; only what it cannot see (child processes, accelerators) is ours.

They live in a registry of their own (so that apps built in one process, as tests do, never
collide); `/metrics` renders it followed by prometheus_client's default registry, which holds the
process series and, when the vLLM engine runs, vLLM's own `vllm:*` series.

Buckets span a GPU serving a small model (milliseconds) to a CPU serving a 7B one (minutes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import psutil
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5,
                7.5, 10, 20, 40, 80)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)

UNKNOWN_MODEL = "unknown"  # label for requests that never named a served model


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        model = ["model_name"]
        self.request_latency = Histogram(
            "hywia_request_latency_seconds", "Time from request arrival to its last token.", model,
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.time_to_first_token = Histogram(
            "hywia_time_to_first_token_seconds", "Time from request arrival to its first generated token.",
            model, buckets=TTFT_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram(
            "hywia_time_per_output_token_seconds",
            "Mean time between generated tokens after the first (requests with at least 2 tokens).",
            model, buckets=TPOT_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(
            "hywia_prompt_tokens", "Prompt tokens processed.", model, registry=self.registry)
        self.generation_tokens = Counter(
            "hywia_generation_tokens", "Tokens generated.", model, registry=self.registry)
        self.requests = Counter(
            "hywia_requests", "Completion requests by HTTP status (499: the client went away).",
            ["model_name", "status"], registry=self.registry)
        self.in_flight = Gauge(
            "hywia_requests_in_flight", "Completion requests being generated now.", model,
            registry=self.registry)
        self.parameters = Gauge(
            "hywia_model_parameters",
            "Parameters of the served checkpoint and of the unpruned checkpoint it came from.",
            ["model_name", "checkpoint"], registry=self.registry)
        self.weight_bytes = Gauge(
            "hywia_model_weight_bytes", "Bytes of weights of the served and the unpruned checkpoint.",
            ["model_name", "checkpoint"], registry=self.registry)
        self.pruning_seconds = Gauge(
            "hywia_pruning_seconds",
            "Seconds this start spent pruning and exporting (0 when the export came from the cache).",
            model, registry=self.registry)
        self.quality_perplexity_ratio = Gauge(
            "hywia_quality_perplexity_ratio",
            "Pruned / dense perplexity on held-out calibration text, measured at prune time (1: no loss).",
            model, registry=self.registry)
        self.startup_seconds = Gauge(
            "hywia_startup_seconds", "Duration of each start-up step.", ["step"],
            registry=self.registry)
        self.cache_hits = Counter(
            "hywia_cache_hits", "Pruned exports found intact in the cache at start-up.", model,
            registry=self.registry)
        self.cache_misses = Counter(
            "hywia_cache_misses", "Pruned exports that had to be built at start-up.", model,
            registry=self.registry)
        self._engines: dict[str, object] = {}
        self.registry.register(_EngineCollector(lambda: list(self._engines.items())))

    def record_quality(self, model_id: str, report: dict | None) -> None:
        """The pruning report's held-out perplexity ratio (hywia.quality); absent when the report has none."""
        quality = (report or {}).get("quality")
        if quality:
            self.quality_perplexity_ratio.labels(model_id).set(quality["perplexity_ratio"])

    def watch_engine(self, model_id: str, engine) -> None:
        """Report this engine's memory under its model id from now on."""
        self._engines[model_id] = engine

    def render(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(REGISTRY)


class _EngineCollector:
    """Read at scrape time: memory of this process and of its children (vLLM's engine processes),
    what each engine reports about its accelerator, and the requests each engine is working on."""

    def __init__(self, engines: Callable[[], Iterable[tuple[str, object]]]):
        self._engines = engines

    def describe(self):
        return []

    def collect(self):
        children = GaugeMetricFamily(
            "hywia_child_processes_resident_memory_bytes",
            "Resident memory of the server's child processes (vLLM's engine core and workers), summed; "
            "the server's own is process_resident_memory_bytes.")
        total = 0
        for child in psutil.Process(os.getpid()).children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # a child that exited between listing and reading
                pass
        children.add_metric([], total)
        yield children

        allocated = GaugeMetricFamily(
            "hywia_accelerator_memory_allocated_bytes", "Accelerator memory held by tensors, per model.",
            labels=["model_name"])
        reserved = GaugeMetricFamily(
            "hywia_accelerator_memory_reserved_bytes", "Accelerator memory reserved by the allocator.",
            labels=["model_name"])
        kv_cache = GaugeMetricFamily(
            "hywia_kv_cache_bytes", "Memory set aside for the KV cache, per model (where configured).",
            labels=["model_name"])
        for model_id, engine in self._engines():
            memory = engine.memory()
            if memory.accelerator_allocated is not None:
                allocated.add_metric([model_id], memory.accelerator_allocated)
            if memory.accelerator_reserved is not None:
                reserved.add_metric([model_id], memory.accelerator_reserved)
            if memory.kv_cache is not None:
                kv_cache.add_metric([model_id], memory.kv_cache)
        yield allocated
        yield reserved
        yield kv_cache
        running = GaugeMetricFamily(
            "hywia_engine_running_requests",
            "Sequences the engine is generating or has queued (aborted ones leave at once).",
            labels=["model_name"])
        for model_id, engine in self._engines():
            running.add_metric([model_id], engine.running_requests())
        yield running
        used = _accelerator_used_bytes()
        if used:
            device_used = GaugeMetricFamily(
                "hywia_accelerator_memory_used_bytes",
                "Memory in use on each accelerator, by every process (engines run in children).",
                labels=["device"])
            for index, value in used.items():
                device_used.add_metric([str(index)], value)
            yield device_used


def _accelerator_used_bytes() -> dict[int, int]:
    """Per-GPU used memory through NVML, which (unlike torch.cuda) sees vLLM's worker processes and
    does not create a CUDA context in this process. Empty where there is no NVIDIA GPU."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
        return {index: pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used
                for index in range(pynvml.nvmlDeviceGetCount())}
    except pynvml.NVMLError:
        return {}
