"""Calibration batches (issue 13 item 4): `self` prompts are kept whole, and the held-out slice
that measures quality shares no token with the calibration batch."""

from __future__ import annotations

import pytest
import torch

from hywia.calibration import (
    CALIBRATION_OPENINGS,
    HELDOUT_PROMPTS,
    PROSE_OPENINGS,
    SELF_PROMPTS,
    calibration_batch,
    heldout_batch,
    reconstruction_rows,
    self_generated,
)
from hywia.errors import HywiaError
from tests.tiny import tiny_model, tiny_tokenizer

TEXT = " ".join(f"Sentence number {i} tells of the {i % 7}th river and the {i % 5}th hill." for i in range(300))


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt).input_ids  # as the tokenizer encodes any text (its special tokens, if it adds any)


def _aligned_windows(tokenizer, seq_len: int) -> dict[tuple, int]:
    """Each aligned window of TEXT's tokens → its start (every calibration row from TEXT is one)."""
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    return {tuple(ids[i:i + seq_len]): i for i in range(0, len(ids) - seq_len + 1, seq_len)}


def test_self_generated_rows_start_with_their_whole_prompt():
    """Prompts of one batch differ in length; each row must begin with all of its own prompt (they were
    cut to the shortest prompt of the batch before)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    lengths = {len(_prompt_ids(tokenizer, p)) for p in CALIBRATION_OPENINGS}
    assert len(lengths) > 1  # the case that matters: a batch of prompts of different lengths
    rows = self_generated(tokenizer, model, 20, 48, seed=0, batch_size=8)
    assert rows.shape == (20, 48)
    for index, row in enumerate(rows):
        prompt = _prompt_ids(tokenizer, CALIBRATION_OPENINGS[index % len(CALIBRATION_OPENINGS)])
        assert row[:len(prompt)].tolist() == prompt


def test_self_calibration_alternates_the_calibration_openings_and_the_prose_openings():
    """`self` calibration continues SELF_PROMPTS and PROSE_OPENINGS in turn, half each, every one of both."""
    assert set(CALIBRATION_OPENINGS[0::2]) == set(SELF_PROMPTS) and set(CALIBRATION_OPENINGS[1::2]) == set(PROSE_OPENINGS)
    tokenizer = tiny_tokenizer()
    model = tiny_model(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    rows = calibration_batch("self", tokenizer, model, 4, 32, seed=0)
    for row, opening in zip(rows, (SELF_PROMPTS[0], PROSE_OPENINGS[0], SELF_PROMPTS[1], PROSE_OPENINGS[1])):
        prompt = _prompt_ids(tokenizer, opening)
        assert row[:len(prompt)].tolist() == prompt


def test_self_generated_is_seeded():
    tokenizer = tiny_tokenizer()
    model = tiny_model(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    first = self_generated(tokenizer, model, 4, 24, seed=5, batch_size=4)
    assert torch.equal(first, self_generated(tokenizer, model, 4, 24, seed=5, batch_size=4))
    assert not torch.equal(first, self_generated(tokenizer, model, 4, 24, seed=6, batch_size=4))


def test_heldout_windows_share_no_token_with_the_calibration_windows(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    seq_len = 16
    windows = _aligned_windows(tokenizer, seq_len)
    used = calibration_batch(str(path), tokenizer, None, 12, seq_len, seed=3)
    held = heldout_batch(str(path), tokenizer, None, 12, seq_len, seed=3, count=8)
    assert held.shape == (8, seq_len)
    used_starts = {windows[tuple(row.tolist())] for row in used}  # every row is an aligned window of the text
    held_starts = {windows[tuple(row.tolist())] for row in held}
    assert len(used_starts) == 12 and len(held_starts) == 8 and not used_starts & held_starts


def test_heldout_from_a_text_with_no_spare_window_is_none(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    n_windows = len(tokenizer(TEXT, add_special_tokens=False).input_ids) // 16
    assert heldout_batch(str(path), tokenizer, None, n_windows, 16, seed=0, count=8) is None
    assert heldout_batch(str(path), tokenizer, None, n_windows - 3, 16, seed=0, count=8).shape == (3, 16)


def test_heldout_self_text_uses_prompts_the_calibration_never_starts_with():
    assert not {p for p in HELDOUT_PROMPTS if any(p.startswith(s) or s.startswith(p) for s in CALIBRATION_OPENINGS)}
    tokenizer = tiny_tokenizer()
    model = tiny_model(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    held = heldout_batch("self", tokenizer, model, 32, 24, seed=0, count=4)
    assert held.shape == (4, 24)
    for row, prompt in zip(held, HELDOUT_PROMPTS):
        ids = _prompt_ids(tokenizer, prompt)[:24]  # this tiny tokenizer spends many tokens on a prompt
        assert row[:len(ids)].tolist() == ids


def test_reconstruction_rows_from_a_text_are_the_calibration_then_windows_no_probe_sees(tmp_path):
    """--reconstruct-samples: the calibration rows first, then windows of the same text that are neither
    calibration nor held-out windows (the quality probe must not measure text the fit saw)."""
    tokenizer = tiny_tokenizer()
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    windows = _aligned_windows(tokenizer, 16)
    used = calibration_batch(str(path), tokenizer, None, 12, 16, seed=3)
    held = heldout_batch(str(path), tokenizer, None, 12, 16, seed=3, count=8)
    rows = reconstruction_rows(str(path), tokenizer, None, used, 30, seed=3, heldout=8)
    assert rows.shape == (30, 16) and torch.equal(rows[:12], used)
    extra = {windows[tuple(row.tolist())] for row in rows[12:]}
    assert len(extra) == 18
    assert not extra & {windows[tuple(row.tolist())] for row in used}
    assert not extra & {windows[tuple(row.tolist())] for row in held}
    assert reconstruction_rows(str(path), tokenizer, None, used, 12, seed=3, heldout=8) is used


def test_reconstruction_rows_beyond_the_text_name_the_flag_and_the_most_it_has(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    n_windows = len(tokenizer(TEXT, add_special_tokens=False).input_ids) // 16
    used = calibration_batch(str(path), tokenizer, None, 12, 16, seed=0)
    with pytest.raises(HywiaError, match="too short for") as refused:
        reconstruction_rows(str(path), tokenizer, None, used, n_windows, seed=0, heldout=8)
    assert f"at most {n_windows - 8}" in refused.value.fix
    assert reconstruction_rows(str(path), tokenizer, None, used, n_windows - 8, seed=0, heldout=8).shape[0] == \
        n_windows - 8


def test_self_reconstruction_rows_are_new_continuations_of_the_calibration_openings():
    tokenizer = tiny_tokenizer()
    model = tiny_model(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    used = calibration_batch("self", tokenizer, model, 4, 24, seed=0)
    rows = reconstruction_rows("self", tokenizer, model, used, 10, seed=0, heldout=8)
    assert rows.shape == (10, 24) and torch.equal(rows[:4], used)
    for index, row in enumerate(rows[4:]):
        prompt = _prompt_ids(tokenizer, CALIBRATION_OPENINGS[index % len(CALIBRATION_OPENINGS)])
        assert row[:len(prompt)].tolist() == prompt
        if index < 4:  # same opening as calibration row `index`, another continuation
            assert not torch.equal(row, used[index])
