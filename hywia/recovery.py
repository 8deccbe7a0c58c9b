"""HyWIA stage 3: recover what pruning removed with LoRA, then merge it back into plain weights.

The pruned model (sliced in place, so still a LlamaForCausalLM or HywiaLlamaForCausalLM) gets peft
LoRA adapters on every projection, is trained towards the dense model's next-token distributions
(hywia.recovery_data's teacher targets, computed before pruning) plus the ordinary LM loss, and the
adapters are then merged (`merge_and_unload`), so the export is a stock dense checkpoint that any
vLLM serves without LoRA support. Every call to the model goes through the original object: peft
injects the adapters into it in place.

    loss = kd_weight · KL(teacher ‖ student) + (1 − kd_weight) · NLL(next token)

both per trained token (divided by the number of tokens trained on, not by the batch). The KL is
exact on the teacher's top-k tokens plus one bucket for all the rest of the vocabulary.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from hywia.errors import HywiaError
from hywia.recovery_data import SELF, RecoveryData, TeacherTargets, data_sources
from hywia.stopping import raise_if_stopped

log = logging.getLogger(__name__)

RECOVERY_MODES = ("none", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_INSTALL = "pip install 'peft>=0.21,<0.22' (a base dependency of hywia: reinstall with `pip install -e .`)"


@dataclass(frozen=True)
class RecoveryOptions:
    # Measured at 0.2 on SmolLM2, seed 0, WikiText-2 first 400 windows, 50 steps on `self` data (2026-12-05,
    # worktree sweep over one cached prune; benchmarks/results/recovery-sweep.json): rank 16 at a constant 1e-3
    # 116.5, with a linear decay 117.0, at 3e-3 decaying 115.8, rank 64 at 1e-3 decaying 114.6; on the
    # 64-sample prune rank 16 constant 1e-3 113.5 and rank 64 at 2e-3 decaying 110.3 (this default).
    # 50 steps keep a first start within minutes; more steps on the same rows add nothing.
    steps: int = 50
    lr: float = 2e-3
    rank: int = 64
    batch_size: int = 4
    kd_weight: float = 1.0  # 1: distillation only; 0: LM loss only
    seed: int = 0
    warmup_steps: int = 5  # then the rate falls linearly to zero at the last step


@dataclass
class RecoveryReport:
    options: dict
    losses: list[float]  # total loss per step
    kd_losses: list[float]
    lm_losses: list[float]
    seconds: float
    seconds_per_step: float
    trainable_parameters: int
    trained_tokens_per_step: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def validate_recovery_options(mode: str = "lora", steps: int = RecoveryOptions.steps, lr: float = RecoveryOptions.lr,
                              rank: int = RecoveryOptions.rank, data: str = SELF,
                              batch_size: int = RecoveryOptions.batch_size,
                              kd_weight: float = RecoveryOptions.kd_weight) -> None:
    """Every check that needs no model: call before any work starts."""
    if mode not in RECOVERY_MODES:
        raise HywiaError(f"--recover {mode!r} is not one of {', '.join(RECOVERY_MODES)}",
                         "use --recover lora (fine-tune, merged before export) or --recover none")
    if mode == "none":
        return
    for flag, value in (("--recover-steps", steps), ("--recover-rank", rank), ("recovery batch size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise HywiaError(f"{flag} {value} must be a positive whole number", "e.g. --recover-steps 100")
    if not (lr > 0 and math.isfinite(lr)):
        raise HywiaError(f"--recover-lr {lr} must be a positive number", f"e.g. --recover-lr {RecoveryOptions.lr:g}")
    if not 0 <= kd_weight <= 1:
        raise HywiaError(f"the distillation weight {kd_weight} is outside [0, 1]",
                         "1 distils only, 0 trains on the next-token loss only")
    path = data_sources(data).path
    if path is not None:
        _check_has_text(path)
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise HywiaError(f"--recover lora needs the peft package, which cannot be imported ({error})",
                         f"{PEFT_INSTALL}, or pass --recover none") from error


def _check_has_text(path) -> None:
    if path.is_dir():
        files = [p for p in path.rglob("*.txt") if p.is_file() and p.stat().st_size > 0]
        if not files:
            raise HywiaError(f"--recover-data {path} has no non-empty .txt files",
                             "pass a text file, a directory of .txt files, 'self', or 'self+PATH'")
    elif not path.is_file():
        raise HywiaError(f"--recover-data {path} does not exist",
                         "pass a text file, a directory of .txt files, 'self' (text the dense model writes), "
                         "or 'self+PATH'")
    elif not path.read_text(encoding="utf-8", errors="replace").strip():
        raise HywiaError(f"--recover-data {path} has no text", "pass a file with text in it")


def add_lora(model, rank: int, seed: int):
    """Wrap `model` with LoRA adapters on every projection (injected into `model` in place).

    lora_alpha = rank keeps the update's scale independent of the rank (scaling 1). B starts at zero,
    so the wrapped model computes exactly what the pruned one did.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA A is initialised at random
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=list(LORA_TARGETS))
    return get_peft_model(model, config)


