"""The pruning pipeline end to end: source → calibration → scores → importance → plan → slice → export.

`prune_model` decides and cuts in memory; `prune_to_directory` also exports; `prepare_export` adds the
content-addressed cache that `hywia serve` starts from (a second start with the same options reuses
the export and prunes nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hywia import __version__
from hywia.allocation import GlobalAllocation, comparable_scores, describe
from hywia.cache import PACKAGE_DIR, cache_root, code_digest, code_version, content_key, move_aside, verify_manifest
from hywia.errors import HywiaError
from hywia.export import REPORT_NAME, check_output_dir, write_export
from hywia.importance import CRITERIA, GRADIENT_FREE, METHODS, ImportanceContext
from hywia.memory_fit import (
    FitResult,
    Workload,
    choose_ratio,
    even_pruned_config,
    pruned_config,
)
from hywia.models import LoadedModel, load_model, resolve_source
from hywia.sizes import COUNT_HELP, SIZE_HELP, parse_count, parse_size
from hywia.plan import (
    KeepCounts,
    PruningPlan,
    build_plan,
    layer_keep_counts,
    layer_shapes,
    parse_protected_layers,
    protected_layers,
    validate_ratio,
)
from hywia.statistics_cache import calibration_statistics
from hywia.surgery import slice_model
from hywia.units import ATTENTION, MLP, count_parameters

log = logging.getLogger(__name__)

LAYOUTS = ("uniform", "per-layer")
ALLOCATIONS = ("even", "global")  # even: the unprotected layers share the removal alike
NORMALISATIONS = ("rank", "mean")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PruneOptions:
    ratio: float = 0.2  # ignored (and must stay at its default) when a target chooses the ratio
    importance: str = "hybrid"
    calibration: str = "self"
    samples: int = 32
    seq_len: int = 128
    seed: int = 0
    layout: str = "uniform"
    align_heads: int = 1
    align_mlp: int = 1
    dtype: str = "float32"
    normalize: str = "rank"
    # --layout per-layer: layers kept whole ("first:K,last:M"), and how the others share the removal.
    protect_layers: str | None = None
    allocation: str = "even"
    min_keep: float = 0.1  # global allocation: fraction of each layer's units of each kind kept at least
    # --target-memory SIZE / --target-params N: the smallest ratio that fits (hywia.memory_fit).
    target_memory: str | None = None
    target_params: str | None = None
    max_model_len: int | None = None  # None: the model's context length, as vLLM serves it by default
    max_seqs: int | None = None

    @property
    def has_target(self) -> bool:
        return self.target_memory is not None or self.target_params is not None

    def validate(self) -> None:
        """Everything that can be checked before loading a model."""
        validate_ratio(self.ratio)
        _check_choice("--importance", self.importance, METHODS)
        _check_choice("--layout", self.layout, LAYOUTS)
        _check_choice("--allocation", self.allocation, ALLOCATIONS)
        _check_choice("--normalize", self.normalize, NORMALISATIONS)
        _check_choice("--dtype", self.dtype, DTYPES)
        self._validate_layout()
        self._validate_target()
        if self.calibration != "self" and not Path(self.calibration).expanduser().exists():
            raise HywiaError(f"--calibration {self.calibration} does not exist",
                             "pass a text file, a directory of .txt files, or 'self'")
        if self.calibration != "self":
            object.__setattr__(self, "calibration", str(Path(self.calibration).expanduser().resolve()))

    def _validate_layout(self) -> None:
        if self.layout == "uniform":
            if self.protect_layers or self.allocation != "even":
                given = "--protect-layers" if self.protect_layers else f"--allocation {self.allocation}"
                raise HywiaError(f"{given} gives layers different widths, which the uniform layout cannot",
                                 "add --layout per-layer")
            return
        if not self.protect_layers and self.allocation == "even":
            raise HywiaError("--layout per-layer needs --protect-layers first:K,last:M or --allocation global "
                             "(otherwise every layer keeps the same and the layout is uniform)",
                             "e.g. --protect-layers first:4,last:2 (LLM-Pruner's recipe)")
        if self.protect_layers:
            parse_protected_layers(self.protect_layers)
        if not 0 <= self.min_keep < 1 or self.min_keep != self.min_keep:
            raise HywiaError(f"--min-keep {self.min_keep} is outside [0, 1)",
                             "give the fraction of each layer's units global allocation must keep, e.g. 0.1")

    def _validate_target(self) -> None:
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


@dataclass
class ExportResult:
    directory: Path
    report: dict
    cache_hit: bool
    seconds: float


def _check_choice(flag: str, value: str, allowed) -> None:
    if value not in allowed:
        raise HywiaError(f"{flag} {value!r} is not one of {', '.join(allowed)}", f"choose one of: {', '.join(allowed)}")


def prune_model(loaded: LoadedModel, options: PruneOptions, progress: bool = True,
                cache_dir=None) -> tuple[PruningPlan, dict]:
    """Decide the plan and slice `loaded.model` in place; returns the plan and the report.

    Uniform and protected-layers layouts know their keep counts from the shapes alone (and, with a
    target, choose the ratio before any calibration); global allocation knows them only once the
    units are scored (hywia.allocation), so a target is fitted after scoring there.
    `cache_dir`: where calibration statistics are cached (None: computed afresh, nothing written).
    """
    options.validate()
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    timings = {}
    params_before = count_parameters(model)
    shapes = layer_shapes(model)
    protected = protected_layers(options.protect_layers, len(shapes))
    config = model.config.to_dict()
    ratio, fit, keep = options.ratio, None, None
    if options.allocation == "even":
        if options.has_target:
            fit = _fit_target(options, config, lambda r: even_pruned_config(
                config, r, protected, options.align_heads, options.align_mlp))
            ratio = fit.ratio
        keep = _even_keep(shapes, params_before, ratio, protected, options)

    stats, batch = None, None
    scoring = keep is None or keep != [shape.whole for shape in shapes]
    if scoring and options.importance not in GRADIENT_FREE:
        tick = time.perf_counter()
        batch, stats, statistics_cached = calibration_statistics(
            model, tokenizer, loaded.resolved.digest, options.calibration, options.samples, options.seq_len,
            options.seed, cache_dir=cache_dir, progress=progress)
        timings["calibration_and_gradients_s"] = time.perf_counter() - tick
        timings["statistics_cache_hit"] = statistics_cached
    tick = time.perf_counter()
    # Only `hybrid` reads `keep` (its fusion trains at those counts); global allocation scores first.
    context = ImportanceContext(model=model, batch=batch, keep=keep, seed=options.seed,
                                normalize=options.normalize, progress=progress)
    importance = None
    if options.allocation == "global":
        if options.importance != "hybrid":
            importance = CRITERIA[options.importance](stats, context)
        comparable = comparable_scores(options.importance, shapes, options.normalize,
                                       importance and importance.scores, stats and stats.fine, stats and stats.coarse)
        allocation = GlobalAllocation(comparable, shapes, params_before, protected, options.min_keep,
                                      options.align_heads, options.align_mlp)
        if options.has_target:
            fit = _fit_target(options, config, lambda r: pruned_config(config, allocation.keep_counts(r)))
            ratio = fit.ratio
        keep = allocation.keep_counts(ratio) if ratio else [shape.whole for shape in shapes]
        scoring = keep != [shape.whole for shape in shapes]
        context = dataclasses.replace(context, keep=keep)
        timings["allocation_s"] = time.perf_counter() - tick
    if importance is None and scoring:
        importance = CRITERIA[options.importance](stats, context)
    timings["importance_s"] = time.perf_counter() - tick
    if importance is None:  # the target fits unpruned: keep everything
        plan = PruningPlan.whole(shapes)
    else:
        plan = build_plan(importance.scores, keep)
    shapes_before = _layer_shapes(model)
    slice_model(model, plan)
    params_after = count_parameters(model)
    report = {
        "hywia_version": __version__,
        "code_version": code_version(),
        "source": loaded.resolved.source,
        "source_digest": loaded.resolved.digest,
        "options": dataclasses.asdict(options),
        "params_before": params_before,
        "params_after": params_after,
        "ratio_requested": ratio,
        "ratio_achieved": 1 - params_after / params_before,
        "layout": {"layout": options.layout, "uniform": plan.is_uniform, "allocation": options.allocation,
                   "protected_layers": protected,
                   **({"min_keep": options.min_keep, "ranking": describe(options.importance, options.normalize)}
                      if options.allocation == "global" else {})},
        "memory_fit": fit.to_dict() if fit is not None else None,
        "per_layer": [
            {"kv_groups_kept": len(p.kept(ATTENTION)), "kv_groups_before": before[0],
             "mlp_channels_kept": len(p.kept(MLP)), "mlp_channels_before": before[1],
             "params_removed_fraction": 1 - after / total}
            for p, before, after, total in zip(plan.layers, shapes_before, _layer_param_counts(model),
                                               [s[2] for s in shapes_before])
        ],
        "alpha": importance.alpha if importance else None,
        "importance_details": importance.details if importance else {},
        "plan": plan.to_dict(),
        "prune_seconds": time.perf_counter() - started,
        "timings": timings,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_accelerator_bytes": _peak_accelerator_bytes(),
    }
    log.info("pruned %s: %d → %d parameters (%.1f%% removed, %.1f s)", loaded.resolved.source, params_before,
             params_after, 100 * report["ratio_achieved"], report["prune_seconds"])
    return plan, report


def _even_keep(shapes, total_params: int, ratio: float, protected: list[int], options: PruneOptions) -> list[KeepCounts]:
    if ratio == 0:  # a target the dense model already fits
        return [shape.whole for shape in shapes]
    return layer_keep_counts(shapes, total_params, ratio, protected, options.align_heads, options.align_mlp)


def _fit_target(options: PruneOptions, config: dict, shape_for_ratio) -> FitResult:
    """memory_fit.choose_ratio for the options' target, workload and export dtype; logs the arithmetic."""
    context = config.get("max_position_embeddings")
    if options.target_memory is not None and options.max_model_len is None:
        log.info("--max-model-len not given: counting the model's context length, %s tokens (vLLM's default)",
                 context)
    workload = Workload(max_model_len=options.max_model_len or context or 2048, max_seqs=options.max_seqs or 1,
                        dtype=options.dtype)
    if options.target_memory is not None:
        result = choose_ratio(config, workload, target_memory=parse_size(options.target_memory),
                              shape_for_ratio=shape_for_ratio)
    else:
        result = choose_ratio(config, workload, target_params=parse_count(options.target_params),
                              shape_for_ratio=shape_for_ratio)
    log.info("fitting the %s target:\n%s", result.target, result.explanation())
    return result


