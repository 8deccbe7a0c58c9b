"""`--harness`: hand a model to lm-evaluation-harness, so users can reproduce with it.

Two ways:
- a model directory, through the harness's `hf` model and its own tasks. Those download their data
  from the Hugging Face hub and apply the harness's conventions (e.g. its `wikitext` task reports
  word perplexity over rolling windows, not our token perplexity over 128-token windows), so the
  numbers are comparable to the literature, not to `hywia eval`'s;
- a running server (`--base-url`: `hywia serve`, `vllm serve`), through the harness's
  `local-completions` model and task files written from the local data (lm_eval_local.py): the same
  items and prompts as `hywia eval`, so the two agree item by item, and no hub is needed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hywia.errors import HywiaError
from hywia.evaluation.tasks import TASKS

log = logging.getLogger(__name__)

API_PACKAGES = ("requests", "aiohttp", "tenacity")  # what lm-eval's API models import (its `api` extra)
INSTALL_HINT = ('install it with `pip install -e ".[eval]"` (lm-eval with its API client), or drop --harness to '
                "use hywia's built-in evaluator")


def import_lm_eval():
    try:
        import lm_eval
    except ImportError as exc:
        raise HywiaError("--harness needs lm-evaluation-harness (the `lm_eval` module), which is not installed",
                         INSTALL_HINT) from exc
    return lm_eval


def import_lm_eval_api():
    """lm_eval and its TaskManager, checked to have what `local-completions` needs (lm-eval[api])."""
    lm_eval = import_lm_eval()
    missing = [name for name in API_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise HywiaError(f"lm-eval's local-completions model needs {', '.join(missing)}, which is not installed",
                         INSTALL_HINT)
    from lm_eval.tasks import TaskManager

    return lm_eval, TaskManager


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


# ------------------------------------------------------------------ a served model (--base-url)

@dataclass(frozen=True)
class ServedModelCard:
    """What /v1/models says about one served model."""

    model_id: str
    root: str | None  # the checkpoint directory the server loaded (hywia serve and vllm serve list it)
    max_model_len: int | None


def completions_url(base_url: str) -> str:
    """http://host:port, …/v1 or …/v1/completions → the completions endpoint lm-eval posts to."""
    url = base_url.rstrip("/")
    if url.endswith("/v1/completions"):
        return url
    return url + ("/completions" if url.endswith("/v1") else "/v1/completions")


def served_model(base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 30) -> ServedModelCard:
    """The served model to score: MODEL by id, or the only one the server lists."""
    url = completions_url(base_url).removesuffix("/completions") + "/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            cards = json.load(response)["data"]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # URLError and HTTPError are OSErrors
        raise HywiaError(f"could not list the models served at {url} ({exc})",
                         "start the server first (hywia serve), check --base-url, and set OPENAI_API_KEY "
                         "if the server was started with --api-key") from exc
    ids = [card["id"] for card in cards]
    if model is None and len(cards) != 1:
        raise HywiaError(f"{url} serves {len(cards)} models ({', '.join(ids) or 'none'}), so which one to score "
                         "is not clear", "name the served model's id: hywia eval MODEL_ID --base-url ...")
    chosen = cards[0] if model is None else next((card for card in cards if card["id"] == model), None)
    if chosen is None:
        raise HywiaError(f"{url} does not serve a model named {model!r}", f"use one of: {', '.join(ids)}")
    return ServedModelCard(chosen["id"], chosen.get("root"), chosen.get("max_model_len"))


def run_served_harness(base_url: str, model_id: str, tokenizer: Path, task_names: list[str], data_dir: Path,
                       limit: int | None, batch_size: int, max_length: int, seed: int = 1234,
                       log_samples: bool = False, task_dir: Path | None = None) -> dict:
    """lm_eval.simple_evaluate with `local-completions` on BASE_URL, over local task files written from
    DATA_DIR (into TASK_DIR, or a temporary folder); returns `results`, `config` (and `samples`).

    Requests carry token ids (tokenised here by TOKENIZER, the served model's), batch_size prompts
    each, with echo, logprobs 1 and max_tokens 1, as the harness scores log-likelihoods.
    """
    from hywia.evaluation.lm_eval_local import write_task_configs

    lm_eval, task_manager_class = import_lm_eval_api()
    model_args = {"model": model_id, "base_url": completions_url(base_url), "tokenizer": str(tokenizer),
                  "tokenizer_backend": "huggingface", "tokenized_requests": True, "batch_size": batch_size,
                  "max_length": max_length, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="hywia-lm-eval-") as scratch:
        directory = Path(task_dir) if task_dir is not None else Path(scratch)
        names = write_task_configs(task_names, data_dir, directory)
        log.info("scoring %s at %s with lm-evaluation-harness: tasks %s", model_id, model_args["base_url"],
                 ", ".join(names.values()))
        output = lm_eval.simple_evaluate(
            model="local-completions", model_args=model_args, tasks=list(names.values()), limit=limit,
            task_manager=task_manager_class(include_path=str(directory), include_defaults=False),
            log_samples=log_samples)
    payload = {"harness": True, "harness_model": "local-completions", "model_args": model_args,
               "tasks_requested": list(names.values()), "task_files": None if task_dir is None else str(task_dir),
               "results": output.get("results", {}), "config": output.get("config", {})}
    if log_samples:
        payload["samples"] = output.get("samples", {})
    return payload
