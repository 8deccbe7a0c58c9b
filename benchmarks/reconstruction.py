"""Reconstruction benchmark: WikiText-2 perplexity of pruned models without and with the ridge
least-squares re-fit of o_proj / down_proj (hywia.reconstruct), for several ridges.

Protocol (issue 13): SmolLM2-135M-Instruct, WikiText-2 raw test text as given (rows joined with
"\\n\\n"), the first 400 non-overlapping 128-token windows. Plans come from the pruning pipeline
(hybrid importance by default) at one ratio, for the uniform layout and for the layer recipe
(per-layer, first 4 and last 2 layers kept whole); each plan and its calibration batch are cached,
so a rerun only evaluates. The reconstruction uses the same calibration batch the plan was scored
on (its first --fit-rows rows).

Every run is written to the JSON as soon as it finishes; a rerun skips the runs already there, so
the results of several commands (e.g. other ridges, fewer fit rows) accumulate in one file.

    python benchmarks/reconstruction.py --ridges 0.001,0.01,0.1,1
    python benchmarks/reconstruction.py --ridges 0.1 --fit-rows 32
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import names, numbers, write_json

from hywia.calibration import calibration_batch
from hywia.evaluation.perplexity import split_windows, tokenize_text, window_perplexity
from hywia.evaluation.scoring import TokenScorer
from hywia.models import load_model
from hywia.plan import PruningPlan
from hywia.reconstruct import reconstruct
from hywia.surgery import slice_model
from hywia.units import count_parameters

log = logging.getLogger("reconstruction")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LAYOUTS = {"uniform": {}, "recipe": {"layout": "per-layer", "protect_layers": "first:4,last:2"}}
CALIBRATIONS = {"gutenberg": "calibration/gutenberg", "self": "self"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "test"),
                        help="hywia cache (model, calibration statistics); plans go under its bench-reconstruction/")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--ratio", type=float, default=0.2108)
    parser.add_argument("--importance", default="hybrid")
    parser.add_argument("--layouts", default="uniform,recipe", help=f"from {', '.join(LAYOUTS)}")
    parser.add_argument("--calibration", default="gutenberg", choices=sorted(CALIBRATIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=64, help="calibration rows for the plan")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ridges", default="0.001,0.01,0.1,1", help="relative ridges (λ / mean diag H_KK)")
    parser.add_argument("--fit-rows", type=int, default=None, help="calibration rows the fit uses (default all)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-slicing (none) rows")
    parser.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    parser.add_argument("--windows", type=int, default=400)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS / "reconstruction.json"))
    return parser.parse_args(argv)


def planned_runs(args) -> list[dict]:
    runs = [{"key": "dense", "variant": "dense"}] if args.dense else []
    fit_rows = args.fit_rows or args.samples
    for layout in names(args.layouts, LAYOUTS):
        base = {"layout": layout, "calibration": args.calibration, "seed": args.seed, "ratio": args.ratio,
                "importance": args.importance}
        prefix = f"{layout}/{args.importance}/{args.ratio}/{args.calibration}/seed{args.seed}"
        if not args.no_baseline:
            runs.append({**base, "key": f"{prefix}/none", "variant": "none"})
        for ridge in numbers(args.ridges, float):
            runs.append({**base, "key": f"{prefix}/ls/ridge{ridge:g}/rows{fit_rows}", "variant": "ls",
                         "ridge": ridge, "fit_rows": fit_rows, "fit_tokens": fit_rows * args.seq_len})
    return runs


def prune_options(args, layout: str):
    """PruneOptions for LAYOUT (from hywia.options once the restructuring lands, else the pipeline)."""
    try:
        from hywia.options import PruneOptions
    except ImportError:
        from hywia.pipeline import PruneOptions
    calibration = CALIBRATIONS[args.calibration]
    calibration = calibration if calibration == "self" else str(Path(args.data_dir) / calibration)
    options = PruneOptions(ratio=args.ratio, importance=args.importance, calibration=calibration,
                           samples=args.samples, seq_len=args.seq_len, seed=args.seed, **LAYOUTS[layout])
    if hasattr(options, "validate"):
        options.validate()
    return options


def cached_plan(args, layout: str) -> tuple[PruningPlan, torch.Tensor, dict]:
    """The pipeline's plan for LAYOUT and its calibration batch, computed once and cached."""
    directory = Path(args.cache_dir) / "bench-reconstruction"
    stem = f"{layout}-{args.importance}-{args.ratio}-{args.calibration}-{args.samples}x{args.seq_len}-seed{args.seed}"
    plan_path, batch_path = directory / f"{stem}.plan.json", directory / f"{stem}.batch.pt"
    if plan_path.is_file() and batch_path.is_file():
        saved = json.loads(plan_path.read_text())
        return PruningPlan.from_dict(saved["plan"]), torch.load(batch_path, weights_only=True), saved["info"]
    from hywia.pipeline import prune_model

    options = prune_options(args, layout)
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    started = time.perf_counter()
    plan, report = prune_model(loaded, options, progress=True, cache_dir=args.cache_dir)[:2]
    info = {"prune_seconds": round(time.perf_counter() - started, 1), "ratio_achieved": report.get("ratio_achieved"),
            "params_after": report.get("params_after"), "alpha": report.get("alpha")}
    # The batch the plan was scored on (calibration_batch is deterministic given the seed; for
    # 'self' it regenerates from the dense model, as the pipeline did).
    dense = load_model(args.model, cache_dir=args.cache_dir)
    batch = calibration_batch(options.calibration, dense.tokenizer, dense.model, args.samples, args.seq_len, args.seed)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(batch, batch_path)
    plan_path.write_text(json.dumps({"plan": plan.to_dict(), "info": info}))
    return plan, batch, info


