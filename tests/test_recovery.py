"""Recovery (HyWIA stage 3): LoRA merged into plain weights, distillation that lowers the loss, data masks, errors."""

from __future__ import annotations

import itertools
import json
import re
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from hywia.calibration import PROSE_OPENINGS, calibration_batch
from hywia.errors import HywiaError
from hywia.models import load_model
from hywia.pipeline import PruneOptions, prune_model
from hywia.recovery import (
    _rate_factor,
    add_lora,
    distillation_loss,
    merge_lora,
    recover,
    recovery_loss,
    validate_recovery_options,
)
from hywia.recovery_data import recovery_batches, teacher_targets
from hywia.recovery_prompts import recovery_prompts
from hywia.stopping import PruningStopped, stop_requests
from tests.conftest import REPO_ROOT
from tests.tiny import save_tiny_model

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 200


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "recovery.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def pruned_and_data(tmp_path, text_file):
    """A tiny GQA model: recovery data and teacher targets from the dense model, then pruned in place."""
    loaded = load_model(str(save_tiny_model(tmp_path / "m", gqa=True, layers=2)))
    data = recovery_batches(loaded.tokenizer, loaded.model, data=str(text_file), samples=8, seq_len=32, seed=0,
                            progress=False)
    targets = teacher_targets(loaded.model, data, top_k=8, progress=False)
    prune_model(loaded, PruneOptions(ratio=0.3, importance="fine", calibration=str(text_file), samples=4, seq_len=32),
                progress=False)
    return loaded, data, targets


def logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_equals_adapter_wrapped_model(pruned_and_data):
    loaded, _, _ = pruned_and_data
    model = loaded.model
    before = logits(model)
    wrapped = add_lora(model, rank=4, seed=0)
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)  # B starts at zero: nothing changes yet
    with torch.no_grad():  # a non-trivial adapter, as training would leave it
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    adapted = logits(model)
    assert (adapted - before).abs().max() > 1e-2
    merged = merge_lora(wrapped)
    assert merged is model and type(merged) is LlamaForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=1e-5)


def test_recover_lowers_distillation_loss_and_returns_a_plain_model(pruned_and_data):
    loaded, data, targets = pruned_and_data
    model = loaded.model
    shapes = {name: (p.shape, p.requires_grad) for name, p in model.named_parameters()}
    all_rows = torch.arange(len(data))
    with torch.no_grad():
        kd_before = recovery_loss(model, data, targets, all_rows, kd_weight=1.0)[1]
    report = recover(model, data, targets, steps=12, lr=5e-3, rank=4, batch_size=4, kd_weight=1.0, seed=0,
                     progress=False)
    with torch.no_grad():
        kd_after = recovery_loss(model, data, targets, all_rows, kd_weight=1.0)[1]
    assert kd_after < 0.8 * kd_before
    assert len(report.losses) == 12 and report.seconds_per_step > 0 and report.trainable_parameters > 0
    # Merged: the same plain tensors, frozen or not as they came.
    assert {name: (p.shape, p.requires_grad) for name, p in model.named_parameters()} == shapes
    assert not model.training


def test_learning_rate_warms_up_then_decays_to_zero_at_the_last_step():
    factors = [_rate_factor(step, 50, warmup_steps=5) for step in range(50)]
    assert factors[:5] == sorted(factors[:5]) and factors[0] < factors[4]
    assert all(earlier > later for earlier, later in itertools.pairwise(factors[4:]))  # strictly falling after
    assert factors[-1] == pytest.approx(1 / 50)  # the last step still moves, barely


def test_recover_is_deterministic_for_a_seed(tmp_path, text_file):
    results = []
    for _ in range(2):
        loaded = load_model(str(save_tiny_model(tmp_path / f"m{len(results)}", gqa=False, layers=2)))
        data = recovery_batches(loaded.tokenizer, loaded.model, data=str(text_file), samples=6, seq_len=24,
                                progress=False)
        targets = teacher_targets(loaded.model, data, top_k=4, progress=False)
        report = recover(loaded.model, data, targets, steps=3, lr=1e-3, rank=2, batch_size=2, kd_weight=0.5,
                         progress=False)
        results.append((report.losses, logits(loaded.model)))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], atol=0, rtol=0)


