"""Calibration batches: token windows from text files, or text the model writes itself.

`self` calibration needs no dataset: the model continues varied short prompts by sampling, so the
pruning signal comes from the model's own distribution (seeded, hence reproducible).

`heldout_batch` draws text from the same source that the calibration batch never saw (other windows of
the text; other prompts for `self`), on which hywia.quality measures what pruning cost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hywia.errors import HywiaError
from hywia.stopping import generate_unless_stopped, raise_if_stopped

log = logging.getLogger(__name__)

SELF_PROMPTS = (
    "Once upon a time", "The history of the city", "In this article, we explain", "def fibonacci(n):",
    "The main causes of the war were", "Dear Sir,", "Photosynthesis is the process", "Breaking news:",
    "The recipe calls for", "In mathematics, a prime number", "My favourite book is", "The committee decided",
    "Here is a short poem about the sea:", "Q: Why is the sky blue?\nA:", "The stock market", "Chapter 1\n\n",
)
# Sentence starts of encyclopedia and news prose on many subjects, none naming a person, place or answer,
# that the dense model continues by sampling to write recovery's own text. Against the calibration
# openings (SELF_PROMPTS: a story, code, a letter, a poem, Q&A, ...) they took the
# default 0.2 recovery of SmolLM2 on WikiText-2 from 109.4/117.7/119.5 to 107.2/116.1/115.6 and on PTB
# from 180.4/190.1/202.7 to 170.8/184.6/199.4 (seeds 0/1/2, first 400 windows each), with chat at
# 16/15/15 of 36 (2026-12-07, benchmarks/results/recovery-openings-2026-12-07.json). Pruning's own
# calibration continues them too, alternating with SELF_PROMPTS (CALIBRATION_OPENINGS).
PROSE_OPENINGS = (
    "The history of the city", "The river rises in the mountains", "The species was first described",
    "The album was released", "The battle took place", "The cathedral was built", "He was born in a small village",
    "She studied at the university", "The team finished the season", "The storm formed over the ocean",
    "The game was developed by", "The railway line opened", "The novel tells the story of", "The election was held",
    "The ship was launched", "The museum houses", "The school was founded", "The island has a population of",
    "The company announced", "Shares of the company", "The government said", "The bridge spans",
    "The festival takes place", "The mountain is the highest", "The painting shows", "The king died",
    "The band was formed", "The film received", "The language is spoken", "The temple is located",
    "The treaty was signed", "The disease is caused by",
)
# What `self` calibration (and the re-fit's extra rows) continues: SELF_PROMPTS and PROSE_OPENINGS alternately,
# half each (SELF_PROMPTS cycled twice against the 32 openings; "The history of the city" is in both, so it
# comes twice in a row). Against SELF_PROMPTS alone, the default 0.2 prune of SmolLM2 went on WikiText-2 from
# 124.9/140.3/132.4 to 110.9/105.0/113.8 before recovery and from 107.2/116.1/115.6 to 98.8/94.8/102.1 after the
# default recovery (seeds 0/1/2, first 400 windows); PTB after recovery stayed where it was (184.9 → 185.7 mean),
# so part of the gain is Wikipedia-shaped text meeting a Wikipedia test (2026-12-07,
# benchmarks/results/calibration-openings-2026-12-07.json).
CALIBRATION_OPENINGS = tuple(opening for pair in zip(SELF_PROMPTS * 2, PROSE_OPENINGS) for opening in pair)
# Prompts for held-out `self` text: none of them starts the calibration text.
HELDOUT_PROMPTS = (
    "The old lighthouse keeper", "To install the package, run", "According to the latest survey,",
    "The difference between weather and climate", "Ingredients:", "She opened the letter and read",
    "class Stack:", "The first rule of the game is",
)

# `self` rows for the re-fit are sampled from a seed of their own, so they are not the calibration text
# again (2026-12-06 measurement: benchmarks/results/reconstruction-rows-2026-12-06.json used this offset).
_RECONSTRUCTION_SEED_OFFSET = 7919


def calibration_batch(source: str, tokenizer, model, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Return a LongTensor [samples, seq_len] of calibration token ids."""
    if samples < 2:
        raise HywiaError(f"--samples {samples} is too few", "use at least 2 calibration samples (leave --samples out for the default)")
    if seq_len < 8:
        raise HywiaError(f"--seq-len {seq_len} is too short", "use at least 8 tokens (default 128)")
    if source == "self":
        return self_generated(tokenizer, model, samples, seq_len, seed)
    return windows_from_text(read_text(Path(source)), tokenizer, samples, seq_len, seed)


def is_model_sampled(source: str) -> bool:
    """Whether SOURCE's text is sampled from the model being pruned (its gradients then average to zero)."""
    return source == "self"


def read_text(path: Path) -> str:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise HywiaError(f"calibration directory {path} has no .txt files",
                             "pass a text file, a directory of .txt files, or 'self'")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    raise HywiaError(f"calibration source {path} does not exist",
                     "pass a text file, a directory of .txt files, or 'self' (the model's own text)")