def _layer_shapes(model) -> list[tuple[int, int, int]]:
    return [(layer.self_attn.k_proj.out_features // layer.self_attn.head_dim, layer.mlp.down_proj.in_features,
             sum(p.numel() for p in layer.parameters())) for layer in model.model.layers]


def _layer_param_counts(model) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]


def _peak_accelerator_bytes() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def prune_to_directory(source: str | None, options: PruneOptions, out_dir: Path, cache_dir=None,
                       allow_pickle: bool = False, progress: bool = True, replace: bool = True) -> ExportResult:
    """Load SOURCE, prune it, and write the export to `out_dir` (atomically)."""
    started = time.perf_counter()
    options.validate()
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    loaded = load_model(source, cache_dir=cache_dir, allow_pickle=allow_pickle)
    plan, report = prune_model(loaded, options, progress, cache_root(cache_dir))
    write_export(loaded.model, loaded.tokenizer, plan, report, out_dir, dtype=options.dtype, replace=replace)
    return ExportResult(out_dir, report, cache_hit=False, seconds=time.perf_counter() - started)


def export_key(source_digest: str, options: PruneOptions, package_dir: Path = PACKAGE_DIR) -> str:
    """What names a cached export: the source's content, the options, and the code that decides and writes it."""
    return content_key({"source": source_digest, "options": dataclasses.asdict(options), "version": __version__,
                        "code": code_digest(package_dir)})


