"""The OpenAI API end to end: a real `hywia serve` process on a free loopback port, the official
`openai` client (and httpx where a raw body matters), on both engines:

* torch: a tiny random LLaMA, pruned at 20% at start-up, served next to its dense original;
* vllm (slow): the real default model (SmolLM2-135M-Instruct) pruned at 20%, started once.

Every test here runs against both; engine-specific checks live in their own modules.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from hywia.bench.process import ServerProcess, free_port
from hywia.bench.scrape import scrape
from tests.conftest import TEST_CACHE

API_KEY = "test-key"
STARTUP_PHASES = {"loading", "pruning", "starting-engine"}
LONG_ANSWER = "Write a long story about a cat who travels around the world."


@dataclass
class Served:
    engine: str
    process: ServerProcess
    model: str  # the pruned model's id
    dense_model: str  # the unpruned source, served next to it (--serve-dense)
    tokenizer: object
    context: int

    @property
    def url(self) -> str:
        return self.process.base_url

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=300)

    def metrics(self):
        return scrape(self.url)


def serve_command(source: str | None, port: int, cache_dir: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "hywia.cli", "serve"]
    if source is not None:
        command.append(source)
    return command + ["--port", str(port), "--cache-dir", str(cache_dir), "--api-key", API_KEY, *extra]


def start(command: list[str], port: int, log_path: Path, timeout: float) -> ServerProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    process = ServerProcess(command, port, log_path, env=env).start()
    try:
        process.wait_until_ready(timeout)
    except BaseException:
        process.stop()
        raise
    return process


def tiny_server_options() -> list[str]:
    # Few, short calibration samples and no fusion training: the tiny model prunes in seconds.
    # No repair either: these tests are about the API, and a re-fitted random model's greedy text is empty.
    return ["--engine", "torch", "--ratio", "0.2", "--importance", "fixed", "--samples", "4", "--seq-len", "32",
            "--reconstruct", "none", "--recover", "none"]


@pytest.fixture(scope="module", params=["torch", pytest.param("vllm", marks=pytest.mark.slow)])
def served(request, tmp_path_factory) -> Served:
    work = tmp_path_factory.mktemp(f"serve-{request.param}")
    port = free_port()
    if request.param == "torch":
        from tests.tiny import save_tiny_model

        # A context long enough that a 1000-token answer takes seconds: the disconnect test needs
        # a generation still running when its client leaves.
        source = save_tiny_model(work / "tiny", gqa=True, max_position_embeddings=2048)
        cache_dir = work / "cache"
        command = serve_command(str(source), port, cache_dir, *tiny_server_options(), "--serve-dense")
        model, dense_model, timeout = "tiny-pruned20", "tiny", 300
    else:
        # The shared test cache: the default model is converted, and its export pruned, once per machine.
        # Book text for calibration and the fixed blend keep that one pruning to a few minutes on 2 cores.
        calibration = request.getfixturevalue("data_dir") / "calibration" / "gutenberg"
        command = serve_command(None, port, TEST_CACHE, "--engine", "vllm", "--ratio", "0.2",
                                "--importance", "fixed", "--calibration", str(calibration), "--samples", "8",
                                "--seq-len", "64", "--reconstruct", "none", "--recover", "none", "--kv-cache-memory-bytes", "256MiB", "--max-model-len", "512",
                                "--serve-dense", "--enforce-eager")
        model, dense_model, timeout = "smollm2-135m-instruct-pruned20", "smollm2-135m-instruct", 1500
    process = start(command, port, work / "server.log", timeout)
    try:
        report = httpx.get(f"{process.base_url}/v1/hywia/report",
                           headers={"Authorization": f"Bearer {API_KEY}"}).json()
        served_model = next(entry for entry in report["data"] if entry["model"] == model)
        tokenizer = AutoTokenizer.from_pretrained(served_model["directory"])
        context = next(card["max_model_len"] for card in httpx.get(
            f"{process.base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
            if card["id"] == model)
        yield Served(request.param, process, model, dense_model, tokenizer, context)
    finally:
        status = process.stop()
    # Stopping is part of serving: SIGTERM ends the server, both engines included, with status 0 and
    # nothing printed at interpreter exit (a vLLM engine kept alive past its shutdown used to print
    # "Exception ignored in AsyncLLM.__del__" there).
    assert status == 0, process.log_tail()
    assert "Exception ignored" not in process.log_path.read_text(errors="replace"), process.log_tail()


def chat_prompt_tokens(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def greedy_completion(served: Served, prompt: str, max_tokens: int, **extra):
    return served.client().completions.create(model=served.model, prompt=prompt, max_tokens=max_tokens,
                                              temperature=0, **extra)


# ------------------------------------------------------------------------------------ start-up


def test_health_says_the_phase_until_ready(served):
    statuses = [(status, body["status"]) for status, body in served.process.health_seen]
    assert statuses[-1] == (200, "ready")
    before_ready = statuses[:-1]
    assert before_ready, "the port should answer /health while the model is still being prepared"
    assert all(status == 503 and phase in STARTUP_PHASES for status, phase in before_ready)


def test_models_lists_every_served_model(served):
    ids = {model.id for model in served.client().models.list()}
    assert ids == {served.model, served.dense_model}


def test_report_describes_the_pruning(served):
    response = httpx.get(f"{served.url}/v1/hywia/report", headers={"Authorization": f"Bearer {API_KEY}"})
    entries = {entry["model"]: entry for entry in response.json()["data"]}
    pruned = entries[served.model]
    assert pruned["pruned"] is True
    assert pruned["report"]["params_after"] < pruned["report"]["params_before"]
    assert pruned["parameters"] == pruned["report"]["params_after"]
    assert pruned["weight_bytes"] < pruned["unpruned_weight_bytes"]
    assert entries[served.dense_model]["pruned"] is False
    assert entries[served.dense_model]["report"] is None


# ------------------------------------------------------------------------------------ generation


def test_chat_usage_matches_tokenizer_and_max_tokens(served):
    messages = [{"role": "user", "content": LONG_ANSWER}]
    # ignore_eos: the counts must not depend on whether the pruned model ends its reply early
    response = served.client().chat.completions.create(model=served.model, messages=messages, max_tokens=12,
                                                       temperature=0, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content is not None
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens == chat_prompt_tokens(served.tokenizer, messages)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12
    assert response.model == served.model


def test_completion_usage_matches_tokenizer(served):
    prompt = "Once upon a time, in a small village by the sea,"
    response = greedy_completion(served, prompt, max_tokens=7, extra_body={"ignore_eos": True})
    assert response.usage.prompt_tokens == len(served.tokenizer(prompt).input_ids)
    assert response.usage.completion_tokens == 7
    assert response.choices[0].finish_reason == "length"
    # No assertion on the text: 7 tokens of a random tiny model may all decode to nothing (special tokens).


def test_stop_string_ends_the_text_before_it(served):
    prompt = "The history of the city begins"
    full = greedy_completion(served, prompt, max_tokens=24).choices[0].text
    # A stop string that first occurs inside the text, not at its start; a random tiny model may repeat one
    # token throughout, and then the stop string is the text's start (the reply is empty, finish 'stop').
    start = next((i for i in range(2, len(full) - 2) if full.find(full[i:i + 2]) == i and full[i:i + 2].strip()), 0)
    stop = full[start:start + 2]
    response = greedy_completion(served, prompt, max_tokens=24, stop=[stop])
    assert response.choices[0].text == full[:start]
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens <= 24


def test_completion_stream_parses_and_matches_the_whole_answer(served):
    prompt = "In the morning the market was"
    whole = greedy_completion(served, prompt, max_tokens=10)
    chunks = list(greedy_completion(served, prompt, max_tokens=10, stream=True,
                                    stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_parses_and_matches_the_whole_answer(served):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": LONG_ANSWER}]
    client = served.client()
    whole = client.chat.completions.create(model=served.model, messages=messages, max_tokens=9, temperature=0)
    chunks = list(client.chat.completions.create(model=served.model, messages=messages, max_tokens=9,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage, no usage chunk


def test_n_choices_are_seeded_and_reproducible(served):
    def ask():
        # ignore_eos (vLLM's extension, which this server honours too): sampling may pick EOS early.
        return served.client().completions.create(model=served.model, prompt=LONG_ANSWER, max_tokens=6, n=3,
                                                  temperature=1.0, seed=1234, extra_body={"ignore_eos": True})

    first, second = ask(), ask()
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1, "each choice should get its own seed"
    assert all(c.finish_reason == "length" for c in first.choices)
    assert first.usage.completion_tokens == 18 and first.usage.prompt_tokens == len(
        served.tokenizer(LONG_ANSWER).input_ids)


def test_max_tokens_is_capped_to_what_fits_in_the_context(served):
    room = 5
    filler_ids = served.tokenizer("word " * served.context).input_ids[:served.context - room]
    response = served.client().completions.create(model=served.model, prompt=filler_ids, max_tokens=500,
                                                  temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.prompt_tokens == served.context - room
    assert response.usage.completion_tokens == room
    assert response.choices[0].finish_reason == "length"


def test_the_dense_model_is_served_under_its_own_id(served):
    response = served.client().completions.create(model=served.dense_model, prompt="Hello", max_tokens=3,
                                                  temperature=0)
    assert response.model == served.dense_model and response.usage.completion_tokens == 3


# ------------------------------------------------------------------------------------ vLLM's extensions
# The vLLM engine honours them; the torch engine refuses each with a 400 that names the field.

EXTENSION_FIELDS = {"logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3,
                    "min_tokens": 2}


def _refused_by_torch(served: Served, path: str, body: dict, field: str) -> None:
    response = _post(served, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_by_engine", field)
    assert "--engine vllm" in error["message"]


@pytest.mark.parametrize("field", list(EXTENSION_FIELDS))
def test_extensions_are_honoured_by_vllm_and_refused_by_torch(served, field):
    body = _text(served.model, max_tokens=4, temperature=0, **{field: EXTENSION_FIELDS[field]})
    if served.engine == "torch":
        _refused_by_torch(served, TEXT, body, field)
        return
    response = _post(served, TEXT, body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 2


def test_repetition_penalty_changes_a_greedy_answer_on_vllm(served):
    if served.engine == "torch":
        return _refused_by_torch(served, TEXT, _text(served.model, repetition_penalty=2.0), "repetition_penalty")
    prompt = "List the days of the week: Monday, Tuesday, Monday, Tuesday, Monday, Tuesday,"
    plain = greedy_completion(served, prompt, max_tokens=16).choices[0].text
    penalised = greedy_completion(served, prompt, max_tokens=16, extra_body={"repetition_penalty": 2.0}).choices[0].text
    assert penalised != plain


def test_chat_logprobs_describe_each_greedy_token(served):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    if served.engine == "torch":
        return _refused_by_torch(served, CHAT, _chat(served.model, messages=messages, logprobs=True), "logprobs")
    client = served.client()
    response = client.chat.completions.create(model=served.model, messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens  # an end-of-sequence token counts, as in vLLM
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        # Greedy: the chosen token is the most likely one, and the alternatives come best first.
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.bytes == list(entry.token.encode())
    # The tokens spell the answer (followed by the end-of-sequence token when the answer stopped).
    spelled, answer = "".join(entry.token for entry in content), response.choices[0].message.content
    assert spelled == answer or (response.choices[0].finish_reason == "stop" and spelled.startswith(answer))
    streamed = list(client.chat.completions.create(model=served.model, messages=messages, max_tokens=6,
                                                   temperature=0, logprobs=True, stream=True))
    tokens = [entry.token for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for entry in chunk.choices[0].logprobs.content]
    assert tokens == [entry.token for entry in content]


def test_completion_echo_returns_the_prompt_and_its_logprobs(served):
    prompt = "The capital of France is"
    prompt_tokens = len(served.tokenizer(prompt).input_ids)
    echoed = greedy_completion(served, prompt, max_tokens=3, echo=True)  # echo alone: any engine
    plain = greedy_completion(served, prompt, max_tokens=3)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    if served.engine == "torch":
        return _refused_by_torch(served, TEXT, _text(served.model, echo=True, logprobs=1), "logprobs")
    # What lm-eval's local-completions sends to score a continuation.
    response = greedy_completion(served, prompt, max_tokens=1, echo=True, logprobs=1)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == prompt_tokens + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(value <= 0 for value in logprobs.token_logprobs[1:])
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    # The generated token's logprob is the same whether or not the prompt is echoed.
    alone = greedy_completion(served, prompt, max_tokens=1, logprobs=1).choices[0].logprobs
    assert alone.token_logprobs[0] == pytest.approx(logprobs.token_logprobs[-1], abs=1e-4)
    assert alone.tokens == logprobs.tokens[-1:]


# ------------------------------------------------------------------------------------ errors


def _post(served: Served, path: str, body=None, key: str | None = API_KEY, raw: bytes | None = None):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(served.url + path, json=body if raw is None else None, content=raw, headers=headers,
                      timeout=60)


def _chat(model: str, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


def _text(model: str, **fields) -> dict:
    return {"model": model, "prompt": "Hi", "max_tokens": 2, **fields}


@dataclass(frozen=True)
class BadRequest:
    path: str
    body: object = None  # callable(model id) -> JSON body
    raw: bytes | None = None  # a raw body instead (not JSON, or not UTF-8)
    status: int = 400
    code: str | None = None
    key: str | None = API_KEY
    content_type: str = "application/json"
    method: str = "POST"


CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
BAD_REQUESTS = {
    # access
    "missing key": BadRequest(CHAT, _chat, status=401, code="invalid_api_key", key=None),
    "wrong key": BadRequest(CHAT, _chat, status=401, code="invalid_api_key", key="nope"),
    "unknown model": BadRequest(CHAT, lambda m: _chat("no-such-model"), status=404, code="model_not_found"),
    # bodies that are not the JSON object asked for
    "malformed json": BadRequest(CHAT, raw=b'{"model": "x", "messages": ['),
    "invalid utf-8": BadRequest(CHAT, raw=b'{"model": "\xff\xfe", "messages": []}'),
    "empty body": BadRequest(CHAT, raw=b""),
    "json array": BadRequest(CHAT, raw=b"[]"),
    "json string": BadRequest(TEXT, raw=b'"prompt"'),
    "text/plain body": BadRequest(TEXT, raw=b"hello", content_type="text/plain"),
    "body over the limit": BadRequest(TEXT, raw=b'{"model": "m", "prompt": "' + b"x" * (10 << 20) + b'"}',
                                      status=413, code="request_too_large"),
    # missing or mistyped fields
    "missing model": BadRequest(TEXT, lambda m: {"prompt": "x"}),
    "model not a string": BadRequest(TEXT, lambda m: _text(123)),
    "missing messages": BadRequest(CHAT, lambda m: {"model": m}),
    "messages not a list": BadRequest(CHAT, lambda m: _chat(m, messages="Hi")),
    "empty messages": BadRequest(CHAT, lambda m: _chat(m, messages=[])),
    "message without content": BadRequest(CHAT, lambda m: _chat(m, messages=[{"role": "user"}])),
    "content a number": BadRequest(CHAT, lambda m: _chat(m, messages=[{"role": "user", "content": 5}])),
    "image content": BadRequest(CHAT, lambda m: _chat(m, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])),
    "unknown role": BadRequest(CHAT, lambda m: _chat(m, messages=[{"role": "wizard", "content": "x"}])),
    "tool role": BadRequest(CHAT, lambda m: _chat(m, messages=[{"role": "tool", "content": "x"}])),
    "missing prompt": BadRequest(TEXT, lambda m: {"model": m}),
    "prompt an object": BadRequest(TEXT, lambda m: _text(m, prompt={"text": "x"})),
    "empty prompt list": BadRequest(TEXT, lambda m: _text(m, prompt=[])),
    "empty prompt": BadRequest(TEXT, lambda m: _text(m, prompt="")),
    "token id outside vocabulary": BadRequest(TEXT, lambda m: _text(m, prompt=[10**9])),
    "stream not a boolean": BadRequest(TEXT, lambda m: _text(m, stream={"on": 1})),
    "seed not an integer": BadRequest(TEXT, lambda m: _text(m, seed="abc")),
    # values out of range
    "zero max_tokens": BadRequest(TEXT, lambda m: _text(m, max_tokens=0)),
    "negative max_tokens": BadRequest(TEXT, lambda m: _text(m, max_tokens=-5)),
    "absurd max_tokens": BadRequest(TEXT, lambda m: _text(m, max_tokens=10**20)),
    "temperature above 2": BadRequest(TEXT, lambda m: _text(m, temperature=5)),
    "negative temperature": BadRequest(TEXT, lambda m: _text(m, temperature=-0.1)),
    "top_p zero": BadRequest(TEXT, lambda m: _text(m, top_p=0)),
    "top_p above 1": BadRequest(TEXT, lambda m: _text(m, top_p=1.5)),
    "n zero": BadRequest(CHAT, lambda m: _chat(m, n=0)),
    "n 10000": BadRequest(CHAT, lambda m: _chat(m, n=10000)),
    "five stop strings": BadRequest(TEXT, lambda m: _text(m, stop=["a", "b", "c", "d", "e"])),
    "stop a number": BadRequest(TEXT, lambda m: _text(m, stop=7)),
    # features this server does not have
    "logit_bias": BadRequest(TEXT, lambda m: _text(m, logit_bias={"50": 10})),
    "logprobs above 20": BadRequest(TEXT, lambda m: _text(m, logprobs=21)),
    "top_logprobs without logprobs": BadRequest(CHAT, lambda m: _chat(m, top_logprobs=2)),
    "min_tokens above max_tokens": BadRequest(TEXT, lambda m: _text(m, min_tokens=3)),
    "zero repetition_penalty": BadRequest(TEXT, lambda m: _text(m, repetition_penalty=0)),
    "presence_penalty above 2": BadRequest(TEXT, lambda m: _text(m, presence_penalty=2.5)),
    "tools": BadRequest(CHAT, lambda m: _chat(m, tools=[{"type": "function", "function": {"name": "f"}}])),
    "json response format": BadRequest(CHAT, lambda m: _chat(m, response_format={"type": "json_object"})),
    # routes
    "unknown route": BadRequest("/v1/embeddings", lambda m: {"model": m, "input": "x"}, status=404),
    "wrong method": BadRequest(CHAT, method="GET", status=405),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_their_status_and_an_openai_error(served, case):
    bad = BAD_REQUESTS[case]
    headers = {"content-type": bad.content_type}
    if bad.key is not None:
        headers["Authorization"] = f"Bearer {bad.key}"
    content = bad.raw if bad.raw is not None else (
        json.dumps(bad.body(served.model)).encode() if bad.body is not None else None)
    response = httpx.request(bad.method, served.url + bad.path, content=content, headers=headers, timeout=60)
    assert response.status_code == bad.status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in response.text
    if bad.code is not None:
        assert error["code"] == bad.code


def test_the_server_still_answers_after_bad_requests(served):
    for case in ("malformed json", "invalid utf-8", "body over the limit", "n 10000"):
        test_bad_requests_get_their_status_and_an_openai_error(served, case)
    # ignore_eos: the count must not depend on whether the pruned model ends its text at once
    assert greedy_completion(served, "Still fine?", max_tokens=2, extra_body={"ignore_eos": True}).usage.completion_tokens == 2


def test_prompt_longer_than_the_context_is_a_400(served):
    too_long = served.tokenizer("word " * (served.context + 10)).input_ids[:served.context + 5]
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().completions.create(model=served.model, prompt=too_long, max_tokens=1)
    assert caught.value.status_code == 400
    assert caught.value.body["code"] == "context_length_exceeded"
    # …and the server keeps serving.
    assert greedy_completion(served, "Still there?", max_tokens=2, extra_body={"ignore_eos": True}).usage.completion_tokens == 2


def test_the_openai_client_sees_typed_errors(served):
    with pytest.raises(openai.AuthenticationError):
        served.client(api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        served.client().completions.create(model="missing", prompt="x", max_tokens=1)


# ------------------------------------------------------------------------------------ metrics


def test_metrics_move_by_exactly_n_requests(served):
    before = served.metrics()
    responses = [greedy_completion(served, f"Request number {i} says", max_tokens=3) for i in range(3)]
    after = served.metrics()
    model = served.model

    def moved(name, **labels):
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("hywia_requests_total", model_name=model, status="200") == 3
    assert moved("hywia_prompt_tokens_total", model_name=model) == sum(r.usage.prompt_tokens for r in responses)
    assert moved("hywia_generation_tokens_total", model_name=model) == sum(r.usage.completion_tokens for r in responses)
    for histogram in ("hywia_request_latency_seconds", "hywia_time_to_first_token_seconds",
                      "hywia_time_per_output_token_seconds"):
        assert moved(f"{histogram}_count", model_name=model) == 3, histogram
    assert after.value("hywia_requests_in_flight", model_name=model) == 0


def test_refused_requests_are_counted_by_status(served):
    before = served.metrics()
    _post(served, "/v1/completions", {"model": served.model, "prompt": "x", "max_tokens": 0})
    _post(served, "/v1/completions", {"model": "no-such-model", "prompt": "x"})
    after = served.metrics()
    assert after.total("hywia_requests_total", status="400") - before.total("hywia_requests_total", status="400") == 1
    assert after.total("hywia_requests_total", status="404") - before.total("hywia_requests_total", status="404") == 1


def test_metrics_describe_memory_and_size_of_each_model(served):
    samples = served.metrics()
    for model in (served.model, served.dense_model):
        for checkpoint in ("served", "unpruned"):
            assert samples.value("hywia_model_parameters", model_name=model, checkpoint=checkpoint) > 0
            assert samples.value("hywia_model_weight_bytes", model_name=model, checkpoint=checkpoint) > 0
    assert (samples.value("hywia_model_parameters", model_name=served.model, checkpoint="served")
            < samples.value("hywia_model_parameters", model_name=served.model, checkpoint="unpruned"))
    assert samples.value("process_resident_memory_bytes") > 0  # prometheus_client's: not duplicated by ours
    assert not [name for name in samples.names() if name.startswith("hywia_resident")]
    assert ("hywia_child_processes_resident_memory_bytes", frozenset()) in samples
    assert ("hywia_engine_running_requests", frozenset({("model_name", served.model)})) in samples


def test_clients_that_disconnect_abort_their_generations(served):
    import asyncio

    clients = 16
    before = served.metrics()
    body = {"model": served.model, "prompt": LONG_ANSWER, "max_tokens": 1000, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def read_one_event_then_leave(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", f"{served.url}/v1/completions", json=body, headers=headers) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return  # leaving the block closes the connection mid-stream

    async def cut_streams() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(read_one_event_then_leave(client) for _ in range(clients)))

    asyncio.run(cut_streams())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples = served.metrics()
        if (samples.value("hywia_requests_in_flight", model_name=served.model) == 0
                and samples.value("hywia_engine_running_requests", model_name=served.model) == 0):
            break
        time.sleep(0.2)
    else:
        pytest.fail("aborted requests were still running 60 s after their clients left")

    def moved(name, **labels):
        return samples.value(name, model_name=served.model, **labels) - before.value(name, model_name=served.model, **labels)

    assert moved("hywia_requests_total", status="499") == clients
    assert moved("hywia_requests_total", status="200") == 0
    prompt_tokens = len(served.tokenizer(LONG_ANSWER).input_ids)
    full_answers = clients * min(1000, served.context - prompt_tokens)
    assert moved("hywia_generation_tokens_total") < full_answers / 2  # they stopped early, not at the end
    # …and the server still answers.
    assert greedy_completion(served, "After the storm", max_tokens=2,
                             extra_body={"ignore_eos": True}).usage.completion_tokens == 2


def test_vllm_series_are_exposed_next_to_ours(served):
    greedy_completion(served, "One more", max_tokens=2)
    samples = served.metrics()
    if served.engine != "vllm":
        # The torch engine never starts vLLM, so /metrics must not carry stale or empty vllm:* series.
        assert not [name for name in samples.names() if name.startswith("vllm:")]
        return
    # Two engines run in this process; vLLM's series describe the pruned one (see startup).
    for name in ("vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count"):
        assert samples.total(name, model_name=served.model) > 0, name
    assert "vllm:num_requests_running" in samples.names()


# ------------------------------------------------------------------------------------ fuzzing

def _fuzz_bodies():
    """(path, body) near the request schema: a third valid bodies, a third valid bodies with one field
    swapped for junk, a third junk. max_tokens stays small wherever a body may be valid (absent, it
    would mean "up to the context": slow)."""
    from hypothesis import strategies as st

    junk = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=6)
    sampling = {
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "n": st.integers(1, 3),
        "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
        "seed": st.integers(-2**63, 2**63 - 1), "stream": st.booleans(), "ignore_eos": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "user": st.text(max_size=8),
    }
    content = st.text(max_size=40) | st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}), min_size=1, max_size=2)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                     "content": content})
    chat = st.fixed_dictionaries(
        {"model": st.just("MODEL"), "max_tokens": st.integers(1, 3),
         "messages": st.lists(message, min_size=1, max_size=3)}, optional=sampling)
    text = st.fixed_dictionaries(
        {"model": st.just("MODEL"), "max_tokens": st.integers(1, 3),
         "prompt": st.text(max_size=40) | st.lists(st.integers(0, 300), min_size=1, max_size=6)
         | st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=2)}, optional=sampling)
    valid = st.tuples(st.just(CHAT), chat) | st.tuples(st.just(TEXT), text)

    @st.composite
    def one_field_junked(draw):
        path, body = draw(valid)
        key = draw(st.sampled_from(sorted(body) + ["messages", "prompt", "logprobs", "tools", "unknown"]))
        value = draw(junk)
        if key == "max_tokens" and isinstance(value, int) and not isinstance(value, bool) and value > 3:
            value = -value  # junk, but never a long generation
        return path, {**body, key: value}

    all_junk = st.tuples(st.sampled_from([CHAT, TEXT]),
                         st.dictionaries(st.sampled_from(["model", "messages", "prompt", "n", "stop", "stream"]),
                                         junk, max_size=4).map(lambda body: {**body, "max_tokens": 2}))
    return valid | one_field_junked() | all_junk


def test_fuzzed_requests_never_get_a_server_error(served):
    from hypothesis import HealthCheck, given, settings

    client = httpx.Client(base_url=served.url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"})

    @settings(max_examples=200 if served.engine == "torch" else 50, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_fuzz_bodies())
    def check(path_and_body):
        path, body = path_and_body
        body = json.loads(json.dumps(body, allow_nan=True).replace('"MODEL"', json.dumps(served.model)))
        response = client.post(path, content=json.dumps(body, allow_nan=True),
                               headers={"content-type": "application/json"})
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        elif body.get("stream") is True:
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert not any('"error"' in event for event in events[:-1]), (body, events)

    with client:
        check()
    assert served.metrics().value("hywia_requests_in_flight", model_name=served.model) == 0
