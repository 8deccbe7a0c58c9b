"""`hywia bench latency`: measure running OpenAI-compatible servers (this one, `vllm serve`, …).

    hywia bench latency --target pruned=http://127.0.0.1:8000,smollm2-135m-instruct-pruned20 \\
                        --target dense=http://127.0.0.1:8000,smollm2-135m-instruct \\
                        --speedup pruned:dense --out benchmarks/results/latency

Each target is LABEL=URL,MODEL[,PID]; with a PID the memory column is that process tree's peak RSS,
otherwise the server's own resident memory and its children's, from its /metrics. Targets are measured one after the other,
at each concurrency level, with a fixed prompt and a fixed output length. Writes OUT.md (table, the
command, the date), OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import platform
import shlex
import sys
from pathlib import Path

import httpx

from hywia.errors import HywiaError

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    kinds = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    latency = kinds.add_parser("latency", help="TTFT, TPOT, throughput and memory of running servers",
                               description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    latency.add_argument("--target", action="append", required=True, metavar="LABEL=URL,MODEL[,PID]",
                         help="a server and model to measure (repeat for several)")
    latency.add_argument("--api-key", default=None, help="Bearer key for the targets")
    latency.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    latency.add_argument("--requests", type=int, default=None,
                         help="measured requests per level (default: max(8, 2 × concurrency))")
    latency.add_argument("--prompt-words", type=int, default=256, help="length of the fixed prompt in words")
    latency.add_argument("--output-tokens", type=int, default=128, help="tokens generated per request")
    latency.add_argument("--warmup", type=int, default=1, help="unmeasured requests before each level")
    latency.add_argument("--speedup", action="append", default=[], metavar="PRUNED:DENSE",
                         help="check pruned/dense throughput against their weight-bytes ratio")
    latency.add_argument("--overhead", action="append", default=[], metavar="OURS:REFERENCE",
                         help="check this server's overhead over a reference server (≤ 5%%)")
    latency.add_argument("--note", action="append", default=[], help="a line to add to the results")
    latency.add_argument("--title", default="Latency", help="heading of the results")
    latency.add_argument("--out", type=Path, default=Path("benchmarks/results/latency"),
                         help="output prefix (default %(default)s)")


def parse_target(text: str, api_key: str | None):
    from hywia.bench.loadgen import Target

    label, _, rest = text.partition("=")
    parts = rest.split(",")
    if not label or len(parts) not in (2, 3) or not parts[0].startswith("http"):
        raise HywiaError(f"--target {text!r} is not LABEL=URL,MODEL[,PID]",
                         "example: --target pruned=http://127.0.0.1:8000,smollm2-135m-instruct-pruned20")
    pid = int(parts[2]) if len(parts) == 3 else None
    return Target(label=label, base_url=parts[0].rstrip("/"), model=parts[1], api_key=api_key, pid=pid)


def weight_bytes_ratio(target, api_key: str | None) -> float:
    """Unpruned / served weight bytes of a model served by hywia (from its /v1/hywia/report)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{target.base_url}/v1/hywia/report", headers=headers, timeout=30)
    if response.status_code != 200:
        raise HywiaError(f"{target.label}: no hywia report at {target.base_url} ({response.status_code})",
                         "--speedup needs its pruned target to be served by hywia")
    entry = next((e for e in response.json()["data"] if e["model"] == target.model), None)
    if entry is None:
        raise HywiaError(f"{target.label}: {target.model} is not in the report of {target.base_url}")
    return entry["unpruned_weight_bytes"] / entry["weight_bytes"]


def run(args) -> int:
    from hywia.bench.loadgen import fixed_prompt, run_levels
    from hywia.bench.report import overhead_note, speedup_note, write_results

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the results
    targets = [parse_target(text, args.api_key) for text in args.target]
    by_label = {t.label: t for t in targets}
    pairs = [_pair(text, by_label) for text in args.speedup + args.overhead]  # validate before measuring
    results = asyncio.run(run_levels(targets, args.concurrency, fixed_prompt(args.prompt_words),
                                     args.output_tokens, args.requests, args.warmup))
    notes = [speedup_note(results, pruned, dense, weight_bytes_ratio(by_label[pruned], args.api_key))
             for pruned, dense in pairs[:len(args.speedup)]]
    notes += [overhead_note(results, ours, reference) for ours, reference in pairs[len(args.speedup):]]
    preamble = [
        f"Command: `hywia bench {' '.join(shlex.quote(a) for a in sys.argv[2:])}`",
        (f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {platform.node()} "
        f"({platform.machine()}, {_cpu_count()} CPUs)"),
        (f"Prompt: {args.prompt_words} words of fixed text; output: {args.output_tokens} tokens (ignore_eos, "
        f"greedy); {args.warmup} warm-up request(s) per level, not measured."),
        *args.note,
    ]
    for path in write_results(results, args.out, args.title, preamble, notes):
        print(f"wrote {path}")
    return 0


def _pair(text: str, by_label: dict) -> tuple[str, str]:
    first, _, second = text.partition(":")
    for label in (first, second):
        if label not in by_label:
            raise HywiaError(f"{text!r} names {label!r}, which is not a --target label",
                             f"labels: {', '.join(by_label)}")
    return first, second


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