def test_a_stop_request_raises_and_leaves_the_model_as_it_was(pruned_and_data):
    loaded, data, targets = pruned_and_data
    before = logits(loaded.model)
    calls = []
    with stop_requests(lambda: calls.append(1) or len(calls) > 2), \
            pytest.raises(PruningStopped, match=r"before step 3 of 5; the adapters were not merged"):
        recover(loaded.model, data, targets, steps=5, lr=1e-2, rank=4, batch_size=4, progress=False)
    assert len(calls) == 3  # two steps taken, the third never started
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())
    torch.testing.assert_close(logits(loaded.model), before, atol=0, rtol=0)


def test_self_data_trains_on_reply_tokens_only(tmp_path):
    loaded = load_model(str(save_tiny_model(tmp_path / "m", gqa=True, layers=2)))
    tokenizer = loaded.tokenizer
    data = recovery_batches(tokenizer, loaded.model, data="self-chat", samples=5, seq_len=128, seed=3,
                            progress=False)
    assert data.input_ids.shape == (5, 128) and data.trained_tokens > 0
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ids, attention, mask in zip(data.input_ids, data.attention_mask, data.loss_mask):
        reply_start = int(mask.nonzero()[0])
        text_before = tokenizer.decode(ids[:reply_start])
        assert text_before.endswith("<|im_start|>assistant\n")  # everything before the reply is the prompt
        assert text_before.count("<|im_start|>") == 2  # the user's turn and the assistant's header
        assert any(prompt in text_before for prompt in recovery_prompts())
        trained = mask.nonzero().flatten()
        assert trained.tolist() == list(range(reply_start, int(trained[-1]) + 1))  # one contiguous reply
        assert not mask[attention == 0].any()  # padding is never trained on
        # A reply ends at its first end-of-turn token, which is trained on (the model must learn to stop).
        assert end_of_turn not in ids[trained[:-1]].tolist()


def test_self_data_is_deterministic_and_varies_with_the_seed(tmp_path):
    loaded = load_model(str(save_tiny_model(tmp_path / "m", gqa=True, layers=2)))
    make = lambda seed: recovery_batches(loaded.tokenizer, loaded.model, samples=4, seq_len=128, seed=seed,
                                         progress=False)
    first, again, other = make(0), make(0), make(1)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.loss_mask, again.loss_mask)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_text_and_mixed_data(tmp_path, text_file):
    loaded = load_model(str(save_tiny_model(tmp_path / "m", gqa=True, layers=2)))
    text = recovery_batches(loaded.tokenizer, loaded.model, data=str(text_file), samples=4, seq_len=32,
                            progress=False)
    assert text.loss_mask[:, 1:].all() and not text.loss_mask[:, 0].any() and text.attention_mask.all()
    mixed = recovery_batches(loaded.tokenizer, loaded.model, data=f"self+{text_file}", samples=6, seq_len=128,
                             progress=False)
    fully_trained = mixed.loss_mask[:, 1:].all(dim=1)
    # Chat replies (loss on the reply only), own text and the file's text alternate, a third each.
    assert fully_trained.tolist() == [False, True, True] * 2
    book_rows = [row for row in range(6) if "the worst of times" in loaded.tokenizer.decode(mixed.input_ids[row])]
    assert book_rows == [2, 5]


def test_self_data_is_chat_replies_and_own_text_half_each(tmp_path):
    loaded = load_model(str(save_tiny_model(tmp_path / "m", gqa=True, layers=2)))
    make = lambda data, samples: recovery_batches(loaded.tokenizer, loaded.model, data=data, samples=samples,
                                                  seq_len=128, seed=0, progress=False)
    own = make("self-text", 2)
    assert own.source == "self-text" and own.loss_mask[:, 1:].all() and not own.loss_mask[:, 0].any()
    # Own text continues the prose openings, in order, each row starting with its whole opening.
    for row, opening in zip(own.input_ids, PROSE_OPENINGS):
        opening_ids = loaded.tokenizer(opening).input_ids
        assert row[:len(opening_ids)].tolist() == opening_ids
    chat = make("self-chat", 2)
    assert not chat.loss_mask[:, 1:].all(dim=1).any()  # the prompt of a chat row is never trained on
    both = make("self", 5)  # the remainder goes to the first source (chat): 3 chat rows, 2 own-text rows
    assert both.loss_mask[:, 1:].all(dim=1).tolist() == [False, True, False, True, False]
    assert torch.equal(both.input_ids[1::2], own.input_ids[:2])  # each source's rows as it makes them alone
    # Own text is sampled from a seed of its own: not the calibration text of the same seed again.
    calibration = calibration_batch("self", loaded.tokenizer, loaded.model, samples=2, seq_len=128, seed=0)
    assert not torch.equal(calibration, own.input_ids)


