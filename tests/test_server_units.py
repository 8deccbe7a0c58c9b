"""Server parts on their own: text streaming, request validation, sizes, flags, the torch engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.engines.base import EngineSettings, SamplingOptions
from server.engines.text_stream import TextStream
from server.openai.chat.protocol import ChatCompletionRequest
from server.openai.completion.protocol import CompletionRequest
from server.openai.protocol import MAX_N
from server.registry import checkpoint_size


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", gqa=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _stream_all(tokenizer, ids, stop=()):
    stream, pieces = TextStream(tokenizer, stop), []
    for token in ids:
        text, stopped = stream.add(token)
        pieces.append(text)
        if stopped:
            return "".join(pieces), True
    return "".join(pieces) + stream.flush(), False


def test_text_stream_reassembles_the_decoded_text(tokenizer):
    text = "It was the best of times, it was the worst of times. Ünïcödé ✓ 漢字"
    ids = tokenizer(text).input_ids
    assert _stream_all(tokenizer, ids) == (tokenizer.decode(ids, skip_special_tokens=True), False)


def test_text_stream_stops_before_a_stop_string_split_over_tokens(tokenizer):
    text = "Call me Ishmael. To be, or not to be, that is the question."
    ids = tokenizer(text).input_ids
    assert _stream_all(tokenizer, ids, stop=("or not",)) == ("Call me Ishmael. To be, ", True)
    # The earliest of several stop strings wins.
    assert _stream_all(tokenizer, ids, stop=("question", "me Ish")) == ("Call ", True)


def test_text_stream_never_sends_what_could_start_a_stop_string(tokenizer):
    stream = TextStream(tokenizer, stop=("Paris is",))
    sent = ""
    for token in tokenizer("Paris").input_ids:
        sent += stream.add(token)[0]
    assert sent == ""  # "Paris" may still become "Paris is"
    assert stream.flush() == "Paris"


def test_requests_cap_n_and_refuse_what_the_server_cannot_honour():
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert ChatCompletionRequest(**chat, n=MAX_N).n == MAX_N
    for bad in ({"n": MAX_N + 1}, {"tools": [{"type": "function"}]}, {"logit_bias": {"1": 2}},
                {"temperature": 2.5}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": ""},
                {"response_format": {"type": "json_object"}}, {"messages": []}, {"top_logprobs": 2},
                {"logprobs": True, "top_logprobs": 21}, {"presence_penalty": float("nan")},
                {"repetition_penalty": 0}, {"min_tokens": 5, "max_completion_tokens": 4}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(**{**chat, **bad})
    for bad in ({"prompt": []}, {"prompt": [[]]}, {"suffix": "x"}, {"logprobs": -1}, {"echo": "loud"}):
        with pytest.raises(ValidationError):
            CompletionRequest(**{"model": "m", "prompt": "x", **bad})


def test_requests_carry_vllms_extensions_and_ignore_unknown_fields():
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], logprobs=True,
                                 top_logprobs=3, presence_penalty=0.5, frequency_penalty=-0.5,
                                 repetition_penalty=1.2, min_tokens=2, ignore_eos=True, parallel_tool_calls=True,
                                 some_future_field={"a": 1})
    assert (chat.logprobs_per_token, chat.prompt_logprobs) == (3, None)
    assert (chat.presence_penalty, chat.frequency_penalty, chat.repetition_penalty, chat.min_tokens) == (
        0.5, -0.5, 1.2, 2)
    assert "some_future_field" not in chat.model_dump()
    plain = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    assert plain.logprobs_per_token is None
    completion = CompletionRequest(model="m", prompt="x", logprobs=0, echo=True)
    assert (completion.logprobs_per_token, completion.prompt_logprobs) == (0, 0)
    assert CompletionRequest(model="m", prompt="x", echo=True).prompt_logprobs is None


def test_completion_prompt_forms():
    def prompts(prompt):
        return CompletionRequest(model="m", prompt=prompt).prompts

    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]


def test_max_completion_tokens_wins_over_max_tokens():
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                    max_completion_tokens=9)
    assert request.requested_max_tokens == 9


def test_checkpoint_size_counts_every_parameter(tiny_dir):
    from tests.tiny import tiny_model

    model = tiny_model(gqa=True)
    size = checkpoint_size(tiny_dir)
    assert size.parameters == sum(p.numel() for p in model.parameters())
    assert size.weight_bytes == 4 * size.parameters  # float32


def test_serve_flags_align_heads_to_the_tensor_parallel_size():
    from hywia.cli import build_parser
    from hywia.commands.serve import prune_options

    parser = build_parser()
    assert prune_options(parser.parse_args(["serve", "--tensor-parallel-size", "2"])).align_heads == 2
    explicit = parser.parse_args(["serve", "--tensor-parallel-size", "2", "--align-heads", "1"])
    assert prune_options(explicit).align_heads == 1


def test_serve_flags_keep_vllm_names_and_old_spellings(monkeypatch):
    from hywia.cli import build_parser
    from hywia.commands.serve import engine_settings

    monkeypatch.delenv("HYWIA_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    parser = build_parser()
    args = parser.parse_args(["serve", "--served-model-name", "m", "--kv-cache-memory-bytes", "2GiB", "--enforce-eager",
                              "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching", "--kv-cache-dtype",
                              "fp8", "-q", "fp8", "-tp", "2", "--pipeline-parallel-size", "3", "--max-num-seqs", "7"])
    assert (args.served_model_name, args.api_key) == ("m", "from-vllm")
    settings = engine_settings(args, "vllm")
    assert (settings.kv_cache_memory_bytes, settings.max_num_seqs) == (2 << 30, 7)
    assert settings.vllm_args == {"enforce_eager": True, "gpu_memory_utilization": 0.5, "enable_prefix_caching": False,
                                  "kv_cache_dtype": "fp8", "quantization": "fp8", "tensor_parallel_size": 2,
                                  "pipeline_parallel_size": 3}
    # Unset flags pass nothing: vLLM's own defaults apply (compiled mode, its memory share, …).
    assert engine_settings(parser.parse_args(["serve"]), "vllm").vllm_args == {}
    # --dtype picks the export's dtype and, given explicitly, the dtype vLLM computes in (vLLM's own --dtype);
    # `auto` leaves vLLM's choice. The torch engine takes it too (it only shapes the export there).
    assert engine_settings(parser.parse_args(["serve", "--dtype", "float32"]), "vllm").vllm_args == {"dtype": "float32"}
    assert "dtype" not in engine_settings(parser.parse_args(["serve", "--dtype", "auto"]), "vllm").vllm_args
    assert engine_settings(parser.parse_args(["serve", "--dtype", "bfloat16"]), "torch").vllm_args == {}
    old = parser.parse_args(["serve", "--model-name", "m", "--kv-cache-bytes", "1GB"])
    assert (old.served_model_name, old.kv_cache_memory_bytes) == ("m", 10**9)
    assert old.deprecated_flags == [("--model-name", "--served-model-name"),
                                    ("--kv-cache-bytes", "--kv-cache-memory-bytes")]


def test_vllm_engine_arguments_default_to_vllms_own():
    from vllm.engine.arg_utils import AsyncEngineArgs

    from server.engines.vllm_engine import engine_arguments

    on_gpu = engine_arguments(Path("/m"), EngineSettings(), "m", on_gpu=True)
    assert on_gpu == {"model": "/m", "served_model_name": "m", "tokenizer": "/m", "disable_log_stats": False}
    # On a CPU the KV cache needs a size (vLLM would ask for most of the memory); given sizes win.
    assert 0 < engine_arguments(Path("/m"), EngineSettings(), "m", on_gpu=False)["kv_cache_memory_bytes"] <= 4 << 30
    given = EngineSettings(kv_cache_memory_bytes=123 << 20, vllm_args={"enforce_eager": True})
    assert engine_arguments(Path("/m"), given, "m", on_gpu=False)["kv_cache_memory_bytes"] == 123 << 20
    # Two engines on one GPU (--serve-dense) split vLLM's share, or the one given.
    two = engine_arguments(Path("/m"), EngineSettings(engines_per_device=2), "m", on_gpu=True)
    assert two["gpu_memory_utilization"] == AsyncEngineArgs.gpu_memory_utilization / 2
    share = EngineSettings(engines_per_device=2, vllm_args={"gpu_memory_utilization": 0.8})
    assert engine_arguments(Path("/m"), share, "m", on_gpu=True)["gpu_memory_utilization"] == 0.4


# Through the CLI, as a user meets them (each is a process start, so only the cases that get past
# argparse: the ratios the issue names, the engine checks and a deprecated spelling).
IMPOSSIBLE_FLAGS = {
    "--ratio -0.2": ("--ratio -0.2 is outside",),
    "--ratio nan": ("--ratio nan is outside",),
    "--ratio inf": ("--ratio inf is outside",),
    "--ratio 1.5": ("--ratio 1.5 is outside",),
    "--max-num-seqs 0": ("--max-num-seqs", "not a whole number ≥ 1"),
    "--engine torch --quantization fp8 -tp 2": ("--quantization, --tensor-parallel-size: only the vLLM engine",),
    "--model-name x --ratio -1": ("--model-name is deprecated", "use --served-model-name", "--ratio -1.0 is outside"),
}
# The same checks in-process, where argparse itself refuses the value.
UNPARSABLE_FLAGS = {
    "--max-model-len -5": "not a whole number ≥ 1",
    "--gpu-memory-utilization 1.5": "not a number in (0, 1]",
    "--gpu-memory-utilization nan": "not a number in (0, 1]",
    "--port 70000": "not a port number",
    "--kv-cache-memory-bytes lots": "not a positive size",
    "--max-body-bytes 0": "not a positive size",
    "--tensor-parallel-size 0": "not a whole number ≥ 1",
    "--data-parallel-size 1.5": "not a whole number ≥ 1",
    "--drain-seconds -1": "not a whole number ≥ 0",
    "--kv-cache-dtype fp4": "invalid choice",
}


@pytest.mark.parametrize("flags", list(UNPARSABLE_FLAGS))
def test_unparsable_serve_flags_are_refused_by_name(flags, capsys):
    from hywia.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", *flags.split()])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert flags.split()[0] in error and UNPARSABLE_FLAGS[flags] in error


@pytest.mark.parametrize("flags", list(IMPOSSIBLE_FLAGS))
def test_impossible_serve_flags_fail_at_start_with_a_clear_message(flags, tmp_path):
    """Through the CLI, as a user meets them: the process exits non-zero before binding a port or
    loading a model, and says what is wrong."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "hywia.cli", "serve", "--cache-dir", str(tmp_path), *flags.split()],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    for expected in IMPOSSIBLE_FLAGS[flags]:
        assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "models").exists()


