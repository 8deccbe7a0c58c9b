"""Shared fixtures: offline hub, a test cache beside the checkout, tiny models, the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The hub is unreachable on CI; fail fast instead of waiting on network time-outs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
# A persistent test cache: the default model is fetched and converted once per machine, not per run.
TEST_CACHE = Path(os.environ.get("HYWIA_TEST_CACHE", REPO_ROOT / ".cache" / "test"))


def _find_shared_data() -> Path | None:
    for candidate in (os.environ.get("HYWIA_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate, "wikitext-2-raw").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session", autouse=True)
def isolated_user_cache(tmp_path_factory):
    """Point the user's default cache (`HYWIA_CACHE_DIR`) at this session's temporary folder.

    A call that names no cache directory falls back to ~/.cache/hywia; a test must never write there
    (it once left tiny models' statistics among a user's). Servers started as subprocesses inherit it.
    """
    cache = tmp_path_factory.mktemp("user-cache")
    with pytest.MonkeyPatch.context() as patch:  # the function-scoped `monkeypatch` cannot serve a session
        patch.setenv("HYWIA_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = _find_shared_data()
    if found is None:
        pytest.fail("the shared data folder (../shared/data or $HYWIA_DATA_DIR) is missing; tests need it")
    return found


@pytest.fixture(scope="session")
def test_cache() -> Path:
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE


@pytest.fixture(scope="session")
def default_model_dir(test_cache) -> Path:
    from hywia.default_model import ensure_default_model

    directory, _ = ensure_default_model(test_cache)
    return directory


@pytest.fixture(scope="session")
def default_model(default_model_dir, test_cache):
    from hywia.models import load_model

    return load_model(str(default_model_dir), cache_dir=test_cache)


@pytest.fixture
def tiny_gqa_dir(tmp_path) -> Path:
    from tests.tiny import save_tiny_model

    return save_tiny_model(tmp_path / "tiny-gqa", gqa=True)


@pytest.fixture
def tiny_mha_dir(tmp_path) -> Path:
    from tests.tiny import save_tiny_model

    return save_tiny_model(tmp_path / "tiny-mha", gqa=False)


# The real default model pruned at 20% with default options: pruned once per machine (cached in the
# test cache), shared by the export, engine and server tests.
DEFAULT_EXPORT_RATIO = 0.2


@pytest.fixture(scope="session")
def pruned_default_export(test_cache, default_model_dir):
    from hywia.models import resolve_source
    from hywia.options import PruneOptions
    from hywia.pipeline import prepare_export

    # The default layout and criterion, cheaper: recovery off (measured in benchmarks/recovery.py) and 64
    # calibration samples instead of the default 128, each of which would add minutes to a fresh test cache.
    options = PruneOptions(ratio=DEFAULT_EXPORT_RATIO, recover="none", samples=64)
    return prepare_export(resolve_source(None, test_cache), options, cache_dir=test_cache)
