"""The evaluator on tiny LLaMA models whose answers are known in closed form (seconds each)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from hywia.errors import HywiaError
from hywia.evaluation.perplexity import split_windows, tokenize_text, window_perplexity
from hywia.evaluation.results import above_chance_retention, format_table, retention_report
from hywia.evaluation.scoring import TokenScorer, batch_slices
from hywia.evaluation.tasks import (
    MULTIPLE_CHOICE,
    TASKS,
    ChoiceItem,
    TaskSpec,
    load_choice_items,
    load_perplexity_text,
    parse_limits,
    parse_task_names,
)
from hywia.evaluation.zeroshot import Request, encode_pair, evaluate_choice_task, score_requests
from tests.tiny import tiny_model, tiny_tokenizer

TEXT = ("It was the best of times, it was the worst of times. Paris is the capital of France. "
        "Call me Ishmael. The quick brown fox jumps over the lazy dog. ") * 12
MC_SPEC = TaskSpec("toy", MULTIPLE_CHOICE, "unused")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def uniform_model():
    """lm_head all zeros: every position's next-token distribution is uniform over the vocabulary."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def unigram_model(favoured_tokens: list[int], logit: float = 8.0):
    """A LLaMA that ignores its context: every attention and MLP block writes zero into the residual
    stream and every embedding row is the same vector of ones, so the final hidden state is the same
    at every position and the logits are `logit` for the favoured tokens and 0 for all others."""
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        hidden = model.config.hidden_size
        model.lm_head.weight[favoured_tokens] = logit / hidden  # the norm maps ones to (almost) ones
    return model


