"""What recovery trains on, computed from the DENSE model before pruning cuts it in place.

Two pieces, in pipeline order:
  * `recovery_batches`: token rows + a loss mask, from one or more sources mixed row by row in equal
    shares. `self-chat` = chat-formatted replies the dense model writes to varied instructions
    (hywia.recovery_prompts), loss on the reply tokens only; `self-text` = text the dense model writes
    when it continues encyclopedia and news openings by sampling (hywia.calibration.PROSE_OPENINGS
    through hywia.calibration.self_generated), every token counts; `self` = both; a path = windows of plain text; `self+PATH` = self's two and the text.
  * `teacher_targets`: the dense model's top-k next-token log-probabilities at every position whose
    next token is trained on, which the pruned model is then distilled towards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hywia.calibration import PROSE_OPENINGS, read_text, self_generated, windows_from_text
from hywia.errors import HywiaError
from hywia.recovery_prompts import recovery_prompts
from hywia.stopping import generate_unless_stopped, raise_if_stopped

log = logging.getLogger(__name__)

SELF = "self"  # the dense model's chat replies and its own free text, half each
SELF_CHAT = "self-chat"
SELF_TEXT = "self-text"
_MIX_PREFIX = "self+"
# Own text is sampled from a seed of its own (it once continued the calibration's openings, and must not
# be the calibration text again: the pruning pass already fitted that).
_OWN_TEXT_SEED_OFFSET = 104_729


@dataclass
class RecoveryData:
    input_ids: torch.Tensor  # [N, T] long, right-padded
    attention_mask: torch.Tensor  # [N, T] long: 1 = real token
    loss_mask: torch.Tensor  # [N, T] bool: token t is trained on (predicted from tokens < t)
    source: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def trained_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def predicting_positions(self) -> torch.Tensor:
        """[N, T-1] bool: position t predicts a trained token t+1 (where losses are taken)."""
        return self.loss_mask[:, 1:]


@dataclass
class TeacherTargets:
    """The dense model's top-k next-token log-probabilities (over the full vocabulary, so the mass
    outside the top k is 1 − Σ exp(logprobs)); zeros where a position predicts nothing trained."""

    logprobs: torch.Tensor  # [N, T-1, k] float32
    indices: torch.Tensor  # [N, T-1, k] long

    @property
    def top_k(self) -> int:
        return self.logprobs.shape[-1]


@dataclass(frozen=True)
class DataSources:
    chat: bool  # the dense model's chat replies
    own_text: bool  # the dense model's sampled free text
    path: Path | None  # plain text of the user's


def data_sources(data: str) -> DataSources:
    """'self' → replies and own text; 'self-chat' / 'self-text' → one of them; PATH → the text;
    'self+PATH' → all three."""
    if data in (SELF, SELF_CHAT, SELF_TEXT):
        return DataSources(chat=data != SELF_TEXT, own_text=data != SELF_CHAT, path=None)
    if data.startswith(_MIX_PREFIX):
        return DataSources(chat=True, own_text=True, path=Path(data[len(_MIX_PREFIX):]).expanduser())
    return DataSources(chat=False, own_text=False, path=Path(data).expanduser())


def recovery_batches(tokenizer, dense_model, data: str = SELF, samples: int = 128, seq_len: int = 128,
                     seed: int = 0, progress: bool = True) -> RecoveryData:
    """`samples` rows of `seq_len` tokens, shared equally by the sources (the first get any remainder)."""
    sources = data_sources(data)
    makers = []
    if sources.chat:
        makers.append(lambda count: self_replies(tokenizer, dense_model, count, seq_len, seed, progress=progress))
    if sources.own_text:
        makers.append(lambda count: own_text(tokenizer, dense_model, count, seq_len, seed))
    if sources.path is not None:
        makers.append(lambda count: text_windows(tokenizer, sources.path, count, seq_len, seed))
    shares = [samples // len(makers) + (i < samples % len(makers)) for i in range(len(makers))]
    parts = [make(count) for make, count in zip(makers, shares) if count]
    return parts[0] if len(parts) == 1 else interleave(parts, source=data)


def text_windows(tokenizer, path: Path, samples: int, seq_len: int, seed: int) -> RecoveryData:
    """Random non-overlapping windows of a text file or a directory of .txt files; every token but
    the first of each window is trained on (the first has nothing before it)."""
    try:
        ids = windows_from_text(read_text(path), tokenizer, samples, seq_len, seed)
    except HywiaError as error:  # same checks as calibration, worded for this flag
        raise HywiaError(f"--recover-data {path}: {error.problem}", "give more text, or lower the sample count") \
            from error
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[:, 0] = False
    return RecoveryData(ids, torch.ones_like(ids), loss_mask, source=str(path))


def own_text(tokenizer, dense_model, samples: int, seq_len: int, seed: int) -> RecoveryData:
    """The dense model's sampled continuations of encyclopedia and news openings (PROSE_OPENINGS):
    general prose in the model's own distribution, so distillation on it restores language modelling as
    a whole, where chat replies alone restore mostly chat. Every token but the first of a row is trained on."""
    ids = self_generated(tokenizer, dense_model, samples, seq_len, seed + _OWN_TEXT_SEED_OFFSET,
                         prompts=PROSE_OPENINGS, stage="recovery data (own text)")
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[:, 0] = False
    return RecoveryData(ids, torch.ones_like(ids), loss_mask, source=SELF_TEXT)


@torch.no_grad()
def self_replies(tokenizer, model, samples: int, seq_len: int, seed: int, batch_size: int = 16,
                 progress: bool = True) -> RecoveryData:
    """The dense model's greedy replies to the first `samples` recovery prompts (cycled), chat-formatted.

    Greedy, because the served model is judged on its greedy answers: the pruned model is taught the
    dense model's own trajectory. Each row is prompt + reply (+ end-of-turn), cut at `seq_len`.
    """
    prompts = recovery_prompts()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [prompts[order[i % len(prompts)]] for i in range(samples)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = _stop_token_ids(tokenizer)
    encoded = [_chat_prompt_ids(tokenizer, prompt) for prompt in chosen]
    if max(len(ids) for ids in encoded) >= seq_len - 8:
        raise HywiaError(f"the recovery prompts need more than {seq_len - 8} tokens with the chat template",
                         "raise the recovery sequence length (e.g. 128 or more)")
    rows, attention_rows, masks = [], [], []
    device = model.device
    for start in tqdm(range(0, samples, batch_size), desc="recovery data (dense replies)", unit="batch",
                      disable=not progress):
        raise_if_stopped("recovery data (dense replies)")
        batch = encoded[start:start + batch_size]
        width = max(len(ids) for ids in batch)
        # Left padding so every prompt ends where generation begins.
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        output = generate_unless_stopped(model, "recovery data (dense replies)", input_ids, attention_mask=attention,
                                         do_sample=False, max_new_tokens=seq_len - width, eos_token_id=stop_ids,
                                         pad_token_id=pad_id)
        for prompt_ids, generated in zip(batch, output[:, width:].tolist()):
            reply = _cut_at_stop(generated, stop_ids)
            row = (prompt_ids + reply)[:seq_len]
            mask = ([False] * len(prompt_ids) + [True] * len(reply))[:seq_len]
            padding = seq_len - len(row)
            rows.append(row + [pad_id] * padding)
            attention_rows.append([1] * len(row) + [0] * padding)
            masks.append(mask + [False] * padding)
    input_ids = torch.tensor(rows, dtype=torch.long)
    data = RecoveryData(input_ids, torch.tensor(attention_rows), torch.tensor(masks), source=SELF)
    log.info("recovery data: %d dense replies, %d trained tokens (%.0f%% of the rows)", samples, data.trained_tokens,
             100 * data.trained_tokens / input_ids.numel())
    return data


def _chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the served model will see it: through the chat template; a checkpoint with none
    (a LLaMA-1/2 base model, served without --chat-template) continues the instruction as plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(prompt + "\n", add_special_tokens=True).input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def _stop_token_ids(tokenizer) -> list[int]:
    """End of turn: the eos token, and `<|im_end|>`/`<|eot_id|>` where the vocabulary has them."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "</s>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(ids)


