"""The scaled real-model shapes keep their ratios, and their tokenizer files look like the real ones."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.shapes import (
    HEAD_DIM,
    LLAMA_1_7B,
    LLAMA_2_7B,
    LLAMA_2_13B,
    LLAMA_2_70B,
    LLAMA_3_8B,
    SHAPES,
    TINYLLAMA_1_1B,
    VICUNA_7B_V1_5,
    save_shape,
    scaled_config,
    sentencepiece_model,
    write_tokenizer,
)


def _ratios(config: dict) -> tuple:
    return (config["intermediate_size"] / config["hidden_size"],
            config["num_key_value_heads"] / config["num_attention_heads"],
            config["rope_theta"] if "rope_theta" in config else config["rope_parameters"]["rope_theta"],
            config["rms_norm_eps"], config["max_position_embeddings"], config["tie_word_embeddings"])


@pytest.mark.parametrize("shape, hidden", [(LLAMA_1_7B, 512), (LLAMA_2_7B, 512), (VICUNA_7B_V1_5, 512),
                                           (LLAMA_3_8B, 512), (TINYLLAMA_1_1B, 512), (LLAMA_2_13B, 640),
                                           (LLAMA_2_70B, 1024)])
def test_scaled_shapes_keep_the_real_ratios(shape, hidden):
    config = scaled_config(shape, hidden, layers=2).to_dict()
    assert _ratios(config) == _ratios(shape.config)
    assert config["head_dim"] == HEAD_DIM and config["hidden_size"] == hidden
    assert config["num_attention_heads"] * HEAD_DIM == hidden


def test_the_real_shapes_are_the_published_ones():
    assert (LLAMA_2_7B.config["intermediate_size"], LLAMA_2_7B.head_dim) == (11008, 128)
    assert LLAMA_3_8B.config["num_key_value_heads"] == 8 and LLAMA_3_8B.config["rope_theta"] == 500000.0
    assert SHAPES["tinyllama-1.1b"].config["num_key_value_heads"] == 4


def test_a_scale_that_breaks_a_ratio_is_refused():
    with pytest.raises(ValueError, match="ratios intact"):
        scaled_config(LLAMA_2_13B, 512)  # 13824 · 512 / 5120 is not a whole MLP width
    with pytest.raises(ValueError, match="ratios intact"):
        scaled_config(TINYLLAMA_1_1B, 256)  # 4 query heads cannot keep the 32:4 KV ratio


@pytest.mark.parametrize("shape, files", [
    (LLAMA_1_7B, {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}),
    (LLAMA_2_7B, {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}),
    (VICUNA_7B_V1_5, {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}),
])
def test_sentencepiece_tokenizers_match_sentencepiece(tmp_path, shape, files):
    import sentencepiece

    write_tokenizer(tmp_path, shape)
    assert {p.name for p in tmp_path.iterdir()} == files
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reference = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model())
    text = "Paris is the capital of France, said 42 users: ü€"  # ü€ are not in the corpus: byte fallback
    assert tokenizer(text).input_ids == [reference.bos_id(), *reference.encode(text)]
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert tokenizer.chat_template is None  # as the real LLaMA-1/2 and Vicuna checkpoints


def test_checkpoint_dtype_and_token_ids(tmp_path):
    directory = save_shape(tmp_path / "llama-3", LLAMA_3_8B, dtype=torch.bfloat16)
    config = json.loads((directory / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert config["dtype"] == "bfloat16"
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.chat_template is not None
    with safe_open(directory / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}  # noqa: SIM118 -- safe_open is not a dict
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    logits = model(torch.tensor([tokenizer("Paris is").input_ids])).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()