def test_teacher_targets_are_the_dense_top_k_where_trained(pruned_and_data, tmp_path, text_file):
    loaded = load_model(str(save_tiny_model(tmp_path / "d", gqa=True, layers=2)))
    data = recovery_batches(loaded.tokenizer, loaded.model, data=str(text_file), samples=3, seq_len=16,
                            progress=False)
    targets = teacher_targets(loaded.model, data, top_k=5, batch_size=2, progress=False)
    with torch.no_grad():
        full = torch.log_softmax(loaded.model(input_ids=data.input_ids).logits[:, :-1], dim=-1)
    expected = full.topk(5, dim=-1)
    where = data.predicting_positions()
    torch.testing.assert_close(targets.logprobs[where], expected.values[where], atol=1e-5, rtol=1e-5)
    assert torch.equal(targets.indices[where], expected.indices[where])


def test_distillation_loss_is_zero_for_the_teacher_and_positive_otherwise():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    top = torch.log_softmax(logits, dim=-1).topk(7, dim=-1)
    assert abs(float(distillation_loss(logits, top.values, top.indices))) < 1e-6
    assert float(distillation_loss(logits.flip(-1), top.values, top.indices)) > 0.1
    # With k = vocabulary the coarsened KL is the full KL.
    other = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    full = torch.log_softmax(logits, dim=-1).topk(50, dim=-1)
    exact = torch.nn.functional.kl_div(torch.log_softmax(other, -1), torch.log_softmax(logits, -1), log_target=True,
                                       reduction="batchmean")
    torch.testing.assert_close(distillation_loss(other, full.values, full.indices), exact, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "--recover-steps 0 must be a positive"),
    ({"steps": -3}, "--recover-steps -3 must be a positive"),
    ({"rank": 0}, "--recover-rank 0 must be a positive"),
    ({"lr": 0.0}, "--recover-lr 0.0 must be a positive"),
    ({"lr": float("nan")}, "--recover-lr nan must be a positive"),
    ({"kd_weight": 1.5}, "distillation weight 1.5 is outside"),
    ({"mode": "qlora"}, "--recover 'qlora' is not one of none, lora"),
    ({"data": "/no/such/file.txt"}, "--recover-data /no/such/file.txt does not exist"),
])
def test_bad_options_are_clear_errors(overrides, message):
    with pytest.raises(HywiaError, match=re.escape(message)) as caught:
        validate_recovery_options(**overrides)
    assert caught.value.fix


def test_recover_data_without_text_is_refused(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "notes.md").write_text("not a .txt file")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    with pytest.raises(HywiaError, match="has no non-empty .txt files"):
        validate_recovery_options(data=str(empty_dir))
    with pytest.raises(HywiaError, match="has no text"):
        validate_recovery_options(data=f"self+{blank}")
    validate_recovery_options(mode="none", steps=0, data=str(empty_dir))  # nothing to check without recovery


def test_missing_peft_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(HywiaError, match="needs the peft package") as caught:
        validate_recovery_options()
    assert "pip install 'peft" in caught.value.fix and "--recover none" in caught.value.fix


def test_recovery_prompts_do_not_overlap_the_chat_check():
    questions = json.loads((REPO_ROOT / "benchmarks" / "data" / "chat_questions.json").read_text())["questions"]
    assert len(recovery_prompts()) == len(set(recovery_prompts())) >= 400
    assert len(PROSE_OPENINGS) == len(set(PROSE_OPENINGS)) >= 32
    prompts = recovery_prompts() + list(PROSE_OPENINGS)
    normalised = {re.sub(r"\W+", " ", p.lower()).strip() for p in prompts}
    for item in questions:
        assert re.sub(r"\W+", " ", item["question"].lower()).strip() not in normalised
        for answer in item["answers"]:
            pattern = re.compile(rf"(?<!\w){re.escape(answer)}(?!\w)", re.IGNORECASE)
            leaks = [p for p in prompts if pattern.search(p)]
            assert not leaks, f"recovery prompts name the chat-check answer {answer!r}: {leaks[:3]}"