def prepare_export(source: str | None, options: PruneOptions, cache_dir=None, allow_pickle: bool = False,
                   on_phase: Callable[[str], None] | None = None, progress: bool = True) -> ExportResult:
    """The cached export for (source content, options, code version): reused if intact, else built."""
    started = time.perf_counter()
    notify = on_phase or (lambda phase: None)
    options.validate()
    notify("loading")
    resolved = resolve_source(source, cache_dir, allow_pickle)
    key = export_key(resolved.digest, options)
    name = f"{Path(resolved.source).name}-{_export_label(options)}-{options.importance}-{key[:16]}"
    target = cache_root(cache_dir) / "exports" / name
    if target.exists():
        problem = verify_manifest(target)
        if problem is None:
            log.info("export cache hit: %s", target)
            report = json.loads((target / REPORT_NAME).read_text())
            return ExportResult(target, report, cache_hit=True, seconds=time.perf_counter() - started)
        move_aside(target, problem)
    log.info("export cache miss: pruning %s into %s", resolved.source, target)
    loaded = load_model(str(resolved.directory), cache_dir=cache_dir, allow_pickle=allow_pickle)
    loaded.resolved = resolved
    notify("pruning")
    plan, report = prune_model(loaded, options, progress, cache_root(cache_dir))
    notify("exporting")
    write_export(loaded.model, loaded.tokenizer, plan, report, target, dtype=options.dtype, replace=False)
    return ExportResult(target, report, cache_hit=False, seconds=time.perf_counter() - started)


def _export_label(options: PruneOptions) -> str:
    """A readable part of the cache directory's name (the key decides identity)."""
    if options.target_memory is not None:
        label = "mem" + options.target_memory
    elif options.target_params is not None:
        label = "params" + options.target_params
    else:
        label = f"r{options.ratio:g}"
    if options.layout != "uniform":
        label += "-" + ("global" if options.allocation == "global" else "protect" + (options.protect_layers or ""))
    return re.sub(r"[^A-Za-z0-9.+]+", "", label)


