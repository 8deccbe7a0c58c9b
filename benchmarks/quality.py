"""Quality benchmark: does hybrid importance keep more of the model than each single granularity?

Prunes SmolLM2-135M-Instruct with every importance method × ratio × calibration source (exports come
from hywia's cache when they exist), evaluates each export and the dense model on the same fixed
slices of WikiText-2, PTB and six zero-shot tasks. All methods share the uniform layout, except the two
"-recipe" ones: hybrid and LLM-Pruner's criterion with LLM-Pruner's layer recipe (first 4 and last 2
layers whole), the baseline as LLM-Pruner publishes it. Writes

    benchmarks/results/quality.json        every run: options, pruning report fields, all metrics
    benchmarks/results/quality.md          tables, above-chance retention, the goals checked, the command
    benchmarks/results/quality_ratio.png   WikiText-2 perplexity and average accuracy vs ratio, per method
    benchmarks/results/quality_alpha.png   learned α_fine per layer and unit type, per hybrid run

A run saves the JSON after every model, and a re-run with the same model, slices and pruning settings
skips what is already there, so an interrupted run resumes. `--report-only` redraws md and plots.

    nohup python benchmarks/quality.py --data-dir ../shared/data > benchmarks/results/quality.log 2>&1 &
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path
import torch
from _common import (
    calibration_source,
    grid_cells,
    grid_parser,
    mean_range,
    missing_runs,
    names,
    numbers,
    selected_blend,
    write_json,
)

from hywia.evaluation.results import average_accuracy, average_chance, retention_report
from hywia.evaluation.suite import EvalOptions, evaluate
from hywia.evaluation.tasks import TASKS, ZERO_SHOT_TASKS, parse_limits
from hywia.models import load_model, resolve_source
from hywia.options import PruneOptions
from hywia.pipeline import prepare_export

log = logging.getLogger("quality")

# A method is a criterion and a layout: the bare name is the uniform layout; "-recipe" is LLM-Pruner's
# layer recipe (the first 4 and the last 2 layers kept whole, the rest sharing the removal), as LLM-Pruner
# is published; "-global" ranks units across layers (hywia.budget, ≥ 10% of each layer kept); "-global-ends"
# is global allocation with the first 2 and the last 2 layers kept whole.
METHODS = ("hybrid", "fine", "coarse", "fixed", "llm-pruner", "magnitude", "random",
           "hybrid-recipe", "llm-pruner-recipe", "hybrid-global", "hybrid-global-ends", "fixed-global", "fine-global",
           "coarse-global", "llm-pruner-global")
LAYOUT_SUFFIXES = {
    "-recipe": {"layout": "per-layer", "allocation": "even", "protect_layers": "first:4,last:2"},
    "-global-ends": {"layout": "per-layer", "allocation": "global", "protect_layers": "first:2,last:2"},
    "-global": {"layout": "per-layer", "allocation": "global"},
}
# Measured elsewhere with LLM-Pruner's own code on the same model and protocol (WikiText-2, first 400
# windows of 128 tokens): issue 13's reference rows. Keys: ratio → perplexity.
PEER_PERPLEXITY = {0.0: 55.54, 0.2108: 205.4, 0.4999: 1266.9}
GRADIENT_FREE = ("magnitude", "random")  # their export ignores the calibration text: pruned once per ratio
RIVALS = {"hybrid": ("fixed", "fine", "coarse", "llm-pruner"), "hybrid-recipe": ("llm-pruner-recipe",),
          "hybrid-global": ("fixed-global", "fine-global", "coarse-global", "llm-pruner-global")}  # the goals
CALIBRATIONS = {"self": "self", "gutenberg": "calibration/gutenberg"}  # label → 'self' or a path in --data-dir
TASK_ORDER = ("wikitext2", "ptb", *ZERO_SHOT_TASKS)
# Fixed slices (the first N windows / items of each file); quality.md states what a run used. Sizing:
# these slices are ~52k model tokens per evaluation after packing (wikitext2 7.7k, ptb 3.8k, piqa 8.6k,
# boolq 8.9k, winogrande 5.6k, arc_easy 6.2k, arc_challenge 7.7k, openbookqa 3.2k), ~2 min for the
# dense model at SmolLM2's ~420 tokens/s on 2 idle cores and less for pruned ones: ~35 min for the 25
# evaluations. Pruning adds the calibration statistics once per calibration source (the pipeline caches
# them), hybrid's fusion training per (ratio, calibration), and an export per run: ~55-75 min in all
# on an idle machine. On a machine shared with other jobs expect several times that (measured: 6x).
DEFAULT_LIMITS = "wikitext2=60,ptb=30,piqa=150,boolq=60,winogrande=150,arc_easy=150,arc_challenge=150,openbookqa=150"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = grid_parser(__doc__.split("\n\n")[0], METHODS, CALIBRATIONS, "self,gutenberg")
    parser.add_argument("--seeds", default="0", help="calibration seeds; tables show the mean and the range")
    parser.add_argument("--samples", type=int, default=PruneOptions.samples, help="calibration sequences")
    parser.add_argument("--calibration-seq-len", type=int, default=PruneOptions.seq_len)
    parser.add_argument("--tasks", default=",".join(TASK_ORDER), help="evaluation tasks, from " + ", ".join(TASK_ORDER))
    parser.add_argument("--limit", default=DEFAULT_LIMITS, help="evaluation slices, as `hywia eval --limit`")
    parser.add_argument("--reconstruct", default=PruneOptions.reconstruct, help="as `hywia prune --reconstruct`")
    parser.add_argument("--recover", default=PruneOptions.recover, help="as `hywia prune --recover`")
    parser.add_argument("--recover-steps", type=int, default=PruneOptions.recover_steps)
    parser.add_argument("--min-keep", type=float, default=PruneOptions.min_keep,
                        help="as `hywia prune --min-keep` (global layouts: each layer's floor)")
    parser.add_argument("--seq-len", type=int, default=128, help="perplexity window")
    parser.add_argument("--batch-size", type=int, default=64, help="at most this many sequences per forward pass")
    parser.add_argument("--cache-dir", default=None, help="hywia cache (exports are reused from there)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--fresh", action="store_true", help="ignore runs saved in quality.json")
    parser.add_argument("--report-only", action="store_true", help="only redraw quality.md and the plots")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------- the grid

def planned_runs(args) -> list[dict]:
    """Dense first, then every (calibration, ratio, method, seed); gradient-free methods once per ratio."""
    runs = [{"key": "dense", "method": "dense", "ratio": 0.0, "calibration": None, "seed": None}]
    seeds = numbers(args.seeds, int)
    for seed in seeds:
        for ratio, label, method in grid_cells(args, METHODS, CALIBRATIONS, GRADIENT_FREE):
            if method == "magnitude" and seed != seeds[0]:  # deterministic: one seed says it all
                continue
            runs.append({"key": f"{method}|r{ratio:g}|{label}|seed{seed}", "method": method,
                         "ratio": ratio, "calibration": label, "seed": seed})
    return runs


def method_fields(method: str) -> dict:
    """The PruneOptions fields a grid method stands for (the layout always explicit, so a change of the
    package's default layout does not change what a method name means)."""
    for suffix, layout in LAYOUT_SUFFIXES.items():
        if method.endswith(suffix):
            return {"importance": method.removesuffix(suffix), **layout}
    return {"importance": method, "layout": "uniform", "allocation": "even"}


def run_one(run: dict, args, eval_options: EvalOptions) -> dict:
    """Prune (or fetch the cached export), load, evaluate; returns the run's record."""
    record = dict(run)
    source = args.model
    if run["method"] != "dense":
        calibration = calibration_source(run["calibration"], args.data_dir, CALIBRATIONS)
        options = PruneOptions(ratio=run["ratio"], calibration=calibration, samples=args.samples,
                               seq_len=args.calibration_seq_len, seed=run["seed"], reconstruct=args.reconstruct,
                               recover=args.recover, recover_steps=args.recover_steps, min_keep=args.min_keep,
                               **method_fields(run["method"]))
        export = prepare_export(resolve_source(args.model, args.cache_dir), options, cache_dir=args.cache_dir)
        report = export.report
        details = report.get("importance_details") or {}
        source = str(export.directory)
        record.update(export=source, cache_hit=export.cache_hit, prune_seconds=report.get("prune_seconds"),
                      ratio_achieved=report.get("ratio_achieved"), params_after=report.get("params_after"),
                      params_before=report.get("params_before"), alpha=report.get("alpha"),
                      learned_alpha=details.get("learned_alpha"), selected=details.get("selected"),
                      # the fusion's held-out evidence (hybrid), and the quality the report states at prune time
                      holdout_loss_learned=details.get("holdout_loss_learned"),
                      holdout_loss_fixed=details.get("holdout_loss_fixed"),
                      fixed_fine_weight=details.get("fixed_fine_weight"),
                      holdout_loss_fixed_blends=details.get("holdout_loss_fixed_blends"),
                      heldout_perplexity_ratio=(report.get("quality") or {}).get("perplexity_ratio"))
    started = time.perf_counter()
    loaded = load_model(source, cache_dir=args.cache_dir)
    record.update(evaluate(loaded.model, loaded.tokenizer, eval_options))
    record["eval_seconds"] = round(time.perf_counter() - started, 1)
    del loaded
    gc.collect()
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "quality.json"
    limits = parse_limits(args.limit, names(args.tasks, TASK_ORDER))
    settings = {"model": args.model, "model_digest": resolve_source(args.model, args.cache_dir).digest,
                "limits": limits, "seq_len": args.seq_len, "samples": args.samples,
                "calibration_seq_len": args.calibration_seq_len, "reconstruct": args.reconstruct,
                "recover": args.recover, "recover_steps": args.recover_steps if args.recover != "none" else 0,
                "min_keep": args.min_keep}
    saved = json.loads(json_path.read_text()) if json_path.exists() and not args.fresh else {}
    if args.report_only:
        if not saved:
            raise SystemExit(f"no {json_path} to report from: run the grid first")
        payload = saved
    else:
        runs = saved.get("runs", {}) if saved.get("settings") == settings else {}
        if saved and not runs:
            log.info("quality.json was made with other settings: starting afresh")
        command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        earlier = [c for c in (saved.get("commands") or [saved.get("command")]) if c and c != command] if runs else []
        payload = {"command": command, "commands": [*earlier, command],
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                              f"{torch.get_num_threads()} threads",
                   "settings": settings, "runs": runs, "grid_seconds": saved.get("grid_seconds", 0) if runs else 0}
        run_grid(args, payload, json_path)
    write_markdown(payload, args.output_dir / "quality.md")
    plot_ratio_curves(payload, args.output_dir / "quality_ratio.png")
    plot_alpha(payload, args.output_dir / "quality_alpha.png")
    log.info("wrote %s", args.output_dir / "quality.md")
    return 0


def run_grid(args, payload: dict, json_path: Path) -> None:
    """Every planned run not in payload["runs"] yet; the JSON is rewritten after each one."""
    limits = payload["settings"]["limits"]
    eval_options = EvalOptions(tasks=list(limits), data_dir=Path(args.data_dir), limits=limits,
                               seq_len=args.seq_len, batch_size=args.batch_size)
    started, earlier = time.perf_counter(), payload["grid_seconds"]  # a resumed grid counts both invocations
    plan = planned_runs(args)
    for number, run in enumerate(plan, start=1):
        if run["key"] in payload["runs"]:
            continue
        log.info("[%d/%d] %s", number, len(plan), run["key"])
        payload["runs"][run["key"]] = run_one(run, args, eval_options)
        payload["grid_seconds"] = earlier + round(time.perf_counter() - started)
        write_json(json_path, payload)


# ---------------------------------------------------------------------------------------- the report

def grouped(runs: dict) -> dict[tuple, list[dict]]:
    """Runs of the same (method, ratio, calibration) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs.values():
        groups.setdefault((run["method"], run["ratio"], run["calibration"]), []).append(run)
    return groups


def metric(run: dict, name: str) -> float | None:
    if name == "average":
        return run.get("average_accuracy")
    task = run.get("tasks", {}).get(name)
    if task is None:
        return None
    return task["perplexity"] if task["kind"] == "perplexity" else task["headline"]


def write_markdown(payload: dict, path: Path) -> None:
    runs, dense = payload["runs"], payload["runs"].get("dense")
    groups = grouped(runs)
    tasks = [name for name in TASK_ORDER if dense and name in dense.get("tasks", {})]
    lines = header_lines(payload, tasks, dense)
    for ratio in sorted({key[1] for key in groups if key[1] > 0}):
        lines += [f"## Ratio {ratio:g}", ""] + ratio_table(groups, ratio, tasks, dense) + [""]
    lines += goal_lines(groups, dense) + default_goal_lines(groups, payload["settings"]) + [""]
    missing = missing_runs(recorded_commands(payload), payload["runs"], parse_args, planned_runs)
    if missing:
        lines += [f"Not run yet (planned by the commands above; re-running them resumes): {', '.join(missing)}.", ""]
    lines.append("Plots: `quality_ratio.png` (WikiText-2 perplexity and average accuracy vs ratio), "
                 "`quality_alpha.png` (learned α_fine per layer and unit type).")
    selected = [f"{key[0]} {key[2]} r{key[1]:g}: {', '.join(selected_blend(run) for run in members)}"
                for key, members in sorted(groups.items(), key=str) if key[0] in RIVALS]
    if selected:
        lines.append("Hybrid's blend as selected on held-out calibration loss (learned, or the best fixed blend, "
                     "by its α_fine): " + "; ".join(selected) + ".")
    path.write_text("\n".join(lines) + "\n")


def recorded_commands(payload: dict) -> list[str]:
    return payload.get("commands") or [payload.get("command", "")]


def header_lines(payload: dict, tasks: list[str], dense: dict | None) -> list[str]:
    settings, limits = payload["settings"], payload["settings"]["limits"]
    slices = ", ".join(f"{name} {limits.get(name) or 'all'}{' windows' if TASKS[name].kind == 'perplexity' else ''}"
                       for name in tasks)
    lines = [
        f"# Quality: HyWIA importance methods on {settings['model']}", "",
        *(f"- command: `{command}`" for command in recorded_commands(payload)),
        f"- date: {payload['date']}; machine: {payload['machine']}",
        f"- grid time: {payload.get('grid_seconds')} s (pruning + evaluation, all invocations of this grid)",
        f"- slices (first N of each file): {slices}",
        (f"- perplexity: {settings['seq_len']}-token non-overlapping windows; zero-shot: log-likelihood as "
         "lm-evaluation-harness scores it; headline metric acc (acc_norm for ARC-c, OBQA)"),
        (f"- calibration: {settings['samples']} × {settings['calibration_seq_len']} tokens; 'self' = text the "
         "model writes, 'gutenberg' = ../shared/data/calibration/gutenberg; magnitude and random use none"),
        (f"- repair after cutting: --reconstruct {settings.get('reconstruct', 'none')}, --recover "
         f"{settings.get('recover', 'none')}"
         + (f" ({settings['recover_steps']} steps)" if settings.get("recover", "none") != "none" else "")
         + (f"; global layouts keep ≥ {settings['min_keep']:g} of each layer's units" if "min_keep" in settings else "")),
        ("- retention = above-chance retention of the average headline accuracy, "
         "(pruned − chance) / (dense − chance), chance = mean of 1/choices"),
        "",
    ]
    if dense and any(name in ZERO_SHOT_TASKS for name in tasks):  # a perplexity-only grid has no slice noise
        noise = ", ".join(f"{name} ±{dense['tasks'][name][dense['tasks'][name]['headline_metric'] + '_stderr']:.3f}"
                          for name in tasks if name in ZERO_SHOT_TASKS)
        lines += [f"Slice noise (standard error of the dense model's accuracy): {noise}", ""]
        lines += [average_noise_line(dense, tasks), ""]
    return lines


def average_noise_line(dense: dict, tasks: list[str]) -> str:
    """How far the dense average sits above chance, against the average's own standard error.

    Retention divides by that margin; with independent errors on the pruned and dense averages its
    standard error is about √2·se / margin, which on a model this close to chance dwarfs the 0.9 goal.
    """
    zero_shot = {name: dense["tasks"][name] for name in tasks if name in ZERO_SHOT_TASKS}
    errors = [result[result["headline_metric"] + "_stderr"] for result in zero_shot.values()]
    average_error = sum(error ** 2 for error in errors) ** 0.5 / len(errors)
    margin = average_accuracy(zero_shot) - average_chance(zero_shot)
    return (f"The dense average is {margin:.3f} above chance and its standard error is ±{average_error:.3f}, "
            f"so a retention value carries about ±{2 ** 0.5 * average_error / margin:.2f} of slice noise: "
            "read the retention column as indicative only.")


def ratio_table(groups: dict, ratio: float, tasks: list[str], dense: dict | None) -> list[str]:
    columns = ["method", "calibration", "removed", *tasks, "average", "retention"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    keys = [("dense", 0.0, None)] + sorted((k for k in groups if k[1] == ratio),
                                           key=lambda k: (METHODS.index(k[0]), str(k[2])))
    for key in (k for k in keys if k in groups):
        members = groups[key]
        retention = [retention_report(run, dense).get("average") for run in members] if dense else []
        values = [mean_range([metric(run, name) for run in members], 2 if name in ("wikitext2", "ptb") else 3)
                  for name in tasks]
        row = [key[0], key[2] or "–", mean_range([run.get("ratio_achieved", 0.0) for run in members], 3), *values,
               mean_range([metric(run, "average") for run in members], 3), mean_range(retention, 3)]
        lines.append("| " + " | ".join(row) + " |")
    if ratio in PEER_PERPLEXITY and "wikitext2" in tasks:
        cells = [f"{PEER_PERPLEXITY[ratio]:.2f}" if name == "wikitext2" else "–" for name in tasks]
        lines.append("| LLM-Pruner (its own code, measured elsewhere; 400 windows) | 10 × 64 tokens | "
                     f"{ratio:.3f} | " + " | ".join(cells) + " | – | – |")
    return lines


def default_method() -> str | None:
    """The grid method that is `hywia prune`'s default configuration (criterion and layout), if any."""
    defaults = PruneOptions()
    for method in METHODS:
        fields = {"protect_layers": None, "allocation": "even", **method_fields(method)}
        if all(getattr(defaults, name) == value for name, value in fields.items()):
            return method
    return None


# The perplexity goals of issues 13 and 14 for the default configuration: (ratio, ceiling, what it is).
PERPLEXITY_GOALS = ((0.2108, 144.0, "issue 13: 0.7× the peer's excess log-perplexity"),
                    (0.2108, 89.0, "issue 13's aim: FLAP's margin over LLM-Pruner"),
                    (0.4999, 507.0, "issue 13: 0.7× the peer's excess log-perplexity"),
                    (0.4999, 210.0, "issue 13's aim"),
                    (0.2, 111.0, "issue 14: 2× dense"),
                    (0.5, 317.0, "issue 14: 0.25× the peer"))


def non_default_settings(settings: dict) -> list[str]:
    """The grid's pruning settings that differ from `hywia prune`'s defaults, as flags."""
    defaults = PruneOptions()
    flags = {"samples": "--samples", "reconstruct": "--reconstruct", "recover": "--recover",
             "recover_steps": "--recover-steps", "min_keep": "--min-keep"}
    changed = []
    for field, flag in flags.items():
        value = settings.get(field)
        if value is None or (field == "recover_steps" and settings.get("recover") == "none"):
            continue
        if value != getattr(defaults, field):
            changed.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return changed


def default_goal_lines(groups: dict, settings: dict) -> list[str]:
    """Each perplexity goal against the mean over seeds of the default method at that ratio."""
    method = default_method()
    lines = []
    for ratio, ceiling, source in PERPLEXITY_GOALS:
        for (name, run_ratio, calibration), members in sorted(groups.items(), key=str):
            if name != method or abs(run_ratio - ratio) > 1e-9:
                continue
            values = [metric(run, "wikitext2") for run in members]
            values = [v for v in values if v is not None]
            if values:
                mean = sum(values) / len(values)
                # Only `self` calibration is the default; with a corpus it is the default pipeline on the user's text.
                changed = [f"--calibration {calibration}"] if calibration != PruneOptions.calibration else []
                changed += non_default_settings(settings)
                what = "default configuration" + (f" but {', '.join(changed)}" if changed else "")
                lines.append(f"- {what} ({method}, {calibration}, reconstruct "
                             f"{settings.get('reconstruct', 'none')}, recover {settings.get('recover', 'none')}) "
                             f"r{ratio:g}: WikiText-2 {mean:.1f} over {len(values)} seed(s) vs ≤ {ceiling:g} ({source}): "
                             f"**{'met' if mean <= ceiling else 'not met'}**")
    return lines


def goal_lines(groups: dict, dense: dict | None) -> list[str]:
    """The issue's goals, checked against the numbers above (mean over seeds)."""
    def mean(key, name):
        values = [metric(run, name) for run in groups.get(key, [])]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    lines = ["## Goals", ""]
    for key in sorted((k for k in groups if k[0] in RIVALS), key=lambda k: (k[1], str(k[2]), k[0])):
        hybrid, ratio, calibration = key
        for name, better, label in (("wikitext2", min, "WikiText-2 perplexity"), ("average", max, "average accuracy")):
            mine = mean(key, name)
            rivals = {method: mean((method, ratio, calibration), name) for method in RIVALS[hybrid]}
            rivals = {method: value for method, value in rivals.items() if value is not None}
            if mine is None or not rivals:
                continue
            wins = all(better(mine, value) == mine and mine != value for value in rivals.values())
            lines.append(f"- r{ratio:g}, {calibration}: {hybrid} {label} {mine:.3f} vs "
                         + ", ".join(f"{m} {v:.3f}" for m, v in rivals.items())
                         + f": **{f'{hybrid} best' if wins else f'{hybrid} not best'}**")
        if dense and ratio == 0.2:
            retention = [retention_report(run, dense).get("average") for run in groups[key]]
            retention = [r for r in retention if r is not None]
            if retention:
                value = sum(retention) / len(retention)
                lines.append(f"- r0.2, {calibration}: {hybrid} above-chance retention {value:.3f} "
                             f"(goal ≥ 0.9: **{'met' if value >= 0.9 else 'not met'}**)")
    return lines


def plot_ratio_curves(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, dense = grouped(payload["runs"]), payload["runs"].get("dense")
    calibrations = sorted({key[2] for key in groups if key[2] not in (None, "none")})
    if not dense or not calibrations:
        return
    figure, axes = plt.subplots(2, len(calibrations), figsize=(6 * len(calibrations), 8), squeeze=False)
    for column, calibration in enumerate(calibrations):
        for row, (name, label) in enumerate((("wikitext2", "WikiText-2 perplexity (log)"),
                                             ("average", "average accuracy"))):
            axis = axes[row][column]
            for method in METHODS:
                label_cal = "none" if method in GRADIENT_FREE else calibration
                points = sorted((ratio, values) for (m, ratio, cal), members in groups.items()
                                if m == method and cal == label_cal
                                for values in [[v for v in (metric(run, name) for run in members) if v is not None]]
                                if values)
                if not points or metric(dense, name) is None:  # e.g. no zero-shot task in a perplexity-only grid
                    continue
                xs = [0.0] + [ratio for ratio, _ in points]
                ys = [metric(dense, name)] + [sum(v) / len(v) for _, v in points]
                axis.plot(xs, ys, marker="o", label=method, linestyle="--" if method in GRADIENT_FREE else "-")
            if name == "wikitext2":
                axis.set_yscale("log")
            axis.set_xlabel("fraction of parameters removed")
            axis.set_ylabel(label)
            axis.set_title(f"calibration: {calibration}")
            axis.grid(alpha=0.3)
        axes[0][column].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_alpha(payload: dict, path: Path) -> None:
    """Learned α_fine (the fine-grained weight) per layer and unit type, one panel per hybrid run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    hybrid = sorted((run for run in payload["runs"].values() if run["method"] == "hybrid"
                     and (run.get("learned_alpha") or run.get("alpha"))), key=lambda r: (r["calibration"], r["ratio"]))
    if not hybrid:
        return
    figure, axes = plt.subplots(len(hybrid), 1, figsize=(10, 1.4 * len(hybrid) + 1), squeeze=False, sharex=True,
                                constrained_layout=True)
    for axis, run in zip(axes[:, 0], hybrid):
        alpha = run.get("learned_alpha") or run["alpha"]
        grid = np.array([[layer[kind][0] if layer and layer.get(kind) else np.nan for layer in alpha]
                         for kind in ("attn", "mlp")], dtype=float)
        image = axis.imshow(grid, aspect="auto", cmap="coolwarm", vmin=0, vmax=1)
        axis.set_yticks([0, 1], ["attn", "mlp"])
        axis.set_xticks(range(0, grid.shape[1], max(1, grid.shape[1] // 15)))
        axis.set_title(f"{run['calibration']}, ratio {run['ratio']:g}, seed {run['seed']} "
                       f"(selected: {selected_blend(run)})", fontsize=9)
    axes[-1, 0].set_xlabel("layer")
    figure.colorbar(image, ax=axes[:, 0].tolist(), label="α_fine (1 = fine only, 0 = coarse only)")
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
