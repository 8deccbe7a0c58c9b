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
from hywia.export import REPORT_NAME, check_output_dir, write_export
from hywia.importance import CRITERIA, ImportanceContext
from hywia.memory_fit import FitResult, Workload, choose_ratio
from hywia.models import LoadedModel, ResolvedSource, load_model, load_resolved
from hywia.options import PruneOptions
from hywia.plan import PruningPlan, build_plan
from hywia.quality import QualityProbe
from hywia.report import build_report, layer_sizes
from hywia.sizes import parse_count, parse_size
from hywia.statistics_cache import calibration_statistics
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
                cache_dir=None) -> tuple[PruningPlan, dict]:
    """Decide the plan and slice `loaded.model` in place; returns the plan and the report.

    Even shares (uniform, protected layers) know their keep counts from the shapes alone (and, with a
    target, choose the ratio before any calibration); global allocation knows them only once the
    units are scored, so a target is fitted after scoring there. A criterion whose scores depend on
    the keep counts (hybrid) is scored after them.
    `cache_dir`: where calibration statistics are cached (None: computed afresh, nothing written).
    """
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
        ratio, fit = _ratio(options, config, allocate)
        keep = allocate(ratio)

    stats, batch = None, None
    scoring = keep != budget.whole
    if scoring and criterion.needs_statistics:
        tick = time.perf_counter()
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
        if not criterion.needs_keep:
            importance = criterion.score(stats, context)
        comparable = criterion.comparable(stats, importance and importance.scores, shapes, options.normalize)
        allocate = allocator(budget, comparable)
        ratio, fit = _ratio(options, config, allocate)
        keep = allocate(ratio)
        scoring = keep != budget.whole
        context = dataclasses.replace(context, keep=keep)
        timings["allocation_s"] = time.perf_counter() - tick
    if importance is None and scoring:
        importance = criterion.score(stats, context)
    timings["importance_s"] = time.perf_counter() - tick
    plan = build_plan(importance.scores, keep) if importance is not None else PruningPlan.whole(shapes)

    before = layer_sizes(model)
    # Held-out text the calibration batch never saw, measured dense now and pruned below (the report's quality).
    probe = QualityProbe.before_pruning(model, tokenizer, options.calibration, options.samples, options.seq_len,
                                        options.seed)
    slice_model(model, plan)
    quality = probe.after_pruning(model)  # last: after every change to the weights
    report = build_report(
        source=loaded.resolved.source, source_digest=loaded.resolved.digest, options=options, ratio=ratio,
        params_before=params_before, params_after=count_parameters(model), protected=protected, fit=fit,
        plan=plan, importance=importance, before=before, after=layer_sizes(model), quality=quality,
        seconds=time.perf_counter() - started, timings=timings)
    log.info("pruned %s: %d → %d parameters (%.1f%% removed, %.1f s)", loaded.resolved.source, params_before,
             report["params_after"], 100 * report["ratio_achieved"], report["prune_seconds"])
    return plan, report


def _ratio(options: PruneOptions, config: dict, allocate: Allocator) -> tuple[float, FitResult | None]:
    """The ratio to prune at: the options' own, or the smallest that meets their target
    (memory_fit.choose_ratio for the options' workload and export dtype; logs the arithmetic)."""
    if not options.has_target:
        return options.ratio, None
    context = config.get("max_position_embeddings")
    if options.target_memory is not None and options.max_model_len is None:
        log.info("--max-model-len not given: counting the model's context length, %s tokens (vLLM's default)",
                 context)
    workload = Workload(max_model_len=options.max_model_len or context or 2048, max_seqs=options.max_seqs or 1,
                        dtype=options.dtype)
    if options.target_memory is not None:
        result = choose_ratio(config, workload, target_memory=parse_size(options.target_memory), allocate=allocate)
    else:
        result = choose_ratio(config, workload, target_params=parse_count(options.target_params), allocate=allocate)
    log.info("fitting the %s target:\n%s", result.target, result.explanation())
    return result.ratio, result


def prune_to_directory(source: str | None, options: PruneOptions, out_dir: Path, cache_dir=None,
                       allow_pickle: bool = False, progress: bool = True, replace: bool = True) -> ExportResult:
    """Load SOURCE, prune it, and write the export to `out_dir` (atomically)."""
    started = time.perf_counter()
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


def prepare_export(resolved: ResolvedSource, options: PruneOptions, cache_dir=None, allow_pickle: bool = False,
                   on_phase: Callable[[str], None] | None = None, progress: bool = True) -> ExportResult:
    """The cached export for (source content, options, code): reused if intact, else built.
    RESOLVED comes from hywia.models.resolve_source, which hashed the source once; nothing here hashes it again."""
    started = time.perf_counter()
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
    loaded = load_resolved(resolved, allow_pickle=allow_pickle)
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
