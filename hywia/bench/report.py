"""Latency results → a markdown table, the raw JSON, and a PNG plot: the one implementation behind
`hywia bench latency` and benchmarks/latency.py (their files under benchmarks/results/).

The rows are hywia.bench.vllm_load.measure_rounds's: one per target, concurrency level and round, each
with the figures vLLM's benchmark reports and the peak memory. The table gives each figure's median over
the rounds; a ratio between two targets (pruned/dense, ours/reference) is taken per round, from two
loads that ran under the same background load, and reported with its median and range.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

# Figures in the table: (row key, column title, scale).
FIGURES = (("output_throughput", "output tok/s", 1), ("median_ttft_ms", "TTFT p50 (ms)", 1),
           ("p99_ttft_ms", "TTFT p99 (ms)", 1), ("median_tpot_ms", "TPOT p50 (ms)", 1),
           ("p99_tpot_ms", "TPOT p99 (ms)", 1), ("p99_itl_ms", "ITL p99 (ms)", 1),
           ("median_e2el_ms", "E2E p50 (ms)", 1), ("p99_e2el_ms", "E2E p99 (ms)", 1),
           ("peak_rss_bytes", "peak RSS (MiB)", 2**-20))
# Goals: pruned/dense throughput ≥ SPEEDUP_GOAL × their weight-bytes ratio (decode is memory-bound);
# this server over a reference (`vllm serve`): throughput ≥ 1 - OVERHEAD_GOAL, TTFT p50 ≤ 1 + OVERHEAD_GOAL.
SPEEDUP_GOAL = 0.9
OVERHEAD_GOAL = 0.05


def median_of(rows: list[dict], server: str, level: int, key: str) -> float | None:
    """The median over rounds of SERVER's KEY at LEVEL; None when no round has it."""
    values = [r[key] for r in rows if r["server"] == server and r["concurrency"] == level and r.get(key) is not None]
    return statistics.median(values) if values else None


def paired(rows: list[dict], first: str, second: str, level: int, key: str) -> list[float]:
    """Per round, FIRST's figure over SECOND's (both measured in that round, under the same load)."""
    by = {(r["server"], r["round"]): r.get(key) for r in rows if r["concurrency"] == level}
    return [value / by[second, k] for (server, k), value in by.items()
            if server == first and value is not None and by.get((second, k))]


def speedup_ratios(rows: list[dict], pruned: str, dense: str, levels: list[int], weight_ratio: float) -> list[dict]:
    """PRUNED/DENSE output throughput per level; goal ≥ SPEEDUP_GOAL × WEIGHT_RATIO (dense/pruned weight bytes)."""
    goal = SPEEDUP_GOAL * weight_ratio
    records = []
    for level in levels:
        throughput = _spread(paired(rows, pruned, dense, level, "output_throughput"))
        met = None if throughput is None else bool(throughput["median"] >= goal)
        records.append({"kind": "speedup", "first": pruned, "second": dense, "concurrency": level,
                        "weight_bytes_ratio": weight_ratio, "goal": goal, "output_throughput": throughput,
                        "met": met})
    return records


def overhead_ratios(rows: list[dict], ours: str, reference: str, levels: list[int]) -> list[dict]:
    """OURS/REFERENCE output throughput and TTFT p50 per level; goal: within OVERHEAD_GOAL of the reference."""
    records = []
    for level in levels:
        throughput = _spread(paired(rows, ours, reference, level, "output_throughput"))
        ttft = _spread(paired(rows, ours, reference, level, "median_ttft_ms"))
        met = None if throughput is None or ttft is None else bool(
            throughput["median"] >= 1 - OVERHEAD_GOAL and ttft["median"] <= 1 + OVERHEAD_GOAL)
        records.append({"kind": "overhead", "first": ours, "second": reference, "concurrency": level,
                        "output_throughput": throughput, "median_ttft_ms": ttft, "met": met})
    return records


def _spread(values: list[float]) -> dict | None:
    return {"median": statistics.median(values), "per_round": values} if values else None


