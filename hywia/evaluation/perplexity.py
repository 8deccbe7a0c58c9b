"""Perplexity over non-overlapping windows of a joined test text (LLM-Pruner / SparseGPT style).

Convention: the whole text is tokenized once (with the tokenizer's default special tokens, as
`tokenizer(text)` does in the usual code), cut into consecutive windows of `seq_len` tokens, the last
partial window dropped. Each window is scored on its own: its tokens 2..seq_len are predicted from
the ones before. Perplexity = exp(sum of NLL / number of predicted tokens) over all windows scored,
i.e. the exact token-weighted mean, accumulated in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from hywia.errors import HywiaError
from hywia.evaluation.scoring import TokenScorer


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int  # predicted tokens: windows × (seq_len − 1)
    windows: int
    windows_total: int  # windows the whole text yields at this seq_len
    seq_len: int
    convention: str

    def to_dict(self) -> dict:
        return {"kind": "perplexity", **asdict(self)}


def tokenize_text(tokenizer, text: str) -> list[int]:
    # verbose=False: the text is far longer than model_max_length on purpose (it is windowed next).
    return tokenizer(text, verbose=False)["input_ids"]


def split_windows(token_ids: list[int], seq_len: int) -> torch.Tensor:
    """[n, seq_len] consecutive windows; the trailing tokens that do not fill a window are dropped."""
    if seq_len < 2:
        raise HywiaError(f"--seq-len {seq_len} leaves nothing to predict", "use a window of 2 tokens or more")
    count = len(token_ids) // seq_len
    if count == 0:
        raise HywiaError(f"the text has {len(token_ids)} tokens, fewer than one window of {seq_len}",
                         "use a smaller --seq-len")
    return torch.tensor(token_ids[:count * seq_len], dtype=torch.long).view(count, seq_len)


def window_perplexity(scorer: TokenScorer, windows: torch.Tensor, batch_size: int = 64,
                      limit: int | None = None, description: str = "perplexity",
                      batch_tokens: int = 4096) -> PerplexityResult:
    """Perplexity of the first LIMIT windows (all when None), at most batch_size windows and
    batch_tokens tokens per forward pass."""
    total, seq_len = windows.shape
    if seq_len > scorer.max_length:
        raise HywiaError(f"--seq-len {seq_len} is longer than the model's {scorer.max_length} positions",
                         f"use --seq-len {scorer.max_length} or less")
    chosen = windows if limit is None else windows[:limit]
    nll_sum, predicted = 0.0, 0
    with tqdm(total=len(chosen), desc=description, unit="window") as bar:
        for batch in chosen.split(max(1, min(batch_size, batch_tokens // seq_len))):
            hidden = scorer.hidden_states(batch, torch.ones_like(batch))
            # Position t predicts token t+1; the last position predicts nothing inside the window.
            rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            logprobs = scorer.target_logprobs(rows, batch[:, 1:].reshape(-1))
            nll_sum -= float(logprobs.sum())
            predicted += logprobs.numel()
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{math.exp(nll_sum / predicted):.2f}")
    mean_nll = nll_sum / predicted
    convention = (f"non-overlapping {seq_len}-token windows over the whole tokenized text "
                  f"(default special tokens, last partial window dropped); first {len(chosen)} of {total} "
                  f"windows; tokens 2..{seq_len} of each window predicted; exp(token-weighted mean NLL)")
    return PerplexityResult(perplexity=math.exp(mean_nll), mean_nll=mean_nll, tokens_scored=predicted,
                            windows=len(chosen), windows_total=total, seq_len=seq_len, convention=convention)
