"""Per-layer architecture (HywiaLlama) in transformers: config, registration, exact equivalence.

The export is cut here by a small slicer of the test's own (per layer: keep some KV groups and
some MLP channels), so these tests do not depend on the pruning pipeline.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

import hywia.arch
from hywia.arch import HywiaLlamaConfig, HywiaLlamaForCausalLM, per_layer_config
from tests.tiny import tiny_model, tiny_tokenizer, with_layer_widths

# Three layers of a GQA model (2 KV groups of 2 query heads, 512 MLP channels), each cut differently:
# layer 0 whole, layer 1 keeps KV group 1 and 300 channels, layer 2 keeps group 0 and 100 channels.
KEPT_KV_GROUPS = [[0, 1], [1], [0]]
KEPT_MLP_COUNTS = [512, 300, 100]


def kept_mlp_channels(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(512, generator=generator)[:count].tolist()) for count in KEPT_MLP_COUNTS]


def _head_rows(groups: list[int], heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of q_proj (heads_per_group = G) or k/v_proj (1) that the kept groups own."""
    return torch.tensor([(g * heads_per_group + h) * head_dim + d
                         for g in groups for h in range(heads_per_group) for d in range(head_dim)])


def sliced_state_dict(model: LlamaForCausalLM, kv_groups: list[list[int]], channels: list[list[int]]) -> dict:
    config = model.config
    group_size = config.num_attention_heads // config.num_key_value_heads
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for layer, (groups, kept) in enumerate(zip(kv_groups, channels)):
        prefix = f"model.layers.{layer}."
        q_rows = _head_rows(groups, group_size, config.head_dim)
        kv_rows = _head_rows(groups, 1, config.head_dim)
        kept = torch.tensor(kept)
        for name, rows, dim in (("self_attn.q_proj", q_rows, 0), ("self_attn.k_proj", kv_rows, 0),
                                ("self_attn.v_proj", kv_rows, 0), ("self_attn.o_proj", q_rows, 1),
                                ("mlp.gate_proj", kept, 0), ("mlp.up_proj", kept, 0), ("mlp.down_proj", kept, 1)):
            key = prefix + name + ".weight"
            state[key] = state[key].index_select(dim, rows).contiguous()
    return state


def masked_copy(model: LlamaForCausalLM, kv_groups: list[list[int]], channels: list[list[int]]) -> LlamaForCausalLM:
    """The original with every removed unit's output path zeroed: what the cut model must compute."""
    masked = LlamaForCausalLM(model.config).eval()
    masked.load_state_dict(model.state_dict())
    config = model.config
    group_size = config.num_attention_heads // config.num_key_value_heads
    with torch.no_grad():
        for layer, groups, kept in zip(masked.model.layers, kv_groups, channels):
            removed_groups = [g for g in range(config.num_key_value_heads) if g not in groups]
            if removed_groups:
                layer.self_attn.o_proj.weight[:, _head_rows(removed_groups, group_size, config.head_dim)] = 0
            removed = torch.ones(config.intermediate_size, dtype=torch.bool)
            removed[kept] = False
            layer.mlp.down_proj.weight[:, removed] = 0
    return masked


def save_per_layer_export(directory, seed: int = 0):
    """A tiny GQA model cut per layer, saved as a HywiaLlama export with a tokenizer.
    Returns (directory, the original model, kept KV groups, kept MLP channels)."""
    tokenizer = tiny_tokenizer()
    original = tiny_model(gqa=True, seed=seed, layers=len(KEPT_KV_GROUPS), eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    channels = kept_mlp_channels(seed)
    group_size = original.config.num_attention_heads // original.config.num_key_value_heads
    config = per_layer_config(with_layer_widths(original.config, heads=[len(g) * group_size for g in KEPT_KV_GROUPS],
                                                kv_heads=[len(g) for g in KEPT_KV_GROUPS],
                                                intermediate_sizes=[len(c) for c in channels]))
    pruned = HywiaLlamaForCausalLM(config).eval()
    pruned.load_state_dict(sliced_state_dict(original, KEPT_KV_GROUPS, channels), strict=True)
    pruned.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory, original, KEPT_KV_GROUPS, channels


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return save_per_layer_export(tmp_path_factory.mktemp("per-layer") / "export")


def test_export_config_names_the_per_layer_architecture(export):
    directory, *_ = export
    saved = json.loads((directory / "config.json").read_text())
    assert saved["architectures"] == ["HywiaLlamaForCausalLM"]
    assert saved["model_type"] == "hywia_llama"
    assert saved["layer_num_attention_heads"] == [4, 2, 2]
    assert saved["layer_num_key_value_heads"] == [2, 1, 1]
    assert saved["layer_intermediate_size"] == [512, 300, 100]
    # Whole-model fields describe the widest layer; head_dim survives the change of head counts.
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["intermediate_size"]) == (4, 2, 512)
    assert saved["head_dim"] == 64
    assert "auto_map" not in saved  # no remote code anywhere


