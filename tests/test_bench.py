"""hywia.bench, the client-side tooling: target parsing, the latency report (table, per-round ratios,
JSON, plot), and `hywia bench latency` end to end: vLLM's own benchmark against a real tiny server."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import httpx
import pytest

API_KEY = "bench-key"


def test_bench_targets_parse_or_say_why_not():
    from hywia.commands.bench import parse_target
    from hywia.errors import HywiaError

    target = parse_target("pruned=http://127.0.0.1:8000/,m-pruned20,4242", "key")
    assert (target.label, target.base_url, target.model, target.pid, target.api_key, target.tokenizer) == (
        "pruned", "http://127.0.0.1:8000", "m-pruned20", 4242, "key", None)
    target = parse_target("ref=http://h:1,m,tokenizer=/ckpt/m,77", None)
    assert (target.pid, target.tokenizer) == (77, "/ckpt/m")
    for bad in ("http://127.0.0.1:8000,m", "x=http://h:1", "x=http://h:1,m,pid", "x=http://h:1,m,tokenizer="):
        with pytest.raises(HywiaError):
            parse_target(bad, None)


def _row(server: str, level: int, round_index: int, throughput: float, ttft: float) -> dict:
    return {"server": server, "concurrency": level, "round": round_index, "completed": 4, "failed": 0,
            "incomplete": 0, "output_throughput": throughput, "median_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft,
            "median_tpot_ms": 10.0, "p99_tpot_ms": 20.0, "p99_itl_ms": 30.0, "median_e2el_ms": 100.0,
            "p99_e2el_ms": 200.0, "peak_rss_bytes": 2**30}


def test_latency_report_gives_medians_and_per_round_ratios(tmp_path):
    from hywia.bench.report import overhead_ratios, speedup_ratios, write_results

    # Level 1: three rounds, pruned/dense throughput 1.5, 1.2, 1.4 → median 1.4, goal 0.9 × 1.25 met.
    # Level 2: two rounds of equal figures → 1.0, goal not met.
    rows = [_row("pruned", 1, 0, 15.0, 50.0), _row("dense", 1, 0, 10.0, 60.0),
            _row("pruned", 1, 1, 12.0, 40.0), _row("dense", 1, 1, 10.0, 50.0),
            _row("pruned", 1, 2, 14.0, 45.0), _row("dense", 1, 2, 10.0, 40.0),
            _row("pruned", 2, 0, 12.0, 50.0), _row("dense", 2, 0, 12.0, 50.0),
            _row("pruned", 2, 1, 10.0, 50.0), _row("dense", 2, 1, 10.0, 50.0)]
    ratios = speedup_ratios(rows, "pruned", "dense", [1, 2], 1.25) + overhead_ratios(rows, "pruned", "dense", [1, 2])
    speed1, speed2, over1, over2 = ratios
    assert speed1["output_throughput"] == {"median": 1.4, "per_round": [1.5, 1.2, 1.4]}
    assert (speed1["goal"], speed1["met"], speed2["output_throughput"]["median"], speed2["met"]) == (
        pytest.approx(1.125), True, 1.0, False)
    assert over1["median_ttft_ms"]["per_round"] == pytest.approx([50 / 60, 40 / 50, 45 / 40])
    assert (over1["met"], over2["met"]) == (True, True)

    markdown, raw, png = write_results(rows, ["pruned", "dense"], [1, 2], tmp_path / "latency", "Latency",
                                       ["Command: x"], ratios)
    text = markdown.read_text()
    assert "| pruned | 1 | 14.0 | 45.0 | 90.0 | 10.0 | 20.0 | 30.0 | 100.0 | 200.0 | 1024.0 | 12 | 0 | 0 |" in text
    assert "- pruned / dense output throughput; goal ≥ 0.9 × weight-bytes ratio 1.250 = 1.125:" in text
    assert "  - concurrency 1: 1.400 (rounds 1.200–1.500) → met" in text
    assert "  - concurrency 2: 1.000 (rounds 1.000–1.000) → NOT met" in text
    saved = json.loads(raw.read_text())
    assert saved["rows"] == rows and saved["ratios"] == ratios
    assert {(m["server"], m["concurrency"]): m["output_throughput"] for m in saved["medians"]} == {
        ("pruned", 1): 14.0, ("dense", 1): 10.0, ("pruned", 2): 11.0, ("dense", 2): 11.0}
    assert png.read_bytes().startswith(b"\x89PNG")


def test_ratio_without_a_common_round_is_not_judged():
    from hywia.bench.report import ratio_notes, speedup_ratios

    # dense failed every request of its only round: no throughput to divide by.
    rows = [_row("pruned", 1, 0, 15.0, 50.0), {**_row("dense", 1, 0, 0.0, 0.0), "completed": 0, "failed": 4}]
    (record,) = speedup_ratios(rows, "pruned", "dense", [1], 1.25)
    assert (record["output_throughput"], record["met"]) == (None, None)
    assert ratio_notes([record])[-1] == "  - concurrency 1: n/a → not judged: no round measured both"


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """A real `hywia serve` (torch engine) of a tiny random LLaMA, pruned at 20%, its dense source next to it."""
    from hywia.bench.process import ServerProcess, free_port
    from tests.tiny import save_tiny_model

    work = tmp_path_factory.mktemp("bench-serve")
    source = save_tiny_model(work / "tiny", gqa=True)
    port = free_port()
    command = [sys.executable, "-m", "hywia.cli", "serve", str(source), "--port", str(port), "--cache-dir",
               str(work / "cache"), "--api-key", API_KEY, "--engine", "torch", "--ratio", "0.2",
               "--importance", "fixed", "--samples", "4", "--seq-len", "32", "--reconstruct", "none",
               "--recover", "none", "--serve-dense"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    process = ServerProcess(command, port, work / "server.log", env=env).start()
    try:
        process.wait_until_ready(300)
        yield process
    finally:
        process.stop()


def test_bench_latency_drives_real_servers_with_vllms_benchmark(tiny_server, tmp_path):
    """Two targets on one server (pruned with its PID, dense through /metrics), two levels, two rounds:
    vLLM's figures in every row, the rotation, medians, and both ratios recomputable from the rows."""
    url = tiny_server.base_url
    out = tmp_path / "latency"
    command = [sys.executable, "-m", "hywia.cli", "bench", "latency",
               "--target", f"pruned={url},tiny-pruned20,{tiny_server.process.pid}",
               "--target", f"dense={url},tiny", "--api-key", API_KEY,
               "--concurrency", "1", "2", "--requests", "2", "--prompt-tokens", "8", "--output-tokens", "4",
               "--rounds", "2", "--speedup", "pruned:dense", "--overhead", "pruned:dense", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]

    saved = json.loads(out.with_suffix(".json").read_text())
    rows = saved["rows"]
    # Round 0 measures pruned first at each level, round 1 dense first.
    assert [(r["round"], r["concurrency"], r["server"]) for r in rows] == [
        (0, 1, "pruned"), (0, 1, "dense"), (0, 2, "pruned"), (0, 2, "dense"),
        (1, 1, "dense"), (1, 1, "pruned"), (1, 2, "dense"), (1, 2, "pruned")]
    for row in rows:
        assert (row["completed"], row["failed"], row["incomplete"], row["total_output_tokens"]) == (2, 0, 0, 8), row
        for key in ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
                    "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms"):
            assert row[key] >= 0, key
        assert 0 < row["median_ttft_ms"] <= row["p99_ttft_ms"] <= row["p99_e2el_ms"]
        assert row["output_throughput"] > 0 and row["peak_rss_bytes"] > 2**20  # PID tree or /metrics

    def figure(server, level, round_index, key):
        return next(r[key] for r in rows if (r["server"], r["concurrency"], r["round"]) == (server, level, round_index))

    medians = {(m["server"], m["concurrency"]): m for m in saved["medians"]}
    assert medians["dense", 2]["p99_ttft_ms"] == pytest.approx(
        statistics.median(figure("dense", 2, k, "p99_ttft_ms") for k in (0, 1)))

    report = httpx.get(f"{url}/v1/hywia/report", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    pruned_entry = next(e for e in report if e["model"] == "tiny-pruned20")
    weight_ratio = pruned_entry["unpruned_weight_bytes"] / pruned_entry["weight_bytes"]
    speedups = [r for r in saved["ratios"] if r["kind"] == "speedup"]
    overheads = [r for r in saved["ratios"] if r["kind"] == "overhead"]
    assert [r["concurrency"] for r in speedups] == [r["concurrency"] for r in overheads] == [1, 2]
    for speedup, overhead in zip(speedups, overheads):
        level = speedup["concurrency"]
        per_round = [figure("pruned", level, k, "output_throughput") / figure("dense", level, k, "output_throughput")
                     for k in (0, 1)]
        ttft = [figure("pruned", level, k, "median_ttft_ms") / figure("dense", level, k, "median_ttft_ms")
                for k in (0, 1)]
        assert speedup["weight_bytes_ratio"] == pytest.approx(weight_ratio) and weight_ratio > 1
        assert speedup["output_throughput"]["per_round"] == pytest.approx(per_round)
        assert speedup["met"] == (statistics.median(per_round) >= 0.9 * weight_ratio)
        assert overhead["median_ttft_ms"]["per_round"] == pytest.approx(ttft)

    markdown = out.with_suffix(".md").read_text()
    assert "Load: vLLM's `bench serve`, random dataset, 8 prompt tokens, 4 output tokens" in markdown
    assert f"Target pruned: tiny-pruned20 at {url}; tokenizer {pruned_entry['directory']}" in markdown
    assert "| server | conc. | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) |" in markdown
    dense_row = next(line for line in markdown.splitlines() if line.startswith("| dense | 2 |"))
    assert dense_row.endswith("| 4 | 0 | 0 |")  # 2 requests × 2 rounds completed
    assert f"{medians['dense', 2]['output_throughput']:.1f}" in dense_row
    assert "- pruned / dense output throughput; goal ≥ 0.9 × weight-bytes ratio" in markdown
    assert "- pruned / dense; goal: throughput ≥ 0.95, TTFT p50 ≤ 1.05:" in markdown
    assert markdown.count("  - concurrency 2: ") == 2
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_bench_latency_names_an_unserved_model_before_measuring(tiny_server, tmp_path, capsys):
    from hywia.cli import main

    code = main(["bench", "latency", "--target", f"x={tiny_server.base_url},no-such-model", "--api-key", API_KEY,
                 "--out", str(tmp_path / "never")])
    assert code == 2 and not (tmp_path / "never.json").exists()
    error = capsys.readouterr().err
    assert "does not serve 'no-such-model'" in error and "tiny-pruned20" in error


def test_bench_latency_warns_on_prompt_words_and_names_a_dead_server(tmp_path, capsys, caplog):
    from hywia.bench.process import free_port
    from hywia.cli import main

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = main(["bench", "latency", "--target", f"x={url},m", "--prompt-words", "64", "--out", str(tmp_path / "x")])
    assert code == 2
    assert f"x: no answer from {url}/v1/models" in capsys.readouterr().err
    assert "--prompt-words is deprecated" in caplog.text and "use --prompt-tokens (taking 64 as tokens)" in caplog.text
