"""Recovery (LoRA, merged) vs steps: WikiText-2 perplexity, the zero-shot average, wall time per step,
and the chat check.

Per ratio: the dense model writes the recovery data and its top-k teacher targets (once, cached under
.cache/recovery-bench, shared by every ratio), the current pipeline prunes it (`prune_model`,
PruneOptions(ratio=R), all other options default), then one recovery run per requested step count
(the learning rate decays to zero at each run's last step, so a short run is not a prefix of a long
one), each from the same plain prune (reloaded from the cache) and evaluated merged (WikiText-2, and
the six zero-shot tasks on their first --zero-shot-items items each); for the steps in
--chat-steps the merged model is exported and asked the chat check through the
OpenAI endpoint (benchmarks/chat_check.py, `hywia serve EXPORT --ratio 0 --engine torch`).

    nohup .venv/bin/python benchmarks/recovery.py --ratios 0.2,0.5 --steps 0,50,100,200,400 \
        --chat-steps 0,100,400 > /tmp/recovery.log 2>&1 &

Writes benchmarks/results/recovery.json (every run appended, with its command and date),
recovery.md and recovery.png (perplexity vs steps, the dense line and LLM-Pruner's line).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import numbers, write_json
from benchmarks.chat_check import check_directory, load_questions
from hywia.default_model import ensure_default_model
from hywia.evaluation.perplexity import split_windows, tokenize_text, window_perplexity
from hywia.evaluation.results import average_chance
from hywia.evaluation.scoring import TokenScorer
from hywia.evaluation.suite import EvalOptions, evaluate
from hywia.evaluation.tasks import ZERO_SHOT_TASKS
from hywia.export import write_export
from hywia.models import load_model
from hywia.options import PruneOptions
from hywia.pipeline import export_key, prune_model
from hywia.plan import PruningPlan
from hywia.recovery import RecoveryOptions, recover
from hywia.recovery_data import recovery_batches, teacher_targets
from hywia.surgery import slice_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DENSE_PPL = 55.54  # measured with the same protocol (issue 13)
PEER_PPL = {0.2: (0.2108, 205.4), 0.5: (0.4999, 1266.9)}  # LLM-Pruner's code on the same model (issue 13)
log = logging.getLogger("recovery-bench")


def parse_args(argv=None) -> argparse.Namespace:
    defaults, product = RecoveryOptions(), PruneOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--steps", default="0,50,100,200,400", help="step counts evaluated (checkpoints of one run)")
    parser.add_argument("--chat-steps", default="", help="step counts whose merged export is chat-checked")
    parser.add_argument("--recover-data", default="self",
                        help="'self', 'self-chat', 'self-text', 'self+gutenberg' or 'gutenberg' (the data folder's "
                             "calibration books), or a path")
    parser.add_argument("--calibration", default="self",
                        help="the prune's calibration: 'self' (the default), 'gutenberg' (the data folder's books), or a path")
    parser.add_argument("--samples", type=int, default=product.recover_samples, help="recovery rows (default: the product's)")
    parser.add_argument("--seq-len", type=int, default=product.recover_seq_len)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--kd-weight", type=float, default=defaults.kd_weight)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=400, help="WikiText-2 windows (128 tokens) scored")
    parser.add_argument("--zero-shot-items", type=int, default=100,
                        help="items of each of the six zero-shot tasks scored at every point (0: none)")
    parser.add_argument("--dense", action="store_true", help="also measure the dense model (perplexity, chat)")
    parser.add_argument("--label", default="", help="a name for this configuration in the results")
    parser.add_argument("--out", type=Path, default=RESULTS / "recovery.json")
    parser.add_argument("--report-only", action="store_true", help="only rewrite recovery.md/.png from the JSON")
    return parser.parse_args(argv)


def with_data_dir(spec: str, args) -> str:
    """SPEC with the name 'gutenberg' (alone or after 'self+') standing for the data folder's calibration
    books; any other spec, a user's path included, is passed on as given."""
    books = str(Path(args.data_dir) / "calibration" / "gutenberg")
    return {"gutenberg": books, "self+gutenberg": f"self+{books}"}.get(spec, spec)