def test_export_logits_equal_masked_original(export):
    directory, original, kv_groups, channels = export
    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert type(loaded) is HywiaLlamaForCausalLM
    assert [layer.mlp.down_proj.in_features for layer in loaded.model.layers] == [512, 300, 100]
    assert [layer.self_attn.k_proj.out_features for layer in loaded.model.layers] == [128, 64, 64]

    masked = masked_copy(original, kv_groups, channels)
    input_ids = torch.randint(3, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = masked(input_ids).logits
        got = loaded(input_ids).logits
        unpruned = original(input_ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # The cut really changed the model, so the equality above is not vacuous.
    assert (unpruned - expected).abs().max() > 1e-3


def test_cached_generation_matches_full_recompute(export):
    """Greedy decoding with the KV cache (per-layer head counts in every cache layer) gives the
    tokens that recomputing the whole prefix every step gives."""
    directory, *_ = export
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        tokens = prompt
        for _ in range(10):
            next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert cached.tolist() == tokens.tolist()


def test_load_model_accepts_a_per_layer_export(export, tmp_path):
    from hywia.models import load_model

    directory, *_ = export
    loaded = load_model(str(directory), cache_dir=tmp_path)
    assert isinstance(loaded.model, HywiaLlamaForCausalLM)
    assert loaded.model.config.layer_intermediate_size == [512, 300, 100]


@pytest.mark.parametrize("order", ["hywia-first", "transformers-first", "peft-first"])
def test_import_hywia_lets_transformers_load_a_per_layer_export(export, order):
    """As a new user would (README): `import hywia`, then the Auto classes, in a fresh interpreter;
    in any order, including through peft (which makes transformers load configuration_auto while one
    of its own modules is half-imported). `import hywia` itself must not pay for importing transformers,
    and nothing warns."""
    import subprocess
    import sys

    directory, *_ = export
    imports = {"transformers-first": "from transformers import AutoModelForCausalLM; import hywia",
               "hywia-first": "import sys, hywia; assert 'transformers' not in sys.modules; "
                              "from transformers import AutoModelForCausalLM",
               "peft-first": "import hywia, peft; from transformers import AutoModelForCausalLM"}[order]
    script = (f"{imports}; model = AutoModelForCausalLM.from_pretrained({str(directory)!r}); "
              "print(type(model).__name__, [l.mlp.down_proj.in_features for l in model.model.layers])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "could not register" not in done.stderr
    assert done.stdout.split("\n")[-2] == "HywiaLlamaForCausalLM [512, 300, 100]"


def test_registration_is_idempotent():
    hywia.arch.register()
    hywia.arch.register()
    assert AutoConfig.for_model("hywia_llama").__class__ is HywiaLlamaConfig


def test_uniform_lists_describe_the_stock_model():
    base = tiny_model(gqa=True, layers=2)
    config = per_layer_config(with_layer_widths(base.config, [4, 4], [2, 2], [512, 512]))
    assert config.is_uniform
    model = HywiaLlamaForCausalLM(config).eval()
    model.load_state_dict(base.state_dict())
    input_ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, rtol=0, atol=0)


def test_pruned_head_counts_need_not_divide_hidden_size():
    # LlamaConfig rejects hidden_size % num_attention_heads != 0 even with head_dim given; a pruned
    # MHA layer can keep e.g. 3 of 4 heads, which must be accepted here.
    config = per_layer_config(with_layer_widths(tiny_model(gqa=False, layers=2).config, [3, 1], [3, 1], [256, 64]))
    assert config.num_attention_heads == 3 and config.head_dim == 64
    assert HywiaLlamaForCausalLM(config).model.layers[1].self_attn.o_proj.in_features == 64


@pytest.mark.parametrize("heads, kv_heads, sizes, message", [
    ([4, 2], [2, 1], [512], "layer_intermediate_size has 1 entries for 2 layers"),
    ([4, 2], [2, 0], [512, 256], "at least 1"),
    ([4, 3], [2, 2], [512, 256], "layer 1: 3 query heads is not a multiple of 2 KV heads"),
])
def test_impossible_widths_are_refused(heads, kv_heads, sizes, message):
    with pytest.raises(ValueError, match=message):
        per_layer_config(with_layer_widths(tiny_model(gqa=True, layers=2).config, heads, kv_heads, sizes))


def test_layer_view_follows_the_model_config():
    config = per_layer_config(with_layer_widths(tiny_model(gqa=True, layers=2).config, [4, 2], [2, 1], [512, 64]))
    view = config.layer_config(1)
    assert (view.num_attention_heads, view.num_key_value_heads, view.intermediate_size) == (2, 1, 64)
    assert view.hidden_size == config.hidden_size
    config.rms_norm_eps = 1e-3  # settings changed on the model config after the layers exist
    assert view.rms_norm_eps == 1e-3
    with pytest.raises(AttributeError):
        view.intermediate_size = 5