def ratio_notes(records: list[dict]) -> list[str]:
    """Markdown bullets for speedup_ratios/overhead_ratios records: one per pair, one line per level."""
    def span(spread: dict) -> str:
        values = spread["per_round"]
        rounds = f"rounds {min(values):.3f}–{max(values):.3f}" if len(values) > 1 else "1 round"
        return f"{spread['median']:.3f} ({rounds})"

    notes: list[str] = []
    headed = set()
    for record in records:
        first, second = record["first"], record["second"]
        if (record["kind"], first, second) not in headed:
            headed.add((record["kind"], first, second))
            if record["kind"] == "speedup":
                notes.append(f"- {first} / {second} output throughput; goal ≥ {SPEEDUP_GOAL} × weight-bytes ratio "
                             f"{record['weight_bytes_ratio']:.3f} = {record['goal']:.3f}:")
            else:
                notes.append(f"- {first} / {second}; goal: throughput ≥ {1 - OVERHEAD_GOAL:.2f}, "
                             f"TTFT p50 ≤ {1 + OVERHEAD_GOAL:.2f}:")
        verdict = {True: "met", False: "NOT met", None: "not judged: no round measured both"}[record["met"]]
        if record["kind"] == "speedup":
            figures = span(record["output_throughput"]) if record["output_throughput"] else "n/a"
        elif record["met"] is None:
            figures = "n/a"
        else:
            figures = (f"throughput {span(record['output_throughput'])}, "
                       f"TTFT p50 {span(record['median_ttft_ms'])}")
        notes.append(f"  - concurrency {record['concurrency']}: {figures} → {verdict}")
    return notes


def markdown_table(rows: list[dict], servers: list[str], levels: list[int]) -> list[str]:
    """Medians over rounds; completed, failed and incomplete requests summed over rounds."""
    lines = ["| server | conc. | " + " | ".join(title for _, title, _ in FIGURES) + " | completed | failed | incomplete |",
             "|---|---|" + "---|" * (len(FIGURES) + 3)]
    for server in servers:
        for level in levels:
            cells = []
            for key, _, scale in FIGURES:
                value = median_of(rows, server, level, key)
                cells.append("n/a" if value is None else f"{value * scale:.1f}")
            counts = [sum(r.get(key, 0) for r in rows if r["server"] == server and r["concurrency"] == level)
                      for key in ("completed", "failed", "incomplete")]
            lines.append(f"| {server} | {level} | " + " | ".join(cells) + " | " + " | ".join(map(str, counts)) + " |")
    return lines


@contextlib.contextmanager
def panel_figure(panels: int, path: Path, heading: str, height: float = 4):
    """A row of PANELS axes to draw on; on leaving, the legend of the first, the heading, and a PNG at PATH."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, height))
    try:
        yield axes
        axes[0].legend(fontsize="small")
        figure.suptitle(heading)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)


def plot(rows: list[dict], servers: list[str], levels: list[int], path: Path, heading: str) -> None:
    """Log-log: latency percentiles (p50 solid, p99 dashed) and throughput against concurrency."""
    panels = (("TTFT (ms)", ("median_ttft_ms", "p99_ttft_ms")), ("TPOT (ms)", ("median_tpot_ms", "p99_tpot_ms")),
              ("output tokens/s", ("output_throughput",)))
    with panel_figure(len(panels), path, heading, height=4.5) as axes:
        for axis, (title, keys) in zip(axes, panels):
            for index, server in enumerate(servers):
                for key, style in zip(keys, ("-", "--")):
                    name = "p99" if key.startswith("p99") else ("p50" if len(keys) > 1 else "")
                    points = [(level, median_of(rows, server, level, key)) for level in levels]
                    points = [(level, value) for level, value in points if value]  # log axes: no zeros
                    axis.plot([level for level, _ in points], [value for _, value in points], style,
                              color=f"C{index}", marker="o", label=f"{server} {name}".strip())
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xticks(levels, [str(level) for level in levels])
            axis.set_xlabel("concurrency")
            axis.set_title(title)


def write_results(rows: list[dict], servers: list[str], levels: list[int], out_prefix: Path, heading: str,
                  preamble: list[str], ratios: list[dict] = (), extra: dict | None = None) -> list[Path]:
    """OUT_PREFIX.md (preamble, table, ratio notes), .json (the same plus every row, the medians and the
    ratios' per-round values, and EXTRA) and .png; returns their paths."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    notes = ratio_notes(list(ratios))
    markdown = [f"# {heading}", "", *preamble, "", *markdown_table(rows, servers, levels), ""]
    if notes:
        markdown += [*notes, ""]
    medians = [{"server": server, "concurrency": level,
                **{key: median_of(rows, server, level, key) for key, _, _ in FIGURES}}
               for server in servers for level in levels]
    paths = [out_prefix.with_suffix(".md"), out_prefix.with_suffix(".json"), out_prefix.with_suffix(".png")]
    paths[0].write_text("\n".join(markdown))
    paths[1].write_text(json.dumps({"heading": heading, "preamble": preamble, "notes": notes, "medians": medians,
                                    "ratios": list(ratios), "rows": rows, **(extra or {})}, indent=1))
    plot(rows, servers, levels, paths[2], heading)
    return paths