def data_spec(args) -> str:
    return with_data_dir(args.recover_data, args)


def teacher_cache(loaded, args):
    """Recovery data + teacher targets from the dense model, cached across ratios and runs."""
    # The code that writes the data is part of the key: what a spec such as 'self' means has changed before.
    code = [(ROOT / "hywia" / name).read_text() for name in ("recovery_data.py", "recovery_prompts.py", "calibration.py")]
    key = hashlib.sha256(json.dumps([loaded.resolved.digest, data_spec(args), args.samples, args.seq_len, args.top_k,
                                     args.seed, code]).encode()).hexdigest()[:16]
    path = ROOT / ".cache" / "recovery-bench" / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=False), 0.0
    started = time.perf_counter()
    data = recovery_batches(loaded.tokenizer, loaded.model, data_spec(args), args.samples, args.seq_len, args.seed)
    targets = teacher_targets(loaded.model, data, args.top_k)
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save((data, targets), path)
    return (data, targets), seconds


def pruned(loaded, ratio: float, calibration: str = "self"):
    """The plain prune (the default options with recover="none": recovery is what is measured here; the
    calibration text CALIBRATION), in place. The pruned weights (reconstruction included) are kept under
    .cache/recovery-bench, keyed like an export (source, options, code), so a later run of the same code
    starts from the same model in seconds."""
    options = PruneOptions(ratio=ratio, recover="none", calibration=calibration)
    path = ROOT / ".cache" / "recovery-bench" / f"pruned-{export_key(loaded.resolved.digest, options)}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        plan = PruningPlan.from_dict(saved["plan"])
        slice_model(loaded.model, plan)
        loaded.model.load_state_dict(saved["state"])
        return plan, saved["report"]
    plan, report = prune_model(loaded, options, cache_dir=ROOT / ".cache" / "test")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"plan": plan.to_dict(), "report": json.loads(json.dumps(report, default=str)),
                "state": loaded.model.state_dict()}, path)
    return plan, report


def wikitext_windows(tokenizer, args) -> torch.Tensor:
    text = (Path(args.data_dir) / "wikitext-2-raw" / "test.txt").read_text()
    return split_windows(tokenize_text(tokenizer, text), 128)[:args.windows]


def perplexity(model, windows) -> float:
    return window_perplexity(TokenScorer(model), windows, batch_size=16).perplexity


def zero_shot(model, tokenizer, args) -> dict | None:
    """The six zero-shot tasks on their first --zero-shot-items items: the average and each task's headline."""
    if not args.zero_shot_items:
        return None
    options = EvalOptions(tasks=list(ZERO_SHOT_TASKS), data_dir=Path(args.data_dir),
                          limits={name: args.zero_shot_items for name in ZERO_SHOT_TASKS})
    result = evaluate(model, tokenizer, options)
    return {"average": result["average_accuracy"], "chance": average_chance(result["tasks"]),
            "items_per_task": args.zero_shot_items,
            "tasks": {name: task["headline"] for name, task in result["tasks"].items()}}


def evaluated(model, tokenizer, windows, args) -> dict:
    """One point of the curve: WikiText-2 perplexity and, if asked, the zero-shot average."""
    point = {"wikitext2": perplexity(model, windows)}
    scores = zero_shot(model, tokenizer, args)
    if scores:
        point["zero_shot"] = scores
    return point


def chat(model, tokenizer, plan, report, name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"recovery-{name}-") as directory:
        write_export(model, tokenizer, plan, report, Path(directory) / "export", dtype=None, replace=False)
        return {key: value for key, value in check_directory(Path(directory) / "export").items() if key != "directory"}


