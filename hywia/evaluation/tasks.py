"""The evaluation tasks: where each one's data lives, how it is read, and how it is scored.

Every task is a plain `TaskSpec`; data is read from a directory laid out as `../shared/data`
(see its README), so users can point `--data-dir` at their own copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hywia.errors import HywiaError

PERPLEXITY = "perplexity"
MULTIPLE_CHOICE = "multiple_choice"  # score " " + choice after the query
PARTIAL = "partial"  # WinoGrande: score the shared continuation after each context option

# The harness's templates end the prompt with "\nAnswer:"; our data files store the query without
# it, so it is added here, once, and named in the results (`prompt`).
ANSWER_SUFFIX = "\nAnswer:"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    relative_path: str
    # The accuracy that enters the average: LLM-Pruner's (and HyWIA's) tables report acc_norm for
    # ARC-Challenge and OpenBookQA and acc for the rest.
    headline_metric: str = "acc"
    answer_suffix: str = ""  # appended to the query (after its trailing newlines) to form the context
    harness_name: str | None = None  # the lm-evaluation-harness task of the same name, if any
    notes: str = ""

    @property
    def prompt(self) -> str:
        """How the context is built, in words, for the results file."""
        if self.kind == PARTIAL:
            return "each context option, then ' ' + continuation is scored (partial scoring)"
        if self.answer_suffix:
            return f"query.rstrip('\\n') + {self.answer_suffix!r}, then ' ' + choice is scored"
        return "query as given, then ' ' + choice is scored"


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("wikitext2", PERPLEXITY, "wikitext-2-raw/test.txt", harness_name="wikitext",
             notes="test.txt used as given: the 4,358 HF wikitext-2-raw-v1 test rows joined with '\\n\\n'"),
    TaskSpec("ptb", PERPLEXITY, "ptb/test.txt",
             notes="each line of ptb/test.txt stripped, empty lines dropped, joined with '\\n\\n' "
                   "(LLM-Pruner's ppl_dataset convention for the ptb_text_only 'sentence' rows)"),
    TaskSpec("piqa", MULTIPLE_CHOICE, "zeroshot/piqa.jsonl", answer_suffix=ANSWER_SUFFIX,
             harness_name="piqa"),
    TaskSpec("boolq", MULTIPLE_CHOICE, "zeroshot/boolq.jsonl", answer_suffix=ANSWER_SUFFIX,
             harness_name="boolq", notes="chance 0.5; the majority class ('yes') is higher, see majority_rate"),
    TaskSpec("winogrande", PARTIAL, "zeroshot/winogrande.jsonl",
             harness_name="winogrande",
             notes="acc only: acc_norm is not meaningful when the scored continuation is shared"),
    TaskSpec("arc_easy", MULTIPLE_CHOICE, "zeroshot/arc_easy.jsonl", answer_suffix=ANSWER_SUFFIX,
             harness_name="arc_easy"),
    TaskSpec("arc_challenge", MULTIPLE_CHOICE, "zeroshot/arc_challenge.jsonl", headline_metric="acc_norm",
             answer_suffix=ANSWER_SUFFIX, harness_name="arc_challenge"),
    TaskSpec("openbookqa", MULTIPLE_CHOICE, "zeroshot/openbook_qa.jsonl", headline_metric="acc_norm",
             harness_name="openbookqa", notes="query is the question stem, used as given"),
)}

ZERO_SHOT_TASKS = tuple(name for name, spec in TASKS.items() if spec.kind != PERPLEXITY)
PERPLEXITY_TASKS = tuple(name for name, spec in TASKS.items() if spec.kind == PERPLEXITY)


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question reduced to (context, continuation) pairs, one per choice."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_texts: tuple[str, ...]  # what acc_norm divides by (length in characters), as the harness does


def parse_task_names(text: str) -> list[str]:
    """'all', or a comma-separated list of task names; unknown names are a user error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise HywiaError(f"unknown task(s): {', '.join(unknown) or '(none given)'}",
                         f"choose from: all, {', '.join(TASKS)}")
    return names


def task_path(spec: TaskSpec, data_dir: Path) -> Path:
    path = Path(data_dir) / spec.relative_path
    if not path.is_file():
        raise HywiaError(
            f"task {spec.name} needs {path}, which does not exist",
            f"pass the evaluation data folder with --data-dir (it must contain {spec.relative_path}; "
            "layout as in ../shared/data/README.md)",
        )
    return path


def load_perplexity_text(spec: TaskSpec, data_dir: Path) -> str:
    # Bytes decoded by hand so that no newline translation touches the text.
    raw = task_path(spec, data_dir).read_bytes().decode("utf-8")
    if spec.name == "ptb":
        return "\n\n".join(line.strip() for line in raw.splitlines() if line.strip())
    return raw


def load_choice_items(spec: TaskSpec, data_dir: Path, limit: int | None = None) -> list[ChoiceItem]:
    """The first LIMIT items of the task file (a fixed slice), as scorable pairs."""
    path = task_path(spec, data_dir)
    items = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                items.append(_choice_item(spec, json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise HywiaError(f"{path}:{number} is not a valid {spec.name} item ({exc})",
                                 "check the file against the formats in ../shared/data/README.md") from exc
    return items


def _choice_item(spec: TaskSpec, record: dict) -> ChoiceItem:
    gold = int(record["gold"])
    if spec.kind == PARTIAL:
        options = tuple(record["context_options"])
        continuation = " " + record["continuation"]
        item = ChoiceItem(options, (continuation,) * len(options), gold, options)
    else:
        context = _context_for(spec, record["query"])
        choices = tuple(record["choices"])
        item = ChoiceItem((context,) * len(choices), tuple(" " + choice for choice in choices), gold, choices)
    if not 0 <= gold < len(item.contexts):
        raise ValueError(f"gold {gold} out of range for {len(item.contexts)} choices")
    return item


def _context_for(spec: TaskSpec, query: str) -> str:
    return query.rstrip("\n") + spec.answer_suffix if spec.answer_suffix else query


def parse_limits(text: str | None, task_names: list[str]) -> dict[str, int | None]:
    """`--limit`: one number for every task ("200"), or per task ("wikitext2=400,piqa=200").

    For perplexity a limit counts windows, for zero-shot tasks items; both take the first ones, so a
    limited run is a fixed slice that another run (e.g. the dense model) can repeat exactly.
    """
    limits: dict[str, int | None] = {name: None for name in task_names}
    if not text:
        return limits
    try:
        if "=" not in text:
            limits = {name: int(text) for name in task_names}
        else:
            for part in text.split(","):
                name, _, number = part.partition("=")
                if name.strip() not in limits:
                    raise HywiaError(f"--limit names {name.strip()!r}, which is not among --tasks",
                                     f"use the task names given to --tasks: {', '.join(task_names)}")
                limits[name.strip()] = int(number)
    except ValueError as exc:
        raise HywiaError(f"--limit {text!r} is not a number or a list of task=number",
                         "write e.g. --limit 200 or --limit wikitext2=400,piqa=200") from exc
    if any(limit is not None and limit < 1 for limit in limits.values()):
        raise HywiaError(f"--limit {text!r} asks for fewer than one item", "use a positive number")
    return limits


def count_items(spec: TaskSpec, data_dir: Path) -> int:
    with task_path(spec, data_dir).open(encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())