def merge_lora(wrapped, requires_grad: dict[str, bool] | None = None):
    """Fold the adapters into the weights; returns the plain model (the same object as before add_lora)."""
    model = wrapped.merge_and_unload()
    _restore_requires_grad(model, requires_grad)
    return model


def remove_lora(wrapped, requires_grad: dict[str, bool] | None = None):
    """Drop the adapters unmerged: the model computes what it did before add_lora."""
    model = wrapped.unload()
    _restore_requires_grad(model, requires_grad)
    return model


def _restore_requires_grad(model, requires_grad: dict[str, bool] | None) -> None:
    if requires_grad is not None:  # peft froze the base weights; give the model back as it came
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))


def distillation_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
                      teacher_indices: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher ‖ student) on the teacher's top-k tokens plus one "rest" bucket.

    student_logits [M, V]; teacher_logprobs / teacher_indices [M, k] (log-probs over the full vocabulary).
    Exact KL between the two distributions coarsened to k+1 outcomes, so it is ≥ 0 and 0 iff they agree there.
    """
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)
    student_top = student_logprobs.gather(-1, teacher_indices)
    teacher_probs = teacher_logprobs.exp()
    top_term = (teacher_probs * (teacher_logprobs - student_top)).sum(-1)
    # The rest bucket's log-mass: log(1 − Σ p_top), clamped so rounding cannot take a log of ≤ 0.
    tiny = torch.finfo(torch.float32).tiny
    teacher_rest = teacher_probs.sum(-1).clamp(max=1.0)
    student_rest_log = torch.log1p(-student_top.exp().sum(-1).clamp(max=1 - 1e-6))
    teacher_rest_log = torch.log((1 - teacher_rest).clamp(min=tiny))
    rest_term = (1 - teacher_rest) * (teacher_rest_log - student_rest_log)
    return (top_term + rest_term).mean()


def recovery_loss(model, data: RecoveryData, targets: TeacherTargets, rows: torch.Tensor,
                  kd_weight: float) -> tuple[torch.Tensor, float, float]:
    """(total, kd, lm) for the given rows, per trained token. Logits only where a token is trained on."""
    device = next(model.parameters()).device
    input_ids = data.input_ids[rows].to(device)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=data.attention_mask[rows].to(device),
                                 use_cache=False).last_hidden_state
    where = data.predicting_positions()[rows].to(device)
    logits = model.get_output_embeddings()(hidden[:, :-1][where]).float()
    lm = torch.nn.functional.cross_entropy(logits, input_ids[:, 1:][where])
    kd = distillation_loss(logits, targets.logprobs[rows].to(device)[where], targets.indices[rows].to(device)[where]) \
        if kd_weight > 0 else torch.zeros((), device=device)
    total = kd_weight * kd + (1 - kd_weight) * lm
    return total, float(kd.detach()), float(lm.detach())


def recover(pruned_model, data: RecoveryData, targets: TeacherTargets, *, steps: int = RecoveryOptions.steps,
            lr: float = RecoveryOptions.lr, rank: int = RecoveryOptions.rank,
            batch_size: int = RecoveryOptions.batch_size, kd_weight: float = RecoveryOptions.kd_weight,
            seed: int = RecoveryOptions.seed, progress: bool = True,
            on_step: Callable[[int, object], None] | None = None) -> RecoveryReport:
    """Train LoRA adapters on `pruned_model` for `steps` AdamW steps, then merge them in place.

    A stop request (hywia.stopping) is honoured before every step: the adapters are removed unmerged
    (the model is as it came) and PruningStopped is raised. `on_step(step, wrapped)` is called after
    each step (its time is not counted as training time).
    """
    options = RecoveryOptions(steps=steps, lr=lr, rank=rank, batch_size=batch_size, kd_weight=kd_weight, seed=seed)
    validate_recovery_options("lora", steps, lr, rank, SELF, batch_size, kd_weight)
    if len(data) == 0 or data.trained_tokens == 0:
        raise HywiaError("the recovery data has no tokens to train on", "give more recovery samples or text")
    was_training = pruned_model.training
    requires_grad = {name: p.requires_grad for name, p in pruned_model.named_parameters()}
    wrapped = add_lora(pruned_model, rank, seed)
    pruned_model.eval()  # no dropout anywhere (LLaMA has none, LoRA dropout is 0): training = eval numerics
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _rate_factor(step, steps, options.warmup_steps))
    order = _row_order(len(data), steps * batch_size, seed)
    losses, kd_losses, lm_losses = [], [], []
    started, callback_seconds = time.perf_counter(), 0.0
    try:
        bar = tqdm(range(steps), desc="recovery (LoRA)", unit="step", disable=not progress)
        for step in bar:
            raise_if_stopped(f"recovery (before step {step + 1} of {steps}; the adapters were not merged)")
            rows = order[step * batch_size:(step + 1) * batch_size]
            loss, kd, lm = recovery_loss(pruned_model, data, targets, rows, kd_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            kd_losses.append(kd)
            lm_losses.append(lm)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", kd=f"{kd:.3f}", lm=f"{lm:.3f}")
            if step == 0:
                first = time.perf_counter() - started
                log.info("recovery: %d LoRA steps (rank %d, %d rows a step); the first took %.1f s, so about %.0f s "
                         "in all", steps, rank, batch_size, first, first * steps)
            if on_step is not None:
                tick = time.perf_counter()
                on_step(step + 1, wrapped)
                callback_seconds += time.perf_counter() - tick  # evaluation, not training: not timed
    except BaseException:
        remove_lora(wrapped, requires_grad)
        pruned_model.train(was_training)
        raise
    seconds = time.perf_counter() - started - callback_seconds
    merge_lora(wrapped, requires_grad)
    pruned_model.train(was_training)
    tokens = float(data.predicting_positions()[order].sum()) / steps
    log.info("recovery: %d steps in %.1f s (%.2f s a step); loss %.3f → %.3f", steps, seconds, seconds / steps,
             losses[0], losses[-1])
    return RecoveryReport(options=asdict(options), losses=losses, kd_losses=kd_losses, lm_losses=lm_losses,
                          seconds=seconds, seconds_per_step=seconds / steps,
                          trainable_parameters=sum(p.numel() for p in trainable),
                          trained_tokens_per_step=tokens, extra={"data": data.source, "rows": len(data),
                                                                 "top_k": targets.top_k})


def _rate_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then linear decay to zero at `steps`: the last steps move the weights least, so
    the merged model does not end on one noisy batch's update (4 rows a step)."""
    return min(1.0, (step + 1) / warmup_steps) * (1 - step / steps)


def _row_order(rows: int, needed: int, seed: int) -> torch.Tensor:
    """Seeded epochs: each a fresh permutation of the rows, concatenated until `needed` indices."""
    generator = torch.Generator().manual_seed(seed)
    epochs = [torch.randperm(rows, generator=generator) for _ in range(-(-needed // rows))]
    return torch.cat(epochs)[:needed]
