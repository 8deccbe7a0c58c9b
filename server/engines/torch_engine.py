"""The built-in engine: transformers on CPU or GPU, for machines without vLLM (and fast tests).

One worker thread owns the model, so the event loop never waits on a forward pass. Requests that
arrive together are prefilled together as a *cohort* (left-padded, one KV cache); every loop turn
runs one decode step for each cohort in turn, so a new request starts at the next turn instead of
waiting for earlier ones to finish. Finished or abandoned sequences leave their cohort's batch at
once. This is cohort batching, not vLLM's continuous batching: cohorts never merge, which keeps the
KV cache a plain transformers DynamicCache.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from server.engines.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    Engine,
    EngineMemory,
    EngineSettings,
    GenerationDelta,
    SamplingOptions,
)
from server.engines.text_stream import TextStream

log = logging.getLogger(__name__)

_IDLE_POLL_SECONDS = 0.1  # how often an idle worker checks whether it should stop
DEFAULT_MAX_NUM_SEQS = 16  # sequences decoded at once unless --max-num-seqs says otherwise


class EngineFailure(RuntimeError):
    """The model failed while generating (e.g. out of memory); the request cannot complete."""


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    options: SamplingOptions
    request_id: str
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue
    text: TextStream
    generator: torch.Generator | None
    generated: int = 0
    unreported_tokens: int = 0
    done: bool = False
    cancelled: bool = False  # set by the event loop when the consumer left; read by the worker

    def send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


@dataclass(eq=False)
class _Cohort:
    sequences: list[_Sequence]
    cache: object  # transformers DynamicCache, batch dimension = len(sequences)
    attention_mask: torch.Tensor  # [batch, cached tokens]: 0 marks left padding
    next_position: torch.Tensor  # [batch]: position id of the token fed next
    next_tokens: torch.Tensor  # [batch]: the token fed next (sampled in the previous step)


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model, tokenizer, max_model_len: int, max_batch_size: int):
        self._model = model
        self._tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.max_model_len = max_model_len
        self._max_batch_size = max_batch_size
        self._eos_ids = _eos_token_ids(model, tokenizer)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos_ids)
        self._inbox: queue.Queue[_Sequence] = queue.Queue()
        self._live: set[_Sequence] = set()
        self._live_lock = threading.Lock()
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._serve_forever, name="torch-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, directory: Path, settings: EngineSettings) -> TorchEngine:
        """Load the checkpoint (blocking: call it from a thread while the server starts)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import hywia.arch  # noqa: F401  (registers the per-layer architecture of non-uniform exports)

        if torch.cuda.is_available():
            device = "cuda"
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            # bf16 matmuls are slow on most CPUs; the small models served on CPU fit in fp32.
            device, dtype = "cpu", torch.float32
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        context = getattr(model.config, "max_position_embeddings", None) or settings.max_model_len or 2048
        max_model_len = min(settings.max_model_len or context, context)
        max_num_seqs = settings.max_num_seqs or DEFAULT_MAX_NUM_SEQS
        log.info("torch engine: %s on %s (%s), context %d, batch up to %d",
                 directory, device, dtype, max_model_len, max_num_seqs)
        return cls(model, tokenizer, max_model_len, max_num_seqs)

    async def generate(self, prompt_token_ids: list[int], options: SamplingOptions,
                       request_id: str) -> AsyncIterator[GenerationDelta]:
        sequence = _Sequence(
            prompt=list(prompt_token_ids), options=options, request_id=request_id,
            loop=asyncio.get_running_loop(), outbox=asyncio.Queue(),
            text=TextStream(self._tokenizer, options.stop), generator=self._generator(options.seed),
        )
        with self._live_lock:
            self._live.add(sequence)
        self._inbox.put(sequence)
        try:
            while True:
                item = await sequence.outbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # The worker drops the sequence at its next step, which frees its batch row.
            sequence.cancelled = True

    def running_requests(self) -> int:
        with self._live_lock:
            return len(self._live)

    def memory(self) -> EngineMemory:
        if self._device.type != "cuda":
            return EngineMemory()
        return EngineMemory(accelerator_allocated=torch.cuda.memory_allocated(self._device),
                            accelerator_reserved=torch.cuda.memory_reserved(self._device))

    async def shutdown(self) -> None:
        self._stopping.set()
        await asyncio.to_thread(self._worker.join, 30)

    # ------------------------------------------------------------------ the worker thread

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self._device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed % (1 << 64))
        return generator

    def _serve_forever(self) -> None:
        cohorts: list[_Cohort] = []
        with torch.inference_mode():
            while not self._stopping.is_set():
                arrivals = self._take_arrivals(wait=not cohorts, active=sum(len(c.sequences) for c in cohorts))
                if arrivals:
                    cohort = self._guarded(arrivals, self._prefill, arrivals)
                    if cohort is not None:
                        cohorts.append(cohort)
                for cohort in cohorts:
                    self._guarded(cohort.sequences, self._decode_step, cohort)
                cohorts = [c for c in cohorts if c.sequences]
        for cohort in cohorts:
            self._fail(cohort.sequences, EngineFailure("the engine is shutting down"))

    def _take_arrivals(self, wait: bool, active: int) -> list[_Sequence]:
        arrivals: list[_Sequence] = []
        if wait:
            try:
                arrivals.append(self._inbox.get(timeout=_IDLE_POLL_SECONDS))
            except queue.Empty:
                return []
        while active + len(arrivals) < self._max_batch_size:
            try:
                arrivals.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        alive = [s for s in arrivals if not s.cancelled]
        self._forget([s for s in arrivals if s.cancelled])
        return alive

    def _guarded(self, sequences: list[_Sequence], step, *args):
        try:
            return step(*args)
        except Exception as exc:  # one failing batch must not take the worker (and the server) down
            log.exception("torch engine step failed for %d sequence(s)", len(sequences))
            self._fail(list(sequences), EngineFailure(f"generation failed: {type(exc).__name__}: {exc}"))
            sequences.clear()
            return None

    def _prefill(self, sequences: list[_Sequence]) -> _Cohort | None:
        longest = max(len(s.prompt) for s in sequences)
        input_ids = torch.full((len(sequences), longest), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, longest - len(sequence.prompt):] = torch.tensor(sequence.prompt)
            attention_mask[row, longest - len(sequence.prompt):] = 1
        input_ids, attention_mask = input_ids.to(self._device), attention_mask.to(self._device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache(config=self._model.config)
        output = self._model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        cohort = _Cohort(
            sequences=sequences, cache=output.past_key_values, attention_mask=attention_mask,
            next_position=torch.tensor([len(s.prompt) for s in sequences], device=self._device),
            next_tokens=self._sample(output.logits[:, -1, :], sequences),
        )
        self._accept_tokens(cohort)
        return cohort

    def _decode_step(self, cohort: _Cohort) -> None:
        batch = len(cohort.sequences)
        cohort.attention_mask = torch.cat(
            [cohort.attention_mask, torch.ones((batch, 1), dtype=torch.long, device=self._device)], dim=1)
        output = self._model(input_ids=cohort.next_tokens[:, None], attention_mask=cohort.attention_mask,
                             position_ids=cohort.next_position[:, None], past_key_values=cohort.cache,
                             use_cache=True)
        cohort.next_position = cohort.next_position + 1
        cohort.next_tokens = self._sample(output.logits[:, -1, :], cohort.sequences)
        self._accept_tokens(cohort)

    def _sample(self, logits: torch.Tensor, sequences: list[_Sequence]) -> torch.Tensor:
        logits = logits.float()
        chosen = []
        for row, sequence in enumerate(sequences):
            options = sequence.options
            if options.temperature == 0:
                chosen.append(logits[row].argmax())
                continue
            probs = torch.softmax(logits[row] / options.temperature, dim=-1)
            if options.top_p < 1.0:
                probs = _top_p_filter(probs, options.top_p)
            chosen.append(torch.multinomial(probs, 1, generator=sequence.generator)[0])
        return torch.stack(chosen)

    def _accept_tokens(self, cohort: _Cohort) -> None:
        """Hand each sequence its new token; drop finished and abandoned rows from the batch."""
        for sequence, token in zip(cohort.sequences, cohort.next_tokens.tolist()):
            if sequence.cancelled:
                sequence.done = True
                continue
            sequence.generated += 1
            sequence.unreported_tokens += 1
            finish = None
            if token in self._eos_ids and not sequence.options.ignore_eos:
                text, finish = sequence.text.flush(), FINISH_STOP
            else:
                text, hit_stop = sequence.text.add(token)
                if hit_stop:
                    finish = FINISH_STOP
                elif sequence.generated >= sequence.options.max_tokens:
                    text, finish = text + sequence.text.flush(), FINISH_LENGTH
            if finish is not None:
                sequence.done = True
                self._forget([sequence])  # before the last delta, so a finished request never counts
            if text or finish:
                sequence.send(GenerationDelta(text=text, new_tokens=sequence.unreported_tokens,
                                              finish_reason=finish))
                sequence.unreported_tokens = 0
        keep = [row for row, sequence in enumerate(cohort.sequences) if not sequence.done]
        if len(keep) == len(cohort.sequences):
            return
        self._forget([s for s in cohort.sequences if s.done])
        cohort.sequences = [cohort.sequences[row] for row in keep]
        if keep:
            index = torch.tensor(keep, device=self._device)
            cohort.cache.batch_select_indices(index)
            cohort.attention_mask = cohort.attention_mask[index]
            cohort.next_position = cohort.next_position[index]
            cohort.next_tokens = cohort.next_tokens[index]

    def _fail(self, sequences: list[_Sequence], error: Exception) -> None:
        for sequence in sequences:
            sequence.send(error)
        self._forget(sequences)

    def _forget(self, sequences: list[_Sequence]) -> None:
        with self._live_lock:
            self._live.difference_update(sequences)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (nucleus)."""
    sorted_probs, order = probs.sort(descending=True)
    # A token stays when the mass *before* it is below top_p, so the most likely one always stays.
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs[outside] = 0.0
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum()


def _eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (generation_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
