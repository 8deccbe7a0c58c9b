"""Fusion benchmark: the learned attention over granularities (keys from raw-score statistics) vs the fixed ½/½ blend.

SmolLM2-135M-Instruct at one ratio (default 0.2108, the peer's), uniform layout, `hybrid` and `fixed`, each
calibration source × seed (the pipeline's statistics cache shares the gradients between the two). Per run:
WikiText-2 perplexity on the first N non-overlapping 128-token windows of the test text (issue 13's
protocol; dense ≈ 55.5 at N = 400), the fusion's held-out choice and both held-out losses, the report's
held-out perplexity ratio, α per layer, and how α relates to depth and to the raw-score key statistics.
Writes benchmarks/results/fusion.{json,md}; a re-run skips runs already in the JSON.

    nohup .venv/bin/python benchmarks/fusion.py --data-dir ../shared/data > /tmp/fusion.log 2>&1 &
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path
import torch
from _common import selected_blend

from hywia import statistics_cache
from hywia.default_model import ensure_default_model
from hywia.evaluation.perplexity import split_windows, tokenize_text, window_perplexity
from hywia.evaluation.scoring import TokenScorer
from hywia.fusion_keys import KEY_FEATURES
from hywia.models import load_model
from hywia.options import PruneOptions, resolve_calibration
from hywia.pipeline import prune_model
from hywia.units import UNIT_KINDS

log = logging.getLogger("fusion")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CALIBRATIONS = {"gutenberg": "calibration/gutenberg", "self": "self"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parents[1] / ".cache" / "test")
    parser.add_argument("--ratio", type=float, default=0.2108)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--calibrations", default="gutenberg,self")
    parser.add_argument("--methods", default="fixed,hybrid")
    parser.add_argument("--windows", type=int, default=400, help="WikiText-2 windows of 128 tokens")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def wikitext_perplexity(model, tokenizer, data_dir: Path, windows: int) -> float:
    text = (data_dir / "wikitext-2-raw" / "test.txt").read_text(encoding="utf-8")
    chosen = split_windows(tokenize_text(tokenizer, text), 128)
    return window_perplexity(TokenScorer(model), chosen, batch_size=16, limit=windows).perplexity


def alpha_relations(alpha: list[dict], raw_features: list[dict] | None) -> dict:
    """How α_fine varies over the layers: its range, and its correlation with depth and with each
    raw key statistic (the fine granularity's), per unit type."""
    out = {}
    for kind in UNIT_KINDS:
        values = torch.tensor([layer[kind][0] for layer in alpha], dtype=torch.float64)
        depth = torch.arange(len(alpha), dtype=torch.float64)
        entry = {"alpha_fine_min": float(values.min()), "alpha_fine_max": float(values.max()),
                 "corr_depth": _corr(values, depth)}
        if raw_features:
            for index, name in enumerate(KEY_FEATURES):
                feature = torch.tensor([layer[kind][0][index] for layer in raw_features], dtype=torch.float64)
                entry[f"corr_{name}"] = _corr(values, feature)
            # What depth (and depth²) leave unexplained: the residual's share of α's variance.
            design = torch.stack([torch.ones_like(depth), depth, depth * depth], dim=1)
            fit = torch.linalg.lstsq(design, values[:, None]).solution
            residual = values - (design @ fit)[:, 0]
            entry["share_not_explained_by_depth"] = (float(residual.var() / values.var())
                                                     if float(values.var()) > 0 else 0.0)
        out[kind] = entry
    return out


def _corr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else None


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "fusion.json"
    payload = json.loads(json_path.read_text()) if json_path.exists() else {"runs": {}}
    payload.update(command="python benchmarks/fusion.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                           f"{torch.get_num_threads()} threads",
                   ratio=args.ratio, wikitext_windows=args.windows)
    # This process runs the code it imported now; pin the statistics cache's code digest to it, so that
    # edits made to the checkout meanwhile (a shared tree) do not make hybrid recompute fixed's gradients.
    digest = statistics_cache.code_digest()
    statistics_cache.code_digest = lambda: digest
    model_dir, _ = ensure_default_model(args.cache_dir)
    dense = load_model(str(model_dir), cache_dir=args.cache_dir)
    if "dense" not in payload["runs"]:
        payload["runs"]["dense"] = {"wikitext2": wikitext_perplexity(dense.model, dense.tokenizer, args.data_dir,
                                                                     args.windows)}
        json_path.write_text(json.dumps(payload, indent=1))
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed-major: an interrupted run still covers both sources
        for label in args.calibrations.split(","):
            calibration = "self" if CALIBRATIONS[label] == "self" else resolve_calibration(
                str(args.data_dir / CALIBRATIONS[label]))
            for method in args.methods.split(","):
                key = f"{method}|{label}|seed{seed}"
                if key in payload["runs"]:
                    continue
                log.info("run %s", key)
                loaded = copy.copy(dense)
                loaded.model = copy.deepcopy(dense.model)
                options = PruneOptions(ratio=args.ratio, importance=method, calibration=calibration, seed=seed)
                started = time.perf_counter()
                _, report = prune_model(loaded, options, progress=False, cache_dir=args.cache_dir)
                prune_s = time.perf_counter() - started
                details = report.get("importance_details") or {}
                # The same plan prunes the same model: measured once (hybrid that kept the fixed blend).
                plan_digest = hashlib.sha256(json.dumps(report["plan"]).encode()).hexdigest()
                twin = next((run for run in payload["runs"].values() if run.get("plan_sha256") == plan_digest), None)
                record = {
                    "method": method, "calibration": label, "seed": seed, "prune_seconds": round(prune_s, 1),
                    "timings": report.get("timings"), "ratio_achieved": report["ratio_achieved"],
                    "plan_sha256": plan_digest, "wikitext2_from_identical_plan": twin is not None,
                    "wikitext2": twin["wikitext2"] if twin else wikitext_perplexity(
                        loaded.model, loaded.tokenizer, args.data_dir, args.windows),
                    "quality": report.get("quality"), "alpha": report.get("alpha"),
                    **{name: details.get(name) for name in (
                        "selected", "fixed_fine_weight", "holdout_loss_fixed_blends",
                        "holdout_loss_learned", "holdout_loss_fixed", "holdout_gain", "holdout_gain_se",
                        "selection_margin", "learned_alpha", "raw_key_features", "train_losses")},
                }
                if record["learned_alpha"]:
                    record["alpha_relations"] = alpha_relations(record["learned_alpha"], record["raw_key_features"])
                payload["runs"][key] = record
                json_path.write_text(json.dumps(payload, indent=1))
                del loaded
    write_markdown(payload, args.output_dir / "fusion.md")
    return 0


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def write_markdown(payload: dict, path: Path) -> None:
    runs, dense = payload["runs"], payload["runs"]["dense"]["wikitext2"]
    lines = ["# Fusion: learned attention over granularities vs the fixed ½/½ blend (SmolLM2-135M-Instruct)", "",
             f"- command: `{payload['command']}`", f"- date: {payload['date']}; machine: {payload['machine']}",
             (f"- ratio {payload['ratio']}, uniform layout, 32 × 128 calibration tokens (defaults); WikiText-2: first "
              f"{payload['wikitext_windows']} non-overlapping 128-token windows; dense {dense:.2f}"),
             ("- held-out losses: the fusion's selection split (last half of the calibration batch), per-token NLL "
              "of the hard-masked model; 'learned' is kept only if it beats the best fixed blend (½/½, fine only, "
              "coarse only; 'fixed' column) by > max(0.01, 2 SE)"),
             ("- report ratio: the report's held-out perplexity ratio (pruned / dense, 8 × 128 tokens not used "
              "for scoring)"), "",
             ("| calibration | seed | fixed PPL | hybrid PPL | selected | held-out loss learned | fixed | gain ± SE |"
              " report ratio (hybrid) | α_fine range attn | α_fine range mlp | prune s (hybrid) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["calibration"], r["seed"]) for k, r in runs.items() if k != "dense"})
    for label, seed in keys:
        fixed, hybrid = runs.get(f"fixed|{label}|seed{seed}", {}), runs.get(f"hybrid|{label}|seed{seed}", {})
        relations = hybrid.get("alpha_relations") or {}
        ranges = [f"{relations[k]['alpha_fine_min']:.3f}–{relations[k]['alpha_fine_max']:.3f}" if k in relations
                  else "–" for k in UNIT_KINDS]
        lines.append(
            f"| {label} | {seed} | {fixed.get('wikitext2', math.nan):.1f} | {hybrid.get('wikitext2', math.nan):.1f} | "
            f"{selected_blend(hybrid)} | {hybrid.get('holdout_loss_learned', math.nan):.4f} | "
            f"{hybrid.get('holdout_loss_fixed', math.nan):.4f} | "
            f"{hybrid.get('holdout_gain', math.nan):+.4f} ± {hybrid.get('holdout_gain_se', math.nan):.4f} | "
            f"{(hybrid.get('quality') or {}).get('perplexity_ratio', math.nan):.3f} | {ranges[0]} | {ranges[1]} | "
            f"{hybrid.get('prune_seconds', math.nan)} |")
    lines += ["", "## Means over seeds", ""]
    for label in sorted({k[0] for k in keys}):
        for method in ("fixed", "hybrid"):
            values = [runs[f"{method}|{label}|seed{s}"]["wikitext2"] for lab, s in keys
                      if lab == label and f"{method}|{label}|seed{s}" in runs]
            lines.append(f"- {label}, {method}: mean WikiText-2 PPL {_mean(values):.1f} over {len(values)} seeds "
                         f"({', '.join(f'{v:.1f}' for v in values)})")
    lines += ["", "## Does the learned α vary with something other than depth?", "",
              ("Per hybrid run and unit type: correlation of the learned α_fine over the 30 layers with depth and with "
               "each raw key statistic of the fine granularity, and the share of α's variance that a quadratic in "
               "depth leaves unexplained."), "",
              "| run | type | corr depth | " + " | ".join(f"corr {n}" for n in KEY_FEATURES) + " | not explained by depth |",
              "|---|---|---|" + "---|" * len(KEY_FEATURES) + "---|"]
    for key, run in sorted(runs.items()):
        for kind, rel in (run.get("alpha_relations") or {}).items():
            cells = [rel.get("corr_depth")] + [rel.get(f"corr_{n}") for n in KEY_FEATURES]
            lines.append(f"| {key} | {kind} | " + " | ".join("–" if c is None else f"{c:+.2f}" for c in cells)
                         + f" | {rel.get('share_not_explained_by_depth', math.nan):.2f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
