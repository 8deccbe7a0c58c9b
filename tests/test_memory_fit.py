"""--target-memory / --target-params arithmetic: parameter and KV-cache counts, and the ratio choice."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from hywia.errors import HywiaError
from hywia.memory_fit import (
    RATIO_STEP,
    Workload,
    choose_ratio,
    footprint,
    kv_cache_bytes_per_token,
    parameter_count,
    uniform_pruned_config,
)
from hywia.plan import pruned_config
from hywia.sizes import parse_count, parse_size
from hywia.units import KeepCounts

LLAMA_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
            "vocab_size": 32000}
WORKLOAD_7B = Workload(max_model_len=2048, max_seqs=4, dtype="float16")


def test_llama_7b_counts():
    assert parameter_count(LLAMA_7B) == 6_738_415_616  # the published LLaMA-7B size
    # 32 layers × (K and V) × 4096 values × 2 bytes
    assert kv_cache_bytes_per_token(LLAMA_7B, kv_bytes=2) == 512 * 1024


@pytest.mark.parametrize("fields", [
    {"num_key_value_heads": 2},
    {"num_key_value_heads": 4, "tie_word_embeddings": True},
    {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True},
])
def test_parameter_count_matches_what_transformers_allocates(fields):
    config = LlamaConfig(vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, head_dim=64, **fields)
    model = LlamaForCausalLM(config)
    assert parameter_count(config.to_dict()) == sum(p.numel() for p in model.parameters())


def test_per_layer_config_counts_layer_by_layer():
    from hywia.arch import HywiaLlamaForCausalLM, per_layer_config
    from tests.tiny import tiny_config, with_layer_widths

    config = per_layer_config(with_layer_widths(tiny_config(gqa=True, layers=3), [4, 2, 2], [2, 1, 1], [512, 300, 100]))
    model = HywiaLlamaForCausalLM(config)
    assert parameter_count(config.to_dict()) == sum(p.numel() for p in model.parameters())
    # K and V of 2 + 1 + 1 heads of 64 values, 4 bytes each.
    assert kv_cache_bytes_per_token(config.to_dict(), kv_bytes=4) == 2 * (2 + 1 + 1) * 64 * 4


def test_target_memory_on_7b_picks_the_smallest_fitting_ratio():
    target = parse_size("6GiB")
    result = choose_ratio(LLAMA_7B, WORKLOAD_7B, target_memory=target)
    chosen = footprint(uniform_pruned_config(LLAMA_7B, result.ratio), WORKLOAD_7B)
    one_step_less = footprint(uniform_pruned_config(LLAMA_7B, round(result.ratio - RATIO_STEP, 2)), WORKLOAD_7B)
    assert chosen.total_bytes <= target < one_step_less.total_bytes
    assert result.chosen.footprint == chosen and result.previous.footprint == one_step_less
    # Dense: 12.55 GiB of fp16 weights + 4 GiB of KV cache (4 × 2048 tokens × 512 KiB), far over 6 GiB.
    assert result.dense.footprint.kv_cache_bytes == 4 * 2**30
    assert 0.5 < result.ratio < 0.9

    text = result.explanation()
    assert "4 sequences × 2,048 tokens" in text and "16.55 GiB > 6.00 GiB" in text
    assert f"chosen ratio {result.ratio:.2f}" in text and "(does not fit)" in text and "(fits)" in text
    json.dumps(result.to_dict())  # goes into the pruning report as it is


def test_longer_contexts_need_a_larger_ratio():
    short = choose_ratio(LLAMA_7B, WORKLOAD_7B, target_memory=parse_size("6GiB"))
    long = choose_ratio(LLAMA_7B, Workload(max_model_len=8192, max_seqs=4, dtype="float16"),
                        target_memory=parse_size("6GiB"))
    assert long.ratio > short.ratio


def test_target_params_on_7b():
    result = choose_ratio(LLAMA_7B, WORKLOAD_7B, target_params=parse_count("3.5B"))
    assert result.chosen.footprint.parameters <= 3_500_000_000 < result.previous.footprint.parameters
    assert round(result.previous.ratio + RATIO_STEP, 2) == result.ratio


def test_a_dense_model_that_fits_needs_no_pruning():
    result = choose_ratio(LLAMA_7B, WORKLOAD_7B, target_memory=parse_size("20GiB"))
    assert result.ratio == 0.0 and result.previous is None
    assert "no pruning needed" in result.explanation()


def test_refuses_when_even_the_maximum_ratio_does_not_fit():
    many_long_sequences = Workload(max_model_len=4096, max_seqs=64, dtype="float16")
    with pytest.raises(HywiaError) as refusal:
        choose_ratio(LLAMA_7B, many_long_sequences, target_memory=parse_size("6GiB"))
    message = str(refusal.value)
    assert "up to 0.90" in message and "9.26 GiB > 6.00 GiB" in message
    assert "--max-model-len" in message  # the KV cache is what does not fit, so say how to shrink it


def test_a_per_layer_allocator_is_used_for_the_arithmetic():
    def first_layer_whole(ratio: float) -> list[KeepCounts]:
        rest = uniform_pruned_config(LLAMA_7B, min(0.9, ratio * 1.1))
        n = LLAMA_7B["num_hidden_layers"]
        return [KeepCounts(32, 11008)] + [KeepCounts(rest["num_key_value_heads"], rest["intermediate_size"])] * (n - 1)

    result = choose_ratio(LLAMA_7B, WORKLOAD_7B, target_memory=parse_size("6GiB"), allocate=first_layer_whole)
    assert result.chosen.config["layer_num_key_value_heads"][0] == 32
    assert result.chosen.footprint == footprint(pruned_config(LLAMA_7B, first_layer_whole(result.ratio)), WORKLOAD_7B)
    assert result.chosen.footprint.total_bytes <= parse_size("6GiB") < result.previous.footprint.total_bytes
    assert "KV heads (" in result.explanation()  # per-layer widths are described as a range


def test_uniform_shape_follows_the_plan_rule():
    """The config arithmetic keeps what hywia.plan's uniform layout keeps, so the ratio chosen here is
    the ratio the pruning then applies (compared on a real, smaller, model)."""
    from hywia.budget import uniform_keep_counts

    config = {"hidden_size": 576, "num_hidden_layers": 4, "num_attention_heads": 9, "num_key_value_heads": 3,
              "intermediate_size": 1536, "vocab_size": 2048, "head_dim": 64}
    model = LlamaForCausalLM(LlamaConfig(**config))
    for ratio in (0.1, 0.3, 0.5, 0.7):
        counts = uniform_keep_counts(model, ratio)
        shape = uniform_pruned_config(config, ratio)
        assert (shape["num_key_value_heads"], shape["intermediate_size"]) == (counts.kv_groups, counts.mlp_channels)
