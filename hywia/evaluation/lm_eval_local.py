"""lm-evaluation-harness task files for hywia's local multiple-choice data.

The harness's own tasks fetch their data from the Hugging Face hub and format prompts their own
way. These task files instead read the very files `hywia eval` reads (`dataset_path: json` with
absolute `data_files`) and build the same (context, continuation) pairs as hywia/evaluation/tasks.py:

- multiple choice: context `query.rstrip("\\n") + "\\nAnswer:"` (or the query as given, for
  OpenBookQA), continuation `" " + choice`, gold the `gold` index;
- partial scoring (WinoGrande): one context per `context_options` entry, the shared continuation
  `" " + continuation` scored after each (the harness's "multiple input" form).

Both sides score with the harness's tokenization and report acc and acc_norm (length-normalised
by characters), so `lm_eval` against `hywia serve` and `hywia eval` on the same slice are
comparable item by item. Use them with `lm_eval --include_path DIR --tasks hywia_arc_easy ...`
or `TaskManager(include_path=DIR)`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hywia.errors import HywiaError
from hywia.evaluation.tasks import PARTIAL, PERPLEXITY, TASKS, TaskSpec, task_path

TASK_PREFIX = "hywia_"
SPLIT = "test"  # the split name the data file is given in `data_files`


def harness_task_name(name: str) -> str:
    """hywia's task name → the name of its local harness task (prefixed: the harness has its own
    `arc_easy`, `piqa`, ... that read the hub)."""
    return TASK_PREFIX + name


def task_config(spec: TaskSpec, data_dir: Path) -> dict:
    """The harness task config (as its YAML files hold it) for one of hywia's zero-shot tasks."""
    if spec.kind == PERPLEXITY:
        raise HywiaError(
            f"{spec.name} is a perplexity task; only the multiple-choice tasks are written as local "
            "harness tasks (the harness's wikitext reports word perplexity over rolling windows, "
            "not comparable to hywia's token perplexity)",
            "drop it from --tasks, or evaluate it with hywia's built-in evaluator (no --harness)")
    data_file = task_path(spec, data_dir).resolve()  # a missing file is a HywiaError naming it
    config = {
        "task": harness_task_name(spec.name),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {SPLIT: str(data_file)}},
        "test_split": SPLIT,
        "output_type": "multiple_choice",
        "target_delimiter": " ",
        "metadata": {"version": 1.0, "source": "hywia", "prompt": spec.prompt},
    }
    if spec.kind == PARTIAL:
        # doc_to_text yielding an int (the gold index) is the harness's "multiple input" form: each
        # choice is a context, and the continuation (doc_to_target) is scored after each.
        config.update(doc_to_text="gold", doc_to_choice="context_options", doc_to_target="continuation",
                      metric_list=[_metric("acc")])
    else:
        config.update(doc_to_text=_context_template(spec), doc_to_choice="choices", doc_to_target="gold",
                      metric_list=[_metric("acc"), _metric("acc_norm")])
    return config


def _context_template(spec: TaskSpec) -> str:
    """A field name (used as given) or a Jinja template: the same context as tasks._context_for."""
    if not spec.answer_suffix:
        return "query"
    # The harness renders with Jinja; "\\n" inside a Jinja string literal is a newline.
    return "{{ query.rstrip('\\n') }}" + spec.answer_suffix


def _metric(name: str) -> dict:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def write_task_configs(task_names: list[str], data_dir: Path, directory: Path) -> dict[str, str]:
    """Write one `hywia_<task>.yaml` per task into DIRECTORY; returns {hywia name: harness name}.

    Every name is checked (and every data file found) before anything is written.
    """
    unknown = [name for name in task_names if name not in TASKS]
    if unknown:
        raise HywiaError(f"unknown task(s): {', '.join(unknown)}",
                         f"choose from: {', '.join(name for name, spec in TASKS.items() if spec.kind != PERPLEXITY)}")
    configs = [task_config(TASKS[name], Path(data_dir)) for name in task_names]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for config in configs:
        path = directory / f"{config['task']}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return {name: config["task"] for name, config in zip(task_names, configs)}
