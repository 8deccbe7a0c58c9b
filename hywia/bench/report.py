"""Latency results → a markdown table, the raw JSON, and a PNG plot (what `hywia bench latency` and
benchmarks/latency.py leave under benchmarks/results/)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from hywia.bench.loadgen import LoadResult

_COLUMNS = (
    ("target", "target", "{}"),
    ("concurrency", "conc.", "{}"),
    ("requests", "requests", "{}"),
    ("failed", "failed", "{}"),
    ("incomplete", "incomplete", "{}"),
    ("mean_prompt_tokens", "prompt tok", "{:.0f}"),
    ("ttft_p50", "TTFT p50 (s)", "{:.3f}"),
    ("ttft_p99", "TTFT p99 (s)", "{:.3f}"),
    ("tpot_p50", "TPOT p50 (ms)", "{:.1f}"),
    ("output_tokens_per_second", "output tok/s", "{:.1f}"),
    ("peak_rss_bytes", "peak RSS (MiB)", "{:.0f}"),
)


def markdown_table(results: list[LoadResult]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in _COLUMNS) + " |",
             "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    for result in results:
        cells = []
        for field, _, fmt in _COLUMNS:
            value = getattr(result, field)
            if field == "tpot_p50":
                value = value * 1000
            elif field == "peak_rss_bytes":
                value = None if value is None else value / 2**20
            cells.append("n/a" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: list[LoadResult], out_prefix: Path, heading: str, preamble: list[str],
                  notes: list[str] = ()) -> list[Path]:
    """Write OUT_PREFIX.md, .json and .png; returns their paths."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    markdown = [f"# {heading}", "", *preamble, "", markdown_table(results), ""]
    if notes:
        markdown += [*notes, ""]
    paths = [out_prefix.with_suffix(".md"), out_prefix.with_suffix(".json"), out_prefix.with_suffix(".png")]
    paths[0].write_text("\n".join(markdown))
    paths[1].write_text(json.dumps({"heading": heading, "preamble": preamble, "notes": list(notes),
                                    "results": [r.as_dict() for r in results]}, indent=1))
    plot(results, paths[2], heading)
    return paths


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


def plot(results: list[LoadResult], path: Path, heading: str) -> None:
    targets = list(dict.fromkeys(r.target for r in results))
    levels = sorted({r.concurrency for r in results})
    panels = (("ttft_p50", "TTFT p50 (s)", 1), ("tpot_p50", "TPOT p50 (ms)", 1000),
              ("output_tokens_per_second", "output tokens/s", 1))
    width = 0.8 / max(1, len(targets))
    with panel_figure(len(panels), path, heading) as axes:
        for axis, (field, title, scale) in zip(axes, panels):
            for offset, target in enumerate(targets):
                values = [next((getattr(r, field) * scale for r in results
                                if r.target == target and r.concurrency == level), 0.0) for level in levels]
                positions = [i + offset * width for i in range(len(levels))]
                axis.bar(positions, values, width, label=target)
            axis.set_xticks([i + width * (len(targets) - 1) / 2 for i in range(len(levels))])
            axis.set_xticklabels([f"concurrency {level}" for level in levels])
            axis.set_title(title)


def speedup_note(results: list[LoadResult], pruned: str, dense: str, weight_bytes_ratio: float) -> str:
    """Goal: pruned/dense decode throughput ≥ 0.9 × (dense weight bytes / pruned weight bytes)."""
    lines = [(f"- Goal pruned/dense decode throughput ≥ 0.9 × weight-bytes ratio "
             f"({weight_bytes_ratio:.3f}) → ≥ {0.9 * weight_bytes_ratio:.3f}:")]
    for level in sorted({r.concurrency for r in results}):
        a, b = _pair(results, pruned, dense, level)
        if a and b:
            ratio = a.output_tokens_per_second / b.output_tokens_per_second
            tpot_ratio = b.tpot_p50 / a.tpot_p50
            verdict = "met" if ratio >= 0.9 * weight_bytes_ratio else "NOT met"
            lines.append(f"  concurrency {level}: throughput ratio {ratio:.3f}, TPOT ratio (dense/pruned) "
                         f"{tpot_ratio:.3f} → {verdict}")
    return "\n".join(lines)


def overhead_note(results: list[LoadResult], ours: str, reference: str) -> str:
    """Goal: this server's overhead over `vllm serve` ≤ 5% in throughput and in TTFT."""
    lines = [f"- Goal overhead of {ours} over {reference} ≤ 5% (throughput and TTFT p50):"]
    for level in sorted({r.concurrency for r in results}):
        a, b = _pair(results, ours, reference, level)
        if a and b:
            throughput_loss = 1 - a.output_tokens_per_second / b.output_tokens_per_second
            ttft_gain = a.ttft_p50 / b.ttft_p50 - 1
            verdict = "met" if throughput_loss <= 0.05 and ttft_gain <= 0.05 else "NOT met"
            lines.append(f"  concurrency {level}: throughput {-100 * throughput_loss:+.1f}%, "
                         f"TTFT p50 {100 * ttft_gain:+.1f}% → {verdict}")
    return "\n".join(lines)


def _pair(results: list[LoadResult], first: str, second: str, level: int):
    def find(label: str):
        return next((r for r in results if r.target == label and r.concurrency == level), None)

    return find(first), find(second)
