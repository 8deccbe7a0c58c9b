"""The pruning pipeline end to end: source → calibration → scores → importance → budget → plan → slice → export.

Orchestration only: each decision is made in its own stage module. `prune_model` decides and cuts in
memory; `prune_to_directory` also exports; `prepare_export` adds the content-addressed cache that
`hywia serve` starts from (a second start with the same options reuses the export and prunes nothing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hywia import __version__
from hywia.budget import Allocator, Budget, allocator, protected_layers
from hywia.cache import PACKAGE_DIR, cache_root, code_digest, content_key, move_aside, verify_manifest
from hywia.calibration import calibration_batch, reconstruction_rows
from hywia.devices import MemoryMeter, resolve_device, source_dtype
from hywia.export import REPORT_NAME, check_output_dir, write_export
from hywia.importance import CRITERIA, ImportanceContext
from hywia.memory_fit import FitResult, Workload, choose_ratio, served_dtype
from hywia.models import LoadedModel, ResolvedSource, load_resolved, read_config, resolve_source
from hywia.options import PruneOptions
from hywia.plan import PruningPlan, build_plan
from hywia.quality import HELDOUT_SAMPLES, QualityProbe
from hywia.reconstruct import reconstruct
from hywia.recovery import recover
from hywia.recovery_data import recovery_batches, teacher_targets
from hywia.report import build_report, layer_sizes
from hywia.sizes import parse_count, parse_size
from hywia.statistics_cache import calibration_statistics
from hywia.stopping import PruningStopped, raise_if_stopped, stop_requests
from hywia.surgery import slice_model
from hywia.units import count_parameters, layer_shapes

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    directory: Path
    report: dict
    cache_hit: bool
    seconds: float


def prune_model(loaded: LoadedModel, options: PruneOptions, progress: bool = True,
                cache_dir=None, meter: MemoryMeter | None = None) -> tuple[PruningPlan, dict]:
    """Decide the plan and slice `loaded.model` in place; returns the plan and the report.

    Even shares (uniform, protected layers) know their keep counts from the shapes alone (and, with a
    target, choose the ratio before any calibration); global allocation knows them only once the
    units are scored, so a target is fitted after scoring there. A criterion whose scores depend on
    the keep counts (hybrid) is scored after them.
    `cache_dir`: where calibration statistics are cached (None: computed afresh, nothing written).
    `meter`: seconds and memory per stage (the caller's, when it measured loading too).
    Every long stage honours a stop request (hywia.stopping) between its units of work.
    """
    meter = meter or MemoryMeter()
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    timings = {}
    params_before = count_parameters(model)
    shapes = layer_shapes(model)
    protected = protected_layers(options.protect_layers, len(shapes))
    budget = Budget(tuple(shapes), params_before, tuple(protected), options.align_heads, options.align_mlp,
                    options.min_keep)
    config = model.config.to_dict()
    criterion = CRITERIA[options.importance]
    ratio, fit, keep = options.ratio, None, None
    if options.allocation == "even":
        allocate = allocator(budget)
        ratio, fit = _ratio(options, config, allocate, export_dtype(options, loaded))
        keep = allocate(ratio)

    stats, batch = None, None
    scoring = keep != budget.whole
    if scoring and criterion.needs_statistics:
        tick = time.perf_counter()
        with meter.stage("calibration_and_gradients"):
            batch, stats, statistics_cached = calibration_statistics(
                model, tokenizer, loaded.resolved.digest, options.calibration, options.samples, options.seq_len,
                options.seed, cache_dir=cache_dir, progress=progress)
        timings["calibration_and_gradients_s"] = time.perf_counter() - tick
        timings["statistics_cache_hit"] = statistics_cached
    tick = time.perf_counter()
    context = ImportanceContext(model=model, batch=batch, keep=keep, seed=options.seed,
                                normalize=options.normalize, progress=progress)
    importance = None
    if options.allocation == "global":
        with meter.stage("importance"):  # the scores first: global allocation ranks units by them
            if not criterion.needs_keep:
                importance = criterion.score(stats, context)
            comparable = criterion.comparable(stats, importance and importance.scores, shapes, options.normalize)
        allocate = allocator(budget, comparable)
        ratio, fit = _ratio(options, config, allocate, export_dtype(options, loaded))
        keep = allocate(ratio)
        scoring = keep != budget.whole
        context = dataclasses.replace(context, keep=keep)
        timings["allocation_s"] = time.perf_counter() - tick
    if importance is None and scoring:
        with meter.stage("importance"):
            importance = criterion.score(stats, context)
    timings["importance_s"] = time.perf_counter() - tick
    plan = build_plan(importance.scores, keep) if importance is not None else PruningPlan.whole(shapes)

    before = layer_sizes(model)
    # Held-out text the calibration batch never saw, measured dense now and pruned below (the report's quality).
    probe = QualityProbe.before_pruning(model, tokenizer, options.calibration, options.samples, options.seq_len,
                                        options.seed)
    removes = plan.keep_counts() != budget.whole
    # Recovery learns from the dense model: its replies and top-k targets are taken before any weight changes.
    recovery_inputs = None
    if options.recover != "none" and removes:
        with meter.stage("recovery_data"):
            recovery_inputs = _recovery_inputs(model, tokenizer, options, progress)
    stages = {}
    if options.reconstruct == "ls" and removes:
        if batch is None:  # gradient-free criteria drew no calibration batch
            batch = calibration_batch(options.calibration, tokenizer, model, options.samples, options.seq_len,
                                      options.seed)
        if options.reconstruct_samples is not None:
            with meter.stage("reconstruction_text"):  # more rows, written by the still-dense model
                batch = reconstruction_rows(options.calibration, tokenizer, model, batch,
                                            options.reconstruct_samples, options.seed, HELDOUT_SAMPLES)
        with meter.stage("reconstruction"):
            stages["reconstruction"] = reconstruct(model, plan, batch, progress=progress).to_dict()
    with meter.stage("slice"):
        slice_model(model, plan)
    if recovery_inputs is not None:
        with meter.stage("recovery"):
            stages["recovery"] = recover(
                model, *recovery_inputs, steps=options.recover_steps, lr=options.recover_lr,
                rank=options.recover_rank, seed=options.seed, progress=progress).to_dict()
    quality = probe.after_pruning(model)  # last: after every change to the weights
    report = build_report(
        source=loaded.resolved.source, source_digest=loaded.resolved.digest, options=options, ratio=ratio,
        params_before=params_before, params_after=count_parameters(model), protected=protected, fit=fit,
        plan=plan, importance=importance, before=before, after=layer_sizes(model), quality=quality,
        stages=stages, seconds=time.perf_counter() - started, timings=timings, memory=meter.summary())
    log.info("pruned %s: %d → %d parameters (%.1f%% removed, %.1f s)", loaded.resolved.source, params_before,
             report["params_after"], 100 * report["ratio_achieved"], report["prune_seconds"])
    return plan, report


def _recovery_inputs(dense_model, tokenizer, options: PruneOptions, progress: bool) -> tuple:
    """The recovery data (hywia.recovery_data) and the dense model's top-k targets on it."""
    data = recovery_batches(tokenizer, dense_model, options.recover_data, options.recover_samples,
                            options.recover_seq_len, options.seed, progress=progress)
    return data, teacher_targets(dense_model, data, progress=progress)


def _ratio(options: PruneOptions, config: dict, allocate: Allocator, dtype: str) -> tuple[float, FitResult | None]:
    """The ratio to prune at: the options' own, or the smallest that meets their target
    (memory_fit.choose_ratio for the options' workload, counting the weights in the dtype vLLM serves the
    export in; logs the arithmetic)."""
    if not options.has_target:
        return options.ratio, None
    context = config.get("max_position_embeddings")
    if options.target_memory is not None and options.max_model_len is None:
        log.info("--max-model-len not given: counting the model's context length, %s tokens (vLLM's default)",
                 context)
    workload = Workload(max_model_len=options.max_model_len or context or 2048, max_seqs=options.max_seqs or 1,
                        dtype=served_dtype(dtype))
    if options.target_memory is not None:
        result = choose_ratio(config, workload, target_memory=parse_size(options.target_memory), allocate=allocate)
    else:
        result = choose_ratio(config, workload, target_params=parse_count(options.target_params), allocate=allocate)
    log.info("fitting the %s target:\n%s", result.target, result.explanation())
    return result.ratio, result


def prune_to_directory(source: str | None, options: PruneOptions, out_dir: Path, cache_dir=None,
                       allow_pickle: bool = False, progress: bool = True, replace: bool = True,
                       device: str = "auto") -> ExportResult:
    """Load SOURCE on DEVICE, prune it, and write the export to `out_dir` (atomically)."""
    started = time.perf_counter()
    device = resolve_device(device)  # `--device cuda` without CUDA fails before anything is read
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    resolved = resolve_source(source, cache_dir, allow_pickle)
    report = _prune_and_export(resolved, options, out_dir, device=device, cache_dir=cache_dir,
                               allow_pickle=allow_pickle, progress=progress, replace=replace)
    return ExportResult(out_dir, report, cache_hit=False, seconds=time.perf_counter() - started)


def _prune_and_export(resolved: ResolvedSource, options: PruneOptions, out_dir: Path, *, device: str, cache_dir,
                      allow_pickle: bool, progress: bool, replace: bool,
                      notify: Callable[[str], None] = lambda phase: None) -> dict:
    """Load in the source's dtype on DEVICE, prune, and write the export in the export dtype, with the
    options' chat template (if any) in its tokenizer; returns the report."""
    meter = MemoryMeter()
    with meter.stage("load"):
        loaded = load_resolved(resolved, allow_pickle=allow_pickle, dtype="auto", device=device)
    if options.chat_template is not None:  # from here on the model chats in it (recovery's own replies too)
        loaded.tokenizer.chat_template = options.chat_template
    raise_if_stopped("loading the source")
    notify("pruning")
    plan, report = prune_model(loaded, options, progress, cache_root(cache_dir), meter)
    notify("exporting")
    write_export(loaded.model, loaded.tokenizer, plan, report, out_dir, dtype=export_dtype(options, loaded),
                 replace=replace)
    return report


def export_dtype(options: PruneOptions, loaded: LoadedModel) -> str:
    """--dtype, or with `auto` the dtype the source is stored in (a bf16 checkpoint exports bf16)."""
    return options.dtype if options.dtype != "auto" else source_dtype(read_config(loaded.resolved.directory))


def export_key(source_digest: str, options: PruneOptions, package_dir: Path = PACKAGE_DIR) -> str:
    """What names a cached export: the source's content, the options, and the code that decides and writes it."""
    return content_key({"source": source_digest, "options": dataclasses.asdict(options), "version": __version__,
                        "code": code_digest(package_dir)})


def prepare_export(resolved: ResolvedSource, options: PruneOptions, cache_dir=None, allow_pickle: bool = False,
                   on_phase: Callable[[str], None] | None = None, progress: bool = True,
                   device: str = "auto", should_stop: Callable[[], bool] | None = None) -> ExportResult:
    """The cached export for (source content, options, code): reused if intact, else built.
    RESOLVED comes from hywia.models.resolve_source, which hashed the source once; nothing here hashes it again.
    `should_stop`: polled by every pruning stage (`hywia serve` on SIGTERM); True raises
    hywia.stopping.PruningStopped within one unit of work, with nothing written to the cache."""
    started = time.perf_counter()
    device = resolve_device(device)
    notify = on_phase or (lambda phase: None)
    notify("loading")
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
    with stop_requests(should_stop):  # `hywia serve` on SIGTERM: every stage stops within one unit of work
        try:
            report = _prune_and_export(resolved, options, target, device=device, cache_dir=cache_dir,
                                       allow_pickle=allow_pickle, progress=progress, replace=False, notify=notify)
        except PruningStopped as stopped:
            log.warning("%s", stopped.problem)  # a server shutting down has stopped waiting for this thread
            raise
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
