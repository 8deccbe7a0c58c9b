"""Random checkpoints with the config shapes of real LLaMA-family models, full size or scaled down.

The scaled models keep every shape *ratio* of the real one (MLP width / hidden size, KV heads / query
heads, rope θ, norm ε, context length) at a width whose head_dim (64) vLLM's CPU attention supports.
What is not scaled: the vocabulary (the tokenizers are trained here on a few sentences) and the depth
(the caller picks it). Their tokenizer files look like the real ones:
  * LLaMA-1-7B:      tokenizer.model (sentencepiece, byte fallback) + tokenizer_config.json + special_tokens_map.json
  * LLaMA-2-7B:      the same plus tokenizer.json, as Meta's HF repo ships it
  * Vicuna-7B-v1.5:  LLaMA-2's shape, tokenizer.model, <unk> as the pad token
  * Llama-3-8B:      GQA 32/8, rope θ 500000, a byte-level BPE tokenizer.json and the Instruct chat template
LLaMA-1, LLaMA-2 and Vicuna ship no chat template, exactly as their real checkpoints don't.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

HEAD_DIM = 64  # scaled models: a head size vLLM's CPU attention supports (DESIGN.md)

LLAMA_3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
LLAMA_3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"]


@dataclass(frozen=True)
class Shape:
    """A real checkpoint's config fields (exact), and the kind of tokenizer it ships."""

    name: str
    config: dict
    tokenizer: str  # "llama-1" | "llama-2" | "vicuna" (sentencepiece) or "llama-3" (byte-level BPE)
    chat_template: str | None = None

    @property
    def head_dim(self) -> int:
        return self.config["hidden_size"] // self.config["num_attention_heads"]


def _llama(hidden, intermediate, layers, heads, kv_heads, **rest) -> dict:
    fields = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False, hidden_act="silu")
    fields.update(rest)
    return fields


# The config.json fields of the published checkpoints (huggyllama/llama-7b, meta-llama/Llama-2-*-hf,
# lmsys/vicuna-7b-v1.5, meta-llama/Meta-Llama-3-8B-Instruct, TinyLlama/TinyLlama-1.1B-intermediate-*).
LLAMA_1_7B = Shape("llama-1-7b", _llama(4096, 11008, 32, 32, 32, max_position_embeddings=2048, rms_norm_eps=1e-6),
                   tokenizer="llama-1")
LLAMA_2_7B = Shape("llama-2-7b", _llama(4096, 11008, 32, 32, 32), tokenizer="llama-2")
VICUNA_7B_V1_5 = Shape("vicuna-7b-v1.5", _llama(4096, 11008, 32, 32, 32, pad_token_id=0), tokenizer="vicuna")
LLAMA_3_8B = Shape("llama-3-8b-instruct", _llama(4096, 14336, 32, 32, 8, vocab_size=128256, max_position_embeddings=8192,
                                                 rope_theta=500000.0, bos_token_id=128000, eos_token_id=128009),
                   tokenizer="llama-3", chat_template=LLAMA_3_CHAT_TEMPLATE)
LLAMA_2_13B = Shape("llama-2-13b", _llama(5120, 13824, 40, 40, 40), tokenizer="llama-2")
LLAMA_2_70B = Shape("llama-2-70b", _llama(8192, 28672, 80, 64, 8), tokenizer="llama-2")
TINYLLAMA_1_1B = Shape("tinyllama-1.1b", _llama(2048, 5632, 22, 32, 4, max_position_embeddings=2048),
                       tokenizer="llama-2")

# The four checkpoints the issue names; tests run them all through prune → export → vLLM → chat.
TEST_SHAPES = (LLAMA_1_7B, LLAMA_2_7B, VICUNA_7B_V1_5, LLAMA_3_8B)
SHAPES = {shape.name: shape for shape in (*TEST_SHAPES, LLAMA_2_13B, LLAMA_2_70B, TINYLLAMA_1_1B)}


