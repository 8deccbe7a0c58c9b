"""Faults around the server process: a corrupted cache entry, a kill during pruning, and SIGTERM
while a request is streaming. Real `hywia serve` processes with the tiny model on the torch engine."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from server.process import ServerProcess, free_port
from server.scrape import scrape
from tests.test_server_api import API_KEY, serve_command, start, tiny_server_options

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def tiny_source(tmp_path):
    from tests.tiny import save_tiny_model

    return save_tiny_model(tmp_path / "tiny", gqa=True, max_position_embeddings=2048)


def _serve(source, cache_dir, log_path) -> ServerProcess:
    port = free_port()
    return start(serve_command(str(source), port, cache_dir, *tiny_server_options()), port, log_path, timeout=300)


def _report(process: ServerProcess) -> dict:
    return httpx.get(f"{process.base_url}/v1/hywia/report", headers=AUTH).json()["data"][0]


def _exports(cache_dir):
    return sorted(p.name for p in (cache_dir / "exports").iterdir()) if (cache_dir / "exports").exists() else []


def test_a_corrupted_export_is_moved_aside_and_rebuilt(tiny_source, tmp_path):
    cache_dir = tmp_path / "cache"
    first = _serve(tiny_source, cache_dir, tmp_path / "first.log")
    try:
        export_dir = _report(first)["directory"]
    finally:
        first.stop()
    weights = os.path.join(export_dir, "model.safetensors")
    with open(weights, "r+b") as handle:  # flip bytes inside the tensor data, keep the size
        handle.seek(os.path.getsize(weights) // 2)
        chunk = handle.read(64)
        handle.seek(-len(chunk), os.SEEK_CUR)
        handle.write(bytes(b ^ 0xFF for b in chunk))

    second = _serve(tiny_source, cache_dir, tmp_path / "second.log")
    try:
        report, samples = _report(second), scrape(second.base_url)
    finally:
        second.stop()
    assert report["cache_hit"] is False
    assert samples.value("hywia_cache_misses_total", model=report["model"]) == 1
    assert "does not match its checksum" in second.log_tail(100_000)
    assert any(".rejected-" in name for name in _exports(cache_dir))  # kept for inspection, not deleted


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

    survivor = _serve(tiny_source, cache_dir, tmp_path / "after.log")
    try:
        report = _report(survivor)
    finally:
        survivor.stop()
    assert report["cache_hit"] is False  # same options: it pruned again instead of loading a partial export


def test_sigterm_lets_a_streaming_request_finish_then_exits_cleanly(tiny_source, tmp_path):
    process = _serve(tiny_source, tmp_path / "cache", tmp_path / "server.log")
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