def _cut_at_stop(generated: list[int], stop_ids: list[int]) -> list[int]:
    """The reply up to and including its first end-of-turn token (so the pruned model learns to stop)."""
    for position, token in enumerate(generated):
        if token in stop_ids:
            return generated[:position + 1]
    return generated


def interleave(parts: list[RecoveryData], source: str) -> RecoveryData:
    """Rows of several sources alternated (a, b, a, b, …, then the rest), so any batch sees each."""
    width = max(part.input_ids.shape[1] for part in parts)
    if any(part.input_ids.shape[1] != width for part in parts):
        raise ValueError("recovery data parts must share one sequence length")
    order = [(p, i) for i in range(max(len(part) for part in parts)) for p, part in enumerate(parts) if i < len(part)]

    def pick(field: str) -> torch.Tensor:
        return torch.stack([getattr(parts[p], field)[i] for p, i in order])

    return RecoveryData(pick("input_ids"), pick("attention_mask"), pick("loss_mask"), source=source)


@torch.no_grad()
def teacher_targets(dense_model, data: RecoveryData, top_k: int = 32, batch_size: int = 8,
                    progress: bool = True) -> TeacherTargets:
    """The dense model's top-k next-token log-probabilities where the data trains; run before pruning."""
    rows, positions = data.input_ids.shape[0], data.input_ids.shape[1] - 1
    logprobs = torch.zeros(rows, positions, top_k)
    indices = torch.zeros(rows, positions, top_k, dtype=torch.long)
    device = dense_model.device
    trained = data.predicting_positions()
    for start in tqdm(range(0, rows, batch_size), desc="recovery teacher (dense top-k)", unit="batch",
                      disable=not progress):
        raise_if_stopped("recovery teacher (dense top-k)")
        stop = min(start + batch_size, rows)
        logits = dense_model(input_ids=data.input_ids[start:stop].to(device),
                             attention_mask=data.attention_mask[start:stop].to(device), use_cache=False).logits
        where = trained[start:stop]
        top = torch.log_softmax(logits[:, :-1][where.to(device)].float(), dim=-1).topk(top_k, dim=-1)
        logprobs[start:stop][where] = top.values.cpu()
        indices[start:stop][where] = top.indices.cpu()
    return TeacherTargets(logprobs, indices)