def run_ratio(ratio: float, args, steps: list[int], chat_steps: set[int], windows, record) -> None:
    model_dir, _ = ensure_default_model(ROOT / ".cache" / "test")
    loaded = load_model(str(model_dir))
    (data, targets), data_seconds = teacher_cache(loaded, args)
    calibration = with_data_dir(args.calibration, args)
    tick = time.perf_counter()
    plan, report = pruned(loaded, ratio, calibration)
    prune_seconds = time.perf_counter() - tick
    run = {"ratio": ratio, "ratio_achieved": report["ratio_achieved"], "prune_seconds": prune_seconds,
           "data_and_teacher_seconds": data_seconds, "trained_tokens": data.trained_tokens, "points": []}
    record(run)
    for count in sorted(steps):
        # The rate decays to zero at a run's last step, so each step count is a run of its own from the
        # plain prune (reloaded from .cache/recovery-bench), not a checkpoint of a longer one.
        if count:
            loaded = load_model(str(model_dir))
            pruned(loaded, ratio, calibration)
            result = recover(loaded.model, data, targets, steps=count, lr=args.lr, rank=args.rank,
                             batch_size=args.batch_size, kd_weight=args.kd_weight, seed=args.seed)
            run["recovery"] = result.to_dict()  # the longest run's, for the report's s/step
        point = {"steps": count, **evaluated(loaded.model, loaded.tokenizer, windows, args)}
        if count:
            point["seconds_per_step"] = result.seconds_per_step
        if count in chat_steps:
            point["chat"] = chat(loaded.model, loaded.tokenizer, plan, report, f"r{ratio}-s{count}")
        run["points"].append(point)
        log.info("ratio %s, %d steps: %s", ratio, count, {k: v for k, v in point.items() if k != "chat"})
        record(run)


def run_dense(args, windows, record) -> None:
    model_dir, _ = ensure_default_model(ROOT / ".cache" / "test")
    loaded = load_model(str(model_dir))
    run = {"ratio": 0.0, "points": [{"steps": 0, **evaluated(loaded.model, loaded.tokenizer, windows, args)}]}
    run["points"][0]["chat"] = {k: v for k, v in check_directory(model_dir).items() if k != "directory"}
    record(run)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    steps, chat_steps = numbers(args.steps, int), set(numbers(args.chat_steps, int))
    payload = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    config = {"label": args.label or f"{args.recover_data}-kd{args.kd_weight}-lr{args.lr:g}-r{args.rank}",
              "calibration": args.calibration, "recover_data": args.recover_data, "samples": args.samples, "seq_len": args.seq_len,
              "top_k": args.top_k, "lr": args.lr, "rank": args.rank, "batch_size": args.batch_size,
              "kd_weight": args.kd_weight, "seed": args.seed, "windows": args.windows,
              "zero_shot_items": args.zero_shot_items,
              "command": shlex.join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
              "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start, OMP_NUM_THREADS="
                         f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}",
              "chat_questions": len(load_questions())}

    if args.report_only:
        write_report(payload, args.out)
        return 0
    slots: dict[int, int] = {}  # id(run) → its index in payload["runs"]: a run is rewritten as it grows

    def record(run: dict) -> None:
        slot = slots.setdefault(id(run), len(payload["runs"]))
        payload["runs"][slot:slot + 1] = [{**config, **run}]
        write_json(args.out, payload)

    tokenizer = load_model(str(ensure_default_model(ROOT / ".cache" / "test")[0])).tokenizer
    windows = wikitext_windows(tokenizer, args)
    for ratio in numbers(args.ratios, float):
        run_ratio(ratio, args, steps, chat_steps, windows, record)
    if args.dense:  # last: the pruned runs are the ones a slow machine must not starve
        run_dense(args, windows, record)
    write_report(payload, args.out)
    return 0


