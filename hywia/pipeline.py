"""The pruning pipeline end to end: source → calibration → scores → importance → plan → slice → export.

`prune_model` decides and cuts in memory; `prune_to_directory` also exports; `prepare_export` adds the
content-addressed cache that `hywia serve` starts from (a second start with the same options reuses
the export and prunes nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hywia import __version__
from hywia.cache import cache_root, move_aside, verify_manifest
from hywia.calibration import calibration_batch
from hywia.errors import HywiaError
from hywia.export import REPORT_NAME, check_output_dir, write_export
from hywia.importance import CRITERIA, GRADIENT_FREE, METHODS, ImportanceContext
from hywia.models import LoadedModel, load_model, resolve_source
from hywia.plan import PruningPlan, build_plan, uniform_keep_counts, validate_ratio
from hywia.scores import collect_statistics
from hywia.surgery import slice_model
from hywia.units import ATTENTION, MLP, count_parameters

log = logging.getLogger(__name__)

LAYOUTS = ("uniform",)
NORMALISATIONS = ("rank", "mean")
DTYPES = ("float32", "bfloat16", "float16")
# Modules whose code decides or writes the export: a change to any of them changes the cache key.
_DECIDING_MODULES = ("calibration", "scores", "fusion", "importance", "plan", "surgery", "export", "units")


@dataclass(frozen=True)
class PruneOptions:
    ratio: float = 0.2
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

    def validate(self) -> None:
        """Everything that can be checked before loading a model."""
        validate_ratio(self.ratio)
        _check_choice("--importance", self.importance, METHODS)
        _check_choice("--layout", self.layout, LAYOUTS)
        _check_choice("--normalize", self.normalize, NORMALISATIONS)
        _check_choice("--dtype", self.dtype, DTYPES)
        if self.calibration != "self" and not Path(self.calibration).expanduser().exists():
            raise HywiaError(f"--calibration {self.calibration} does not exist",
                             "pass a text file, a directory of .txt files, or 'self'")
        if self.calibration != "self":
            object.__setattr__(self, "calibration", str(Path(self.calibration).expanduser().resolve()))


@dataclass
class ExportResult:
    directory: Path
    report: dict
    cache_hit: bool
    seconds: float


def _check_choice(flag: str, value: str, allowed) -> None:
    if value not in allowed:
        raise HywiaError(f"{flag} {value!r} is not one of {', '.join(allowed)}", f"choose one of: {', '.join(allowed)}")


def code_version() -> str:
    """Package version plus a digest of the modules that decide or write the export."""
    import hywia

    digest = hashlib.sha256()
    package_dir = Path(hywia.__file__).parent
    for name in _DECIDING_MODULES:
        digest.update((package_dir / f"{name}.py").read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def prune_model(loaded: LoadedModel, options: PruneOptions, progress: bool = True) -> tuple[PruningPlan, dict]:
    """Decide the plan and slice `loaded.model` in place; returns the plan and the report."""
    options.validate()
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    timings = {}
    params_before = count_parameters(model)
    keep_counts = uniform_keep_counts(model, options.ratio, options.align_heads, options.align_mlp)
    keep = [keep_counts] * len(model.model.layers)

    stats, batch = None, None
    if options.importance not in GRADIENT_FREE:
        tick = time.perf_counter()
        batch = calibration_batch(options.calibration, tokenizer, model, options.samples, options.seq_len, options.seed)
        timings["calibration_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        stats = collect_statistics(model, batch, progress)
        timings["gradients_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    context = ImportanceContext(model=model, batch=batch, keep=keep, seed=options.seed,
                                normalize=options.normalize, progress=progress)
    importance = CRITERIA[options.importance](stats, context)
    timings["importance_s"] = time.perf_counter() - tick
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
        "ratio_requested": options.ratio,
        "ratio_achieved": 1 - params_after / params_before,
        "per_layer": [
            {"kv_groups_kept": len(p.kept(ATTENTION)), "kv_groups_before": before[0],
             "mlp_channels_kept": len(p.kept(MLP)), "mlp_channels_before": before[1],
             "params_removed_fraction": 1 - after / total}
            for p, before, after, total in zip(plan.layers, shapes_before, _layer_param_counts(model),
                                               [s[2] for s in shapes_before])
        ],
        "alpha": importance.alpha,
        "importance_details": importance.details,
        "plan": plan.to_dict(),
        "prune_seconds": time.perf_counter() - started,
        "timings": timings,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_accelerator_bytes": _peak_accelerator_bytes(),
    }
    log.info("pruned %s: %d → %d parameters (%.1f%% removed, %.1f s)", loaded.resolved.source, params_before,
             params_after, 100 * report["ratio_achieved"], report["prune_seconds"])
    return plan, report


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
    plan, report = prune_model(loaded, options, progress)
    write_export(loaded.model, loaded.tokenizer, plan, report, out_dir, dtype=options.dtype, replace=replace)
    return ExportResult(out_dir, report, cache_hit=False, seconds=time.perf_counter() - started)


def cache_key(source_digest: str, options: PruneOptions) -> str:
    fields = {"source": source_digest, "options": dataclasses.asdict(options), "code": code_version()}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def prepare_export(source: str | None, options: PruneOptions, cache_dir=None, allow_pickle: bool = False,
                   on_phase: Callable[[str], None] | None = None, progress: bool = True) -> ExportResult:
    """The cached export for (source content, options, code version): reused if intact, else built."""
    started = time.perf_counter()
    notify = on_phase or (lambda phase: None)
    options.validate()
    notify("loading")
    resolved = resolve_source(source, cache_dir, allow_pickle)
    key = cache_key(resolved.digest, options)
    name = f"{Path(resolved.source).name}-r{options.ratio:g}-{options.importance}-{key[:16]}"
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
    plan, report = prune_model(loaded, options, progress)
    notify("exporting")
    write_export(loaded.model, loaded.tokenizer, plan, report, target, dtype=options.dtype, replace=False)
    return ExportResult(target, report, cache_hit=False, seconds=time.perf_counter() - started)


def add_prune_arguments(parser) -> None:
    """The pruning flags, shared verbatim by `hywia prune` and `hywia serve`."""
    defaults = PruneOptions()
    group = parser.add_argument_group("pruning")
    group.add_argument("--ratio", type=float, default=defaults.ratio,
                       help="fraction of the whole model's parameters to remove, in (0, 0.9] (default %(default)s)")
    group.add_argument("--importance", choices=METHODS, default=defaults.importance,
                       help="importance criterion (default %(default)s)")
    group.add_argument("--calibration", default=defaults.calibration,
                       help="'self' (text the model writes itself) or a text file / directory of .txt files")
    group.add_argument("--samples", type=int, default=defaults.samples, help="calibration sequences (default %(default)s)")
    group.add_argument("--seq-len", type=int, default=defaults.seq_len, help="calibration sequence length (default %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--layout", choices=LAYOUTS, default=defaults.layout)
    group.add_argument("--align-heads", type=int, default=None,
                       help="kept KV groups per layer are a multiple of this (default 1, or the tensor-parallel size)")
    group.add_argument("--align-mlp", type=int, default=defaults.align_mlp, help="kept MLP channels per layer are a multiple of this")
    group.add_argument("--normalize", choices=NORMALISATIONS, default=defaults.normalize,
                       help="how fine and coarse scores are put on one scale before blending (default %(default)s)")
    group.add_argument("--dtype", choices=DTYPES, default=defaults.dtype, help="dtype of the exported weights")
    group.add_argument("--cache-dir", default=None, help="cache directory (default $HYWIA_CACHE_DIR or ~/.cache/hywia)")
    group.add_argument("--allow-pickle", action="store_true",
                       help="allow loading pickle (.bin) weights; only for checkpoints you trust")


def options_from_args(args) -> PruneOptions:
    return PruneOptions(
        ratio=args.ratio, importance=args.importance, calibration=args.calibration, samples=args.samples,
        seq_len=args.seq_len, seed=args.seed, layout=args.layout,
        align_heads=args.align_heads if args.align_heads is not None else getattr(args, "tensor_parallel_size", 1) or 1,
        align_mlp=args.align_mlp, dtype=args.dtype, normalize=args.normalize,
    )