def wikitext_windows(args, tokenizer) -> torch.Tensor:
    text = (Path(args.data_dir) / "wikitext-2-raw" / "test.txt").read_text(encoding="utf-8")
    return split_windows(tokenize_text(tokenizer, text), args.eval_seq_len)


def perplexity(model, windows: torch.Tensor, limit: int, description: str) -> dict:
    started = time.perf_counter()
    result = window_perplexity(TokenScorer(model), windows, limit=limit, description=description)
    return {"perplexity": result.perplexity, "mean_nll": result.mean_nll, "windows": result.windows,
            "tokens_scored": result.tokens_scored, "eval_seconds": round(time.perf_counter() - started, 1)}


def fit_summary(report) -> dict:
    """Mean relative calibration error before/after per kind, and the worst layer's."""
    summary = {}
    for kind in sorted({fit.kind for fit in report.fits}):
        fits = [fit for fit in report.fits if fit.kind == kind]
        summary[kind] = {"fits": len(fits),
                         "mean_error_before": sum(f.error_before for f in fits) / len(fits),
                         "mean_error_after": sum(f.error_after for f in fits) / len(fits),
                         "max_error_after": max(f.error_after for f in fits)}
    return summary


def run_one(run: dict, args, dense, windows: torch.Tensor) -> dict:
    record = dict(run)
    model = copy.deepcopy(dense.model)
    if run["variant"] != "dense":
        plan, batch, info = cached_plan(args, run["layout"])
        record["plan_info"] = info
        if run["variant"] == "ls":
            report = reconstruct(model, plan, batch[:run["fit_rows"]], ridge=run["ridge"])
            record.update(reconstruct_seconds=round(report.seconds, 1), fit_summary=fit_summary(report),
                          fits=report.to_dict()["fits"])
        slice_model(model, plan)
    record["params"] = count_parameters(model)
    record.update(perplexity(model, windows, args.windows, run["key"]))
    return record  # the pruned copy is freed here, before the next run copies the dense model


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.is_file() else {"runs": {}, "commands": []}
    command = "python benchmarks/reconstruction.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    payload["commands"] = [c for c in payload["commands"] if c["command"] != command] + [{
        "command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f} at start "
                   "(seconds scale with the machine's other work)"}]
    payload["protocol"] = (f"WikiText-2 raw test text, first {args.windows} non-overlapping {args.eval_seq_len}-token "
                           "windows (hywia.evaluation.perplexity)")
    dense = load_model(args.model, cache_dir=args.cache_dir)
    windows = wikitext_windows(args, dense.tokenizer)
    for run in planned_runs(args):
        if run["key"] in payload["runs"]:
            log.info("%s: recorded already, skipped", run["key"])
            continue
        record = run_one(run, args, dense, windows)
        record["date"] = datetime.datetime.now().isoformat(timespec="seconds")
        payload["runs"][run["key"]] = record
        log.info("%s: perplexity %.2f", run["key"], record["perplexity"])
        write_json(out, payload)
        write_markdown(payload, out.with_suffix(".md"))
    return 0


def write_markdown(payload: dict, path: Path) -> None:
    runs = payload["runs"]
    lines = ["# Reconstruction after removal (hywia.reconstruct)", "",
             (f"Protocol: {payload['protocol']}. Relative ridge = λ / mean(diag H_KK); fit errors are "
              "||W'X_K − WX||² / ||WX||² on the calibration inputs, averaged over layers "
              "(plain slicing → after the fit)."), ""]
    dense = runs.get("dense")
    if dense:
        lines += [f"Dense: perplexity **{dense['perplexity']:.2f}**, {dense['params']:,} parameters.", ""]
    lines += [("| layout | calibration | variant | relative ridge | fit tokens | perplexity | reconstruct s "
               "| attn error | mlp error | params |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, run in sorted(runs.items(), key=lambda item: (item[1].get("layout", ""), item[1].get("ridge", -1),
                                                           -item[1].get("fit_rows", 0))):
        if run["variant"] == "dense":
            continue
        errors = [(f"{s['mean_error_before']:.3f} → {s['mean_error_after']:.3f}" if s else "–")
                  for s in ((run.get("fit_summary") or {}).get(kind) for kind in ("attn", "mlp"))]
        lines.append(f"| {run['layout']} | {run['calibration']} seed {run['seed']} | {run['variant']} "
                     f"| {run.get('ridge', '–')} | {run.get('fit_tokens', '–')} | {run['perplexity']:.2f} "
                     f"| {run.get('reconstruct_seconds', '–')} | {errors[0]} | {errors[1]} | {run['params']:,} |")
    lines += ["", "Commands (run from the repository root; each adds its runs to the JSON):", ""]
    lines += [f"- `{c['command']}` — {c['date']}, commit {c['commit']}, {c['machine']}" for c in payload["commands"]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