def scaled_config(shape: Shape, hidden_size: int = 512, layers: int = 2, **overrides) -> LlamaConfig:
    """The shape at `hidden_size` with head_dim 64: every ratio kept exactly, or a ValueError.
    `overrides`: fields the caller's tokenizer decides (vocab_size, special-token ids)."""
    real = shape.config
    heads, remainder = divmod(hidden_size, HEAD_DIM)
    kv_heads, kv_remainder = divmod(heads * real["num_key_value_heads"], real["num_attention_heads"])
    intermediate, mlp_remainder = divmod(real["intermediate_size"] * hidden_size, real["hidden_size"])
    if remainder or kv_remainder or mlp_remainder or kv_heads == 0:
        raise ValueError(f"{shape.name} cannot be scaled to hidden size {hidden_size} with its ratios intact "
                         f"(heads {hidden_size / HEAD_DIM}, KV heads {heads * real['num_key_value_heads'] / real['num_attention_heads']}, "
                         f"MLP {real['intermediate_size'] * hidden_size / real['hidden_size']})")
    fields = dict(real, hidden_size=hidden_size, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=HEAD_DIM)
    return LlamaConfig(**{**fields, **overrides})


def full_config(shape: Shape, **overrides) -> LlamaConfig:
    return LlamaConfig(**{**shape.config, **overrides})


def random_model(config: LlamaConfig, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 seed: int = 0) -> LlamaForCausalLM:
    """Random weights built directly in `dtype` on `device` (a 7B model never exists in fp32 on the host).
    Norms are perturbed away from 1 so that every unit matters differently."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_shape(directory: Path, shape: Shape, hidden_size: int | None = 512, layers: int = 2,
               dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> Path:
    """Write a checkpoint with SHAPE's tokenizer files: scaled to `hidden_size`, or the full shape
    (hidden_size None; `layers` still applies, 0 meaning the real depth)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(directory, shape)
    # The special-token ids of the tokenizer written here (Llama-3's real ids lie beyond a scaled vocabulary).
    token_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if "pad_token_id" in shape.config:
        token_ids["pad_token_id"] = tokenizer.pad_token_id
    if hidden_size is None:
        config = full_config(shape, **token_ids, **({"num_hidden_layers": layers} if layers else {}))
    else:
        config = scaled_config(shape, hidden_size, layers, vocab_size=len(tokenizer), **token_ids)
    model = random_model(config, dtype=dtype, device=device, seed=seed)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def write_tokenizer(directory: Path, shape: Shape):
    """SHAPE's tokenizer files in `directory`; returns the tokenizer as transformers loads them."""
    from transformers import AutoTokenizer

    if shape.tokenizer == "llama-3":
        _write_byte_level_tokenizer(directory, shape.chat_template)
        return AutoTokenizer.from_pretrained(directory)
    (directory / "tokenizer.model").write_bytes(sentencepiece_model())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if shape.tokenizer == "vicuna":
        special["pad_token"] = "<unk>"
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "legacy": shape.tokenizer == "llama-1", "model_max_length": shape.config["max_position_embeddings"],
              **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    if shape.tokenizer == "llama-2":
        _add_tokenizer_json(directory)
    return AutoTokenizer.from_pretrained(directory)


def _add_tokenizer_json(directory: Path) -> None:
    """The fast tokenizer transformers converts from tokenizer.model (Meta ships both for LLaMA-2)."""
    import tempfile

    from transformers import AutoTokenizer

    converted = AutoTokenizer.from_pretrained(directory)
    with tempfile.TemporaryDirectory() as staging:
        converted.save_pretrained(staging)
        (directory / "tokenizer.json").write_bytes((Path(staging) / "tokenizer.json").read_bytes())


SENTENCEPIECE_VOCAB = 400
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Rome is the capital of Italy.",
    "Blue, red and yellow are the primary colours. A chat between a curious user and an assistant.",
    "It was the best of times, it was the worst of times. Call me Ishmael. Some years ago, never mind how long.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text; so do questions? Yes! And answers.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions about science and history.",
)


@functools.lru_cache(maxsize=1)
def sentencepiece_model() -> bytes:
    """A LLaMA-style sentencepiece BPE model (byte fallback, <unk>=0 <s>=1 </s>=2, no pad), trained here."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 8), model_writer=model, vocab_size=SENTENCEPIECE_VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def _write_byte_level_tokenizer(directory: Path, chat_template: str | None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SENTENCEPIECE_VOCAB, special_tokens=LLAMA_3_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(_CORPUS) * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = chat_template
    fast.save_pretrained(directory)
