"""Results as people read them: a printed table, a JSON file, and above-chance retention.

Works on the plain dicts that evaluation writes (`{"tasks": {name: {...}}}`), so the same helpers
read a fresh run and a JSON file from last week.
"""

from __future__ import annotations

import json
from pathlib import Path


def average_accuracy(tasks: dict[str, dict]) -> float | None:
    """Mean of each zero-shot task's headline accuracy (acc, or acc_norm where the tables use it)."""
    headlines = [result["headline"] for result in tasks.values() if result.get("kind") == "multiple_choice"]
    return sum(headlines) / len(headlines) if headlines else None


def average_chance(tasks: dict[str, dict]) -> float | None:
    chances = [result["chance"] for result in tasks.values() if result.get("kind") == "multiple_choice"]
    return sum(chances) / len(chances) if chances else None


def above_chance_retention(pruned: float, dense: float, chance: float) -> float | None:
    """(pruned − chance) / (dense − chance): the share of the dense model's above-chance accuracy kept.

    Plain retention (pruned / dense) flatters a model near chance: a coin keeps 80% of a 0.62 model's
    PIQA score. None when the dense model is not above chance, where the ratio means nothing.
    """
    if dense - chance <= 1e-12:
        return None
    return (pruned - chance) / (dense - chance)


def retention_report(pruned: dict, dense: dict) -> dict[str, float | None]:
    """Above-chance retention per zero-shot task both runs share, and of the average accuracy.

    Each task's chance is the pruned run's (mean of 1/choices over its items); both runs must score
    the same slice, which is checked, since otherwise the ratio compares different questions.
    """
    report: dict[str, float | None] = {}
    shared = {}
    for name, result in pruned["tasks"].items():
        reference = dense["tasks"].get(name)
        if result.get("kind") != "multiple_choice" or reference is None:
            continue
        if reference["items"] != result["items"]:
            raise ValueError(f"{name}: pruned run scored {result['items']} items, dense {reference['items']}")
        report[name] = above_chance_retention(result["headline"], reference["headline"], result["chance"])
        shared[name] = (result, reference)
    if shared:
        pruned_avg = average_accuracy({name: pair[0] for name, pair in shared.items()})
        dense_avg = average_accuracy({name: pair[1] for name, pair in shared.items()})
        chance_avg = average_chance({name: pair[0] for name, pair in shared.items()})
        report["average"] = above_chance_retention(pruned_avg, dense_avg, chance_avg)
    return report


def format_table(payload: dict) -> str:
    """A fixed-width table of one evaluation: perplexities first, then accuracies and their average."""
    lines = [f"{'task':<15}{'metric':<10}{'value':>10}{'± stderr':>10}{'other':>18}{'slice':>16}{'chance':>8}"]
    for name, result in payload["tasks"].items():
        if result["kind"] == "perplexity":
            lines.append(f"{name:<15}{'ppl':<10}{result['perplexity']:>10.3f}{'':>10}"
                         f"{'nll ' + format(result['mean_nll'], '.4f'):>18}"
                         f"{str(result['windows']) + '/' + str(result['windows_total']) + ' win':>16}{'':>8}")
        else:
            metric = result["headline_metric"]
            other_name = "acc" if metric == "acc_norm" else "acc_norm"
            other = result.get(other_name)
            other_text = f"{other_name} {other:.4f}" if other is not None else ""
            stderr = result[f"{metric}_stderr"]
            lines.append(f"{name:<15}{metric:<10}{result['headline']:>10.4f}{stderr:>10.4f}{other_text:>18}"
                         f"{str(result['items']) + '/' + str(result['items_total']):>16}{result['chance']:>8.3f}")
    average = payload.get("average_accuracy")
    if average is not None:
        lines.append(f"{'average':<15}{'headline':<10}{average:>10.4f}")
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # default=str: harness results carry numpy scalars and dtypes that json cannot encode itself.
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
