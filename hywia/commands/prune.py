"""`hywia prune SOURCE --ratio R --out DIR`: prune a model and export a dense checkpoint."""

from __future__ import annotations

from pathlib import Path

from hywia.commands.flags import add_prune_arguments, options_from_args
from hywia.errors import HywiaError
from hywia.pipeline import prune_to_directory


def add_arguments(parser) -> None:
    parser.add_argument("source", nargs="?", default=None,
                        help="HF directory, .gguf file, hub id, or the default 'smollm2-135m-instruct'")
    parser.add_argument("--out", required=True, type=Path, help="export directory (new, empty, or a previous export)")
    add_prune_arguments(parser, workload_flags=True)


def run(args) -> int:
    if args.target_memory is None and (args.max_model_len, args.max_seqs) != (None, None):
        raise HywiaError("--max-model-len and --max-seqs describe the workload that --target-memory fits",
                         "add --target-memory SIZE, or drop them")
    options = options_from_args(args, max_model_len=args.max_model_len, max_seqs=args.max_seqs)
    result = prune_to_directory(args.source, options, args.out, cache_dir=args.cache_dir,
                                allow_pickle=args.allow_pickle, device=args.device)
    report = result.report
    if report.get("memory_fit"):
        print(report["memory_fit"]["explanation"])
    print(f"exported {result.directory}")
    print(f"parameters: {report['params_before']:,} → {report['params_after']:,} "
          f"({100 * report['ratio_achieved']:.2f}% removed; requested {100 * report['ratio_requested']:.1f}%)")
    print(describe_layers(report))
    print(f"pruning took {report['prune_seconds']:.1f} s; report: {result.directory / 'hywia_report.json'}")
    return 0


def describe_layers(report: dict) -> str:
    layers = report["per_layer"]
    first = layers[0]
    if report["layout"]["uniform"]:
        return (f"per layer: {first['kv_groups_kept']}/{first['kv_groups_before']} KV groups, "
                f"{first['mlp_channels_kept']}/{first['mlp_channels_before']} MLP channels "
                f"({100 * first['params_removed_fraction']:.1f}% of each layer)")
    lines = [f"per layer ({report['layout']['allocation']} allocation"
             + (f", layers {report['layout']['protected_layers']} protected" if report["layout"]["protected_layers"]
                else "") + "): KV groups, MLP channels kept, % of the layer removed"]
    lines += [f"  {i:3d}: {layer['kv_groups_kept']}/{layer['kv_groups_before']}  "
              f"{layer['mlp_channels_kept']:>6}/{layer['mlp_channels_before']}  "
              f"{100 * layer['params_removed_fraction']:5.1f}%" for i, layer in enumerate(layers)]
    return "\n".join(lines)