async def _generate(engine, prompt, options):
    text, tokens, finish = "", 0, None
    async for delta in engine.generate(prompt, options, "test"):
        text, tokens, finish = text + delta.text, tokens + delta.new_tokens, delta.finish_reason
    return text, tokens, finish


def test_torch_engine_batches_without_changing_greedy_results(tiny_dir, tokenizer):
    from server.engines.torch_engine import TorchEngine

    prompts = [tokenizer(text).input_ids for text in ("The quick brown fox", "To", "Paris is the capital of")]
    greedy = SamplingOptions(max_tokens=12, temperature=0)

    async def scenario():
        engine = TorchEngine.load(tiny_dir, EngineSettings())
        try:
            one_by_one = [await _generate(engine, p, greedy) for p in prompts]
            together = await asyncio.gather(*[_generate(engine, p, greedy) for p in prompts])
            return one_by_one, list(together)
        finally:
            await engine.shutdown()

    one_by_one, together = asyncio.run(scenario())
    assert together == one_by_one  # left padding and batch rows leaving must not change any token
    assert all(tokens == 12 and finish == "length" for _, tokens, finish in one_by_one)


def test_torch_engine_seeds_sampling_and_forgets_abandoned_requests(tiny_dir, tokenizer):
    from server.engines.torch_engine import TorchEngine

    prompt = tokenizer("It was the best of times").input_ids
    seeded = SamplingOptions(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)

    async def scenario():
        engine = TorchEngine.load(tiny_dir, EngineSettings())
        try:
            first, second = await _generate(engine, prompt, seeded), await _generate(engine, prompt, seeded)
            other = await _generate(engine, prompt, SamplingOptions(max_tokens=16, temperature=1.0, seed=8))
            stream = engine.generate(prompt, SamplingOptions(max_tokens=200, temperature=0), "abandoned")
            await anext(stream)
            running_while_streaming = engine.running_requests()
            await stream.aclose()
            for _ in range(100):
                if engine.running_requests() == 0:
                    break
                await asyncio.sleep(0.05)
            return first, second, other, running_while_streaming, engine.running_requests()
        finally:
            await engine.shutdown()

    first, second, other, running_while_streaming, running_after = asyncio.run(scenario())
    assert first == second and first != other
    assert (running_while_streaming, running_after) == (1, 0)


