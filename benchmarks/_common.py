"""Small helpers the benchmark scripts share: the method grid's flags, comma lists, atomic JSON results,
and the mean (range) cells of the result tables."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path


def numbers(text: str, kind) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def names(text: str, allowed) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in chosen if name not in allowed]
    if unknown:
        raise SystemExit(f"unknown: {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return chosen


def mean_range(values: list[float | None], digits: int) -> str:
    """A table cell: the mean of the values given (None: not measured), with their range when there are several."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def write_json(path: Path, payload: dict) -> None:
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    staging.replace(path)  # atomic: an interrupted run never leaves half a file


def grid_parser(description: str, methods, calibrations: dict, default_calibrations: str) -> argparse.ArgumentParser:
    """The flags every method-grid benchmark takes: the model, the data, and the grid's three axes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--methods", default=",".join(methods))
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--calibrations", default=default_calibrations, help=f"from {', '.join(calibrations)}")
    return parser


# The calibration label of methods that read no calibration text (they are pruned once per ratio).
NO_CALIBRATION = "none"


def grid_cells(args, methods, calibrations: dict, gradient_free) -> list[tuple[float, str, str]]:
    """(ratio, calibration label, method) for every cell of the grid the flags ask for.

    Gradient-free methods ignore the calibration text: they appear once per ratio, labelled "none".
    """
    chosen = names(args.calibrations, calibrations)
    return [(ratio, NO_CALIBRATION if method in gradient_free else calibration, method)
            for ratio in numbers(args.ratios, float) for calibration in chosen
            for method in names(args.methods, methods)
            if method not in gradient_free or calibration == chosen[0]]


def calibration_source(label: str, data_dir, calibrations: dict) -> str:
    """What PruneOptions.calibration takes for a grid label: 'self', or the corpus path in the data folder."""
    path = calibrations.get(label, "self")
    from hywia.options import resolve_calibration

    return resolve_calibration("self" if path == "self" else str(Path(data_dir) / path))


def missing_runs(commands: list[str], done: dict, parse_args, planned_runs) -> list[str]:
    """Run keys the recorded commands plan that `done` does not hold (an interrupted or stopped run).

    Each command is "python benchmarks/<script>.py ARGS"; a script's own parse_args and planned_runs
    turn its ARGS back into the plan.
    """
    missing = []
    for command in commands:
        try:
            planned = planned_runs(parse_args(shlex.split(command)[2:]))
        except SystemExit:  # a command from an older version of the script
            continue
        missing += [run["key"] for run in planned if run["key"] not in done and run["key"] not in missing]
    return missing


def selected_blend(run: dict) -> str:
    """Which blend hybrid kept: 'learned', or 'fixed α_fine=W' (runs from before the fusion compared the
    best of several fixed blends recorded no W: their fixed blend was ½/½)."""
    if run.get("selected") != "fixed":
        return str(run.get("selected"))
    weight = run.get("fixed_fine_weight")
    return f"fixed α_fine={0.5 if weight is None else weight:g}"
