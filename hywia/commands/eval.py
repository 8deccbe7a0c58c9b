"""`hywia eval`: perplexity and zero-shot accuracy of a model or an export, as a table and JSON."""

from __future__ import annotations

import datetime
import logging
import os
import shlex
import time
from pathlib import Path

from hywia import __version__
from hywia.errors import HywiaError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL_OR_EXPORT",
                        help="HF directory, export directory, .gguf file, hub id, or the built-in default "
                             "(when omitted); with --base-url: the served model's id (when omitted: the only "
                             "one the server lists)")
    parser.add_argument("--tasks", default="all",
                        help="comma-separated: wikitext2,ptb,piqa,boolq,winogrande,arc_easy,arc_challenge,"
                             "openbookqa, or 'all' (default)")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR"),
                        help="folder laid out as ../shared/data (default: $HYWIA_DATA_DIR)")
    parser.add_argument("--limit", default=None,
                        help="first N windows/items of every task ('200'), or per task "
                             "('wikitext2=400,piqa=200'); default: everything")
    parser.add_argument("--seq-len", type=int, default=128,
                        help="perplexity window in tokens (128 as LLM-Pruner reports, 2048 as SparseGPT)")
    parser.add_argument("--batch-size", type=int, default=64, help="at most this many sequences per forward pass")
    parser.add_argument("--batch-tokens", type=int, default=4096,
                        help="at most this many tokens (padding included) per forward pass")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--cache-dir", default=None, help="hywia cache (default: $HYWIA_CACHE_DIR or ~/.cache/hywia)")
    parser.add_argument("--harness", action="store_true",
                        help="hand the model to lm-evaluation-harness (lm_eval) instead of the built-in evaluator")
    parser.add_argument("--base-url", default=None, metavar="URL",
                        help="score a running server (hywia serve, vllm serve; e.g. http://127.0.0.1:8000) with "
                             "lm-eval's local-completions model, on task files written from --data-dir: the same "
                             "items and prompts as the built-in evaluator (implies --harness; OPENAI_API_KEY is "
                             "sent as the key)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="with --base-url: the served model's tokenizer directory (default: the checkpoint "
                             "directory the server lists in /v1/models, when it is on this machine)")
    parser.add_argument("--task-files", default=None, metavar="DIR",
                        help="with --base-url: write the harness task files (hywia_<task>.yaml) here and keep them, "
                             "for `lm_eval --include_path DIR` (default: a temporary folder)")


def run(args) -> int:
    from hywia.evaluation.results import format_table, write_json
    from hywia.evaluation.tasks import parse_limits, parse_task_names

    task_names = parse_task_names(args.tasks)
    limits = parse_limits(args.limit, task_names)
    if args.batch_size < 1 or args.batch_tokens < 1:
        raise HywiaError(f"--batch-size {args.batch_size} and --batch-tokens {args.batch_tokens} must be at least 1")
    header = {
        "command": _command_line(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hywia_version": __version__, "dtype": args.dtype, "device": args.device,
    }
    started = time.perf_counter()
    if args.base_url:
        payload, table = _run_served_harness(args, task_names, limits)
    elif args.harness:
        payload, table = _run_harness(args, task_names, limits)
    else:
        payload = _run_builtin(args, task_names, limits)
        table = format_table(payload)
    payload = {**header, **payload, "total_seconds": round(time.perf_counter() - started, 1)}
    print(table)
    if args.output:
        log.info("wrote %s", write_json(args.output, payload))
    return 0


def _run_builtin(args, task_names: list[str], limits: dict) -> dict:
    from hywia.evaluation.suite import EvalOptions, evaluate
    from hywia.models import load_model

    data_dir = _data_dir(args.data_dir)
    loaded = load_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype, device=args.device)
    options = EvalOptions(tasks=task_names, data_dir=data_dir, limits=limits, seq_len=args.seq_len,
                          batch_size=args.batch_size, batch_tokens=args.batch_tokens)
    result = evaluate(loaded.model, loaded.tokenizer, options)
    return {"model": loaded.resolved.source, "model_directory": str(loaded.resolved.directory),
            "model_digest": loaded.resolved.digest, "data_dir": str(data_dir), "seq_len": args.seq_len,
            "limits": limits, **result}


def _run_harness(args, task_names: list[str], limits: dict) -> tuple[dict, str]:
    from hywia.evaluation.harness import format_harness_table, import_lm_eval, run_harness
    from hywia.models import resolve_source

    import_lm_eval()  # fail before resolving (and maybe converting) the model
    limit = _one_limit(limits)
    resolved = resolve_source(args.model, cache_dir=args.cache_dir)
    output = run_harness(resolved.directory, task_names, limit, args.batch_size, args.dtype, args.device)
    return {"model": resolved.source, "model_directory": str(resolved.directory), **output}, \
        format_harness_table(output)


def _run_served_harness(args, task_names: list[str], limits: dict) -> tuple[dict, str]:
    from hywia.evaluation.harness import (
        format_harness_table,
        import_lm_eval_api,
        run_served_harness,
        served_model,
    )

    import_lm_eval_api()  # fail before asking the server anything
    limit = _one_limit(limits)
    data_dir = _data_dir(args.data_dir)
    card = served_model(args.base_url, args.model, os.environ.get("OPENAI_API_KEY"))
    tokenizer = args.tokenizer or card.root
    if not tokenizer or not Path(tokenizer).is_dir():
        where = f"{tokenizer} is not a folder on this machine" if tokenizer else "the server lists no checkpoint folder"
        raise HywiaError(f"no tokenizer directory for {card.model_id} ({where})",
                         "pass --tokenizer DIR: the served model's tokenizer, which lm-eval needs to split each "
                         "context from its continuation")
    output = run_served_harness(args.base_url, card.model_id, tokenizer, task_names, data_dir, limit,
                                args.batch_size, card.max_model_len or 2048, task_dir=args.task_files)
    return {"model": card.model_id, "base_url": args.base_url, "tokenizer": str(tokenizer),
            "data_dir": str(data_dir), **output}, format_harness_table(output)


def _one_limit(limits: dict) -> int | None:
    distinct_limits = set(limits.values())
    if len(distinct_limits) > 1:
        raise HywiaError("--harness takes one --limit for all tasks", "write e.g. --limit 200")
    return distinct_limits.pop()


def _command_line(args) -> str:
    """The command that reproduces this run, spelled out with every option's value."""
    words = ["hywia", "eval"] + ([args.model] if args.model else [])
    for option in ("tasks", "data_dir", "limit", "seq_len", "batch_size", "batch_tokens", "dtype", "device", "output",
                   "base_url", "tokenizer", "task_files"):
        value = getattr(args, option)
        if value is not None:
            words += [f"--{option.replace('_', '-')}", str(value)]
    return shlex.join(words + (["--harness"] if args.harness else []))


def _data_dir(value: str | None) -> Path:
    if not value:
        raise HywiaError("no evaluation data folder given",
                         "pass --data-dir DIR (laid out as ../shared/data, see its README.md) or set HYWIA_DATA_DIR")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise HywiaError(f"--data-dir {path} is not a folder",
                         "pass the evaluation data folder (laid out as ../shared/data, see its README.md)")
    return path
