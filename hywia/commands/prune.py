"""`hywia prune SOURCE --ratio R --out DIR`: prune a model and export a dense checkpoint."""

from __future__ import annotations

from pathlib import Path

from hywia.pipeline import add_prune_arguments, options_from_args, prune_to_directory


def add_arguments(parser) -> None:
    parser.add_argument("source", nargs="?", default=None,
                        help="HF directory, .gguf file, hub id, or the default 'smollm2-135m-instruct'")
    parser.add_argument("--out", required=True, type=Path, help="export directory (new, empty, or a previous export)")
    add_prune_arguments(parser)


def run(args) -> int:
    result = prune_to_directory(args.source, options_from_args(args), args.out, cache_dir=args.cache_dir,
                                allow_pickle=args.allow_pickle)
    report = result.report
    print(f"exported {result.directory}")
    print(f"parameters: {report['params_before']:,} → {report['params_after']:,} "
          f"({100 * report['ratio_achieved']:.2f}% removed; requested {100 * report['ratio_requested']:.1f}%)")
    first = report["per_layer"][0]
    print(f"per layer: {first['kv_groups_kept']}/{first['kv_groups_before']} KV groups, "
          f"{first['mlp_channels_kept']}/{first['mlp_channels_before']} MLP channels "
          f"({100 * first['params_removed_fraction']:.1f}% of each layer)")
    print(f"pruning took {report['prune_seconds']:.1f} s; report: {result.directory / 'hywia_report.json'}")
    return 0
