"""The pruning flags, shared verbatim by `hywia prune` and `hywia serve`, and the PruneOptions they make.

The served workload that --target-memory fits (tokens per sequence, sequences at once) is passed in
by each verb: `hywia prune` has its own --max-model-len / --max-seqs, `hywia serve` the serving
flags its engine then runs with.
"""

from __future__ import annotations

import argparse

from hywia.chat_templates import BUILTIN_TEMPLATES, resolve_chat_template
from hywia.devices import DEVICE_HELP
from hywia.errors import HywiaError
from hywia.options import (
    ALLOCATIONS,
    CHOICES,
    DTYPES,
    LAYOUTS,
    NORMALISATIONS,
    PruneOptions,
    resolve_calibration,
    resolve_recovery_data,
)
from hywia.recovery import RecoveryOptions
from hywia.sizes import COUNT_HELP, SIZE_HELP

BUILTIN_NAMES = ", ".join(BUILTIN_TEMPLATES)
# Measured on SmolLM2-135M, 2 CPU cores (the rank-64 row of benchmarks/results/recovery-sweep.json: 203 s for
# 50 steps; the data and targets took 262 s in recovery.md); shown in --help so the cost is known up front.
RECOVERY_COST = ("about 4 s a step at rank 64 for SmolLM2-135M on 2 CPU cores, plus 3-5 minutes for the dense "
                 "model's replies, own text and targets (benchmarks/results/recovery-sweep.json, 2026-12-05)")

# Measured 2026-12-07 (README Results; benchmarks/results/reconstruction-rows-2026-12-07.json), one-thread
# processes on 2 shared CPU cores.
RECONSTRUCT_ROWS_COST = ("Measured on SmolLM2-135M at 0.2, 3 seeds, default recovery: 512 gave WikiText-2 113.8 "
                         "against 115.5 with the 128 calibration rows (1.5%% lower), for 384 more rows of the "
                         "model's own text (13-21 minutes on 2 CPU cores) and a fit 4x as long (850-870 s "
                         "instead of 211 s) (README Results, 2026-12-07; with the earlier own-text openings of the "
                         "recovery data)")
# Measured 2026-12-07 (README Results; benchmarks/results/recovery-samples-2026-12-07.json), same setup.
RECOVER_ROWS_MEASURED = ("Measured on SmolLM2-135M at 0.2, 3 seeds, 50 steps: 512 gave WikiText-2 113.3 "
                         "against 115.5 with 128, one seed lower and two not (109.5/118.6/111.8 against "
                         "109.4/117.7/119.5), and 114.2 with 200 steps; chat within the usual spread (16 of 36); "
                         "the 512 rows took 32 minutes, three prunes sharing 2 CPU cores. Measured with the earlier "
                         "own-text openings: the prose openings alone took 128 rows to 113.0 (2026-12-07)")
# Measured 2026-12-07 (README Results; benchmarks/results/longer-budget-2026-12-07.json and
# longer-budget-rows-2026-12-07.json), up to five one-thread processes on 2 shared CPU cores.
LONGER_BUDGET_MEASURED = ("A longer budget, measured on SmolLM2-135M over 3 seeds: self+PATH (Gutenberg books) "
                          "with --recover-steps 200 gave WikiText-2 92.1 at 0.2 and 252.2 at 0.5, against 98.6 and "
                          "322.6 with the defaults; chat the same (14.3 of 36); 200 steps took 15-36 minutes on 2 "
                          "shared CPU cores. With --recover-samples 384 --recover-steps 300 as well: 88.3 at 0.2 "
                          "(chat 13.0 of 36), for 14 minutes of data and 32 of steps, three runs sharing 2 CPU cores. "
                          "PATH alone (1024 samples, 500 steps) gave no more (88.4) and one seed of three lost chat "
                          "(1 of 36 answered): for a chat model keep self in the mix (self+PATH)")


