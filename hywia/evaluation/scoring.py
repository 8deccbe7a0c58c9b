"""Log-probabilities of chosen next tokens, with logits computed only where they are needed.

Both evaluators need the same primitive: run the decoder over a padded batch, then, at some
positions, log p(target token). Projecting only those positions onto the vocabulary (instead of
`model(...).logits` for every position) spares the lm_head's work and the B×T×V logits tensor,
which for a 49k vocabulary and 2048-token windows is 400 MB per sequence.
"""

from __future__ import annotations

import torch


class TokenScorer:
    def __init__(self, model, chunk_rows: int = 512):
        self.model = model
        self.chunk_rows = chunk_rows
        decoder = getattr(model, "get_decoder", lambda: None)()
        head = getattr(model, "get_output_embeddings", lambda: None)()
        # A causal LM without the decoder/head split still works: its logits play the hidden states
        # and the head is the identity (slower, but the same numbers).
        self._split = decoder is not None and head is not None and decoder is not model
        self._decoder, self._head = (decoder, head) if self._split else (None, None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_length(self) -> int:
        """The longest input the model accepts (positions), as the harness reads it from the config."""
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, H] final hidden states (after the last norm), or [B, T, V] logits without the split.

        attention_mask is the usual [B, T] padding mask, or a ready [B, 1, T, T] additive mask
        (0 = may attend) for packed rows, which transformers passes to the attention as it is.
        """
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                  "use_cache": False}
        if position_ids is not None:
            inputs["position_ids"] = position_ids.to(self.device)
        if self._split:
            return self._decoder(**inputs).last_hidden_state
        return self.model(**inputs).logits

    @torch.inference_mode()
    def target_logprobs(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[i] | rows[i]) for N gathered hidden rows [N, H]; float64 on the CPU.

        Chunked so that at most chunk_rows × vocab logits exist at once; the softmax runs in
        float32 whatever the model's dtype, so bf16 models are not also scored in bf16.
        """
        targets = targets.to(rows.device)
        pieces = []
        for start in range(0, rows.shape[0], self.chunk_rows):
            chunk = rows[start:start + self.chunk_rows]
            logits = (self._head(chunk) if self._split else chunk).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            pieces.append(logprobs.gather(1, targets[start:start + self.chunk_rows, None]).squeeze(1))
        if not pieces:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat(pieces).double().cpu()


def batch_slices(lengths: list[int], max_rows: int, max_tokens: int) -> list[slice]:
    """Consecutive batches of sequences (already sorted longest first) with at most max_rows rows and
    max_tokens tokens, padding included. On a CPU each forward pass has a fixed cost per operator,
    so short sequences (OpenBookQA's ~25 tokens) need many rows per pass to run at full speed."""
    slices, start = [], 0
    while start < len(lengths):
        width = max(lengths[start], 1)  # the first row is the longest: it sets the padded width
        rows = max(1, min(max_rows, max_tokens // width, len(lengths) - start))
        slices.append(slice(start, start + rows))
        start += rows
    return slices