def write_report(payload: dict, json_path: Path) -> None:
    """recovery.md (one table per configuration and ratio) and recovery.png beside the JSON."""
    runs = payload["runs"]
    dense = next((r for r in reversed(runs) if r["ratio"] == 0.0), None)  # the latest measurement
    dense_chat = dense and dense["points"][0].get("chat", {}).get("right")
    dense_zero_shot = dense and dense["points"][0].get("zero_shot")
    lines = ["# Recovery (LoRA, merged) vs steps", "",
             ("WikiText-2 perplexity on the first windows of 128 tokens (count per row), the zero-shot average "
              "(PIQA, BoolQ, WinoGrande, ARC-e, ARC-c, OBQA on their first items; count per row), the chat check "
             f"({payload['runs'][0]['chat_questions']} questions through the OpenAI endpoint, greedy, keyword-graded), "
             "and wall time per step. Generated by `benchmarks/recovery.py` from `recovery.json`; commands below."),
             "", f"Dense: WikiText-2 {dense['points'][0]['wikitext2']:.2f} ({dense['windows']} windows), chat {dense_chat}" if dense else
             f"Dense: WikiText-2 {DENSE_PPL} (issue 13)", ""]
    if dense_zero_shot:
        lines += [(f"Dense zero-shot average: {zero_shot_cell(dense_zero_shot)} (six tasks, the first items of "
                  f"each; chance {dense_zero_shot['chance']:.3f})"), ""]
    lines += [("| config | ratio | steps | WikiText-2 PPL (windows) | zero-shot avg (items/task) | chat right | s/step | "
              "data+teacher s | date |"), "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        if run["ratio"] == 0.0:
            continue
        flagged = "*" if run.get("recovery", {}).get("seconds_per_step_note") else ""
        for point in run["points"]:
            per_step = None if not point["steps"] else point.get("seconds_per_step",
                                                                 run.get("recovery", {}).get("seconds_per_step"))
            chat_right = point.get("chat", {}).get("right")
            chat_cell = "" if chat_right is None else f"{chat_right}/{point['chat']['total']}" + (
                f" ({chat_right / dense_chat:.0%} of dense)" if dense_chat else "")
            lines.append(f"| {run['label']} | {run['ratio']:g} | {point['steps']} | {point['wikitext2']:.1f} "
                         f"({run['windows']}) | {zero_shot_cell(point.get('zero_shot'))} | {chat_cell} | {'' if per_step is None else f'{per_step:.1f}{flagged}'} | "
                         f"{round(run['data_and_teacher_seconds']) if run.get('data_and_teacher_seconds') else 'cached'} | {run['date']} |")
    notes = [f"\\* {r['recovery']['seconds_per_step_note']}" for r in runs
             if r.get("recovery", {}).get("seconds_per_step_note")]
    notes += [f"{r['label']} at {r['ratio']:g}: {r['note']}" for r in runs if r.get("note")]
    lines += ["", *notes, "", ("Peer (LLM-Pruner's code, same model, no recovery; issue 13) on the first 400 windows: "
                               "205.4 at 21.08%, 1,266.9 at 49.99% (dense 55.54 there): rows with fewer windows "
                               "compare with it only roughly."), "", "Commands:", ""]
    lines += [f"- `{command}` ({run['date']}; {run['machine']})"
              for command, run in {r["command"]: r for r in runs}.items()]
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(runs, dense, json_path.with_suffix(".png"))


def zero_shot_cell(scores: dict | None) -> str:
    return "" if not scores else f"{scores['average']:.3f} ({scores['items_per_task']})"


def plot(runs: list[dict], dense: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in runs if r["ratio"] > 0})
    if not ratios:  # a dense-only run (--ratios "" --dense) has no curve to draw
        return
    figure, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 4), squeeze=False)
    for axis, ratio in zip(axes[0], ratios):
        by_label: dict[str, dict[int, float]] = {}  # the runs of one configuration form one curve
        for run in (r for r in runs if r["ratio"] == ratio):
            by_label.setdefault(run["label"], {}).update({p["steps"]: p["wikitext2"] for p in run["points"]})
        for label, curve in by_label.items():
            steps = sorted(curve)
            axis.plot(steps, [curve[s] for s in steps], marker="o", label=label)
        axis.axhline(dense["points"][0]["wikitext2"] if dense else DENSE_PPL, color="black", linestyle="--",
                     label="dense")
        peer_ratio, peer_ppl = PEER_PPL.get(ratio, (None, None))
        if peer_ppl:
            axis.axhline(peer_ppl, color="red", linestyle=":", label=f"LLM-Pruner {peer_ratio:.2%}, no recovery")
        axis.set(title=f"ratio {ratio:g}", xlabel="recovery steps", ylabel="WikiText-2 perplexity (log)", yscale="log")
        axis.set_xlim(left=-10)  # from step 0, also where a ratio has only a long run
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
