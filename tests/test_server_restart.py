"""A second start with the same options reuses the cached export: no pruning, a cache hit."""

from __future__ import annotations

import httpx

from server.process import free_port
from server.scrape import scrape
from tests.test_server_api import API_KEY, serve_command, start, tiny_server_options


def _report(url: str) -> dict:
    response = httpx.get(f"{url}/v1/hywia/report", headers={"Authorization": f"Bearer {API_KEY}"})
    return response.json()["data"][0]


def test_restart_with_the_same_options_hits_the_cache(tmp_path):
    from tests.tiny import save_tiny_model

    source = save_tiny_model(tmp_path / "tiny", gqa=True)
    cache_dir = tmp_path / "cache"
    phases_seen = []
    for attempt in ("first", "second"):
        port = free_port()
        process = start(serve_command(str(source), port, cache_dir, *tiny_server_options()), port,
                        tmp_path / f"{attempt}.log", timeout=300)
        try:
            phases_seen.append({body["status"] for _, body in process.health_seen})
            report, samples = _report(process.base_url), scrape(process.base_url)
        finally:
            process.stop()
        model = report["model"]
        if attempt == "first":
            assert report["cache_hit"] is False
            assert samples.value("hywia_cache_misses_total", model=model) == 1
            assert samples.value("hywia_pruning_seconds", model=model) > 0
            first_report = report["report"]
        else:
            assert report["cache_hit"] is True
            assert samples.value("hywia_cache_hits_total", model=model) == 1
            assert samples.value("hywia_cache_misses_total", model=model) == 0
            assert samples.value("hywia_pruning_seconds", model=model) == 0
            assert report["report"] == first_report  # the very export the first start wrote
    assert "pruning" not in phases_seen[1]
