"""Pruning memory benchmark (issue 15): what `hywia prune` holds in memory, measured on a TinyLlama-1.1B-shaped
bf16 model on the CPU and extrapolated to LLaMA-7B, 13B and 70B.

1. The source: random weights with TinyLlama-1.1B's exact config (hidden 2048, 22 layers, 32 heads, 4 KV heads,
   MLP 5632, bf16 on disk; tests/shapes.py), written once into the work directory.
2. A baseline child: a fresh interpreter that imports the pruning stack and exits. Its peak RSS is the
   runtime's fixed cost (torch, transformers), which does not grow with the model.
3. The prune child: `python -m hywia.cli prune SRC --out OUT --device cpu --samples 4 --seq-len 64 …`, a fresh
   process whose whole-life peak RSS comes from wait4 (loading, statistics, importance, slicing, export).
4. The export's report gives the seconds and memory of each stage; its safetensors give the dtype and size.
5. Extrapolation: peak ≈ baseline + k · (bf16 weight bytes), with k measured here; it holds as long as the
   statistics budget is the weights' own bytes (hywia.devices.statistics_budget_bytes on the CPU) and the
   activations of one 64-token sequence stay small next to the weights, as they do at every size below.

    benchmarks/results/pruning_memory.json   the measurement
    benchmarks/results/pruning_memory.md     the table, the goals checked, the command and the date

    python benchmarks/pruning_memory.py --calibration ../shared/data/calibration/gutenberg
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/shapes.py holds the real-model shapes
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json

log = logging.getLogger("pruning_memory")

GOAL_PEAK_OVER_WEIGHTS = 3.0  # peak RSS ≤ 3 × the bf16 weight bytes (issue 15)
EXTRAPOLATE = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
BASELINE_CODE = ("import hywia.cli, transformers.models.llama.modeling_llama, safetensors.torch; "
                 "hywia.cli.build_parser()")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--calibration", default="self", help="as `hywia prune --calibration` (default self)")
    parser.add_argument("--importance", default="hybrid")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--recover", default="none",
                        help="as `hywia prune --recover` (default none: this measures pruning; recovery's LoRA "
                             "training is benchmarks/recovery.py's subject)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "benchmarks" / "pruning_memory")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from tests.shapes import TINYLLAMA_1_1B

    source = ensure_source(args.workdir / "tinyllama-1.1b-bf16", TINYLLAMA_1_1B)
    baseline = run_child([sys.executable, "-c", BASELINE_CODE], args.workdir / "baseline.log")
    export = args.workdir / "export"
    prune_args = [str(source), "--out", str(export), "--device", "cpu", "--samples", str(args.samples),
                  "--seq-len", str(args.seq_len), "--calibration", args.calibration, "--importance", args.importance,
                  "--ratio", str(args.ratio), "--recover", args.recover, "--cache-dir", str(args.workdir / "cache")]
    if (args.workdir / "cache").exists():  # every run pays its own calibration and gradients
        subprocess.run(["rm", "-rf", str(args.workdir / "cache")], check=True)
    pruned = run_child([sys.executable, "-m", "hywia.cli", "prune", *prune_args], args.workdir / "prune.log")
    if pruned["returncode"] != 0:
        raise SystemExit(f"the prune child failed (status {pruned['returncode']}); see {args.workdir / 'prune.log'}")
    result = summarize(source, export, baseline, pruned)
    result["command"] = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    result["prune_command"] = "hywia prune " + " ".join(shlex.quote(a) for a in prune_args)
    result["date"] = datetime.date.today().isoformat()
    result["machine"] = machine()
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "pruning_memory.json", result)
    (args.results / "pruning_memory.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(result["goals"].values()) else 1


def ensure_source(directory: Path, shape) -> Path:
    """The random bf16 checkpoint, built once (a marker file says it is complete)."""
    import torch

    from tests.shapes import save_shape

    if (directory / ".complete").is_file():
        return directory
    log.info("writing a random %s-shaped bf16 checkpoint to %s (once)", shape.name, directory)
    save_shape(directory, shape, hidden_size=None, layers=0, dtype=torch.bfloat16)
    (directory / ".complete").write_text("")
    return directory


def run_child(command: list[str], log_path: Path) -> dict:
    """Run COMMAND in a fresh process; its exit status and whole-life peak RSS (wait4: that child alone)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("running %s", " ".join(command[:4]) + " …")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    with log_path.open("w") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it; keep Popen from waiting again
    return {"returncode": child.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime}


def safetensors_summary(directory: Path) -> dict:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    dtypes, params = set(), 0
    for path in files:
        with safe_open(path, "pt") as weights:
            for name in weights.keys():  # noqa: SIM118 -- a safe_open handle is not a dict: it cannot be iterated
                tensor = weights.get_slice(name)
                dtypes.add(tensor.get_dtype())
                numel = 1
                for size in tensor.get_shape():
                    numel *= size
                params += numel
    return {"bytes_on_disk": sum(p.stat().st_size for p in files), "dtypes": sorted(dtypes), "parameters": params}


