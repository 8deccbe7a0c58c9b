"""Pruning cost benchmark (issue 3): what each importance method costs a user's first run, and what it buys.

For every method × ratio × calibration source, a fresh child process loads SmolLM2-135M-Instruct and prunes
it with `hywia.pipeline.prune_model` with the calibration-statistics cache off, so each method pays its own
calibration (and, for `self`, text generation) and gradient pass, as a first `hywia prune` does. The child
reports its wall time per stage, its peak RSS right after pruning (ru_maxrss: model, gradients, fusion), the
parameter counts, and then the WikiText-2 perplexity of the pruned model on a fixed slice. One child
evaluates the dense model on the same slice. Children run one at a time, so timings do not share the CPU.

    benchmarks/results/pruning_cost.json   every run
    benchmarks/results/pruning_cost.md     the table, the perplexity goal checked, the command and the date

The JSON is saved after each child and a re-run skips what it holds; `--report-only` redraws the table.

    nohup python benchmarks/pruning_cost.py --data-dir ../shared/data > .cache/pruning_cost.log 2>&1 &
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path
from _common import calibration_source, grid_cells, grid_parser, missing_runs, write_json

log = logging.getLogger("pruning_cost")

METHODS = ("hybrid", "fine", "coarse", "llm-pruner", "magnitude", "random")
GRADIENT_FREE = ("magnitude", "random")  # no calibration: run once per ratio
CALIBRATIONS = {"gutenberg": "calibration/gutenberg", "self": "self"}  # label → path in --data-dir, or 'self'
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = grid_parser(__doc__.split("\n\n")[0], METHODS, CALIBRATIONS, "gutenberg,self")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wikitext-windows", type=int, default=40, help="first N 128-token windows of the test set")
    parser.add_argument("--cache-dir", default=None, help="hywia cache holding the model (statistics are not cached)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one run, as JSON: used by the parent only
    return parser.parse_args(argv)


def planned_runs(args) -> list[dict]:
    runs = [{"key": "dense", "method": "dense", "ratio": 0.0, "calibration": None}]
    for ratio, label, method in grid_cells(args, METHODS, CALIBRATIONS, GRADIENT_FREE):
        runs.append({"key": f"{method}|r{ratio:g}|{label}", "method": method, "ratio": ratio, "calibration": label})
    return runs


# ---------------------------------------------------------------------------------------- one child

def child(run: dict, args) -> dict:
    """Load, prune (statistics computed afresh), measure; then the perplexity of the pruned model."""
    from hywia.evaluation.suite import EvalOptions, evaluate
    from hywia.models import load_model
    from hywia.options import PruneOptions
    from hywia.pipeline import prune_model

    started = time.perf_counter()
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    record = {"load_seconds": time.perf_counter() - started}
    if run["method"] != "dense":
        calibration = calibration_source(run["calibration"], args.data_dir, CALIBRATIONS)
        options = PruneOptions(ratio=run["ratio"], importance=run["method"], calibration=calibration,
                               seed=args.seed)
        _, report = prune_model(loaded, options, progress=False, cache_dir=None)
        record.update(prune_seconds=report["prune_seconds"], timings=report["timings"],
                      params_before=report["params_before"], params_after=report["params_after"],
                      ratio_achieved=report["ratio_achieved"])
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    quality = evaluate(loaded.model, loaded.tokenizer, EvalOptions(
        tasks=["wikitext2"], data_dir=Path(args.data_dir), limits={"wikitext2": args.wikitext_windows}))
    record["wikitext2_ppl"] = quality["tasks"]["wikitext2"]["perplexity"]
    return record


def run_child(run: dict, argv: list[str]) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", json.dumps(run)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{run['key']} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- the report

def write_markdown(payload: dict, path: Path) -> None:
    runs = payload["runs"]
    dense = runs.get("dense", {})
    lines = [
        f"# Pruning cost: importance methods on {payload['settings']['model']}",
        "",
        f"- command: `{payload['command']}`",
        f"- date: {payload['date']}; machine: {payload['machine']}",
        (f"- calibration: {payload['settings']['samples']} × {payload['settings']['seq_len']} tokens, seed "
         f"{payload['settings']['seed']}; 'self' = text the model writes, 'gutenberg' = the books in "
         "`calibration/gutenberg`; magnitude and random use none"),
        ("- each run is a fresh process with the statistics cache off: wall time = calibration + gradients + "
         "importance (+ fusion training for hybrid) + slicing, not counting the model load; peak RSS is the "
         "process's maximum resident set after pruning (the model load included)"),
        (f"- perplexity: WikiText-2 test, first {payload['settings']['wikitext_windows']} non-overlapping "
         f"128-token windows; dense: {dense.get('wikitext2_ppl', float('nan')):.2f}"),
        "",
        ("| ratio | calibration | method | wall s | calibration + gradients s | importance s | peak RSS GiB "
         "| params after | removed | WikiText-2 ppl |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pruned = [run for key, run in runs.items() if key != "dense"]
    for run in sorted(pruned, key=lambda r: (r["ratio"], r["calibration"] == "none", r["calibration"],
                                             METHODS.index(r["method"]))):
        timings = run.get("timings", {})
        gradients = timings.get("calibration_and_gradients_s")
        lines.append(
            f"| {run['ratio']:g} | {run['calibration']} | {run['method']} | {run['prune_seconds']:.1f} | "
            f"{'–' if gradients is None else f'{gradients:.1f}'} | {timings.get('importance_s', 0):.1f} | "
            f"{run['peak_rss_bytes'] / 2**30:.2f} | {run['params_after']:,} | {run['ratio_achieved']:.3f} | "
            f"{run['wikitext2_ppl']:.2f} |")
    missing = missing_runs([payload["command"]], runs, parse_args, planned_runs)
    if missing:
        lines += ["", f"Not run (planned by the command above; re-running it resumes): {', '.join(missing)}."]
    lines += ["", "## Goal: hybrid has the lowest perplexity", ""]
    for ratio in sorted({run["ratio"] for run in pruned}):
        for calibration in sorted({run["calibration"] for run in pruned if run["calibration"] != "none"}):
            group = {run["method"]: run["wikitext2_ppl"] for run in pruned if run["ratio"] == ratio
                     and run["calibration"] in (calibration, "none")}
            if "hybrid" not in group:
                continue
            others = {method: ppl for method, ppl in group.items() if method != "hybrid"}
            best = min(others, key=others.get)
            verdict = ("**hybrid lowest**" if group["hybrid"] < others[best]
                       else f"**not met: {best} {others[best]:.1f} is as low or lower**")
            others = ", ".join(f"{method} {ppl:.1f}" for method, ppl in others.items())
            lines.append(f"- r{ratio:g}, {calibration}: hybrid {group['hybrid']:.1f} vs {others}: {verdict}")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child), args)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hywia.options import PruneOptions

    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "pruning_cost.json"
    settings = {"model": args.model, "seed": args.seed, "samples": PruneOptions.samples,
                "seq_len": PruneOptions.seq_len, "wikitext_windows": args.wikitext_windows}
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    if args.report_only:
        if not saved:
            raise SystemExit(f"no {json_path} to report from: run the benchmark first")
        write_markdown(saved, args.output_dir / "pruning_cost.md")
        return 0
    import torch

    payload = {"command": "python benchmarks/pruning_cost.py " + shlex.join(argv),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
               "settings": settings,
               "runs": saved.get("runs", {}) if saved.get("settings") == settings else {}}
    child_argv = [arg for arg in argv if arg != "--report-only"]
    plan = planned_runs(args)
    for number, run in enumerate(plan, start=1):
        if run["key"] in payload["runs"]:
            continue
        log.info("[%d/%d] %s", number, len(plan), run["key"])
        payload["runs"][run["key"]] = {**run, **run_child(run, child_argv)}
        write_json(json_path, payload)
    write_markdown(payload, args.output_dir / "pruning_cost.md")
    log.info("wrote %s", args.output_dir / "pruning_cost.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