class _RatioAction(argparse.Action):
    """Stores --ratio and notes that it was given, so that a target given with it is refused (the
    default stays a float: `hywia serve` compares it with 0)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.ratio_given = True


def add_prune_arguments(parser, workload_flags: bool = False) -> None:
    """The pruning flags, shared verbatim by `hywia prune` and `hywia serve`."""
    defaults = PruneOptions()
    group = parser.add_argument_group("pruning")
    group.add_argument("--ratio", type=float, default=defaults.ratio, action=_RatioAction,
                       help="fraction of the whole model's parameters to remove, in (0, 0.9] (default %(default)s)")
    group.add_argument("--importance", choices=METHODS, default=defaults.importance,
                       help="importance criterion (default %(default)s)")
    group.add_argument("--calibration", default=defaults.calibration,
                       help="'self' (text the model writes itself) or a text file / directory of .txt files")
    group.add_argument("--samples", type=int, default=defaults.samples, help="calibration sequences (default %(default)s)")
    group.add_argument("--seq-len", type=int, default=defaults.seq_len, help="calibration sequence length (default %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--layout", choices=LAYOUTS, default=defaults.layout,
                       help="uniform: every layer keeps the same widths (stock LlamaForCausalLM export); per-layer: "
                            "widths differ by layer (HywiaLlamaForCausalLM export; needs --protect-layers or "
                            "--allocation global) (default %(default)s)")
    group.add_argument("--protect-layers", default=None, metavar="first:K,last:M",
                       help="per-layer: keep these layers whole, the others share the removal "
                            "(first:4,last:2 is LLM-Pruner's recipe)")
    group.add_argument("--allocation", choices=ALLOCATIONS, default=defaults.allocation,
                       help="per-layer: 'even' (unprotected layers lose alike) or 'global' (units ranked across "
                            "layers by importance per parameter) (default %(default)s)")
    group.add_argument("--min-keep", type=float, default=defaults.min_keep,
                       help="global allocation keeps at least this fraction of every layer's KV groups and MLP "
                            "channels (default %(default)s)")
    group.add_argument("--align-heads", type=int, default=None,
                       help="kept KV groups per layer are a multiple of this (default 1, or the tensor-parallel size)")
    group.add_argument("--align-mlp", type=int, default=defaults.align_mlp, help="kept MLP channels per layer are a multiple of this")
    group.add_argument("--normalize", choices=NORMALISATIONS, default=defaults.normalize,
                       help="how fine and coarse scores are put on one scale before blending (default %(default)s)")
    group.add_argument("--dtype", choices=DTYPES, default=defaults.dtype, help="dtype of the exported weights")
    fit = parser.add_argument_group("fitting a memory or parameter budget (instead of --ratio)")
    fit.add_argument("--target-memory", default=None, metavar="SIZE",
                     help="choose the smallest ratio whose weights plus KV cache fit SIZE ("
                          + SIZE_HELP + "); "
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


def options_from_args(args) -> PruneOptions:
    """PruneOptions from `add_prune_arguments` flags. The --target-memory workload comes from
    --max-model-len / --max-seqs (hywia prune) or the serving flags --max-model-len / --max-num-seqs
    (hywia serve), which are the values the engine then runs with."""
    target = args.target_memory is not None or args.target_params is not None
    if target and getattr(args, "ratio_given", False):
        flag = "--target-memory" if args.target_memory is not None else "--target-params"
        raise HywiaError(f"--ratio and {flag} both set the ratio", f"drop --ratio: {flag} chooses it")
    max_model_len = getattr(args, "max_model_len", None)
    max_seqs = getattr(args, "max_seqs", None) if hasattr(args, "max_seqs") else getattr(args, "max_num_seqs", None)
    if hasattr(args, "max_seqs") and args.target_memory is None and (max_model_len or max_seqs) is not None:
        raise HywiaError("--max-model-len and --max-seqs describe the workload that --target-memory fits",
                         "add --target-memory SIZE, or drop them")
    return PruneOptions(
        ratio=PruneOptions.ratio if target else args.ratio, importance=args.importance, calibration=args.calibration,
        samples=args.samples, seq_len=args.seq_len, seed=args.seed, layout=args.layout,
        align_heads=args.align_heads if args.align_heads is not None else getattr(args, "tensor_parallel_size", 1) or 1,
        align_mlp=args.align_mlp, dtype=args.dtype, normalize=args.normalize,
        protect_layers=args.protect_layers, allocation=args.allocation, min_keep=args.min_keep,
        target_memory=args.target_memory, target_params=args.target_params,
        max_model_len=max_model_len if args.target_memory is not None else None,
        max_seqs=max_seqs if args.target_memory is not None else None,
    )
