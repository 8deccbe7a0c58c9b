"""Targets, their memory, and a small fixed-prompt load generator for OpenAI-compatible servers.

`Target` (a server and a model) and `target_memory` (a process tree's resident memory, or the server's
/metrics) serve `hywia bench latency` and benchmarks/latency.py, whose load is vLLM's own benchmark
(hywia.bench.vllm_load). `measure` streams `/v1/completions` with one fixed prompt and a fixed output
length (`ignore_eos`), `concurrency` requests at a time, and measures per request the time to first
token (TTFT) and time per output token after it (TPOT): a dependency-free check that a server streams
complete answers under concurrency (the API tests use it), not a latency benchmark (every request
after the first is served from the prefix cache).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass

import httpx
import psutil

from hywia.bench.scrape import scrape

# A fixed public-domain passage (Austen, Emma, ch. 1), repeated to the prompt length asked for.
_PASSAGE = (
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed "
    "to unite some of the best blessings of existence; and had lived nearly twenty-one years in the world "
    "with very little to distress or vex her. She was the youngest of the two daughters of a most "
    "affectionate, indulgent father; and had, in consequence of her sister's marriage, been mistress of "
    "his house from a very early period. "
)
_RSS_SAMPLE_SECONDS = 0.5


def fixed_prompt(words: int) -> str:
    passage = _PASSAGE.split()
    return " ".join(passage[i % len(passage)] for i in range(words))


@dataclass(frozen=True)
class Target:
    label: str
    base_url: str
    model: str
    api_key: str | None = None
    pid: int | None = None  # sample this process tree's memory; None: ask the server's /metrics
    tokenizer: str | None = None  # what vLLM's benchmark tokenises its random prompts with (hywia.bench.vllm_load)


@dataclass
class RequestTiming:
    ttft: float
    tpot: float | None
    output_tokens: int
    prompt_tokens: int


@dataclass
class LoadResult:
    target: str
    model: str
    concurrency: int
    requests: int  # completed streams
    failed: int  # requests that got an error status, an error event, or a broken stream
    incomplete: int  # completed streams with fewer tokens than asked for (ignore_eos makes that a fault)
    wall_seconds: float
    mean_prompt_tokens: float
    output_tokens: int
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    output_tokens_per_second: float
    peak_rss_bytes: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); exact for the small samples a benchmark takes."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


async def stream_one(client: httpx.AsyncClient, target: Target, prompt: str, output_tokens: int) -> RequestTiming:
    body = {"model": target.model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    started = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", f"{target.base_url}/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"].get("message"))
            # Any event with a choice carries generated tokens (text may be held back, e.g. half a
            # character); timing by events is what vLLM's own benchmark does too.
            if event.get("choices"):
                last = time.perf_counter()
                first = first or last
            if event.get("usage"):
                usage = event["usage"]
    if first is None or usage is None:
        raise RuntimeError("the stream ended without tokens or without usage")
    tokens = usage["completion_tokens"]
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return RequestTiming(ttft=first - started, tpot=tpot, output_tokens=tokens, prompt_tokens=usage["prompt_tokens"])


async def measure(target: Target, prompt: str, output_tokens: int, concurrency: int, requests: int,
                  warmup: int = 1) -> LoadResult:
    """Run `requests` streamed completions, `concurrency` at a time, after `warmup` unmeasured ones."""
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        for _ in range(warmup):
            await stream_one(client, target, prompt, output_tokens)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(requests):
            queue.put_nowait(index)
        timings: list[RequestTiming] = []
        failures: list[str] = []

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                try:
                    timings.append(await stream_one(client, target, prompt, output_tokens))
                except (httpx.HTTPError, RuntimeError) as exc:
                    failures.append(str(exc))

        memory = _MemoryProbe(target)
        sampler = asyncio.create_task(memory.sample_forever())
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    if not timings:
        raise RuntimeError(f"every request to {target.label} failed; first error: {failures[0]}")
    tpots = [t.tpot for t in timings if t.tpot is not None]
    produced = sum(t.output_tokens for t in timings)
    return LoadResult(
        target=target.label, model=target.model, concurrency=concurrency, requests=len(timings),
        failed=len(failures), incomplete=sum(t.output_tokens != output_tokens for t in timings), wall_seconds=wall,
        mean_prompt_tokens=statistics.fmean(t.prompt_tokens for t in timings), output_tokens=produced,
        ttft_p50=percentile([t.ttft for t in timings], 50), ttft_p99=percentile([t.ttft for t in timings], 99),
        tpot_p50=percentile(tpots, 50) if tpots else float("nan"),
        output_tokens_per_second=produced / wall, peak_rss_bytes=memory.peak,
    )


class _MemoryProbe:
    def __init__(self, target: Target):
        self._target = target
        self.peak: int | None = None

    async def sample_forever(self) -> None:
        while True:
            value = await asyncio.to_thread(self._read)
            if value is not None:
                self.peak = max(self.peak or 0, value)
            await asyncio.sleep(_RSS_SAMPLE_SECONDS)

    def _read(self) -> int | None:
        return target_memory(self._target)


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