def reference_logprob(model, request: Request) -> float:
    """The obvious, unbatched computation: full logits of the whole sequence, one request at a time."""
    limit = model.config.max_position_embeddings
    full = list(request.context_ids + request.continuation_ids)[-(limit + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([full[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    count = len(request.continuation_ids)
    positions = range(len(full) - 1 - count, len(full) - 1)
    return float(sum(logprobs[pos, full[pos + 1]] for pos in positions))


# ---------------------------------------------------------------- perplexity

def test_uniform_model_perplexity_equals_vocabulary_size(tokenizer):
    windows = split_windows(tokenize_text(tokenizer, TEXT), seq_len=32)
    result = window_perplexity(TokenScorer(uniform_model()), windows, batch_size=3)
    assert result.perplexity == pytest.approx(384, rel=1e-6)  # tiny_config's vocab_size
    assert result.tokens_scored == len(windows) * 31


def test_perplexity_is_token_weighted_mean_over_windows(tokenizer):
    model = tiny_model()
    windows = split_windows(tokenize_text(tokenizer, TEXT), seq_len=24)
    result = window_perplexity(TokenScorer(model), windows, batch_size=4, limit=7)  # 7 = 4 + 3: a ragged batch
    with torch.no_grad():  # every window predicts 23 tokens, so the token-weighted mean is the mean of means
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows[:7]]
    assert result.windows == 7 and result.windows_total == len(windows)
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 7), rel=1e-5)


def test_split_windows_drops_the_partial_window_and_keeps_order():
    windows = split_windows(list(range(100)), seq_len=32)
    assert windows.shape == (3, 32)
    assert windows[2, -1] == 95 and windows[1, 0] == 32


def test_batches_respect_the_row_and_token_budgets():
    lengths = [100, 90, 10, 10, 10, 300]
    assert batch_slices(lengths[:5], max_rows=64, max_tokens=200) == [slice(0, 2), slice(2, 5)]
    assert batch_slices(lengths[:5], max_rows=2, max_tokens=10_000) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert batch_slices([300], max_rows=8, max_tokens=200) == [slice(0, 1)]  # a long row still runs, alone


def test_perplexity_texts_follow_the_stated_conventions(data_dir):
    wikitext = load_perplexity_text(TASKS["wikitext2"], data_dir)
    assert wikitext == (data_dir / "wikitext-2-raw/test.txt").read_bytes().decode("utf-8")
    ptb = load_perplexity_text(TASKS["ptb"], data_dir)
    lines = (data_dir / "ptb/test.txt").read_text().splitlines()
    assert ptb.split("\n\n") == [line.strip() for line in lines if line.strip()]


# ---------------------------------------------------------------- zero-shot scoring

def test_encode_pair_moves_trailing_space_and_splits_the_joint_encoding(tokenizer):
    request = encode_pair(tokenizer, "Question: capital of France?\nAnswer: ", "Paris")
    same = encode_pair(tokenizer, "Question: capital of France?\nAnswer:", " Paris")
    assert request == same
    whole = tokenizer("Question: capital of France?\nAnswer: Paris", add_special_tokens=False)["input_ids"]
    assert list(request.context_ids + request.continuation_ids) == whole
    assert tokenizer.decode(list(request.continuation_ids)) == " Paris"


def test_planted_gold_answer_is_chosen_and_scored_exactly(tokenizer):
    context = "Question: What is the capital of France?\nAnswer:"
    choices = ["Paris", "London", "Berlin"]
    favoured = list(encode_pair(tokenizer, context, " Paris").continuation_ids)
    for distractor in choices[1:]:  # precondition of the construction: distractors share no favoured token
        assert not set(encode_pair(tokenizer, context, " " + distractor).continuation_ids) & set(favoured)
    model = unigram_model(favoured)
    items = []
    for shift in range(3):  # the gold answer at every position
        rotated = choices[shift:] + choices[:shift]
        items.append(ChoiceItem((context,) * 3, tuple(" " + c for c in rotated), rotated.index("Paris"),
                                tuple(rotated)))
    result = evaluate_choice_task(TokenScorer(model), tokenizer, MC_SPEC, items, items_total=3, batch_size=2)
    assert result.acc == 1.0 and result.acc_norm == 1.0

    # And the number itself: log p = logit − logsumexp(logits), summed over the continuation's tokens.
    with torch.no_grad():
        logits = model(torch.tensor([[5]])).logits[0, -1].double()
    expected = float(sum(logits[t] - torch.logsumexp(logits, 0) for t in favoured))
    scored = score_requests(TokenScorer(model), [encode_pair(tokenizer, context, " Paris")])
    assert scored[0] == pytest.approx(expected, abs=1e-4)
    assert expected > -2.0  # the planted answer is likely; an unfavoured token costs about 8 nats more


def test_acc_norm_differs_from_acc_when_choice_lengths_differ(tokenizer):
    # Under a uniform model every token costs log V, so log p(choice) = −tokens · log V exactly: acc picks
    # the choice with the fewest tokens, acc_norm the fewest tokens per character.
    context, short, long = "Question: Which?\nAnswer:", "x", "it was the best of times, it was the worst of times"
    short_tokens = len(encode_pair(tokenizer, context, " " + short).continuation_ids)
    long_tokens = len(encode_pair(tokenizer, context, " " + long).continuation_ids)
    assert short_tokens < long_tokens and long_tokens / len(long) < short_tokens / len(short)  # precondition
    model = uniform_model()
    item = ChoiceItem((context,) * 2, (" " + short, " " + long), gold=1, choice_texts=(short, long))
    result = evaluate_choice_task(TokenScorer(model), tokenizer, MC_SPEC, [item], items_total=1)
    assert result.acc == 0.0 and result.acc_norm == 1.0
    scores = score_requests(TokenScorer(model), [encode_pair(tokenizer, context, " " + c) for c in (short, long)])
    assert scores == pytest.approx([-short_tokens * math.log(384), -long_tokens * math.log(384)], rel=1e-6)


@pytest.mark.parametrize("row_cap", [2048, 12])  # 12 tokens: packed rows overflow and repeat their context
def test_packed_batched_scores_match_one_request_at_a_time(tokenizer, monkeypatch, row_cap):
    monkeypatch.setattr("hywia.evaluation.packing.MAX_PACKED_TOKENS", row_cap)
    model = tiny_model()
    texts = [("The quick brown fox", " jumps"), ("The quick brown fox", " sleeps all day long"),
             ("The quick brown fox", " sleeps all day long"), ("The quick brown fox", " sleeps"),
             ("Call me", " Ishmael."), ("Paris is the capital of", " France"), ("Paris is the capital of", " Spain"),
             ("", " To be, or not to be"), ("It was the best of times, " * 50, "it was the worst of times.")]
    requests = [encode_pair(tokenizer, context, continuation) for context, continuation in texts]
    assert len(requests[-1].context_ids) > model.config.max_position_embeddings  # exercises left truncation
    batched = score_requests(TokenScorer(model), requests, batch_size=3)
    assert batched == pytest.approx([reference_logprob(model, r) for r in requests], abs=1e-4)


def test_models_without_a_decoder_head_split_score_the_same(tokenizer):
    class LogitsOnly(torch.nn.Module):  # a causal LM that only exposes forward(...).logits
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    model = tiny_model()
    requests = [encode_pair(tokenizer, "Call me", " Ishmael."), encode_pair(tokenizer, "The quick", " brown fox")]
    assert score_requests(TokenScorer(LogitsOnly(model)), requests) == pytest.approx(
        score_requests(TokenScorer(model), requests), abs=1e-5)


def test_winogrande_scores_the_shared_continuation_after_each_option(tokenizer, data_dir):
    items = load_choice_items(TASKS["winogrande"], data_dir, limit=4)
    model = tiny_model()
    result = evaluate_choice_task(TokenScorer(model), tokenizer, TASKS["winogrande"], items, items_total=1267)
    expected = []
    for item in items:
        lls = [reference_logprob(model, encode_pair(tokenizer, c, k)) for c, k in zip(item.contexts, item.continuations)]
        expected.append(float(max(range(2), key=lambda i: (lls[i], -i)) == item.gold))
    assert result.acc == pytest.approx(sum(expected) / len(items))
    assert result.acc_norm is None and result.chance == 0.5


# ---------------------------------------------------------------- task data and options

def test_task_files_become_harness_style_pairs(data_dir):
    piqa = load_choice_items(TASKS["piqa"], data_dir, limit=3)
    assert len(piqa) == 3 and piqa[0].contexts[0].startswith("Question: ")
    assert piqa[0].contexts[0].endswith("?\nAnswer:") and piqa[0].continuations[0] == " " + piqa[0].choice_texts[0]
    wino = load_choice_items(TASKS["winogrande"], data_dir, limit=1)[0]
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.gold == 1
    obqa = load_choice_items(TASKS["openbookqa"], data_dir, limit=1)[0]
    assert obqa.contexts[0].endswith("decide the best way to save money is to")


def test_missing_data_file_names_the_path_and_the_option(tmp_path):
    with pytest.raises(HywiaError) as error:
        load_choice_items(TASKS["piqa"], tmp_path)
    assert str(tmp_path / "zeroshot/piqa.jsonl") in str(error.value) and "--data-dir" in str(error.value)


def test_task_names_and_limits_are_validated():
    assert parse_task_names("all") == list(TASKS)
    with pytest.raises(HywiaError, match="hellaswag"):
        parse_task_names("piqa,hellaswag")
    assert parse_limits("200", ["piqa", "ptb"]) == {"piqa": 200, "ptb": 200}
    assert parse_limits("ptb=40", ["piqa", "ptb"]) == {"piqa": None, "ptb": 40}
    for bad in ("many", "boolq=3", "0"):
        with pytest.raises(HywiaError):
            parse_limits(bad, ["piqa", "ptb"])


# ---------------------------------------------------------------- results

def test_above_chance_retention():
    assert above_chance_retention(0.6, 0.7, 0.5) == pytest.approx(0.5)
    assert above_chance_retention(0.25, 0.40, 0.25) == 0.0
    assert above_chance_retention(0.6, 0.5, 0.5) is None  # dense at chance: nothing to retain


def test_retention_report_per_task_and_on_the_average():
    def run(piqa, arc):
        return {"tasks": {
            "wikitext2": {"kind": "perplexity", "perplexity": 50.0},
            "piqa": {"kind": "multiple_choice", "headline": piqa, "chance": 0.5, "items": 200},
            "arc_easy": {"kind": "multiple_choice", "headline": arc, "chance": 0.25, "items": 200}}}
    report = retention_report(run(0.60, 0.40), run(0.70, 0.55))
    assert report["piqa"] == pytest.approx(0.5) and report["arc_easy"] == pytest.approx(0.5)
    assert report["average"] == pytest.approx((0.5 - 0.375) / (0.625 - 0.375))
    assert "wikitext2" not in report


# ---------------------------------------------------------------- the CLI

def test_cli_prints_a_table_and_writes_json(tiny_gqa_dir, data_dir, tmp_path, capsys):
    from hywia.cli import main

    output = tmp_path / "eval.json"
    code = main(["eval", str(tiny_gqa_dir), "--tasks", "wikitext2,ptb,piqa,boolq,winogrande",
                 "--data-dir", str(data_dir), "--limit", "wikitext2=3,ptb=2,piqa=4,boolq=3,winogrande=4",
                 "--seq-len", "64", "--batch-size", "2", "--output", str(output)])
    assert code == 0
    payload = json.loads(output.read_text())
    assert payload["tasks"]["wikitext2"]["windows"] == 3 and payload["tasks"]["ptb"]["seq_len"] == 64
    assert payload["tasks"]["piqa"]["items"] == 4 and payload["tasks"]["piqa"]["items_total"] == 1838
    assert payload["tasks"]["boolq"]["headline_metric"] == "acc"
    assert 0.0 <= payload["average_accuracy"] <= 1.0 and "--limit" in payload["command"]
    table = capsys.readouterr().out
    assert all(name in table for name in ("wikitext2", "ptb", "piqa", "boolq", "winogrande", "average"))
    assert format_table(payload) in table


def test_harness_without_lm_eval_says_how_to_install(tiny_gqa_dir, data_dir, monkeypatch, capsys):
    from hywia.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail even where it is installed
    code = main(["eval", str(tiny_gqa_dir), "--tasks", "piqa", "--data-dir", str(data_dir), "--harness"])
    assert code == 2
    message = capsys.readouterr().err
    assert "lm-evaluation-harness" in message and "pip install" in message


def test_harness_gets_the_model_directory_and_the_harness_task_names(tiny_gqa_dir, monkeypatch, tmp_path, capsys):
    import types

    from hywia.cli import main

    calls = []

    def simple_evaluate(**kwargs):  # stands in for lm_eval.simple_evaluate: records what it was asked
        calls.append(kwargs)
        return {"results": {"piqa": {"acc,none": 0.61, "alias": "piqa"}, "arc_challenge": {"acc_norm,none": 0.3}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    output = tmp_path / "harness.json"
    assert main(["eval", str(tiny_gqa_dir), "--tasks", "piqa,arc_challenge", "--harness", "--limit", "20",
                 "--output", str(output)]) == 0
    assert calls == [{"model": "hf", "model_args": f"pretrained={tiny_gqa_dir},dtype=float32",
                      "tasks": ["piqa", "arc_challenge"], "limit": 20, "batch_size": 64, "device": "cpu"}]
    assert "acc,none" in capsys.readouterr().out
    assert json.loads(output.read_text())["results"]["piqa"]["acc,none"] == 0.61
    with pytest.raises(HywiaError, match="ptb"):  # no harness task of that name: said before any work
        from hywia.evaluation.harness import harness_task_names
        harness_task_names(["piqa", "ptb"])


def test_missing_data_dir_is_a_clear_error(tiny_gqa_dir, monkeypatch, capsys):
    from hywia.cli import main

    monkeypatch.delenv("HYWIA_DATA_DIR", raising=False)
    assert main(["eval", str(tiny_gqa_dir), "--tasks", "piqa", "--data-dir", ""]) == 2
    assert "--data-dir" in capsys.readouterr().err
