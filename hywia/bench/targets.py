"""Targets and their memory, for `hywia bench latency` and benchmarks/latency.py.

`Target` is a server and a model; `target_memory` is its resident memory now (a process tree's, or
what the server's /metrics says). The load itself is vLLM's own benchmark (hywia.bench.vllm_load).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from hywia.bench.scrape import scrape


@dataclass(frozen=True)
class Target:
    label: str
    base_url: str
    model: str
    api_key: str | None = None
    pid: int | None = None  # sample this process tree's memory; None: ask the server's /metrics
    tokenizer: str | None = None  # what vLLM's benchmark tokenises its random prompts with (hywia.bench.vllm_load)


def target_memory(target: Target) -> int | None:
    """Resident memory of a target now: its PID's process tree when given, or else what its /metrics
    says (the server's own resident memory and its child processes'); None when neither answers."""
    if target.pid is not None:
        return process_tree_rss(target.pid)
    try:
        samples = scrape(target.base_url, target.api_key)
    except OSError:
        return None
    total = samples.total("process_resident_memory_bytes") + samples.total(
        "hywia_child_processes_resident_memory_bytes")
    return int(total) if total else None


def process_tree_rss(pid: int) -> int | None:
    try:
        root = psutil.Process(pid)
        total = root.memory_info().rss
        for child in root.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return None
