"""vLLM serves a per-layer (HywiaLlama) export through our `vllm.general_plugins` entry point and
decodes exactly what transformers decodes. One engine start for the whole module (2-core CI)."""

from __future__ import annotations

import pytest
import torch

from tests.engines import KV_CACHE_BYTES, start_vllm
from tests.test_arch import save_per_layer_export

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Paris is the capital of", "To be, or not to be", "It was the best"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    directory, *_ = save_per_layer_export(tmp_path_factory.mktemp("vllm-per-layer") / "export")
    return directory


@pytest.fixture(scope="module")
def engine(export_dir):
    # A missing vLLM fails here (start_vllm), never skips. vLLM's CPU platform spawns the engine core
    # and its worker, so those processes know the architecture only through our entry point, exactly
    # as under `vllm serve`.
    llm = start_vllm(export_dir, max_model_len=128)
    yield llm
    # Stop the engine-core process now, so that it does not hold CPU and memory while later test
    # modules start engines of their own.
    llm.llm_engine.engine_core.shutdown()


def transformers_greedy(export_dir, prompts: list[str]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hywia.arch  # noqa: F401  (registers HywiaLlama with the Auto classes)

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                       do_sample=False)
        outputs.append(generated[0, input_ids.shape[1]:].tolist())
    return outputs


def test_vllm_builds_per_layer_shapes(engine):
    config = engine.llm_engine.model_config.hf_config
    assert config.model_type == "hywia_llama"
    assert config.layer_num_key_value_heads == [2, 1, 1]
    assert engine.llm_engine.model_config.architectures == ["HywiaLlamaForCausalLM"]


def test_vllm_kv_cache_holds_per_layer_heads(engine, export_dir):
    """vLLM sizes each layer's KV cache by that layer's KV heads, as hywia.memory_fit counts it
    (a cache sized for the widest layer everywhere would hold 2/3 of these tokens here)."""
    import json

    from hywia.memory_fit import kv_cache_bytes_per_token

    per_token = kv_cache_bytes_per_token(json.loads((export_dir / "config.json").read_text()), kv_bytes=4)
    cache_config = engine.llm_engine.vllm_config.cache_config
    tokens = cache_config.num_gpu_blocks * cache_config.block_size
    assert KV_CACHE_BYTES // per_token - cache_config.block_size < tokens <= KV_CACHE_BYTES // per_token


def test_vllm_greedy_equals_transformers_greedy(engine, export_dir):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)
    vllm_tokens = [list(out.outputs[0].token_ids) for out in engine.generate(PROMPTS, params)]
    assert vllm_tokens == transformers_greedy(export_dir, PROMPTS)


def test_plugin_register_is_idempotent(engine):
    from vllm import ModelRegistry

    from hywia.arch.vllm_plugin import register

    register()
    register()
    assert "HywiaLlamaForCausalLM" in ModelRegistry.get_supported_archs()
    model_cls, _ = ModelRegistry.resolve_model_cls(["HywiaLlamaForCausalLM"],
                                                   engine.llm_engine.model_config)
    assert model_cls.__name__ == "HywiaLlamaForCausalLM" and model_cls.__module__ == "hywia.arch.vllm_model"
