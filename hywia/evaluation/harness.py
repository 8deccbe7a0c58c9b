"""`--harness`: hand a model directory to lm-evaluation-harness, so users can reproduce with it.

The harness downloads its task data from the Hugging Face hub and applies its own conventions
(e.g. its `wikitext` task reports word perplexity over rolling windows, not our token perplexity
over 128-token windows), so its numbers are comparable to the literature, not to `hywia eval`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hywia.errors import HywiaError
from hywia.evaluation.tasks import TASKS

log = logging.getLogger(__name__)

INSTALL_HINT = ('install it with `pip install "lm-eval>=0.4"` (it fetches task data from the Hugging Face '
                "hub, so it needs network access), or drop --harness to use hywia's built-in evaluator")


def import_lm_eval():
    try:
        import lm_eval
    except ImportError as exc:
        raise HywiaError("--harness needs lm-evaluation-harness (the `lm_eval` module), which is not installed",
                         INSTALL_HINT) from exc
    return lm_eval


def harness_task_names(task_names: list[str]) -> list[str]:
    missing = [name for name in task_names if TASKS[name].harness_name is None]
    if missing:
        raise HywiaError(f"lm-evaluation-harness has no task matching {', '.join(missing)}",
                         "drop those from --tasks when using --harness")
    return [TASKS[name].harness_name for name in task_names]


def run_harness(model_directory: Path, task_names: list[str], limit: int | None, batch_size: int,
                dtype: str, device: str = "cpu") -> dict:
    """lm_eval.simple_evaluate on the HF directory; returns its `results` and `config` sections."""
    lm_eval = import_lm_eval()
    tasks = harness_task_names(task_names)
    model_args = f"pretrained={model_directory},dtype={dtype}"
    log.info("handing %s to lm-evaluation-harness: tasks %s", model_directory, ", ".join(tasks))
    output = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, limit=limit,
                                     batch_size=batch_size, device=device)
    return {"harness": True, "model_args": model_args, "tasks_requested": tasks,
            "results": output.get("results", {}), "config": output.get("config", {})}


def format_harness_table(output: dict) -> str:
    """One line per harness task and metric (its result keys look like "acc,none")."""
    lines = []
    for task, metrics in output["results"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                lines.append(f"{task:<15}{key:<28}{value:>10.4f}")
    return "\n".join(lines)
