"""PruneOptions: every choice a pruning run takes, frozen and validated once, when it is made.

Anything that can be checked before a model is loaded is checked in `__post_init__`, so an options
object that exists is valid: the pipeline, serve and the cache key never validate again, and nothing
changes an option after construction. A new option is one field below plus, where it has a fixed set
of values, one line in `CHOICES` (or a check in `_check_combinations`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hywia.budget import parse_protected_layers, validate_ratio
from hywia.chat_templates import render_sample_conversation
from hywia.errors import HywiaError
from hywia.importance import CRITERIA
from hywia.reconstruct import RECONSTRUCTIONS
from hywia.recovery import RECOVERY_MODES, RecoveryOptions, validate_recovery_options
from hywia.recovery_data import SELF, data_sources
from hywia.sizes import parse_count, parse_size

LAYOUTS = ("uniform", "per-layer")
ALLOCATIONS = ("even", "global")  # even: the unprotected layers share the removal alike
NORMALISATIONS = ("rank", "mean")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: the source's own dtype


@dataclass(frozen=True)
class PruneOptions:
    ratio: float = 0.2  # ignored (and must stay at its default) when a target chooses the ratio
    importance: str = "hybrid"
    calibration: str = "self"  # 'self' or an absolute path (resolve_calibration makes one)
    # 128: the default pipeline at 0.2 (SmolLM2, WikiText-2 400 windows, seeds 0/1/2) 111.5/123.7/121.8
    # (mean 119.0) and chat 16/14/16 of 36, against 110.3/131.9/130.6 (124.3) and 14/13/13 with 64
    # (benchmarks/results/quality400-r02-samples128 vs quality400-r02, 2026-12-05). The cost: the
    # calibration, fusion and reconstruction stages take ~2.4x as long, the whole prune 1.76x (seed 0:
    # 1,722 s vs 979 s, both on 2 shared cores). Earlier, 32 → 64 took seed 0 from 135.4 to 127.4
    # before recovery (recovery-sweep.json). Since 2026-12-06 `self` text's Fisher terms come from 4 token
    # groups per sequence (hywia/scores.py): 115.5 over the same seeds at 128 samples.
    samples: int = 128
    seq_len: int = 128
    seed: int = 0
    # Per-layer widths with global allocation by default: measured best (benchmarks/results/layouts400/quality.md);
    # its export needs this package's vLLM plugin, which `hywia serve` always has. `uniform` exports the
    # stock LlamaForCausalLM, for a vLLM without the plugin.
    layout: str = "per-layer"
    align_heads: int = 1
    align_mlp: int = 1
    dtype: str = "auto"  # of the exported weights; auto: the source's (a bf16 model stays bf16)
    normalize: str = "rank"
    # --layout per-layer: layers kept whole ("first:K,last:M"), and how the others share the removal.
    protect_layers: str | None = None
    allocation: str | None = None  # None: the layout's own ('global' for per-layer, 'even' for uniform)
    min_keep: float = 0.1  # global allocation: fraction of each layer's units of each kind kept at least
    # --target-memory SIZE / --target-params N: the smallest ratio that fits (hywia.memory_fit), for the
    # workload the model is served with (None: the model's context length, one sequence).
    target_memory: str | None = None
    target_params: str | None = None
    max_model_len: int | None = None
    max_seqs: int | None = None
    # The chat template written into the export's tokenizer (hywia.chat_templates.resolve_chat_template's
    # text, so the cache key follows the template's content); None keeps the source's own, if any.
    chat_template: str | None = None
    # After cutting (hywia.reconstruct): re-fit the kept columns of o_proj/down_proj by ridge least squares.
    reconstruct: str = "ls"
    # Rows that re-fit sees: None, the calibration rows; N, those plus N − samples more of the same text
    # (hywia.calibration.reconstruction_rows; forward passes only). 512 at 0.2, seeds 0/1/2, the default
    # recovery: 107.2/116.8/117.4 (mean 113.8) against 109.4/117.7/119.5 (115.5) with the 128 calibration
    # rows (README Results, 2026-12-07). Not the default: on 2 CPU cores it adds 25-30 minutes to a prune.
    reconstruct_samples: int | None = None
    # Stage 3 (hywia.recovery): LoRA distillation from the dense model, merged before export.
    recover: str = "lora"
    recover_steps: int = RecoveryOptions.steps
    recover_lr: float = RecoveryOptions.lr
    recover_rank: int = RecoveryOptions.rank
    recover_data: str = SELF  # what the dense model writes (chat replies + own text), a text PATH, or 'self+PATH'
    recover_samples: int = 128
    recover_seq_len: int = 128  # its own: self replies need room for the prompt and a reply

    def __post_init__(self) -> None:
        if self.allocation is None:  # resolved here, so the cache key and the report hold the real choice
            object.__setattr__(self, "allocation", "global" if self.layout == "per-layer" else "even")
        validate_ratio(self.ratio)
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                flag = "--" + name.replace("_", "-")
                raise HywiaError(f"{flag} {value!r} is not one of {', '.join(allowed)}",
                                 f"choose one of: {', '.join(allowed)}")
        self._check_calibration()
        if self.chat_template is not None:
            render_sample_conversation(self.chat_template)
        self._check_layout()
        self._check_target()
        self._check_reconstruct_samples()
        validate_recovery_options(self.recover, self.recover_steps, self.recover_lr, self.recover_rank,
                                  self.recover_data)
        if self.recover != "none":
            for flag, value, least in (("--recover-samples", self.recover_samples, 1),
                                       ("--recover-seq-len", self.recover_seq_len, 64)):
                if value < least:
                    raise HywiaError(f"{flag} {value} must be at least {least}", f"e.g. {flag} 128")

    @property
    def has_target(self) -> bool:
        return self.target_memory is not None or self.target_params is not None

    def _check_calibration(self) -> None:
        if self.calibration == "self":
            return
        path = Path(self.calibration)
        if not path.exists():
            raise HywiaError(f"--calibration {self.calibration} does not exist",
                             "pass a text file, a directory of .txt files, or 'self'")
        if not path.is_absolute():  # the statistics and export caches key on this string
            raise HywiaError(f"calibration path {self.calibration!r} is relative",
                             "pass hywia.options.resolve_calibration(path) (the CLI does)")

    def _check_reconstruct_samples(self) -> None:
        if self.reconstruct_samples is None:
            return
        if self.reconstruct == "none":
            raise HywiaError("--reconstruct-samples sets the rows of the least-squares re-fit, which "
                             "--reconstruct none turns off", "drop --reconstruct-samples, or use --reconstruct ls")
        if not isinstance(self.reconstruct_samples, int) or self.reconstruct_samples < self.samples:
            raise HywiaError(f"--reconstruct-samples {self.reconstruct_samples} is below --samples {self.samples}: "
                             "the re-fit always uses the calibration rows, and more on top",
                             f"give at least {self.samples} (e.g. {4 * self.samples}), or leave it out")
        if self.reconstruct_samples == self.samples:  # the same rows as leaving it out: one cache key for both
            object.__setattr__(self, "reconstruct_samples", None)

    def _check_layout(self) -> None:
        if self.layout == "uniform":
            if self.protect_layers or self.allocation != "even":
                given = "--protect-layers" if self.protect_layers else f"--allocation {self.allocation}"
                raise HywiaError(f"{given} gives layers different widths, which the uniform layout cannot",
                                 "drop --layout uniform (per-layer is the default)")
            return
        if not self.protect_layers and self.allocation == "even":
            raise HywiaError("--allocation even needs --protect-layers first:K,last:M (otherwise every layer "
                             "keeps the same widths, which is --layout uniform)",
                             "e.g. --protect-layers first:4,last:2 (LLM-Pruner's recipe), or --allocation global")
        if self.protect_layers:
            parse_protected_layers(self.protect_layers)
        if not 0 <= self.min_keep < 1 or math.isnan(self.min_keep):
            raise HywiaError(f"--min-keep {self.min_keep} is outside [0, 1)",
                             "give the fraction of each layer's units global allocation must keep, e.g. 0.1")

    def _check_target(self) -> None:
        for flag, value in (("--max-model-len", self.max_model_len), ("--max-seqs", self.max_seqs)):
            if value is not None and value < 1:
                raise HywiaError(f"{flag} {value} must be at least 1")
        if not self.has_target:
            return
        if self.target_memory is not None and self.target_params is not None:
            raise HywiaError("--target-memory and --target-params both choose the ratio", "give one of them")
        if self.ratio != PruneOptions.ratio:
            raise HywiaError("--ratio and a target (--target-memory / --target-params) both set the ratio",
                             "drop --ratio: the target chooses it")
        if self.target_memory is not None:
            parse_size(self.target_memory)
            if self.max_seqs is None:
                raise HywiaError("--target-memory counts the KV cache of the sequences served at once, "
                                 "so it needs their number",
                                 "give --max-seqs N (hywia prune) or --max-num-seqs N (hywia serve)")
        else:
            parse_count(self.target_params)


# Fields with a fixed set of values (the CLI offers the same lists as choices).
CHOICES = {"importance": tuple(CRITERIA), "layout": LAYOUTS, "allocation": ALLOCATIONS,
           "normalize": NORMALISATIONS, "dtype": DTYPES, "reconstruct": RECONSTRUCTIONS,
           "recover": RECOVERY_MODES}


def resolve_calibration(calibration: str) -> str:
    """'self' as it is, else the absolute form of a user's path (what PruneOptions takes)."""
    return calibration if calibration == "self" else str(Path(calibration).expanduser().resolve())


def resolve_recovery_data(data: str) -> str:
    """'self', 'self-chat', 'self-text' as they are; a PATH or 'self+PATH' with the path made absolute
    (the export key holds it)."""
    sources = data_sources(data)
    if sources.path is None:
        return data
    absolute = str(sources.path.expanduser().resolve())
    return f"{SELF}+{absolute}" if sources.chat else absolute
