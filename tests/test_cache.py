"""Cache identity (issue 12, bug 1): the export key covers all the code that decides or writes an export."""

from __future__ import annotations

import shutil

import pytest

from hywia.cache import PACKAGE_DIR, code_digest, content_key
from hywia.options import PruneOptions
from hywia.pipeline import export_key


@pytest.fixture
def package_copy(tmp_path):
    return shutil.copytree(PACKAGE_DIR, tmp_path / "hywia", ignore=shutil.ignore_patterns("__pycache__"))


def _edit(path):
    path.write_text(path.read_text() + "\n# an edit\n")


@pytest.mark.parametrize("module", ["pipeline.py", "arch/configuration_hywia_llama.py", "plan.py", "fusion.py",
                                    "export.py", "cache.py"])
def test_editing_code_that_decides_or_writes_the_export_changes_its_key(package_copy, module):
    options = PruneOptions(ratio=0.3, recover="none")
    before = export_key("source-digest", options, package_copy)
    assert before == export_key("source-digest", options, package_copy)  # deterministic
    _edit(package_copy / module)
    assert export_key("source-digest", options, package_copy) != before


def test_a_new_module_changes_the_key(package_copy):
    before = code_digest(package_copy)
    (package_copy / "new_stage.py").write_text("RULE = 1\n")
    assert code_digest(package_copy) != before


@pytest.mark.parametrize("module", ["commands/prune.py", "evaluation/perplexity.py"])
def test_front_ends_and_evaluation_do_not_change_the_key(package_copy, module):
    before = code_digest(package_copy)
    _edit(package_copy / module)
    assert code_digest(package_copy) == before


def test_the_installed_package_is_what_the_key_digests():
    assert code_digest() == code_digest(PACKAGE_DIR)
    assert export_key("a", PruneOptions()) != export_key("b", PruneOptions())
    assert export_key("a", PruneOptions()) != export_key("a", PruneOptions(ratio=0.3))


def test_content_key_ignores_field_order():
    assert content_key({"a": 1, "b": [2, 3]}) == content_key({"b": [2, 3], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_a_source_is_hashed_once_per_start(tmp_path, monkeypatch):
    """Bug 2: resolving a source hashes its weights; prepare_export and loading must reuse that digest
    (a 7B checkpoint is ~40 GB to read). Counted on a cache miss, the path that also loads the model."""
    import hywia.models
    from hywia.models import resolve_source
    from hywia.pipeline import prepare_export
    from tests.tiny import save_tiny_model

    source = save_tiny_model(tmp_path / "tiny", gqa=True)
    digests = []
    real_digest = hywia.models.content_digest
    monkeypatch.setattr(hywia.models, "content_digest", lambda directory: digests.append(directory) or
                        real_digest(directory))
    resolved = resolve_source(str(source), tmp_path / "cache")
    export = prepare_export(resolved, PruneOptions(ratio=0.3, importance="magnitude", recover="none"), cache_dir=tmp_path / "cache",
                            progress=False)
    assert not export.cache_hit and export.report["source_digest"] == resolved.digest
    assert digests == [source]
