"""Calibration batches: token windows from text files, or text the model writes itself.

`self` calibration needs no dataset: the model continues varied short prompts by sampling, so the
pruning signal comes from the model's own distribution (seeded, hence reproducible).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hywia.errors import HywiaError

log = logging.getLogger(__name__)

SELF_PROMPTS = (
    "Once upon a time", "The history of the city", "In this article, we explain", "def fibonacci(n):",
    "The main causes of the war were", "Dear Sir,", "Photosynthesis is the process", "Breaking news:",
    "The recipe calls for", "In mathematics, a prime number", "My favourite book is", "The committee decided",
    "Here is a short poem about the sea:", "Q: Why is the sky blue?\nA:", "The stock market", "Chapter 1\n\n",
)


def calibration_batch(source: str, tokenizer, model, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Return a LongTensor [samples, seq_len] of calibration token ids."""
    if samples < 2:
        raise HywiaError(f"--samples {samples} is too few", "use at least 2 calibration samples (default 32)")
    if seq_len < 8:
        raise HywiaError(f"--seq-len {seq_len} is too short", "use at least 8 tokens (default 128)")
    if source == "self":
        return self_generated(tokenizer, model, samples, seq_len, seed)
    return windows_from_text(read_text(Path(source)), tokenizer, samples, seq_len, seed)


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
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_windows = ids.numel() // seq_len
    if n_windows < samples:
        raise HywiaError(
            f"the calibration text has {ids.numel()} tokens: too short for {samples} windows of {seq_len}",
            "give more text, or lower --samples / --seq-len",
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_windows, generator=generator)[:samples].sort().values
    return torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in chosen.tolist()])


@torch.no_grad()
def self_generated(tokenizer, model, samples: int, seq_len: int, seed: int, batch_size: int = 16) -> torch.Tensor:
    """The model's own continuations of varied prompts, sampled at temperature 1 (seeded)."""
    torch.manual_seed(seed)
    rows = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for start in tqdm(range(0, samples, batch_size), desc="self-calibration", unit="batch"):
        count = min(batch_size, samples - start)
        prompts = [SELF_PROMPTS[(start + i) % len(SELF_PROMPTS)] for i in range(count)]
        # Same-length prompts: cut each prompt's ids to the shortest so no padding is needed.
        encoded = [bos + tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        width = min(len(e) for e in encoded)
        input_ids = torch.tensor([e[:width] for e in encoded], device=model.device)
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=1.0, top_p=0.95,
            max_new_tokens=seq_len - width, min_new_tokens=seq_len - width, pad_token_id=tokenizer.eos_token_id,
        )
        rows.append(output[:, :seq_len].cpu())
    return torch.cat(rows)
