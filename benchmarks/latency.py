"""Latency benchmark: pruned vs dense through `hywia serve`, and `hywia serve` vs `vllm serve` on the
same pruned export, with vLLM's own serving benchmark (`vllm bench serve`, run from Python: see
hywia.bench.vllm_load) as the load generator: random prompts of a fixed length, a fixed output length
(ignore_eos, greedy), streamed completions at each concurrency level.

Three servers run side by side, started once with the same engine flags (vLLM's defaults unless
--enforce-eager):
  1. hywia serve SOURCE --ratio R      the pruned export (from the cache when present)
  2. hywia serve SOURCE --ratio 0      the dense source
  3. python -m vllm.entrypoints.openai.api_server --model EXPORT   (vLLM's own server; DESIGN.md
     explains why not the `vllm` console script)
Only one is under load at a time: every round measures each server at each level, in an order that
rotates from round to round, so all three share the machine's background load alike. Reported: the
median over rounds of each figure, and the per-round ratios (pruned/dense, hywia/vLLM) with their
medians. Peak RSS is each server's whole process tree (vLLM's engine processes included).
Writes benchmarks/results/latency.{md,json,png}.

The measurement for benchmarks/results/latency.md (an idle machine; ~1 h on 2 CPU cores):
    python benchmarks/latency.py --cache-dir .cache/test --calibration ../shared/data/calibration/gutenberg --rounds 5
A smoke run (minutes; proves the pipeline, measures nothing):
    python benchmarks/latency.py --cache-dir .cache/test --calibration ../shared/data/calibration/gutenberg \
        --enforce-eager --rounds 1 --concurrency 1 2 --num-prompts 4 --input-len 32 --output-len 8 \
        --kv-cache-memory-bytes 256MiB --max-model-len 512 --out /tmp/latency-smoke/latency
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from hywia.bench.process import ServerProcess, free_port
from hywia.bench.report import overhead_ratios, speedup_ratios, write_results
from hywia.bench.targets import Target
from hywia.bench.vllm_load import Load, measure_rounds
from hywia.sizes import parse_size

log = logging.getLogger("latency")
RESULTS = Path(__file__).resolve().parent / "results"
PRUNED, DENSE, REFERENCE = "hywia pruned", "hywia dense", "vllm serve pruned"


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
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--kv-cache-memory-bytes", default="1GiB")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true", help="pass --enforce-eager to every server")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="measured requests per level and round (default max(16, 2 × concurrency))")
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-vllm-serve", action="store_true", help="skip the `vllm serve` reference")
    parser.add_argument("--out", type=Path, default=RESULTS / "latency")
    parser.add_argument("--startup-timeout", type=float, default=3600)
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "hywia-latency",
                        help="where the servers' logs go (not committed: vLLM logs are long)")
    return parser.parse_args(argv)


@dataclass
class Server:
    label: str
    process: ServerProcess
    model: str
    tokenizer: str  # the checkpoint directory: vLLM's benchmark tokenises its random prompts with it


def engine_flags(args) -> list[str]:
    flags = ["--kv-cache-memory-bytes", str(parse_size(args.kv_cache_memory_bytes)),
             "--max-model-len", str(args.max_model_len)]
    return flags + (["--enforce-eager"] if args.enforce_eager else [])


def hywia_command(args, port: int, ratio: float) -> list[str]:
    command = [sys.executable, "-m", "hywia.cli", "serve", args.source, "--port", str(port), "--engine", "vllm",
               "--ratio", str(ratio), "--importance", args.importance, "--calibration", args.calibration,
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), *engine_flags(args)]
    return command + (["--cache-dir", args.cache_dir] if args.cache_dir else [])


def vllm_serve_command(args, port: int, export_dir: str, model_id: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", export_dir,
            "--served-model-name", model_id, "--port", str(port), "--host", "127.0.0.1", *engine_flags(args)]


def start(args, label: str, command: list[str], port: int) -> ServerProcess:
    log_path = args.log_dir / f"latency-{label.replace(' ', '-')}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log.info("%s: starting (%s); log in %s", label, shlex.join(command), log_path)
    process = ServerProcess(command, port, log_path, env=env).start()
    process.wait_until_ready(args.startup_timeout)
    return process


def start_hywia(args, label: str, ratio: float) -> tuple[Server, dict]:
    port = free_port()
    process = start(args, label, hywia_command(args, port, ratio), port)
    entry = httpx.get(f"{process.base_url}/v1/hywia/report", timeout=30).json()["data"][0]
    return Server(label, process, entry["model"], entry["directory"]), entry


def target(server: Server) -> Target:
    return Target(server.label, server.process.base_url, server.model, pid=server.process.process.pid,
                  tokenizer=server.tokenizer)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[1]
    servers: list[Server] = []
    try:
        pruned, entry = start_hywia(args, PRUNED, args.ratio)
        servers.append(pruned)
        servers.append(start_hywia(args, DENSE, 0)[0])
        if not args.no_vllm_serve:
            port = free_port()
            process = start(args, REFERENCE, vllm_serve_command(args, port, entry["directory"], entry["model"]), port)
            servers.append(Server(REFERENCE, process, entry["model"], entry["directory"]))
        load = Load(args.input_len, args.output_len, args.num_prompts, min_requests=16)
        rows = measure_rounds([target(server) for server in servers], args.concurrency, args.rounds, load)
    finally:
        for server in servers:
            server.process.stop()
    labels = [server.label for server in servers]
    weight_ratio = entry["unpruned_weight_bytes"] / entry["weight_bytes"]
    heading = "Latency: pruned vs dense, hywia serve vs vllm serve (vLLM's benchmark as the load)"
    preamble = [
        f"Command: `python benchmarks/latency.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        (f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {platform.node()} "
         f"({platform.machine()}, {len(os.sched_getaffinity(0))} CPUs; 5-minute load average "
         f"{load_before:.1f} at the start, {os.getloadavg()[1]:.1f} at the end)"),
        (f"Model: {entry['model']} ({entry['parameters']:,} parameters, {entry['weight_bytes'] / 2**20:.0f} MiB) "
         f"vs its source {args.source} ({entry['unpruned_parameters']:,}, "
         f"{entry['unpruned_weight_bytes'] / 2**20:.0f} MiB); export {entry['directory']}"),
        (f"Load: vLLM's `bench serve`, random dataset, {args.input_len} prompt tokens, {args.output_len} output "
         f"tokens (ignore_eos, greedy), streamed /v1/completions, {args.num_prompts or 'max(16, 2 × concurrency)'} "
         f"requests per level and round after one warm-up; {args.rounds} interleaved rounds (order rotating); "
         f"engines: KV cache {args.kv_cache_memory_bytes}, context {args.max_model_len}, "
         f"{'--enforce-eager' if args.enforce_eager else 'vLLM defaults (compiled)'}."),
        "Table: median over rounds; ratios: per round, then their median and range.",
    ]
    ratios = speedup_ratios(rows, PRUNED, DENSE, args.concurrency, weight_ratio)
    if not args.no_vllm_serve:
        ratios += overhead_ratios(rows, PRUNED, REFERENCE, args.concurrency)
    write_results(rows, labels, args.concurrency, args.out, heading, preamble, ratios,
                  extra={"weight_bytes_ratio": weight_ratio})
    log.info("wrote %s.{md,json,png}", args.out)
    return 0


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running this script
    sys.exit(main())