class _RatioAction(argparse.Action):
    """Stores --ratio and notes that it was given, so that a target given with it is refused (the
    default stays a float: `hywia serve` compares it with 0)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.ratio_given = True


def add_prune_arguments(parser, workload_flags: bool = False) -> None:
    """The pruning flags. WORKLOAD_FLAGS adds --max-model-len / --max-seqs (for a verb without its own)."""
    defaults = PruneOptions()
    group = parser.add_argument_group("pruning")
    group.add_argument("--ratio", type=float, default=defaults.ratio, action=_RatioAction,
                       help="fraction of the whole model's parameters to remove, in (0, 0.9] (default %(default)s). "
                            "For a chat model, measured on SmolLM2-135M-Instruct (36 factual questions, 3 seeds, "
                            "default pipeline): 0.1 kept 81%% of the dense model's right answers, 0.15 72%%, "
                            "0.2 57%% (README, Results 2026-12-08)")
    group.add_argument("--importance", choices=CHOICES["importance"], default=defaults.importance,
                       help="importance criterion (default %(default)s)")
    group.add_argument("--calibration", default=defaults.calibration,
                       help="'self' (text the model writes itself from varied openings, half of them "
                            "encyclopedia and news sentence starts: no dataset needed) or a text file / directory "
                            "of .txt files. SmolLM2 20%% pruned by the defaults: WikiText-2 98.6 with self (3 seeds, "
                            "2026-12-07; dense 55.5); Gutenberg books gave 101 at 21%% under an older pipeline "
                            "(1 seed, 2026-12-02; README, Results)")
    group.add_argument("--samples", type=int, default=defaults.samples, help="calibration sequences (default %(default)s)")
    group.add_argument("--seq-len", type=int, default=defaults.seq_len, help="calibration sequence length (default %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--layout", choices=LAYOUTS, default=defaults.layout,
                       help="per-layer: widths differ by layer (HywiaLlamaForCausalLM export, served by `hywia "
                            "serve` and by any vLLM where hywia is installed, through its plugin); uniform: every "
                            "layer keeps the same widths (stock LlamaForCausalLM export: use it for a vLLM without "
                            "hywia's plugin; lower quality at the same size) (default %(default)s)")
    group.add_argument("--protect-layers", default=None, metavar="first:K,last:M",
                       help="per-layer: keep these layers whole, the others share the removal "
                            "(with --allocation even, first:4,last:2 is LLM-Pruner's recipe)")
    group.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                       help="per-layer: 'global' (units ranked across layers by importance per parameter; the "
                            "default) or 'even' (unprotected layers lose alike; needs --protect-layers)")
    group.add_argument("--min-keep", type=float, default=defaults.min_keep,
                       help="global allocation keeps at least this fraction of every layer's KV groups and MLP "
                            "channels (default %(default)s)")
    group.add_argument("--align-heads", type=int, default=None,
                       help="kept KV groups per layer are a multiple of this (default 1, or the tensor-parallel size)")
    group.add_argument("--align-mlp", type=int, default=defaults.align_mlp, help="kept MLP channels per layer are a multiple of this")
    group.add_argument("--normalize", choices=NORMALISATIONS, default=defaults.normalize,
                       help="how fine and coarse scores are put on one scale before blending (default %(default)s)")
    group.add_argument("--dtype", choices=DTYPES, default=defaults.dtype,
                       help="dtype of the exported weights and, in `hywia serve` with vLLM, the dtype vLLM computes "
                            "in; auto: the source's own for the export, vLLM's choice for serving (on a CPU vLLM "
                            "computes float32 checkpoints in bfloat16) (default %(default)s)")
    group.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]", help=DEVICE_HELP + " (default auto)")
    group.add_argument("--chat-template", default=None, metavar="NAME|PATH",
                       help="chat template to serve with and to write into the export's tokenizer, as "
                            f"`vllm serve --chat-template` takes it: a Jinja file, or a built-in ({BUILTIN_NAMES}) "
                            "for checkpoints that ship none (LLaMA-1/2, Vicuna)")
    repair = parser.add_argument_group("repairing what pruning removed")
    repair.add_argument("--reconstruct", choices=CHOICES["reconstruct"], default=defaults.reconstruct,
                        help="ls: after cutting, re-fit the kept columns of o_proj and down_proj layer by layer "
                             "by ridge least squares on the calibration batch (no new parameters); none: plain "
                             "slicing (default %(default)s)")
    repair.add_argument("--reconstruct-samples", type=int, default=defaults.reconstruct_samples, metavar="N",
                        help="sequences the --reconstruct ls fit runs on: the calibration ones plus N − --samples "
                             "more of the same text (forward passes only, no gradients). Default: the calibration "
                             f"ones. {RECONSTRUCT_ROWS_COST}")
    repair.add_argument("--recover", choices=CHOICES["recover"], default=defaults.recover,
                        help="lora: distil the dense model into the pruned one with LoRA adapters, merged into "
                             "the weights before export (the export stays a plain checkpoint); none: skip "
                             "(default %(default)s)")
    repair.add_argument("--recover-steps", type=int, default=defaults.recover_steps,
                        help=f"LoRA steps of {RecoveryOptions.batch_size} sequences (default %(default)s; "
                             f"{RECOVERY_COST})")
    repair.add_argument("--recover-lr", type=float, default=defaults.recover_lr,
                        help="LoRA learning rate (default %(default)s)")
    repair.add_argument("--recover-rank", type=int, default=defaults.recover_rank,
                        help="LoRA rank (default %(default)s)")
    repair.add_argument("--recover-data", default=defaults.recover_data,
                        metavar="self|self-chat|self-text|PATH|self+PATH",
                        help="self: what the dense model writes, no dataset needed: its chat replies to built-in "
                             "instructions (self-chat) and its sampled continuations of encyclopedia and news "
                             "openings (self-text), half each; PATH: a text file or directory of .txt files; self+PATH: "
                             "self's two and the text, a third each (default %(default)s). " + LONGER_BUDGET_MEASURED)
    repair.add_argument("--recover-samples", type=int, default=defaults.recover_samples,
                        help=f"sequences the recovery trains on (default %(default)s). {RECOVER_ROWS_MEASURED}")
    repair.add_argument("--recover-seq-len", type=int, default=defaults.recover_seq_len,
                        help="tokens per recovery sequence: an instruction and the dense model's reply "
                             "(default %(default)s)")
    fit = parser.add_argument_group("fitting a memory or parameter budget (instead of --ratio)")
    fit.add_argument("--target-memory", default=None, metavar="SIZE",
                     help="choose the smallest ratio whose weights plus KV cache fit SIZE (" + SIZE_HELP + "); "
                          "needs the served workload: --max-model-len and --max-seqs"
                          + ("" if workload_flags else " (here: --max-model-len and --max-num-seqs)"))
    fit.add_argument("--target-params", default=None, metavar="N",
                     help="choose the smallest ratio that leaves at most N parameters (" + COUNT_HELP + ")")
    if workload_flags:
        fit.add_argument("--max-model-len", type=int, default=None,
                         help="tokens per sequence counted by --target-memory (default: the model's context length)")
        fit.add_argument("--max-seqs", type=int, default=None,
                         help="sequences served at once counted by --target-memory")
    group.add_argument("--cache-dir", default=None, help="cache directory (default $HYWIA_CACHE_DIR or ~/.cache/hywia)")
    group.add_argument("--allow-pickle", action="store_true",
                       help="allow loading pickle (.bin) weights; only for checkpoints you trust")


def options_from_args(args, *, max_model_len: int | None = None, max_seqs: int | None = None,
                      tensor_parallel_size: int = 1) -> PruneOptions:
    """PruneOptions from `add_prune_arguments` flags. MAX_MODEL_LEN / MAX_SEQS: the served workload,
    counted only by --target-memory (otherwise they would change the cache key for nothing).
    TENSOR_PARALLEL_SIZE: the default --align-heads, so that the export shards over that many GPUs."""
    target = args.target_memory is not None or args.target_params is not None
    if target and getattr(args, "ratio_given", False):
        flag = "--target-memory" if args.target_memory is not None else "--target-params"
        raise HywiaError(f"--ratio and {flag} both set the ratio", f"drop --ratio: {flag} chooses it")
    fits_memory = args.target_memory is not None
    return PruneOptions(
        ratio=PruneOptions.ratio if target else args.ratio, importance=args.importance,
        calibration=resolve_calibration(args.calibration), samples=args.samples, seq_len=args.seq_len,
        seed=args.seed, layout=args.layout,
        align_heads=args.align_heads if args.align_heads is not None else tensor_parallel_size,
        align_mlp=args.align_mlp, dtype=args.dtype, normalize=args.normalize,
        protect_layers=args.protect_layers, allocation=args.allocation, min_keep=args.min_keep,
        target_memory=args.target_memory, target_params=args.target_params,
        max_model_len=max_model_len if fits_memory else None, max_seqs=max_seqs if fits_memory else None,
        chat_template=resolve_chat_template(args.chat_template) if args.chat_template is not None else None,
        reconstruct=args.reconstruct, reconstruct_samples=args.reconstruct_samples,
        recover=args.recover, recover_steps=args.recover_steps,
        recover_lr=args.recover_lr, recover_rank=args.recover_rank,
        recover_data=resolve_recovery_data(args.recover_data), recover_samples=args.recover_samples,
        recover_seq_len=args.recover_seq_len,
    )
