"""The server across starts and stops: the export cache (reuse, corruption), a kill during pruning,
and SIGTERM while a request streams. Real `hywia serve` processes, tiny model, torch engine."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from hywia.bench.process import ServerProcess, free_port
from hywia.bench.scrape import scrape
from tests.test_server_api import API_KEY, serve_command, start, tiny_server_options

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    from tests.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", gqa=True, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the tests that start from a built export; the first start builds it."""
    return tmp_path_factory.mktemp("cache")


def _serve(source, cache_dir, log_path) -> ServerProcess:
    port = free_port()
    return start(serve_command(str(source), port, cache_dir, *tiny_server_options()), port, log_path, timeout=300)


def _report(process: ServerProcess) -> dict:
    return httpx.get(f"{process.base_url}/v1/hywia/report", headers=AUTH).json()["data"][0]


def _exports(cache_dir) -> list[str]:
    return sorted(p.name for p in (cache_dir / "exports").iterdir()) if (cache_dir / "exports").exists() else []


def _start_and_inspect(source, cache_dir, log_path):
    """Start, read the report, the metrics and the phases /health went through, stop."""
    process = _serve(source, cache_dir, log_path)
    try:
        return _report(process), scrape(process.base_url), {b["status"] for _, b in process.health_seen}, process
    finally:
        process.stop()


def test_a_restart_reuses_the_export_and_a_corrupted_one_is_rebuilt(tiny_source, shared_cache, tmp_path):
    first, first_metrics, _, _ = _start_and_inspect(tiny_source, shared_cache, tmp_path / "first.log")
    model = first["model"]
    assert first["cache_hit"] is False
    assert first_metrics.value("hywia_cache_misses_total", model_name=model) == 1
    assert first_metrics.value("hywia_pruning_seconds", model_name=model) > 0

    second, second_metrics, phases, _ = _start_and_inspect(tiny_source, shared_cache, tmp_path / "second.log")
    assert second["cache_hit"] is True and "pruning" not in phases
    assert second_metrics.value("hywia_cache_hits_total", model_name=model) == 1
    assert second_metrics.value("hywia_cache_misses_total", model_name=model) == 0
    assert second_metrics.value("hywia_pruning_seconds", model_name=model) == 0
    assert second["report"] == first["report"]  # the very export the first start wrote

    weights = os.path.join(second["directory"], "model.safetensors")
    with open(weights, "r+b") as handle:  # flip bytes inside the tensor data, keep the size
        handle.seek(os.path.getsize(weights) // 2)
        chunk = handle.read(64)
        handle.seek(-len(chunk), os.SEEK_CUR)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    third, third_metrics, _, process = _start_and_inspect(tiny_source, shared_cache, tmp_path / "third.log")
    assert third["cache_hit"] is False
    assert third_metrics.value("hywia_cache_misses_total", model_name=model) == 1
    assert "does not match its checksum" in process.log_tail(100_000)
    assert any(".rejected-" in name for name in _exports(shared_cache))  # kept for inspection, not deleted


def test_sigterm_lets_a_streaming_request_finish_then_exits_cleanly(tiny_source, shared_cache, tmp_path):
    process = _serve(tiny_source, shared_cache, tmp_path / "server.log")
    events: list[str] = []
    first_event = threading.Event()

    def stream() -> None:
        body = {"model": _report(process)["model"], "prompt": "Once upon a time", "max_tokens": 400,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{process.base_url}/v1/completions", json=body, headers=AUTH,
                          timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_event.set()

    reader = threading.Thread(target=stream)
    try:
        reader.start()
        assert first_event.wait(60), process.log_tail()
        os.killpg(process.process.pid, signal.SIGTERM)
        reader.join(120)
        exit_status = process.process.wait(60)
    finally:
        process.stop()
    assert exit_status == 0, process.log_tail()
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 400  # drained to the end, not cut off


def test_a_start_killed_while_pruning_leaves_nothing_a_later_start_accepts(tiny_source, tmp_path):
    cache_dir = tmp_path / "cache"
    port = free_port()
    command = serve_command(str(tiny_source), port, cache_dir, *tiny_server_options())
    victim = ServerProcess(command, port, tmp_path / "killed.log").start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status, body = victim.health()
            if status == 503 and body["status"] == "pruning":
                break
            assert victim.process.poll() is None, victim.log_tail()
            time.sleep(0.05)
        else:
            pytest.fail("the server never reported the pruning phase")
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait(30)
    finally:
        victim.stop()
    assert all(name.startswith(".tmp-") for name in _exports(cache_dir)), _exports(cache_dir)

    report, _, _, _ = _start_and_inspect(tiny_source, cache_dir, tmp_path / "after.log")
    assert report["cache_hit"] is False  # same options: it pruned again instead of loading a partial export


def test_sigterm_while_pruning_stops_the_prune_at_once_and_writes_nothing(tiny_source, tmp_path):
    """The prune runs in a worker thread that the interpreter waits for at exit, so the server can only
    exit as soon as every pruning stage heeds the stop. Self-calibration is the first long stage: asked
    for far more samples than it could write before the signal, it must stop part-way."""
    cache_dir = tmp_path / "cache"
    port = free_port()
    options = [*tiny_server_options(), "--calibration", "self", "--samples", "50000"]
    process = ServerProcess(serve_command(str(tiny_source), port, cache_dir, *options), port,
                            tmp_path / "stopped.log").start()
    try:
        deadline = time.monotonic() + 300
        while "self-calibration" not in process.log_tail(100_000):  # its progress bar has started
            assert process.process.poll() is None and time.monotonic() < deadline, process.log_tail()
            time.sleep(0.2)
        os.killpg(process.process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        exit_status = process.process.wait(120)
        stopped_after = time.monotonic() - signalled
    finally:
        process.stop()
    log_text = process.log_tail(100_000)
    assert exit_status == 0, log_text
    assert stopped_after < 60, log_text  # 50,000 samples would take hours
    assert "pruning stopped during self-calibration" in log_text, log_text
    assert _exports(cache_dir) == []