def test_admission_gate_refuses_beyond_its_limit_and_frees_dropped_slots():
    import gc

    from server.errors import APIError
    from server.limits import AdmissionGate

    gate = AdmissionGate(limit=2)
    first, second = gate.admit(), gate.admit()
    with pytest.raises(APIError) as refused:
        gate.admit()
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    first.release()
    first.release()  # releasing twice frees one slot only
    assert gate.active == 1
    del second  # a response dropped before it ran
    gc.collect()
    assert gate.active == 0


def test_tensor_parallel_serving_prunes_to_shardable_attention(tmp_path):
    """`serve --tensor-parallel-size 2` keeps a multiple of 2 KV groups in every layer, so vLLM can
    shard the export over 2 GPUs (running it needs the GPUs; the shapes do not)."""
    import json

    from hywia.cli import build_parser
    from hywia.commands.serve import prune_options
    from hywia.models import resolve_source
    from hywia.pipeline import prepare_export
    from tests.tiny import save_tiny_model

    source = save_tiny_model(tmp_path / "mha", gqa=False)  # 4 KV heads per layer
    args = build_parser().parse_args(["serve", str(source), "--tensor-parallel-size", "2", "--ratio", "0.4",
                                      "--importance", "magnitude"])
    export = prepare_export(resolve_source(str(source), tmp_path / "cache"), prune_options(args),
                            cache_dir=tmp_path / "cache", progress=False)
    kept = [layer["kv_groups_kept"] for layer in export.report["per_layer"]]
    assert kept and all(k % 2 == 0 and k > 0 for k in kept)
    config = json.loads((export.directory / "config.json").read_text())
    assert config["num_key_value_heads"] % 2 == 0 and config["num_attention_heads"] % 2 == 0


def test_memory_freed_by_pruning_goes_back_to_the_system():
    """glibc keeps freed heap pages below a live allocation mapped; the server trims them after pruning."""
    from server.startup import return_freed_memory

    chunks, pins = [], []
    for _ in range(2000):  # 64 KiB blocks come from the heap (below glibc's mmap threshold), each pinned by a
        chunks.append(bytearray(64 << 10))  # small live block after it, so free() alone cannot shrink the heap
        pins.append(bytearray(64))
    for chunk in chunks:
        chunk[::4096] = b"x" * len(chunk[::4096])  # touch every page: resident, not just reserved
    del chunks
    assert return_freed_memory() >= 64 << 20  # of the 125 MiB freed
    assert len(pins) == 2000
