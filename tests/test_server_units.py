"""Server parts on their own: text streaming, request validation, sizes, flags, the torch engine."""

from __future__ import annotations

import asyncio

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
    for bad in ({"n": MAX_N + 1}, {"logprobs": True}, {"tools": [{"type": "function"}]},
                {"temperature": 2.5}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": ""},
                {"response_format": {"type": "json_object"}}, {"messages": []}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(**{**chat, **bad})
    for bad in ({"echo": True}, {"prompt": []}, {"prompt": [[]]}, {"suffix": "x"}):
        with pytest.raises(ValidationError):
            CompletionRequest(**{"model": "m", "prompt": "x", **bad})


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
    from hywia.commands.serve import parse_bytes
    from hywia.pipeline import options_from_args

    parser = build_parser()
    assert options_from_args(parser.parse_args(["serve", "--tensor-parallel-size", "2"])).align_heads == 2
    explicit = parser.parse_args(["serve", "--tensor-parallel-size", "2", "--align-heads", "1"])
    assert options_from_args(explicit).align_heads == 1
    assert parse_bytes("256MiB") == 256 << 20 and parse_bytes("2G") == 2 << 30 and parse_bytes("1024") == 1024
    with pytest.raises(ValueError):
        parse_bytes("lots")


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


def test_percentile_is_nearest_rank():
    from hywia.bench.loadgen import percentile

    values = [float(v) for v in range(1, 11)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (5.0, 10.0, 10.0)
    assert percentile([3.0], 99) == 3.0


def test_bench_targets_parse_or_say_why_not():
    from hywia.commands.bench import parse_target
    from hywia.errors import HywiaError

    target = parse_target("pruned=http://127.0.0.1:8000/,m-pruned20,4242", "key")
    assert (target.label, target.base_url, target.model, target.pid, target.api_key) == (
        "pruned", "http://127.0.0.1:8000", "m-pruned20", 4242, "key")
    with pytest.raises(HywiaError):
        parse_target("http://127.0.0.1:8000,m", None)


def test_tensor_parallel_serving_prunes_to_shardable_attention(tmp_path):
    """`serve --tensor-parallel-size 2` keeps a multiple of 2 KV groups in every layer, so vLLM can
    shard the export over 2 GPUs (running it needs the GPUs; the shapes do not)."""
    import json

    from hywia.cli import build_parser
    from hywia.pipeline import options_from_args, prepare_export
    from tests.tiny import save_tiny_model

    source = save_tiny_model(tmp_path / "mha", gqa=False)  # 4 KV heads per layer
    args = build_parser().parse_args(["serve", str(source), "--tensor-parallel-size", "2", "--ratio", "0.4",
                                      "--importance", "magnitude"])
    export = prepare_export(str(source), options_from_args(args), cache_dir=tmp_path / "cache", progress=False)
    kept = [layer["kv_groups_kept"] for layer in export.report["per_layer"]]
    assert kept and all(k % 2 == 0 and k > 0 for k in kept)
    config = json.loads((export.directory / "config.json").read_text())
    assert config["num_key_value_heads"] % 2 == 0 and config["num_attention_heads"] % 2 == 0