def summarize(source: Path, export: Path, baseline: dict, pruned: dict) -> dict:
    from hywia.memory_fit import parameter_count
    from tests.shapes import SHAPES

    report = json.loads((export / "hywia_report.json").read_text())
    before, after = safetensors_summary(source), safetensors_summary(export)
    weight_bytes = 2 * before["parameters"]  # bf16
    peak = pruned["peak_rss_bytes"]
    slope = (peak - baseline["peak_rss_bytes"]) / weight_bytes
    extrapolation = {}
    for name in EXTRAPOLATE:
        params = parameter_count(SHAPES[name].config)
        extrapolation[name] = {"parameters": params, "bf16_weight_bytes": 2 * params,
                               "peak_rss_bytes": int(baseline["peak_rss_bytes"] + slope * 2 * params),
                               "largest_layer_statistics_bytes": 8 * _layer_prunable(SHAPES[name].config)}
    return {
        "source": {**before, "path": str(source)},
        "export": {**after, "path": str(export), "config_dtype": json.loads((export / "config.json").read_text())
                   .get("dtype")},
        "bf16_weight_bytes": weight_bytes,
        "baseline_peak_rss_bytes": baseline["peak_rss_bytes"],
        "prune_peak_rss_bytes": peak,
        "prune_cpu_seconds": pruned["user_seconds"] + pruned["system_seconds"],
        "peak_over_weights": peak / weight_bytes,
        "slope_over_baseline": slope,
        "report_peak_rss_bytes": report.get("peak_rss_bytes"),
        "stages": report.get("memory", {}).get("stages", {}),
        "ratio_achieved": report.get("ratio_achieved"),
        "extrapolation": extrapolation,
        "goals": {
            f"peak RSS ≤ {GOAL_PEAK_OVER_WEIGHTS:g}× bf16 weights": peak <= GOAL_PEAK_OVER_WEIGHTS * weight_bytes,
            "export is bf16": after["dtypes"] == ["BF16"],
            "export smaller than the source on disk": after["bytes_on_disk"] < before["bytes_on_disk"],
        },
    }


def _layer_prunable(config: dict) -> int:
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    return 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * config["intermediate_size"]


def machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "platform": platform.platform()}


def _gib(n) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(result: dict) -> str:
    lines = [
        "# Pruning memory (issue 15)",
        "",
        (f"Run {result['date']} on {result['machine']['cpus']} CPUs, {_gib(result['machine']['ram_bytes'])} RAM "
         "(shared with other jobs: timings are indicative)."),
        "",
        f"    {result['command']}",
        f"    # the child: {result['prune_command']}",
        "",
        ("Random TinyLlama-1.1B-shaped weights (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632), bf16 on disk, "
         f"{result['source']['parameters']:,} parameters = {_gib(result['bf16_weight_bytes'])} of bf16 weights."),
        "",
        "| | value |",
        "|---|---|",
        (f"| peak RSS of the prune process (wait4) | {_gib(result['prune_peak_rss_bytes'])} = "
         f"{result['peak_over_weights']:.2f}× the bf16 weights |"),
        f"| runtime baseline (imports only) | {_gib(result['baseline_peak_rss_bytes'])} |",
        f"| (peak − baseline) / weights | {result['slope_over_baseline']:.2f} |",
        f"| CPU seconds (user + system) | {result['prune_cpu_seconds']:.0f} |",
        f"| source on disk | {_gib(result['source']['bytes_on_disk'])}, {', '.join(result['source']['dtypes'])} |",
        (f"| export on disk | {_gib(result['export']['bytes_on_disk'])}, {', '.join(result['export']['dtypes'])} "
         f"(config dtype {result['export']['config_dtype']}), {100 * result['ratio_achieved']:.1f}% of the parameters "
         "removed |"),
        "",
        ("Per stage (from the export's report; RSS peaks are the process's peak so far, so the stage where it "
         "jumps is the one that set it):"),
        "",
        "| stage | seconds | RSS at the end | peak RSS so far |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {stage['seconds']:.1f} | {_gib(stage['rss_bytes'])} | {_gib(stage['peak_rss_bytes'])} |"
              for name, stage in result["stages"].items()]
    lines += ["", ("Extrapolation (peak ≈ baseline + slope × bf16 weights; one layer's statistics is the least "
               "a GPU must hold besides the weights):"), "",
              "| model | parameters | bf16 weights | predicted CPU peak RSS | one layer's fp32 statistics |",
              "|---|---|---|---|---|"]
    lines += [f"| {name} | {row['parameters'] / 1e9:.2f} B | {_gib(row['bf16_weight_bytes'])} | "
              f"{_gib(row['peak_rss_bytes'])} | {_gib(row['largest_layer_statistics_bytes'])} |"
              for name, row in result["extrapolation"].items()]
    lines += ["", "Goals:", ""]
    lines += [f"- {'met' if met else 'NOT met'}: {goal}" for goal, met in result["goals"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
