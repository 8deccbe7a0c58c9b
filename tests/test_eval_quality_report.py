"""benchmarks/quality.py's grid and report, on synthetic runs (no model is pruned or evaluated)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(method, ratio, calibration, ppl, accuracies, seed=0):
    tasks = {"wikitext2": {"kind": "perplexity", "perplexity": ppl}}
    for name, (acc, chance) in accuracies.items():
        tasks[name] = {"kind": "multiple_choice", "headline": acc, "headline_metric": "acc", "acc": acc,
                       "acc_stderr": 0.03, "chance": chance, "items": 150}
    average = sum(acc for acc, _ in accuracies.values()) / len(accuracies)
    key = "dense" if method == "dense" else f"{method}|r{ratio:g}|{calibration}|seed{seed}"
    return key, {"key": key, "method": method, "ratio": ratio, "calibration": calibration, "seed": seed,
                 "ratio_achieved": ratio, "tasks": tasks, "average_accuracy": average,
                 "learned_alpha": [{"attn": [0.3, 0.7], "mlp": [0.6, 0.4]}] * 4 if method == "hybrid" else None,
                 "selected": "learned" if method == "hybrid" else None}


def payload():
    runs = dict([
        fake_run("dense", 0.0, None, 50.0, {"piqa": (0.70, 0.5), "arc_easy": (0.55, 0.25)}),
        fake_run("hybrid", 0.2, "self", 60.0, {"piqa": (0.68, 0.5), "arc_easy": (0.52, 0.25)}),
        fake_run("fine", 0.2, "self", 65.0, {"piqa": (0.66, 0.5), "arc_easy": (0.50, 0.25)}),
        fake_run("coarse", 0.2, "self", 62.0, {"piqa": (0.67, 0.5), "arc_easy": (0.50, 0.25)}),
        fake_run("llm-pruner", 0.2, "self", 58.0, {"piqa": (0.66, 0.5), "arc_easy": (0.49, 0.25)}),
    ])
    return {"command": "python benchmarks/quality.py", "date": "2026-01-01", "machine": "test",
            "grid_seconds": 1, "runs": runs,
            "settings": {"model": "m", "limits": {"wikitext2": 60, "piqa": 150, "arc_easy": 150}, "seq_len": 128,
                         "samples": 32, "calibration_seq_len": 128}}


def test_the_default_grid_is_dense_plus_56_runs(quality):
    runs = quality.planned_runs(quality.parse_args([]))
    # 2 ratios × (2 calibrations × 13 calibrated methods + magnitude and random once)
    assert runs[0]["method"] == "dense" and len(runs) == 1 + 2 * (2 * 13 + 2)
    gradient_free = [run for run in runs if run["method"] in ("magnitude", "random")]
    assert {run["calibration"] for run in gradient_free} == {"none"} and len(gradient_free) == 4
    assert len({run["key"] for run in runs}) == len(runs)
    # every method names its layout explicitly, so a change of the package default leaves it meaning the same
    assert quality.method_fields("llm-pruner-recipe") == {"importance": "llm-pruner", "layout": "per-layer",
                                                          "allocation": "even", "protect_layers": "first:4,last:2"}
    assert quality.method_fields("coarse") == {"importance": "coarse", "layout": "uniform", "allocation": "even"}
    assert quality.method_fields("hybrid-global-ends") == {"importance": "hybrid", "layout": "per-layer",
                                                           "allocation": "global", "protect_layers": "first:2,last:2"}
    assert quality.method_fields("hybrid-global") == {"importance": "hybrid", "layout": "per-layer",
                                                      "allocation": "global"}


def test_report_states_retention_and_checks_the_goals(quality, tmp_path):
    path = tmp_path / "quality.md"
    quality.write_markdown(payload(), path)
    text = path.read_text()
    assert "| hybrid | self | 0.200 | 60.00 | 0.680 | 0.520 | 0.600 | 0.900 |" in text  # (0.6-0.375)/(0.625-0.375)
    # hybrid's perplexity 60 loses to llm-pruner's 58; its average 0.600 beats 0.580, 0.585, 0.575
    assert "hybrid WikiText-2 perplexity 60.000" in text and "**hybrid not best**" in text
    assert "hybrid average accuracy 0.600" in text and "**hybrid best**" in text
    assert "above-chance retention 0.900 (goal ≥ 0.9: **met**)" in text
    assert "piqa 150" in text and "wikitext2 60 windows" in text


def test_plots_are_written(quality, tmp_path):
    # matplotlib comes with the `bench` extra that `make test` installs: its absence must fail here.
    quality.plot_ratio_curves(payload(), tmp_path / "ratio.png")
    quality.plot_alpha(payload(), tmp_path / "alpha.png")
    assert (tmp_path / "ratio.png").stat().st_size > 10_000 and (tmp_path / "alpha.png").stat().st_size > 5_000


def test_report_checks_the_default_configurations_perplexity_goals_and_shows_the_peer(quality, tmp_path):
    data = payload()
    default = quality.default_method()
    assert default is not None  # the package default is one of the grid's methods
    for seed, ppl in ((0, 130.0), (1, 150.0), (2, 140.0)):  # mean 140: under 144, over 111 and 89
        key, run = fake_run(default, 0.2108, "self", ppl, {"piqa": (0.6, 0.5), "arc_easy": (0.45, 0.25)}, seed)
        data["runs"][key] = run
    data["settings"]["samples"] = quality.PruneOptions.samples  # the payload's 32 is not the default
    path = tmp_path / "quality.md"
    quality.write_markdown(data, path)
    text = path.read_text()
    assert f"default configuration ({default}, self" in text
    # a grid run with a setting off the default says so on the goal line, not "default configuration"
    data["settings"].update(samples=quality.PruneOptions.samples + 1, min_keep=0.6)
    quality.write_markdown(data, path)
    assert (f"default configuration but --samples {quality.PruneOptions.samples + 1}, --min-keep 0.6 ({default}, self"
            in path.read_text())
    assert "r0.2108: WikiText-2 140.0 over 3 seed(s) vs ≤ 144 (issue 13: 0.7× the peer's excess log-perplexity): **met**" in text
    assert "r0.2108: WikiText-2 140.0 over 3 seed(s) vs ≤ 89 (issue 13's aim: FLAP's margin over LLM-Pruner): **not met**" in text
    assert "| LLM-Pruner (its own code, measured elsewhere; 400 windows) | 10 × 64 tokens | 0.211 | 205.40 |" in text
