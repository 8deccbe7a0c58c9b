"""Tiny random LLaMA models with a real (small, trained) tokenizer, for fast unit tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "It was the best of times, it was the worst of times. Call me Ishmael. "
    "To be, or not to be, that is the question. In the beginning was the word. "
) * 20


def tiny_config(gqa: bool = True, layers: int = 2, vocab_size: int = 384, **overrides) -> LlamaConfig:
    """MHA (4 heads / 4 KV heads) or GQA (4 heads / 2 KV heads), head_dim 64 (a size vLLM's CPU
    attention supports), so the same models serve the engine tests."""
    fields = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2 if gqa else 4, head_dim=64,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TRAINING_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(gqa: bool = True, seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(gqa=gqa, **config_overrides))
    # Random init leaves norms at 1 and weights small; perturb so every unit matters differently.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def save_tiny_model(directory: Path, gqa: bool = True, seed: int = 0, **config_overrides) -> Path:
    tokenizer = tiny_tokenizer()
    model = tiny_model(gqa=gqa, seed=seed, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                       **config_overrides)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def with_layer_widths(config, heads: list[int], kv_heads: list[int], intermediate_sizes: list[int]) -> dict:
    """CONFIG (a LlamaConfig) as a dict carrying HywiaLlama's per-layer lists, for hywia.arch.per_layer_config."""
    return {**config.to_dict(), "layer_num_attention_heads": heads, "layer_num_key_value_heads": kv_heads,
            "layer_intermediate_size": intermediate_sizes}
