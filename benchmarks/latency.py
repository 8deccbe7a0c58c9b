"""Latency benchmark: pruned vs dense through `hywia serve`, and `hywia serve` vs `vllm serve` on the
same pruned export, with the load of `hywia bench latency` (fixed prompt, fixed output length,
concurrency 1 and 16).

Each server runs alone (a 2-core machine cannot serve two loads fairly), is measured, then stopped:
  1. hywia serve SOURCE --ratio R            (the pruned export, from the cache when present)
  2. hywia serve SOURCE --ratio 0            (the dense source, same engine)
  3. python -m vllm.entrypoints.openai.api_server --model EXPORT   (vLLM's own server; DESIGN.md
     explains why not the `vllm` console script)
Peak RSS is the whole process tree of each server (vLLM's engine processes included).
Writes benchmarks/results/latency.{md,json,png}.

    python benchmarks/latency.py --calibration ../shared/data/calibration/gutenberg
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

from hywia.bench.loadgen import Target, fixed_prompt, run_levels
from hywia.bench.process import ServerProcess, free_port
from hywia.bench.report import overhead_note, speedup_note, write_results

log = logging.getLogger("latency")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="smollm2-135m-instruct")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--importance", default="fixed",
                        help="pruned shapes depend only on ratio and alignment, not on the criterion; "
                             "the cheapest criterion that gives a sensible model keeps the run short")
    parser.add_argument("--calibration", default="self")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--engine", default="vllm", choices=("vllm", "torch"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--kv-cache-bytes", default="1GiB")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=None, help="per level (default max(8, 2 × concurrency))")
    parser.add_argument("--prompt-words", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--no-vllm-serve", action="store_true", help="skip the `vllm serve` reference")
    parser.add_argument("--out", type=Path, default=RESULTS / "latency")
    parser.add_argument("--startup-timeout", type=float, default=3600)
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "hywia-latency",
                        help="where the servers' logs go (not committed: vLLM logs are long)")
    return parser.parse_args(argv)


def hywia_command(args, port: int, ratio: float) -> list[str]:
    command = [sys.executable, "-m", "hywia.cli", "serve", args.source, "--port", str(port), "--engine",
               args.engine, "--ratio", str(ratio), "--importance", args.importance, "--calibration",
               args.calibration, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
               "--kv-cache-bytes", args.kv_cache_bytes, "--max-model-len", str(args.max_model_len)]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    return command


def vllm_serve_command(args, port: int, export_dir: str, model_id: str) -> list[str]:
    from hywia.commands.serve import parse_bytes

    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", export_dir,
            "--served-model-name", model_id, "--port", str(port), "--host", "127.0.0.1",
            "--max-model-len", str(args.max_model_len),
            "--kv-cache-memory-bytes", str(parse_bytes(args.kv_cache_bytes)), "--enforce-eager"]


def measure_server(args, label: str, command_for_port: Callable[[int], list[str]], model_from_report: bool = True,
                   model_id: str | None = None) -> tuple[list, dict | None]:
    """Start one server, measure it at every level, stop it; returns (results, its hywia report entry)."""
    port = free_port()
    command = command_for_port(port)
    log_path = args.log_dir / f"latency-{label.replace(' ', '-')}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    process = ServerProcess(command, port, log_path, env=env).start()
    try:
        log.info("%s: starting (%s); log in %s", label, shlex.join(command), log_path)
        process.wait_until_ready(args.startup_timeout)
        entry = None
        if model_from_report:
            entry = httpx.get(f"{process.base_url}/v1/hywia/report", timeout=30).json()["data"][0]
            model_id = entry["model"]
        target = Target(label=label, base_url=process.base_url, model=model_id, pid=process.process.pid)
        log.info("%s: measuring %s", label, model_id)
        results = asyncio.run(run_levels([target], args.concurrency, fixed_prompt(args.prompt_words),
                                         args.output_tokens, args.requests))
        return results, entry
    finally:
        process.stop()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    pruned_label, dense_label, reference_label = (f"hywia {args.engine} pruned", f"hywia {args.engine} dense",
                                                  "vllm serve pruned")
    load_before = os.getloadavg()[1]
    pruned, entry = measure_server(args, pruned_label, lambda port: hywia_command(args, port, args.ratio))
    dense, _ = measure_server(args, dense_label, lambda port: hywia_command(args, port, 0))
    results = pruned + dense
    notes = [speedup_note(results, pruned_label, dense_label,
                          entry["unpruned_weight_bytes"] / entry["weight_bytes"])]
    if not args.no_vllm_serve:
        reference, _ = measure_server(
            args, reference_label, lambda port: vllm_serve_command(args, port, entry["directory"], entry["model"]),
            model_from_report=False, model_id=entry["model"])
        results += reference
        notes.append(overhead_note(results, pruned_label, reference_label))
    preamble = [
        f"Command: `python benchmarks/latency.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        (f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {platform.node()} "
        f"({platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, shared with other work: 5-minute load "
         f"average {load_before:.1f} at the start, {os.getloadavg()[1]:.1f} at the end)"),
        (f"Model: {entry['model']} ({entry['parameters']:,} parameters, {entry['weight_bytes'] / 2**20:.0f} MiB) "
         f"vs its source {args.source} ({entry['unpruned_parameters']:,}, "
         f"{entry['unpruned_weight_bytes'] / 2**20:.0f} MiB); export {entry['directory']}"),
        (f"Load: {args.prompt_words}-word fixed prompt, {args.output_tokens} output tokens (ignore_eos, greedy), "
         f"one warm-up request per level; every server alone on the machine, KV cache {args.kv_cache_bytes}, "
         f"context {args.max_model_len}."),
    ]
    for path in write_results(results, args.out, "Latency: pruned vs dense, hywia vs vllm serve", preamble, notes):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running this script
    sys.exit(main())
