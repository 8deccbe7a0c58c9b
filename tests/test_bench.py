"""hywia.bench, the client-side tooling: load-generator statistics, target parsing, the report files."""

from __future__ import annotations

import pytest


def test_percentile_is_nearest_rank():
    from hywia.bench.loadgen import percentile

    values = [float(v) for v in range(1, 11)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (5.0, 10.0, 10.0)
    assert percentile([3.0], 99) == 3.0


def test_bench_targets_parse_or_say_why_not():
    from hywia.commands.bench import parse_target
    from hywia.errors import HywiaError

    target = parse_target("pruned=http://127.0.0.1:8000/,m-pruned20,4242", "key")
    assert (target.label, target.base_url, target.model, target.pid, target.api_key) == (
        "pruned", "http://127.0.0.1:8000", "m-pruned20", 4242, "key")
    with pytest.raises(HywiaError):
        parse_target("http://127.0.0.1:8000,m", None)


def test_latency_report_writes_table_json_and_plot(tmp_path):
    import json

    from hywia.bench.loadgen import LoadResult
    from hywia.bench.report import write_results

    def result(target: str, concurrency: int, throughput: float) -> LoadResult:
        return LoadResult(target=target, model="m", concurrency=concurrency, requests=4, failed=0, incomplete=0,
                          wall_seconds=1.0, mean_prompt_tokens=10.0, output_tokens=32, ttft_p50=0.05, ttft_p99=0.1,
                          tpot_p50=0.02, output_tokens_per_second=throughput, peak_rss_bytes=2**30)

    results = [result("pruned", 1, 25.0), result("dense", 1, 20.0)]
    markdown, raw, png = write_results(results, tmp_path / "latency", "Latency", ["Command: x"], ["a note"])
    assert "| pruned | 1 | 4 | 0 | 0 | 10 | 0.050 | 0.100 | 20.0 | 25.0 | 1024 |" in markdown.read_text()
    assert [r["output_tokens_per_second"] for r in json.loads(raw.read_text())["results"]] == [25.0, 20.0]
    assert png.read_bytes().startswith(b"\x89PNG")