def windows_from_text(text: str, tokenizer, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` random non-overlapping windows of `seq_len` tokens (seeded)."""
    ids, order = _window_order(text, tokenizer, seq_len, seed)
    if order.numel() < samples:
        raise HywiaError(
            f"the calibration text has {ids.numel()} tokens: too short for {samples} windows of {seq_len}",
            "give more text, or lower --samples / --seq-len",
        )
    return _windows(ids, order[:samples], seq_len)


def _window_order(text: str, tokenizer, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text's token ids and its window indices in the seeded random order both batches draw from."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    generator = torch.Generator().manual_seed(seed)
    return ids, torch.randperm(ids.numel() // seq_len, generator=generator)


def _windows(ids: torch.Tensor, chosen: torch.Tensor, seq_len: int) -> torch.Tensor:
    return torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in chosen.sort().values.tolist()])


def heldout_batch(source: str, tokenizer, model, used_samples: int, seq_len: int, seed: int,
                  count: int) -> torch.Tensor | None:
    """Up to COUNT sequences of SEQ_LEN tokens from SOURCE that share no token with
    `calibration_batch(source, ..., used_samples, seq_len, seed)`: for a text, the windows that follow
    the calibration windows in the same seeded order; for `self`, the model's continuations of
    HELDOUT_PROMPTS. None when the text has no window left over."""
    if source == "self":
        return self_generated(tokenizer, model, count, seq_len, seed, prompts=HELDOUT_PROMPTS)
    ids, order = _window_order(read_text(Path(source)), tokenizer, seq_len, seed)
    spare = order[used_samples:used_samples + count]
    return _windows(ids, spare, seq_len) if spare.numel() else None


def reconstruction_rows(source: str, tokenizer, model, calibration: torch.Tensor, samples: int, seed: int,
                        heldout: int) -> torch.Tensor:
    """SAMPLES rows for the least-squares re-fit (hywia.reconstruct, `--reconstruct-samples`): the
    calibration rows first, then more of the same source that neither they nor the held-out quality probe
    (HELDOUT windows after them) contain: for `self`, the model's continuations of the same openings from
    another seed; for a text, the windows that follow the probe's in the same seeded order. The fit only
    runs forward passes, so its rows cost far less than calibration rows, whose gradients are taken.
    Call it while the model is still dense: `self` rows are the dense model's text."""
    extra = samples - calibration.shape[0]
    if extra <= 0:
        return calibration
    seq_len = calibration.shape[1]
    if source == "self":
        more = self_generated(tokenizer, model, extra, seq_len, seed + _RECONSTRUCTION_SEED_OFFSET,
                              stage="reconstruction text")
    else:
        ids, order = _window_order(read_text(Path(source)), tokenizer, seq_len, seed)
        start = calibration.shape[0] + heldout
        if order.numel() < start + extra:
            raise HywiaError(
                f"the calibration text has {ids.numel()} tokens: too short for {samples} reconstruction windows "
                f"of {seq_len} besides the {heldout} held-out ones",
                f"lower --reconstruct-samples (at most {max(order.numel() - heldout, calibration.shape[0])} here) "
                "or give more text")
        more = _windows(ids, order[start:start + extra], seq_len)
    return torch.cat([calibration, more])


@torch.no_grad()
def self_generated(tokenizer, model, samples: int, seq_len: int, seed: int, batch_size: int = 16,
                   prompts: tuple[str, ...] = CALIBRATION_OPENINGS, stage: str = "self-calibration") -> torch.Tensor:
    """The model's own continuations of varied PROMPTS, sampled at temperature 1 (seeded); every row
    starts with its whole prompt, encoded as the tokenizer encodes any text (a LLaMA tokenizer adds its
    <s>; SmolLM2's adds nothing, where forcing its bos token put a chat-turn marker before prose:
    WikiText-2 188.6 vs 193.7 after a 0.2108 prune, seed 0). Prompts of one batch differ in length, so they are left-padded
    (masked out, positions counted from each prompt's first token) and each row is cut to SEQ_LEN.
    STAGE names the work in a stop message (hywia.stopping): recovery data is written this way too."""
    torch.manual_seed(seed)
    rows = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in tqdm(range(0, samples, batch_size), desc=stage, unit="batch"):
        raise_if_stopped(stage)
        count = min(batch_size, samples - start)
        encoded = [tokenizer(prompts[(start + i) % len(prompts)], add_special_tokens=True).input_ids[:seq_len]
                   for i in range(count)]
        width = max(len(e) for e in encoded)
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
        # The shortest prompt needs the most new tokens; longer ones get a few too many, cut below.
        new_tokens = seq_len - min(len(e) for e in encoded)
        output = input_ids
        if new_tokens > 0:
            output = generate_unless_stopped(
                model, stage, input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                top_p=0.95, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
            )
        rows += [row[width - len(e):][:seq_len].cpu() for row, e in zip(output, encoded)]
    return torch.stack(rows)
